"""
One BRIMs training step against one step of torch's fused nn.LSTM (our lstm.py) with the same number
of layers and the same hidden size per layer, on the same batch of sequential-MNIST-shaped inputs
(binary pixels, 14 x 14 = 196 steps, a class read at the last step), timed side by side: the two
alternate, run after run, so that a noisy machine slows both alike. No dataset is needed.

    python benchmarks/brims_vs_lstm.py                                  # 2 layers of 600 (6 modules, 4 active), batch 64
    python benchmarks/brims_vs_lstm.py --hidden_size 120 --input_key_size 32 --input_value_size 32 \
        --comm_key_size 16 --comm_value_size 16 --threads 1             # the sequential-MNIST preset's size

BRIMs embeds the binary pixel with a 2-entry table of the hidden size, as the seqmnist preset does
(--input_vocab 0 feeds the pixel itself); the LSTM reads the pixel.

Prints the median ms per training step (forward, backward, Adam) of each and its ratio to the LSTM's;
--compile adds the same BRIMs with its step compiled (as train.py trains it on the CPU).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from brims import BRIMs, BRIMsConfig  # noqa: E402
from lstm import LSTM, LSTMConfig  # noqa: E402
from rims_vs_lstm import report, time_side_by_side, with_compiled_step  # noqa: E402  (the same timing, side by side)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=600, help="per layer, for both models")
    parser.add_argument("--num_modules", type=int, default=6)
    parser.add_argument("--num_active", type=int, default=4)
    parser.add_argument("--input_key_size", type=int, default=64)
    parser.add_argument("--input_value_size", type=int, default=400)
    parser.add_argument("--comm_key_size", type=int, default=32)
    parser.add_argument("--comm_value_size", type=int, default=32)
    parser.add_argument("--input_vocab", type=int, default=2, help="BRIMs embeds the pixel (2 codes); 0: reads it as is")
    parser.add_argument("--resolution", type=int, default=14, help="sequence length resolution ** 2")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--compile", action="store_true", help="also time BRIMs with its step compiled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = (torch.rand(args.batch_size, args.resolution ** 2, 1) > 0.8).float()
    y = torch.randint(0, 10, (args.batch_size,))
    models = {"brims": BRIMs(BRIMsConfig(input_size=1, output_size=10, num_layers=args.num_layers,
                                         num_modules=(args.num_modules,), num_active=(args.num_active,),
                                         hidden_size=(args.hidden_size,), input_key_size=args.input_key_size,
                                         input_value_size=args.input_value_size, comm_key_size=args.comm_key_size,
                                         comm_value_size=args.comm_value_size, input_vocab=args.input_vocab,
                                         embed_size=args.hidden_size)),
              "lstm": LSTM(LSTMConfig(input_size=1, output_size=10, hidden_size=args.hidden_size, num_layers=args.num_layers))}
    if args.compile:
        models = with_compiled_step(models, "brims")
    ms = time_side_by_side(models, lambda logits: F.cross_entropy(logits[:, -1], y), x, args.runs, args.steps)
    print(f"{args.resolution ** 2} steps, batch {args.batch_size}, {args.num_layers} layers of hidden {args.hidden_size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.runs} runs of {args.steps} steps")
    report(models, ms)


if __name__ == "__main__":
    main()
