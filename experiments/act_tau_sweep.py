"""
The ACT paper's Figure 4 (section 3.1): parity error and ponder at the end of training, for
several time penalties tau, several seeds each, and the plain RNN that does not ponder.

    python experiments/act_tau_sweep.py                         # 16-element parity, 3 seeds, CPU scale
    python experiments/act_tau_sweep.py --input_size 64 --max_iters 50000   # the paper's vectors

Each run is `python train.py --model act --task parity --time_penalty TAU --seed S ...` (the plain
RNN: --no-act), written to <out_dir>/<name>_s<S>/. Runs whose metrics.json exists are not run again,
so an interrupted sweep continues where it stopped. Writes <out_dir>/results.json (every run),
<out_dir>/results.md (mean and standard error per setting) and <out_dir>/tau_sweep.png: bars of the
mean error and ponder per setting with standard-error whiskers, as in the paper's figure.
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import UserError, main as train, text_image, write_png  # noqa: E402


def mean_and_stderr(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def bar_panel(title, labels, stats, height=120, bar=34, gap=16):
    """One bar chart as a uint8 image: a bar per (mean, stderr) with a whisker of +-stderr,
    the value above it and its label below. The y axis starts at 0."""
    top = max(m + s for m, s in stats) or 1.0
    width = gap + len(stats) * (bar + gap)
    plot = torch.full((height, width, 3), 255, dtype=torch.uint8)
    plot[-1, :] = 0  # x axis
    scale = (height - 4) / top
    for i, (m, s) in enumerate(stats):
        x0 = gap + i * (bar + gap)
        h = max(1, round(m * scale))
        plot[height - h:, x0:x0 + bar] = torch.tensor([70, 110, 190], dtype=torch.uint8)
        lo, hi = round((m - s) * scale), round((m + s) * scale)
        mid = x0 + bar // 2
        plot[max(0, height - 1 - hi):height - lo, mid] = 0  # whisker
        for y in (lo, hi):
            plot[max(0, min(height - 1, height - 1 - y)), mid - 4:mid + 5] = 0
    values = torch.cat([text_image(f"{m:.3g}", width=bar + gap) for m, _ in stats], dim=1)
    names = torch.cat([text_image(label, width=bar + gap) for label in labels], dim=1)

    def pad(img):  # shift right by half a gap so each text sits under its bar, then fill to width
        grey = lambda w: torch.full((img.shape[0], w, 3), 96, dtype=torch.uint8)
        return torch.cat([grey(gap // 2), img, grey(width)], dim=1)[:, :width]

    return torch.cat([text_image(title, width=width), pad(values), plot, pad(names)], dim=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taus", default="1e-1,1e-2,1e-3,1e-4", help="comma-separated time penalties")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--no_rnn", action="store_true", help="skip the plain-RNN baseline")
    parser.add_argument("--input_size", type=int, default=16, help="parity vector size (the paper: 64)")
    parser.add_argument("--max_iters", type=int, default=10000)
    parser.add_argument("--out_dir", default="out/act_tau_sweep")
    args, train_flags = parser.parse_known_args()  # anything else goes to train.py, e.g. --lr
    try:
        taus = [float(t) for t in args.taus.split(",") if t]
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error("--taus and --seeds take comma-separated numbers, e.g. --taus 1e-2,1e-3 --seeds 0,1")
    settings = [(f"tau={t:g}", ["--time_penalty", str(t)]) for t in taus]
    if not args.no_rnn:
        settings.append(("rnn", ["--no-act"]))

    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for name, flags in settings:
        for seed in seeds:
            run_dir = os.path.join(args.out_dir, f"{name}_s{seed}")
            metrics_path = os.path.join(run_dir, "metrics.json")
            if not os.path.exists(metrics_path):
                argv = ["--model", "act", "--task", "parity", "--input_size", str(args.input_size),
                        "--max_iters", str(args.max_iters), "--seed", str(seed), "--out_dir", run_dir,
                        "--no-figures", *flags, *train_flags]
                print(f"== {name} seed {seed}: python train.py {' '.join(argv)}", flush=True)
                try:
                    train(argv)
                except UserError as e:
                    sys.exit(f"error: {e}")
            with open(metrics_path) as f:
                metrics = json.load(f)
            setting = str(args.input_size)
            rows.append({"setting": name, "seed": seed, "err": metrics[f"err@{setting}"],
                         "ponder": metrics[f"ponder@{setting}"], "seconds": metrics["seconds"]})

    names = [name for name, _ in settings]
    summary = {}
    for name in names:
        runs = [r for r in rows if r["setting"] == name]
        summary[name] = {key: mean_and_stderr([r[key] for r in runs]) for key in ("err", "ponder", "seconds")}
        summary[name]["per_seed_err"] = [round(r["err"], 2) for r in runs]

    lines = [f"Parity, {args.input_size}-element vectors, {args.max_iters} steps, seeds {args.seeds} "
             "(mean +- standard error)", "",
             "| setting | err (%) | ponder | per-seed err | seconds per run |", "|---|---|---|---|---|"]
    for name in names:
        s = summary[name]
        lines.append(f"| {name} | {s['err'][0]:.2f} +- {s['err'][1]:.2f} | {s['ponder'][0]:.2f} +- {s['ponder'][1]:.2f} "
                     f"| {', '.join(map(str, s['per_seed_err']))} | {s['seconds'][0]:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "train_flags": train_flags, "runs": rows}, f, indent=2)

    labels = [n.replace("tau=", "") for n in names]
    panels = [bar_panel("error rate", labels, [summary[n]["err"] for n in names]),
              bar_panel("ponder", labels, [summary[n]["ponder"] for n in names])]
    gap = torch.full((panels[0].shape[0], 8, 3), 96, dtype=torch.uint8)  # both panels have one height
    write_png(os.path.join(args.out_dir, "tau_sweep.png"), torch.cat([panels[0], gap, panels[1]], dim=1))
    print(f"wrote {args.out_dir}/results.md, results.json, tau_sweep.png")


if __name__ == "__main__":
    main()
