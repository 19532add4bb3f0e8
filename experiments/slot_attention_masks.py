"""
Slot Attention's Figure 2 on a trained object-discovery run, large enough to read: for each of a few
test scenes, the input, the reconstruction and each slot's reconstruction (rgb times its mask, on
white); each slot's attention over the input at iterations 1, 2, 3 (Fig. 2b); and the masks decoded
from the slots after each iteration (Fig. 2c). White is 1. One object per slot shows as one sprite per
slot panel and one blob per attention map.

    python reproduce.py slot_attention_sprites                 # the runs, out/reproduce/slot_attention_sprites/s*
    python experiments/slot_attention_masks.py --run out/reproduce/slot_attention_sprites/s0 \\
        --out docs/slot_attention_sprites_s0_masks.png

The scenes are the first of the test scenes train.py evaluates on (drawn from the fixed seed 1234).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Sprites, SpritesConfig  # noqa: E402
from slot_attention import SlotAttention, SlotAttentionConfig  # noqa: E402
from train import UserError, check_png_out, draw_panels, fixed_eval_data, load_checkpoint, run_command  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a train.py run folder of slot_attention on sprites")
    parser.add_argument("--scenes", type=int, default=2, help="test scenes to show (1-4)")
    parser.add_argument("--out", default="slot_attention_masks.png", help="the PNG to write")
    args = parser.parse_args(argv)
    check_png_out(args.out)
    if not 1 <= args.scenes <= 4:
        raise UserError(f"--scenes must be 1..4, got {args.scenes}")
    ckpt = load_checkpoint(os.path.join(args.run, "ckpt.pt"), "slot_attention", "sprites")
    task = Sprites(SpritesConfig(**ckpt["task_config"]))
    model = SlotAttention(SlotAttentionConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(0)  # the slots' initial draw
    batch = fixed_eval_data(task, args.scenes)["test"][0]
    with torch.no_grad():
        reconstruction, internals = model(batch["x"], return_internals=True)
    panels = task.figure_panels(reconstruction, batch, internals, images=args.scenes)
    draw_panels(args.out, panels, max_width=1100, max_height=2000)
    print(f"wrote {args.out}: {args.scenes} test scene(s) of {args.run}")


if __name__ == "__main__":
    run_command(main)
