"""
ACT on parity over training: the error and the ponder cost at every evaluation of one or more train.py
runs (--model act --task parity), drawn from their log.jsonl, one line per run; and, from each run's
last checkpoint, how long a training batch waits for its slowest vector, and the error (and mean N)
by how many entries of the vector are set, in four equal ranges.

    python reproduce.py act_parity64 && python reproduce.py rnn_parity64
    python experiments/act_curves.py --runs out/reproduce/act_parity64/tau=1e-3/s0,out/reproduce/rnn_parity64/s0 \\
        --out docs/act_parity64_curves.png

Batch wait: the ponder loop of a batch runs until its last vector halts, so every vector's cell is
computed max_b N_b times (the halted ones' results are thrown away) where N_b updates were needed.
For --wait_batches training batches of the run's batch size this prints the mean N over vectors, the
mean over batches of the largest N, and their ratio: the share of cell updates a batch computes for
nothing is 1 - mean / max. The figure's error is err@SIZE (% wrong on the run's fixed test vectors)
and its ponder rho = N + R (Graves Eq. 10), as metrics.json.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from act import ACT, ACTConfig  # noqa: E402
from data import TASKS  # noqa: E402
from train import UserError, check_png_out, line_chart, load_checkpoint, run_command, text_image, write_png  # noqa: E402

COLORS = (((200, 60, 40), "RED"), ((70, 110, 190), "BLUE"), ((60, 150, 70), "GREEN"), ((150, 90, 170), "PURPLE"),
          ((220, 140, 30), "ORANGE"), ((90, 90, 90), "GREY"))


def read_run(run):
    """(size, eval steps, err, ponder) from a parity run's log.jsonl."""
    log = os.path.join(run, "log.jsonl")
    if not os.path.exists(log):
        raise UserError(f"{run} has no log.jsonl: train it first (python reproduce.py act_parity64)")
    evals = [r for r in map(json.loads, open(log)) if any(k.startswith("err@") for k in r)]
    if not evals:
        raise UserError(f"{log} holds no evaluation yet (no err@SIZE record): let the run reach its first one")
    size = next(k for k in evals[0] if k.startswith("err@"))[4:]
    return size, [r["iter"] for r in evals], [r[f"err@{size}"] for r in evals], [r[f"ponder@{size}"] for r in evals]


