"""
One RIMs training step against one step of torch's fused nn.LSTM (our lstm.py, one layer) of the
same total hidden size, on the same batch of copy_delay sequences, timed side by side: the two
alternate, run after run, so that a noisy machine slows both alike.

    python benchmarks/rims_vs_lstm.py                          # hidden 600 (the paper's), batch 64, T = 50
    python benchmarks/rims_vs_lstm.py --hidden_size 120 --input_value_size 32 --comm_key_size 16 \
        --comm_value_size 16 --batch_size 32 --threads 1 --compile     # the copy_delay preset's size

Prints the median ms per training step (forward, backward, Adam) of each and its ratio to the LSTM's.
--compile adds the same RIMs with its step compiled (torch.compile, as train.py trains it on the CPU);
--compile_modes step,max-autotune,whole adds inductor's max-autotune and the whole unrolled forward beside it.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import CopyDelay, CopyDelayConfig  # noqa: E402
from lstm import LSTM, LSTMConfig  # noqa: E402
from rims import RIMs, RIMsConfig  # noqa: E402


def time_side_by_side(models, loss_of, x, runs, steps):
    """Median ms per training step (forward, backward, Adam) of each model on input x, the models
    alternating run after run so that a noisy machine slows them alike. loss_of(logits) -> loss."""
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    def train_step(name):
        logits, _ = models[name](x)
        loss = loss_of(logits)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:  # warm-up
        train_step(name)
    times = {name: [] for name in models}
    for _ in range(runs):
        for name in models:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(name)
            times[name].append(1000 * (time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def with_compiled_step(models, name, modes=("step",)):
    """models plus a compiled copy of models[name] per mode, after it: 'step' compiles its step as train.py's
    compile_for_training does for recurrent models on the CPU ('+compile'); 'max-autotune' the same with
    inductor's max-autotune, which may pick its own C++ GEMM kernels for the matmuls; 'whole' the whole
    forward, the time loop unrolled (minutes of compiling). Compiling happens in the warm-up."""
    out = {name: models[name]}
    for mode in modes:
        compiled = copy.deepcopy(models[name])
        if mode == "whole":
            compiled = torch.compile(compiled)
        else:
            compiled.step = torch.compile(compiled.step, mode=None if mode == "step" else mode)
        out[f"{name}+compile" + ("" if mode == "step" else f"({mode})")] = compiled
    return {**out, **{k: m for k, m in models.items() if k != name}}


def report(models, ms):
    """One line per model (ms per step, parameters), then each model's time over the last one's (the LSTM)."""
    width = max(map(len, models))
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<{width}} {ms[name]:9.1f} ms/step  {params:>9,} parameters")
    *others, reference = list(models)
    for name in others:
        print(f"{name} / {reference} = {ms[name] / ms[reference]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=600)
    parser.add_argument("--input_value_size", type=int, default=400)
    parser.add_argument("--comm_key_size", type=int, default=32)
    parser.add_argument("--comm_value_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--delay", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    parser.add_argument("--compile", action="store_true", help="also time RIMs with its step compiled")
    parser.add_argument("--compile_modes", default="step",
                        help="with --compile, comma-separated: step (as train.py), max-autotune, whole")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = CopyDelay(CopyDelayConfig(delay=args.delay))
    batch = task.train_batch(args.batch_size, torch.Generator().manual_seed(0))
    size = dict(input_size=task.spec["input_size"], output_size=task.spec["output_size"], hidden_size=args.hidden_size)
    models = {"rims": RIMs(RIMsConfig(**size, input_value_size=args.input_value_size,
                                      comm_key_size=args.comm_key_size, comm_value_size=args.comm_value_size)),
              "lstm": LSTM(LSTMConfig(**size, num_layers=1))}
    if args.compile:
        modes = tuple(m for m in args.compile_modes.split(",") if m)
        if not modes or any(m not in ("step", "max-autotune", "whole") for m in modes):
            parser.error(f"--compile_modes takes step, max-autotune and whole, got {args.compile_modes!r}")
        models = with_compiled_step(models, "rims", modes)
    ms = time_side_by_side(models, lambda logits: task.loss(logits, batch), batch["x"], args.runs, args.steps)
    steps = batch["x"].shape[1]
    print(f"copy_delay T = {args.delay} ({steps} steps), batch {args.batch_size}, hidden {args.hidden_size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.runs} runs of {args.steps} steps")
    report(models, ms)


if __name__ == "__main__":
    main()
