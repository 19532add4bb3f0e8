"""
ACT against the LSTM on addition over training (Graves 2016, section 3.3, Fig. 11-12): the test sequence
error of both models at every evaluation, the mean over seeds as a line and the lowest and highest seed as
a band, and beside it ACT's ponder cost rho = N + R per input (Eq. 10), from the runs' log.jsonl.

    python reproduce.py act_addition_small
    python experiments/act_addition_curves.py --act out/reproduce/act_addition_small/act \\
        --lstm out/reproduce/act_addition_small/lstm --out docs/act_addition_small.png

The x axis is sequences seen (thousands): steps x batch size. seq_err@SETTING is the % of the run's
fixed test sequences with any wrong digit (metrics.json's metric). It also prints, for each model, the
mean error at the last evaluation and the first evaluation at which every seed is under --under %.
"""

import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ntm_curves import chart, spread  # noqa: E402
from train import UserError, check_png_out, load_checkpoint, run_command, text_image, write_png  # noqa: E402

MODELS = (("act", (200, 60, 40)), ("lstm", (70, 110, 190)))  # red, blue


def read_runs(folder, model):
    """Every seed folder under folder: (setting, [(sequences seen in thousands, seq_err, ponder or None)]
    per seed). Every seed must evaluate at the same steps."""
    runs = sorted(glob.glob(os.path.join(folder, "s*")))
    if not runs:
        raise UserError(f"{folder} holds no seed folders (s0, s1, ...): run python reproduce.py act_addition_small first")
    settings, out = set(), []
    for run in runs:
        log = os.path.join(run, "log.jsonl")
        if not os.path.exists(log):
            raise UserError(f"{run} has no log.jsonl: run python reproduce.py act_addition_small first")
        batch = load_checkpoint(os.path.join(run, "ckpt.pt"), model, "addition")["train_config"]["batch_size"]
        evals = [r for r in map(json.loads, open(log)) if any(k.startswith("seq_err@") for k in r)]
        if not evals:
            raise UserError(f"{log} holds no evaluation yet: let the run reach its first one")
        setting = next(k for k in evals[0] if k.startswith("seq_err@"))[len("seq_err@"):]
        settings.add(setting)
        out.append([(r["iter"] * batch / 1000, r[f"seq_err@{setting}"], r.get(f"ponder@{setting}")) for r in evals])
    if len(settings) > 1:
        raise UserError(f"{folder}: the seeds test different settings ({', '.join(sorted(settings))})")
    return settings.pop(), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--act", required=True, help="folder of the ACT addition runs (s0, s1, ...)")
    parser.add_argument("--lstm", required=True, help="folder of the LSTM addition runs (s0, s1, ...)")
    parser.add_argument("--out", default="act_addition.png", help="the PNG to write")
    parser.add_argument("--top_ponder", type=float, default=8.0, help="the ponder chart's y range: 0 to this")
    parser.add_argument("--under", type=float, default=10.0, help="report the first evaluation with every seed under this %%")
    args = parser.parse_args(argv)
    check_png_out(args.out)
    if args.top_ponder <= 0 or args.under <= 0:
        raise UserError("--top_ponder and --under must be above 0")
    runs = {m: read_runs(getattr(args, m), m) for m, _ in MODELS}
    if runs["act"][0] != runs["lstm"][0]:
        raise UserError(f"the ACT runs test {runs['act'][0]} and the LSTM runs {runs['lstm'][0]}: draw one problem")
    setting = runs["act"][0]
    for m, (_, seeds) in runs.items():
        if any([p[0] for p in s] != [p[0] for p in seeds[0]][:len(s)] for s in seeds):
            raise UserError(f"the {m} seeds evaluate at different steps: draw runs of one protocol")
    width = 420
    error = chart(f"TEST SEQUENCE ERROR ({setting}), IN PERCENT", "Y 0-100, GRID 25; MEAN, SEED RANGE",
                  [([p[0] for p in min(seeds, key=len)], [[p[1] for p in s] for s in seeds], color)
                   for (m, color), (_, seeds) in zip(MODELS, runs.values())], 100.0, width)
    act_seeds = runs["act"][1]
    ponder = chart("ACT PONDER COST RHO = N + R", f"Y 0-{args.top_ponder:g}, GRID {args.top_ponder / 4:g}",
                   [([p[0] for p in min(act_seeds, key=len)], [[p[2] for p in s] for s in act_seeds], MODELS[0][1])],
                   args.top_ponder, width)
    gap = torch.full((error.shape[0], 16, 3), 255, dtype=torch.uint8)
    row = torch.cat([error, gap, ponder], dim=1)
    legend = f"RED: ACT ({len(act_seeds)} SEEDS)  BLUE: LSTM ({len(runs['lstm'][1])} SEEDS)"
    write_png(args.out, torch.cat([text_image(f"ADDITION {setting}: ACT AGAINST THE LSTM", width=row.shape[1]),
                                   text_image(legend, width=row.shape[1]), row], dim=0))
    print(f"wrote {args.out}")
    for m, (_, seeds) in runs.items():
        mean, _, worst = spread([[p[1] for p in s] for s in seeds])
        xs = [p[0] for p in min(seeds, key=len)]
        first = next((x for x, w in zip(xs, worst) if w < args.under), None)
        print(f"{m}: seq_err@{setting} {mean[-1]:.1f} % (mean of {len(seeds)} seeds) at {xs[-1]:.0f}K sequences; "
              + (f"every seed under {args.under:g} % first at {first:.0f}K" if first is not None
                 else f"not every seed under {args.under:g} % at any evaluation"))


if __name__ == "__main__":
    run_command(main)
