"""
How far apart NPS's stage 1 scores start, against the Gumbel noise (standard deviation pi / sqrt(6) = 1.28)
that the hard choice adds to them: for each run folder, fresh weights of the run's model config (one per
seed) score 256 training frames of its mnist_transform task, and the mean over frames of the standard
deviation and of the range (max - min) over the (rule, slot) pairs is printed. Scores well below the noise
start the choice near-random; scores above it let the rule that starts ahead take the choice.

    python experiments/nps_score_spread.py --data_dir DIR/mnist \\
        --runs out/reproduce/nps_mnist_official/s0,out/screen/nps_mnist_unscaled/s0,out/screen/nps_mnist_key/s0

Each folder is a train.py run of nps on mnist_transform (its checkpoint holds the configs; its weights
are not used).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataError, MNISTTransform, MNISTTransformConfig  # noqa: E402
from nps import NPS, NPSConfig  # noqa: E402
from train import UserError, load_checkpoint, run_command  # noqa: E402


@torch.no_grad()
def spread(model, x):
    """x (B, input_size) one frame per sample -> (mean std, mean range) of the stage 1 scores over (rule, slot)."""
    C = model.config.condition_size
    scores = model.match_scores(model.encode(x), x[:, x.shape[1] - C:]).flatten(1)  # (B, N * S)
    return scores.std(1).mean().item(), (scores.max(1).values - scores.min(1).values).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated train.py run folders of nps on mnist_transform")
    parser.add_argument("--data_dir", required=True, help="the folder with the four MNIST files")
    parser.add_argument("--seeds", default="0,1,2", help="fresh weights drawn with these seeds")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for run in [r for r in args.runs.split(",") if r]:
        ckpt = load_checkpoint(os.path.join(run, "ckpt.pt"), "nps", "mnist_transform")
        task_config = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["task_config"].items()}
        try:
            task = MNISTTransform(MNISTTransformConfig(**{**task_config, "train_size": min(task_config["train_size"], 1000),
                                                             "eval_samples": min(task_config["eval_samples"], 100)}), args.data_dir)
        except DataError as e:
            raise UserError(str(e))
        x = task.train_batch(256, torch.Generator().manual_seed(0))["x"][:, 0]
        for seed in seeds:
            torch.manual_seed(seed)
            std, width = spread(NPS(NPSConfig(**ckpt["model_config"])).eval(), x)
            print(f"{run} seed {seed}: stage 1 scores, std over (rule, slot) {std:.3f}, max - min {width:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_command(main)
