"""
One LIM training step (lim.py: the experts' stacked weights run as grouped convolutions, every expert
scored without gradient, then each image re-run through its winner only) against the same algorithm
written the way the public implementations run it: one nn.Module per expert in a Python list, every
expert run with gradient on the whole batch, the discriminator called once per expert, and each
expert's loss masked to the images it won. Same sizes, same batch, the two alternating run after run
so that a noisy machine slows both alike.

    python benchmarks/lim_vs_loop.py --threads 1                          # the CPU preset's sizes, batch 32
    python benchmarks/lim_vs_loop.py --threads 1 --expert_layers 5 --expert_channels 32 \\
        --expert_batch_norm --disc_hidden 1024                            # the paper's sizes

Prints the median ms per training step (forward, backward, Adam) of each and the ratio. The loop version
is ours, written from the public code's structure (not copied); it computes the same losses.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lim import LIM, Discriminator, LIMConfig  # noqa: E402


class LoopLIM(nn.Module):
    """The same model and losses, one expert module at a time."""

    def __init__(self, config):
        super().__init__()
        def expert():
            widths = [1] + [config.expert_channels] * (config.expert_layers - 1) + [1]
            layers = []
            for i, (a, b) in enumerate(zip(widths, widths[1:])):
                layers.append(nn.Conv2d(a, b, 3, padding=1))
                if i < len(widths) - 2:
                    layers += [nn.BatchNorm2d(b)] if config.expert_batch_norm else []
                    layers.append(nn.ELU())
            return nn.Sequential(*layers, nn.Sigmoid())
        self.experts = nn.ModuleList(expert() for _ in range(config.num_experts))
        self.discriminator = Discriminator(config)

    def forward(self, x, real):
        outputs = [e(x) for e in self.experts]  # every expert, with gradient
        scores = torch.stack([self.discriminator(o.detach()) for o in outputs], 1)  # (B, N')
        winner = scores.detach().argmax(1)
        d_loss = -(F.logsigmoid(self.discriminator(real)).mean() + F.logsigmoid(-scores).mean())
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        e_loss = 0
        for j, o in enumerate(outputs):  # each expert's loss on the images it won
            mask = (winner == j).float()
            e_loss = e_loss - (F.logsigmoid(self.discriminator(o)) * mask).sum() / len(x)
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        return d_loss + e_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_experts", type=int, default=10)
    parser.add_argument("--expert_layers", type=int, default=4)
    parser.add_argument("--expert_channels", type=int, default=16)
    parser.add_argument("--expert_batch_norm", action="store_true", help="as the paper (the CPU preset has none)")
    parser.add_argument("--disc_channels", default="16,16,32,32")
    parser.add_argument("--disc_hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py on the CPU: subnormals made a step 2.5x slower on real digits
    config = LIMConfig(num_experts=args.num_experts, expert_layers=args.expert_layers,
                       expert_channels=args.expert_channels, expert_batch_norm=args.expert_batch_norm,
                       disc_hidden=args.disc_hidden, identity_iters=0,
                       disc_channels=tuple(int(c) for c in args.disc_channels.split(",")))
    torch.manual_seed(0)
    # binary images, so the backgrounds are exactly black as MNIST's are
    x, real = (torch.rand(args.batch_size, 1, 28, 28) > 0.8).float(), (torch.rand(args.batch_size, 1, 28, 28) > 0.8).float()
    models = {"lim.py": LIM(config), "loop": LoopLIM(config)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    def train_step(name):
        model = models[name]
        loss = model(x, real=real)[1]["loss"] if name == "lim.py" else model(x, real)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    times = {name: [] for name in models}
    for name in models:
        train_step(name)  # warm-up
    for _ in range(args.runs):
        for name in models:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(name)
            times[name].append((time.perf_counter() - t0) / args.steps)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"batch {args.batch_size}, {args.num_experts} experts of {args.expert_layers} layers x {args.expert_channels}"
          f"{' with batch norm' if args.expert_batch_norm else ''}, "
          f"D {args.disc_channels} / {args.disc_hidden}, {torch.get_num_threads()} thread(s)")
    for name, value in ms.items():
        print(f"{name:>8}: {value:8.1f} ms per training step")
    print(f"loop / lim.py: {ms['loop'] / ms['lim.py']:.2f}x")


if __name__ == "__main__":
    main()
