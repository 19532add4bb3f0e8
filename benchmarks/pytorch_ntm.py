"""
Times the most used public PyTorch NTM, loudinthecloud/pytorch-ntm, the same way bench.py times
ours: one copy-task training step on length-20 sequences (21 input steps, 20 output steps),
3 warm-up steps, then the median of 5 runs of 20 steps. The step is that repository's own
`train.train_batch` on the model, loss and optimizer its copy task builds (LSTM controller 100,
one read and one write head, memory 128 x 20, RMSprop).

    git clone https://github.com/loudinthecloud/pytorch-ntm /tmp/pytorch-ntm   # we used 3c64937
    pip install attrs
    python benchmarks/pytorch_ntm.py --repo /tmp/pytorch-ntm
    python bench.py --models ntm --batch_sizes 1,16            # ours, same machine, same threads

Two shims, in memory only, let its 2018 code run today: attrs 19.2 renamed attrib(convert=) to
converter=, and its train.py imports argcomplete, used only by its command line.
"""

import argparse
import json
import statistics
import sys
import time
import types


def install_shims():
    import attr

    original = attr.attrib

    def attrib(*args, **kwargs):
        if "convert" in kwargs:
            kwargs["converter"] = kwargs.pop("convert")
        return original(*args, **kwargs)

    attr.attrib = attr.ib = attrib
    if "argcomplete" not in sys.modules:
        try:
            import argcomplete  # noqa: F401
        except ImportError:
            sys.modules["argcomplete"] = types.SimpleNamespace(autocomplete=lambda *a, **k: None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True, help="a checkout of loudinthecloud/pytorch-ntm")
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--length", type=int, default=20)
    args = parser.parse_args()
    install_shims()
    sys.path.insert(0, args.repo)
    import torch
    from tasks.copytask import CopyTaskModelTraining, CopyTaskParams, dataloader
    from train import train_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, runs, steps = 3, 5, 20
    for batch_size in map(int, args.batch_sizes.split(",")):
        torch.manual_seed(0)
        params = CopyTaskParams(batch_size=batch_size, sequence_min_len=args.length, sequence_max_len=args.length)
        model = CopyTaskModelTraining(params=params)
        batches = [(x, y) for _, x, y in dataloader(warmup + runs * steps, batch_size, params.sequence_width,
                                                     args.length, args.length)]
        batches = iter(batches)
        for _ in range(warmup):
            train_batch(model.net, model.criterion, model.optimizer, *next(batches))
        per_step = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(steps):
                train_batch(model.net, model.criterion, model.optimizer, *next(batches))
            per_step.append((time.perf_counter() - t0) / steps)
        ms = 1000 * statistics.median(per_step)
        print(json.dumps({"impl": "loudinthecloud/pytorch-ntm", "batch": batch_size, "threads": torch.get_num_threads(),
                          "ms_per_step": round(ms, 2), "ms_per_seq": round(ms / batch_size, 3),
                          "seq_per_s": round(1000 * batch_size / ms, 1)}), flush=True)


if __name__ == "__main__":
    main()
