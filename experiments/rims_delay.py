"""
Which RIMs modules hold the copied symbols through the delay? For a train.py run of --model rims
--task copy_delay, this runs the test sequences of each delay and reports, per module, how often it
updates during the delay (the blanks between the last symbol and the delimiter) and in how many
sequences it stays inactive on every delay step, i.e. keeps its state bit for bit however long the
delay is (RIMs, section 2.3). The paper's claim that RIMs copy at delay 200 after training at 50
rests on such modules: a module that updates during the delay can forget; one that never does
cannot.

    python train.py --model rims --task copy_delay --delay 20 --eval_delays 20,80,200 --out_dir out/rims_copy
    python experiments/rims_delay.py --out_dir out/rims_copy                     # the run's test delays

Reads <out_dir>/ckpt.pt and the task's settings from it; writes <out_dir>/delay.json with flat keys
acc@T (recall accuracy, %), active@T/m<k> (fraction of delay steps module k updates) and
frozen@T/m<k> (fraction of sequences in which module k never updates during the delay), and prints
one line per delay.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import TASKS  # noqa: E402
from rims import RIMs, RIMsConfig  # noqa: E402
from train import UserError, atomic_write, load_checkpoint, run_command  # noqa: E402


@torch.no_grad()
def delay_activity(model, task, delay, samples, batch_size, seed=0):
    """Recall accuracy (%) at this delay, and per module the fraction of delay steps it is active and
    the fraction of sequences in which it is inactive on every delay step."""
    length = task.config.length
    generator = torch.Generator().manual_seed(seed)
    right, active_steps, frozen, count = 0.0, 0.0, 0.0, 0
    for start in range(0, samples, batch_size):
        batch = task.make_batch(min(batch_size, samples - start), generator, delay=delay)
        logits, internals = model(batch["x"], return_internals=True)
        mask = batch["mask"].bool()
        right += (logits.argmax(-1) == batch["y"])[mask].float().sum().item() / length
        during = internals["active_modules"][:, length: length + delay - 1]  # (B, delay - 1, M): the blanks
        active_steps = active_steps + during.mean(1).sum(0)
        frozen = frozen + (during.sum(1) == 0).float().sum(0)
        count += len(batch["y"])
    return 100.0 * right / count, (active_steps / count).tolist(), (frozen / count).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/rims_copy_delay", help="a train.py run of --model rims --task copy_delay")
    parser.add_argument("--delays", default="", help="comma-separated (default: the run's eval_delays)")
    parser.add_argument("--samples", type=int, default=512, help="test sequences per delay")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "rims", "copy_delay")
    task_cfg_cls, task_cls = TASKS["copy_delay"]
    task = task_cls(task_cfg_cls(**ckpt["task_config"]))
    try:
        delays = [int(d) for d in args.delays.split(",") if d] or list(task.config.eval_delays)
    except ValueError:
        raise UserError(f"--delays takes comma-separated integers, got {args.delays!r}")
    if min(delays) < 2 or args.samples < 1 or args.batch_size < 1:
        raise UserError("--delays must be at least 2, --samples and --batch_size at least 1")
    model = RIMs(RIMsConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    results = {"trained_delay": task.config.delay, "samples": args.samples}
    for delay in delays:
        acc, active, frozen = delay_activity(model, task, delay, args.samples, args.batch_size)
        results[f"acc@{delay}"] = acc
        results.update({f"active@{delay}/m{k}": a for k, a in enumerate(active)})
        results.update({f"frozen@{delay}/m{k}": f for k, f in enumerate(frozen)})
        print(f"delay {delay:4d}: acc {acc:5.1f} %; active during the delay "
              f"{' '.join(f'{a:.2f}' for a in active)}; frozen through it {' '.join(f'{f:.2f}' for f in frozen)}")
    atomic_write(os.path.join(args.out_dir, "delay.json"), json.dumps(results, indent=2))
    print(f"wrote {os.path.join(args.out_dir, 'delay.json')}")
    return results


if __name__ == "__main__":
    run_command(main)
