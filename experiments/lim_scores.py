"""
What a trained LIM run's discriminator makes of each expert, per mechanism: the mean D score (the
probability "canonical") of every expert's output on the test digits under each mechanism, beside D on
the canonical digits and on the transformed digits as they are. An expert can only win, and so only
learn, an image on which D scores it above every other expert; a column of zeros is an expert that
cannot win that mechanism, whatever it would learn.

    python reproduce.py lim_mnist --data_root DIR                   # the runs, out/reproduce/lim_mnist/s*
    python experiments/lim_scores.py --run out/reproduce/lim_mnist/s0 --data_dir DIR/mnist

Prints one markdown table (rows: mechanisms; columns: experts; the winner's mean score and the
mechanism's main expert, the one winning most of its digits). The test digits are those train.py
evaluates on.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import MECHANISMS, DataError, MNISTMechanisms, MNISTMechanismsConfig, apply_mechanisms  # noqa: E402
from lim import LIM, LIMConfig  # noqa: E402
from train import UserError, load_checkpoint, run_command  # noqa: E402


@torch.no_grad()
def score_table(model, task):
    """-> (D on the canonical digits, [(mechanism, D on the transformed digits, D per expert (N',),
    the winner's mean score, the main expert)]), D as a probability, means over the test digits."""
    model.eval()
    D = lambda images: torch.sigmoid(model.discriminator(images))
    digits, generator = task.test_images, torch.Generator().manual_seed(0)
    rows = []
    for m, name in enumerate(MECHANISMS):
        x = apply_mechanisms(digits, torch.full((len(digits),), m), task.config.shift, task.config.noise_std, generator)
        outputs, _ = model.experts(x)  # (B, N', 1, H, W)
        scores = D(outputs)  # (B, N')
        main = int(torch.bincount(scores.argmax(1), minlength=scores.shape[1]).argmax())
        rows.append((name, D(x).mean().item(), scores.mean(0), scores.max(1).values.mean().item(), main))
    return D(digits).mean().item(), rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a train.py run folder of lim on mnist_mechanisms")
    parser.add_argument("--data_dir", required=True, help="the folder with the four MNIST files")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(os.path.join(args.run, "ckpt.pt"), "lim", "mnist_mechanisms")
    untuple = lambda config: {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    try:
        task = MNISTMechanisms(MNISTMechanismsConfig(**untuple(ckpt["task_config"])), args.data_dir)
    except DataError as e:
        raise UserError(str(e))
    model = LIM(LIMConfig(**untuple(ckpt["model_config"])))
    model.load_state_dict(ckpt["model"])
    canonical, rows = score_table(model, task)
    n = model.config.num_experts
    print(f"D on the canonical test digits: {canonical:.3f} ({len(task.test_images)} digits, step {int(model.train_steps)})\n")
    print("| mechanism | D on the input | " + " | ".join(f"E{j}" for j in range(n)) + " | winner's score | main expert |")
    print("|---|---|" + "---|" * n + "---|---|")
    for name, as_is, per_expert, best, main in rows:
        print(f"| {name} | {as_is:.3f} | " + " | ".join(f"{v:.2f}" for v in per_expert.tolist()) + f" | {best:.3f} | E{main} |")


if __name__ == "__main__":
    run_command(main)
