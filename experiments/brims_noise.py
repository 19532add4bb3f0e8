"""
The BRIMs paper's Figure 2 (Mittal et al. 2020, arXiv:2006.16981), here on sequential MNIST: test
images at the largest resolution with k pixels replaced by random values, for several k, and the
first layer's mean attention on its three rows: the input (bottom-up), the null row and the layer
above (top-down). The paper (on CIFAR-10 at 32 x 32) sees the attention on the layer above rise
with k: the noisier the input, the more the model relies on its higher layer.

    python train.py --model brims --task seqmnist --out_dir out/brims_seqmnist
    python experiments/brims_noise.py --out_dir out/brims_seqmnist                   # k = 0 ... 400 of 576 pixels

Reads <out_dir>/ckpt.pt (the checkpoint that train.py selected on validation accuracy, as in
metrics.json), the task's settings from it, and the test images from --data_dir. A noisy pixel
gets a random binary value (the inputs stay in the alphabet the model was trained on); the k
positions of an image are the first k of one random order, so each noise level adds pixels to the
one before. Writes <out_dir>/noise.json (flat keys attn_input@k, attn_null@k, attn_topdown@k and
acc@k, the test accuracy %) and <out_dir>/noise.png (the three attention curves against k).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from brims import BRIMs, BRIMsConfig  # noqa: E402
from data import TASKS, DataError  # noqa: E402
from train import UserError, atomic_write, load_checkpoint, run_command, text_image, write_png  # noqa: E402


def noisy(x, count, generator):
    """x (N, T, 1) binary pixels -> a copy with `count` pixels per image set to random bits."""
    N, T, _ = x.shape
    order = torch.rand(N, T, generator=generator).argsort(dim=1)[:, :count]  # which pixels
    values = torch.randint(0, 2, (N, count), generator=generator).float()
    out = x.clone()
    out[torch.arange(N).unsqueeze(1), order, 0] = values
    return out


@torch.no_grad()
def measure(model, x, labels, batch_size):
    """Mean attention of the first layer's modules on [null, input, top-down] over images, steps and
    modules, and the accuracy (%) from the last step."""
    totals, right = torch.zeros(3), 0
    for start in range(0, len(x), batch_size):
        logits, internals = model(x[start:start + batch_size], return_internals=True)
        totals += internals["source_attention_l0"].double().mean(dim=(1, 2)).sum(0).float()  # (3,)
        right += (logits[:, -1].argmax(-1) == labels[start:start + batch_size]).sum().item()
    null, bottom_up, top_down = (totals / len(x)).tolist()
    return {"input": bottom_up, "null": null, "topdown": top_down, "acc": 100.0 * right / len(x)}


def curve_panel(title, xs, ys, width=260, height=120, pad=6):
    """One line plot as a uint8 image: the points joined by straight lines, y from min to max of ys
    (printed at the top and bottom), x spaced by value; the title above, the x values below."""
    plot = torch.full((height, width, 3), 255, dtype=torch.uint8)
    low, high = min(ys), max(ys)
    span = (high - low) or 1.0
    to_x = lambda v: pad + round((v - xs[0]) / ((xs[-1] - xs[0]) or 1) * (width - 2 * pad - 1))
    to_y = lambda v: height - 1 - pad - round((v - low) / span * (height - 2 * pad - 1))
    points = [(to_x(x), to_y(y)) for x, y in zip(xs, ys)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            plot[round(y0 + (y1 - y0) * i / steps), round(x0 + (x1 - x0) * i / steps)] = torch.tensor([70, 110, 190])
    for x, y in points:
        plot[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = torch.tensor([200, 60, 40], dtype=torch.uint8)
    plot[-1, :] = 0
    plot[:, 0] = 0
    labels = f"K = {', '.join(str(x) for x in xs)}"
    return torch.cat([text_image(title, width=width), text_image(f"MAX {high:.3f}", width=width), plot,
                      text_image(f"MIN {low:.3f}", width=width), text_image(labels, width=width)], dim=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/brims_seqmnist", help="a train.py run of --model brims --task seqmnist")
    parser.add_argument("--data_dir", default="", help="the MNIST files, as for train.py")
    parser.add_argument("--counts", default="0,25,50,100,200,400", help="noisy pixels per image, comma-separated")
    parser.add_argument("--resolution", type=int, default=0, help="0: the largest resolution the run was tested at")
    parser.add_argument("--samples", type=int, default=500, help="test images (the first ones)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="of the noise")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.counts.split(",") if k]
    ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "brims", "seqmnist")
    task_cfg_cls, task_cls = TASKS["seqmnist"]
    task_values = {**ckpt["task_config"], "eval_samples": min(args.samples, 10000)}
    resolution = args.resolution or max(ckpt["task_config"]["eval_resolutions"])
    task_values["eval_resolutions"] = tuple(sorted({*task_values["eval_resolutions"], resolution}))
    try:
        task = task_cls(task_cfg_cls(**task_values), data_dir=args.data_dir or None)
    except DataError as e:
        raise UserError(str(e))
    model = BRIMs(BRIMsConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["best"]["model"] if ckpt.get("best") and ckpt["best"].get("model") else ckpt["model"])
    model.eval()
    batch = task.as_batch(task.test_images[resolution], task.test_labels)
    x, labels = batch["x"], batch["y"]
    if max(counts) > x.shape[1]:
        raise UserError(f"--counts goes up to {max(counts)} but an image has {x.shape[1]} pixels: use smaller counts")
    results = {"resolution": resolution, "samples": len(x), "pixels": x.shape[1]}
    for count in counts:
        measured = measure(model, noisy(x, count, torch.Generator().manual_seed(args.seed)), labels, args.batch_size)
        results.update({f"{('attn_' + k) if k != 'acc' else k}@{count}": v for k, v in measured.items()})
        print(f"k = {count:4d}: attention input {measured['input']:.4f}, null {measured['null']:.4f}, "
              f"top-down {measured['topdown']:.4f}; accuracy {measured['acc']:.1f} %", flush=True)
    atomic_write(os.path.join(args.out_dir, "noise.json"), json.dumps(results, indent=2))
    panels = [curve_panel(f"ATTENTION ON {name}", counts, [results[f"attn_{key}@{k}"] for k in counts])
              for name, key in (("INPUT", "input"), ("NULL", "null"), ("HIGHER LAYER", "topdown"))]
    gap = torch.full((panels[0].shape[0], 12, 3), 255, dtype=torch.uint8)
    write_png(os.path.join(args.out_dir, "noise.png"), torch.cat([panels[0], gap, panels[1], gap, panels[2]], dim=1))
    print(f"wrote {os.path.join(args.out_dir, 'noise.json')} and noise.png")
    return results


if __name__ == "__main__":
    run_command(main)
