"""
The NTM paper's Figure 3 (Graves et al. 2014, arXiv:1410.5401): the cost per sequence over training on
copy, for the NTM and the LSTM, from our runs' logs; the mean over seeds as a line, the lowest and
highest seed as a band. A second chart beside it: bit errors per sequence on the validation
sequences of length 20, at each evaluation (the selection metric).

    python reproduce.py ntm_copy && python reproduce.py lstm_copy     # the runs, out/reproduce/*/s*
    python experiments/ntm_curves.py --ntm out/reproduce/ntm_copy --lstm out/reproduce/lstm_copy \\
        --out docs/ntm_figure3.png

Each run's log.jsonl holds the mean binary cross-entropy per target bit (nats) of one training batch
every log_interval steps, and each batch has one length drawn from the task's range. The cost per
sequence drawn here is that loss in bits times the bits of a sequence of the mean length (width x
(min_len + max_len) / 2), smoothed over --smooth log points: an estimate, since the logs keep no
per-batch length. The paper's x axis is sequences seen (thousands): steps x batch size.
"""

import argparse
import glob
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import UserError, check_png_out, line_chart, load_checkpoint, run_command, text_image, write_png  # noqa: E402

MODELS = (("ntm", (200, 60, 40)), ("lstm", (70, 110, 190)))  # red, blue


def read_runs(folder, model):
    """Every seed folder under folder: (sequences seen in thousands, smoothed-later cost per sequence in
    bits, eval steps, bit_err@val20) lists, one tuple per seed."""
    runs = sorted(glob.glob(os.path.join(folder, "s*")))
    if not runs:
        raise UserError(f"{folder} holds no seed folders (s0, s1, ...): run python reproduce.py {model}_copy first")
    out = []
    for run in runs:
        log = os.path.join(run, "log.jsonl")
        if not os.path.exists(log):
            raise UserError(f"{run} has no log.jsonl: run python reproduce.py {model}_copy first")
        ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"), model, "copy")
        task, train = ckpt["task_config"], ckpt["train_config"]
        bits = task["width"] * (task["min_len"] + task["max_len"]) / 2
        records = [json.loads(line) for line in open(log)]
        losses = [r for r in records if "loss" in r]
        evals = [r for r in records if "bit_err@val20" in r]
        out.append(([r["iter"] * train["batch_size"] / 1000 for r in losses],
                    [r["loss"] / math.log(2) * bits for r in losses],
                    [r["iter"] * train["batch_size"] / 1000 for r in evals], [r["bit_err@val20"] for r in evals]))
    return out


def smooth(values, window):
    """Trailing moving mean over window points."""
    t = torch.tensor(values, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
    idx = torch.arange(1, len(t) + 1)
    start = (idx - window).clamp(min=0)
    return ((c[idx] - c[start]) / (idx - start)).tolist()


def spread(curves):
    """Mean, lowest and highest over seeds, truncated to the shortest curve."""
    n = min(len(c) for c in curves)
    t = torch.tensor([c[:n] for c in curves], dtype=torch.float64)
    return t.mean(0).tolist(), t.min(0).values.tolist(), t.max(0).values.tolist()


def chart(title, axis, per_model, top, width):
    """One chart: per_model is [(xs, [curve per seed], rgb)]; lines are means, bands the seed range."""
    xs = min((m[0] for m in per_model), key=len)
    series, bands = [], []
    for _, curves, color in per_model:
        mean, low, high = spread(curves)
        series.append((mean[:len(xs)], color))
        bands.append((low[:len(xs)], high[:len(xs)], color))
    plot = line_chart(xs, series, width=width, height=220, top=top, bands=bands)
    return torch.cat([text_image(title, width=width), text_image(axis, width=width), plot,
                      text_image(f"X: 0-{xs[-1]:.0f}K SEQUENCES", width=width)], dim=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ntm", required=True, help="folder of the NTM copy runs (s0, s1, ...)")
    parser.add_argument("--lstm", required=True, help="folder of the LSTM copy runs (s0, s1, ...)")
    parser.add_argument("--out", default="ntm_figure3.png", help="the PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="log points in the moving mean of the training cost")
    parser.add_argument("--top", type=float, default=40.0, help="the cost chart's y range: 0 to this many bits")
    parser.add_argument("--top_errors", type=float, default=80.0, help="the error chart's y range: 0 to this many bits")
    args = parser.parse_args(argv)
    check_png_out(args.out)
    if args.smooth < 1 or args.top <= 0 or args.top_errors <= 0:
        raise UserError("--smooth must be at least 1, --top and --top_errors above 0")
    runs = {"ntm": read_runs(args.ntm, "ntm"), "lstm": read_runs(args.lstm, "lstm")}
    width = 420
    cost = chart("TRAINING COST PER SEQUENCE (BITS)", f"Y 0-{args.top:g}, GRID {args.top / 4:g}; MEAN, SEED RANGE",
                 [(runs[m][0][0], [smooth(r[1], args.smooth) for r in runs[m]], c) for m, c in MODELS], args.top, width)
    top_err = args.top_errors
    errors = chart("VALIDATION BIT ERRORS PER SEQUENCE (LENGTH 20)", f"Y 0-{top_err:g}, GRID {top_err / 4:g}",
                   [(runs[m][0][2], [r[3] for r in runs[m]], c) for m, c in MODELS], top_err, width)
    gap = torch.full((cost.shape[0], 16, 3), 255, dtype=torch.uint8)
    row = torch.cat([cost, gap, errors], dim=1)
    legend = f"RED: NTM ({len(runs['ntm'])} SEEDS)  BLUE: LSTM ({len(runs['lstm'])} SEEDS)"
    write_png(args.out, torch.cat([text_image("COPY: LEARNING CURVES (NTM FIG. 3)", width=row.shape[1]),
                                   text_image(legend, width=row.shape[1]), row], dim=0))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_command(main)
