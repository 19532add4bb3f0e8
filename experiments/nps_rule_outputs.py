"""
What each NPS rule does on MNIST (the paper's per-rule outputs): a trained run's every rule applied to the
same test digits, whatever the transformation asked for. Row 0 holds the digits; then one row per rule,
its output for each digit, labelled with the transformation that fires the rule most often on the test
chains. One rule per transformation shows as rows that each rotate or translate every digit one way.

    python reproduce.py nps_mnist_official --data_root DIR           # the runs, out/reproduce/nps_mnist_official/s*
    python experiments/nps_rule_outputs.py --run out/reproduce/nps_mnist_official/s1 --data_dir DIR/mnist \\
        --out docs/nps_mnist_official_s1_rules.png

The rule is forced at stage 1 (the primary slot stays the one the model picks); stage 2, the rule's MLP
and the decoder run as in nps.py at evaluation.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import OFFICIAL_TRANSFORMS, DataError, MNISTTransform, MNISTTransformConfig  # noqa: E402
from nps import NPS, NPSConfig  # noqa: E402
from train import UserError, check_png_out, draw_panels, fixed_eval_data, load_checkpoint, run_command  # noqa: E402

LABELS = {"rotate_right": "R60", "rotate_left": "L60", "up": "UP", "down": "DOWN"}


@torch.no_grad()
def every_rule(model, x):
    """x (B, input_size), one frame each -> (N, B, output_size): the decoded output of each rule forced
    at stage 1, on the primary slot the model picks; the context slot chosen by stage 2 for that rule."""
    c = model.config
    cond = x[:, x.shape[1] - c.condition_size:]
    slots = model.encode(x)
    B, S, _ = slots.shape
    primary_mask = torch.nn.functional.one_hot(model.match_scores(slots, cond).amax(1).argmax(-1), S).float()  # (B, S)
    primary = torch.einsum("bs,bsh->bh", primary_mask, slots)
    outputs = []
    for r in range(c.num_rules):
        rule = model.rule_embeddings[r].expand(B, -1)
        scores = model.context_scores(slots, primary, rule)
        if S > 1:
            scores = scores.masked_fill(primary_mask > 0.5, float("-inf"))
        context = slots[torch.arange(B), scores.argmax(-1)]
        update = model.rule_outputs(primary, context)[:, r]  # (B, H)
        written = primary_mask.unsqueeze(-1)
        new = slots + written * update.unsqueeze(1) if c.residual else slots * (1 - written) + written * update.unsqueeze(1)
        readout = torch.einsum("bs,bsh->bh", primary_mask, new) if c.readout_slot < 0 else new[:, c.readout_slot]
        outputs.append(torch.sigmoid(model.decoder(readout)))
    return torch.stack(outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a train.py run folder of nps on mnist_transform (official transforms)")
    parser.add_argument("--data_dir", required=True, help="the folder with the four MNIST files")
    parser.add_argument("--digits", type=int, default=6, help="test digits to show")
    parser.add_argument("--out", default="nps_rules.png", help="the PNG to write")
    args = parser.parse_args(argv)
    check_png_out(args.out)
    if not 1 <= args.digits <= 12:
        raise UserError(f"--digits must be 1..12, got {args.digits}")
    ckpt = load_checkpoint(os.path.join(args.run, "ckpt.pt"), "nps", "mnist_transform")
    task_config = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["task_config"].items()}
    if task_config.get("transforms") != "official":
        raise UserError(f"{args.run} was trained on --transforms {task_config.get('transforms')}: this figure is for the official ones")
    try:
        task = MNISTTransform(MNISTTransformConfig(**task_config), args.data_dir)
    except DataError as e:
        raise UserError(str(e))
    model = NPS(NPSConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    batch = fixed_eval_data(task, 500)["test"][0]  # the test chains train.py evaluates on
    with torch.no_grad():
        _, internals = model(batch["x"], return_internals=True)
    which = batch["x"][:, :, -len(OFFICIAL_TRANSFORMS):].argmax(-1)  # (B, T) the transformation of each step
    rules = internals["rules"][..., 0]  # (B, T)
    N, side = model.config.num_rules, task.side
    counts = torch.zeros(N, len(OFFICIAL_TRANSFORMS))
    counts.index_put_((rules.reshape(-1), which.reshape(-1)), torch.ones(rules.numel()), accumulate=True)
    frames = batch["x"][:args.digits, 0]  # the first frame of the first chains
    outputs = every_rule(model, frames).view(N, args.digits, side, side)
    row = lambda images: torch.cat([torch.cat([im, torch.ones(side, 2)], 1) for im in images], 1)
    panels = [("test digits (first frame of the first chains)", row(frames[:, :side * side].view(-1, side, side)))]
    for r in range(N):
        if counts[r].sum() > 0:
            main_t = int(counts[r].argmax())
            share = counts[r, main_t] / counts[r].sum()
            label = f"rule {r} fires for {LABELS[OFFICIAL_TRANSFORMS[main_t]]} ({share:.2f} of its steps)"
        else:
            label = f"rule {r} never fires on the test chains"
        panels.append((label, row(outputs[r])))
    draw_panels(args.out, panels, max_width=900)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_command(main)
