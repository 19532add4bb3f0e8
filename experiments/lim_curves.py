"""
The LIM paper's Figure 6 (Parascandolo et al. 2018, arXiv:1712.00961) from our runs: a classifier's accuracy
on the transformed test digits, on the same digits after the winning expert, and on the original digits,
over training; one chart per run, side by side. Below each, the mechanism x expert share of wins at the
end of the run (each row sums to 1): one bright cell per row and per column is one expert per mechanism.

    python reproduce.py lim_mnist --data_root DIR                   # the runs, out/reproduce/lim_mnist/s*
    python experiments/lim_curves.py --runs out/reproduce/lim_mnist/s0,out/reproduce/lim_mnist/s1,out/reproduce/lim_mnist/s2 \\
        --out docs/lim_figure6.png

Reads each run's log.jsonl (its evaluations) and metrics.json (the final one); writes one PNG.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import MECHANISM_LABELS, MECHANISMS  # noqa: E402
from train import UserError, check_png_out, heatmap, line_chart, run_command, text_image, write_png  # noqa: E402

SERIES = (("acc_original@test", "ORIGINAL", (60, 150, 60)), ("acc_inverted@test", "AFTER WINNING EXPERT", (200, 60, 40)),
          ("acc_transformed@test", "TRANSFORMED", (70, 110, 190)))


def run_panel(run, width=300):
    """One run: its title, the chart, the axis labels and the final win shares."""
    log = os.path.join(run, "log.jsonl")
    metrics_path = os.path.join(run, "metrics.json")
    if not os.path.exists(log) or not os.path.exists(metrics_path):
        raise UserError(f"{run} has no log.jsonl and metrics.json: run it first (python reproduce.py lim_mnist)")
    records = [json.loads(line) for line in open(log) if '"acc_inverted@test"' in line]
    metrics = json.load(open(metrics_path))
    if not records or "expert_up@test" not in metrics:
        raise UserError(f"{run} is not a run of --model lim --task mnist_mechanisms")
    xs = [r["iter"] for r in records]  # the evaluations; the x axis starts at step 0
    series = [([r[key] for r in records], color) for key, _, color in SERIES]
    chart = line_chart(xs, series, width=width)
    experts = 1 + max(int(metrics[f"expert_{name}@test"]) for name in MECHANISMS)
    experts = max(experts, 10)
    shares = torch.zeros(experts, len(MECHANISMS))  # rows: experts; columns: mechanisms
    for m, name in enumerate(MECHANISMS):  # the main expert's share only: metrics.json keeps no more than that
        shares[int(metrics[f"expert_{name}@test"]), m] = metrics[f"share_{name}@test"]
    cell = width // len(MECHANISMS)
    wins = heatmap(shares, cell)
    labels = torch.cat([text_image(label, scale=1, width=cell) for label in MECHANISM_LABELS], dim=1)
    pad = lambda image: torch.cat([image, torch.full((image.shape[0], width - image.shape[1], 3), 255, dtype=torch.uint8)], 1)
    wins, labels = pad(wins), pad(labels)
    final = (f"INVERTED {metrics['acc_inverted@test']:.3f} OWNED {int(metrics['owned@test'])} OF 10")
    return torch.cat([text_image(os.path.basename(os.path.normpath(run)).upper() + f"  STEPS 0-{xs[-1]}", width=width),
                      text_image("Y 0-1, GRID 0.25", width=width), chart, text_image(final, width=width),
                      text_image("WINNING EXPERT (ROWS 0-9) OF EACH", width=width),
                      text_image("MECHANISM (COLUMNS), ITS SHARE:", width=width), labels, wins], dim=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated train.py run folders of lim on mnist_mechanisms")
    parser.add_argument("--out", default="lim_figure6.png", help="the PNG to write")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    check_png_out(args.out)
    panels = [run_panel(run) for run in runs]
    height = max(p.shape[0] for p in panels)
    panels = [torch.cat([p, torch.full((height - p.shape[0], p.shape[1], 3), 255, dtype=torch.uint8)]) for p in panels]
    gap = torch.full((height, 12, 3), 255, dtype=torch.uint8)
    row = torch.cat([x for p in panels for x in (p, gap)][:-1], dim=1)
    legend = "  ".join(f"{'GREEN' if c[1] == 150 else 'RED' if c[0] == 200 else 'BLUE'}: {name}" for _, name, c in SERIES)
    write_png(args.out, torch.cat([text_image("CLASSIFIER ACCURACY OVER TRAINING (LIM FIG. 6)", width=row.shape[1]),
                                   text_image(legend, width=row.shape[1]), row], dim=0))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_command(main)