@torch.no_grad()
def batch_wait(run, batches, seed=0):
    """Mean N over the vectors of `batches` training batches, the mean of each batch's largest N, and the
    run's batch size, from the run's checkpoint; None for a run without ACT (one update per input)."""
    ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"), "act", "parity")
    if not ckpt["model_config"].get("act", True):
        return None
    model = ACT(ACTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    task_cfg_cls, task_cls = TASKS["parity"]
    task = task_cls(task_cfg_cls(**ckpt["task_config"]))
    batch_size = ckpt["train_config"]["batch_size"]
    generator = torch.Generator().manual_seed(seed)
    means, maxes = [], []
    for _ in range(batches):
        steps = model(task.train_batch(batch_size, generator)["x"])[1]["steps"].float()  # (B, T): N per input
        means.append(steps.mean().item())
        maxes.append(steps.max(0).values.mean().item())  # the loop runs the largest N at each input step
    return sum(means) / batches, sum(maxes) / batches, batch_size


@torch.no_grad()
def error_by_length(run, vectors, parts=4, seed=1):
    """The run's error (%) and mean N on `vectors` fresh vectors, split by how many entries are set into
    `parts` equal ranges: [(first k, last k, err, mean N or None without ACT)], as the paper's Fig. 6
    splits ponder by difficulty."""
    ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"), "act", "parity")
    model = ACT(ACTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    task_cfg_cls, task_cls = TASKS["parity"]
    task = task_cls(task_cfg_cls(**ckpt["task_config"]))
    generator, size = torch.Generator().manual_seed(seed), task.config.input_size
    set_k, wrong, steps = [], [], []
    for start in range(0, vectors, 512):
        batch = task.train_batch(min(512, vectors - start), generator)
        logits, internals = model(batch["x"])
        set_k.append((batch["x"][:, 0] != 0).sum(-1))
        wrong.append(((logits > 0).float() != batch["y"]).float().view(-1))
        steps.append(internals["steps"].float().view(-1) if "steps" in internals else torch.ones_like(wrong[-1]))
    set_k, wrong, steps = torch.cat(set_k), torch.cat(wrong), torch.cat(steps)
    rows, act = [], ckpt["model_config"].get("act", True)
    for part in range(parts):
        lo, hi = part * size // parts + 1, (part + 1) * size // parts
        chosen = (set_k >= lo) & (set_k <= hi)
        if chosen.any():
            rows.append((lo, hi, 100 * wrong[chosen].mean().item(), steps[chosen].mean().item() if act else None))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated run folders of --model act --task parity")
    parser.add_argument("--labels", default="", help="comma-separated names for the legend (default: the folders)")
    parser.add_argument("--out", default="act_curves.png", help="the PNG to write")
    parser.add_argument("--top_ponder", type=float, default=8.0, help="the ponder chart's y range: 0 to this")
    parser.add_argument("--wait_batches", type=int, default=20, help="training batches for the batch-wait count (0: skip)")
    parser.add_argument("--length_vectors", type=int, default=4096,
                        help="fresh vectors for the error by number of set entries (0: skip)")
    args = parser.parse_args(argv)
    check_png_out(args.out)
    runs = [r for r in args.runs.split(",") if r]
    labels = [s for s in args.labels.split(",") if s] or [os.path.relpath(r, "out/reproduce") if "out/reproduce" in r
                                                          else r for r in runs]
    if not runs or len(runs) > len(COLORS) or len(labels) != len(runs):
        raise UserError(f"--runs takes 1 to {len(COLORS)} folders, and --labels as many names as --runs")
    if args.top_ponder <= 0 or args.wait_batches < 0 or args.length_vectors < 0:
        raise UserError("--top_ponder must be above 0, and --wait_batches and --length_vectors at least 0")
    data = [read_run(r) for r in runs]
    if len({d[0] for d in data}) > 1:
        raise UserError(f"the runs test different sizes ({', '.join(sorted({d[0] for d in data}))}): draw one size at a time")
    size = data[0][0]
    xs = max((d[1] for d in data), key=len)  # a shorter run (stopped when solved) draws only its part
    if any(d[1] != xs[:len(d[1])] for d in data):
        raise UserError("the runs evaluate at different steps (--eval_interval): draw runs of one protocol")
    width = 420
    charts = []
    for title, axis, index, top in ((f"TEST ERROR, {size} ELEMENTS, IN PERCENT", "Y 0-50, GRID 12.5; CHANCE 50", 2, 50.0),
                                    ("PONDER COST RHO = N + R", f"Y 0-{args.top_ponder:g}, GRID {args.top_ponder / 4:g}",
                                     3, args.top_ponder)):
        plot = line_chart(xs, [(d[index], color) for d, (color, _) in zip(data, COLORS)], width=width, height=220,
                          top=top)
        charts.append(torch.cat([text_image(title, width=width), text_image(axis, width=width), plot,
                                 text_image(f"X: 0-{xs[-1] / 1000:.0f}K STEPS", width=width)], dim=0))
    gap = torch.full((charts[0].shape[0], 16, 3), 255, dtype=torch.uint8)
    row = torch.cat([charts[0], gap, charts[1]], dim=1)
    legend = [text_image(f"{name}: {label.upper()}", width=row.shape[1]) for (_, name), label in zip(COLORS, labels)]
    write_png(args.out, torch.cat([text_image(f"ACT ON {size}-ELEMENT PARITY OVER TRAINING", width=row.shape[1]),
                                   *legend, row], dim=0))
    print(f"wrote {args.out}")
    for run, label, (_, steps, err, ponder) in zip(runs, labels, data):
        line = f"{label}: err@{size} {err[-1]:.1f} % and ponder {ponder[-1]:.2f} at step {steps[-1]}"
        under = [s for s, e in zip(steps, err) if e < 2.0]
        line += f"; first under 2 % at step {under[0]}" if under else "; never under 2 %"
        wait = batch_wait(run, args.wait_batches) if args.wait_batches else None
        if wait:
            mean, most, batch_size = wait
            line += (f"; batch wait over {args.wait_batches} batches of {batch_size}: mean N {mean:.2f}, largest N per "
                     f"batch {most:.2f} on average, {100 * (1 - mean / most):.0f} % of cell updates computed for nothing")
        print(line)
        if args.length_vectors:
            parts = error_by_length(run, args.length_vectors)
            print(f"{label}: error by number of set entries: " + ", ".join(
                f"{lo}-{hi} {err:.1f} %" + (f" (mean N {n:.2f})" if n is not None else "") for lo, hi, err, n in parts))


if __name__ == "__main__":
    run_command(main)
