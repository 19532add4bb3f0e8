"""
One Neural Interpreter training step, ours (neural_interpreter.py) against the official implementation
(nasimrahaman/neural-interpreter, the model only), at the same sizes: the digits CPU preset by default
(28 x 28 x 1 in patches of 7, width 64, codes 64, types 16, 5 functions, 4 iterations, 2 heads of 16) or the
official digits preset with --paper. The two alternate run after run, so a noisy machine slows both alike.

    git clone https://github.com/nasimrahaman/neural-interpreter /tmp/neural-interpreter    # needs einops, addict, pyyaml
    python benchmarks/neural_interpreter_official.py --repo /tmp/neural-interpreter --threads 1
    python benchmarks/neural_interpreter_official.py --repo /tmp/neural-interpreter --threads 1 --paper --batch_size 8

Prints the parameters of each, the median ms per training step (forward, cross-entropy, backward, Adam)
and the ratio. The official model is built from its presets/digits.yml with the sizes overridden; it
is imported from --repo, never copied here.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neural_interpreter import NeuralInterpreter, NIConfig  # noqa: E402

CPU = dict(image_size=28, in_channels=1, patch_size=7, width=64, code_size=64, type_size=16, num_functions=5,
           num_iterations=4, num_heads=2, head_size=16)
PAPER = dict(image_size=32, in_channels=3, patch_size=4, width=192, code_size=192, type_size=24, num_functions=5,
             num_iterations=8, num_heads=4, head_size=32)


def official_model(repo, sizes):
    sys.path.insert(0, repo)
    try:
        from neural_interpreters.core.interface import NeuralInterpreter as Official
        from neural_interpreters.utils import read_yaml
    except ImportError as e:
        sys.exit(f"cannot import the official code from {repo} ({e}): clone it there and pip install einops addict pyyaml")
    kwargs = copy.deepcopy(read_yaml(os.path.join(repo, "presets", "digits.yml")).model.kwargs.to_dict())
    kwargs.update(image_size=sizes["image_size"], image_input_channels=sizes["in_channels"],
                  patch_size=sizes["patch_size"], num_classes_in_dataset={"mnist": 10, "inverted": 10, "rotated": 10})
    script = kwargs["program_kwargs"]["script_kwargs"]
    script.update(variable_features=sizes["width"], type_features=sizes["type_size"],
                  num_iterations=sizes["num_iterations"])
    pod = script["function_pod_kwargs"]
    pod.update(code_features=sizes["code_size"], num_functions=sizes["num_functions"],
               num_heads_in_loc=sizes["num_heads"], num_features_per_loc_head=sizes["head_size"])
    return Official(**kwargs)


def step_time(step, runs, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="a clone of nasimrahaman/neural-interpreter")
    parser.add_argument("--paper", action="store_true", help="the official digits preset's sizes instead of the CPU preset's")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = PAPER if args.paper else CPU
    torch.manual_seed(0)
    ours = NeuralInterpreter(NIConfig(**sizes, num_domains=3))
    official = official_model(args.repo, sizes)
    x = torch.rand(args.batch_size, sizes["in_channels"], sizes["image_size"], sizes["image_size"])
    y = torch.randint(0, 10, (args.batch_size,))

    def trainer(model, logits_of):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(logits_of(model), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    steps = {"ours": trainer(ours, lambda m: m(x)[0]),
             "official": trainer(official, lambda m: m(x).predictions["mnist"])}
    times = {name: [] for name in steps}
    for _ in range(args.runs):  # alternate, one run at a time
        for name, step in steps.items():
            times[name] += step_time(step, 1, args.steps, warmup=2)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, model in (("ours", ours), ("official", official)):
        print(f"{name:9s} {sum(p.numel() for p in model.parameters()):8d} parameters  {medians[name]:8.1f} ms/step")
    print(f"official / ours: {medians['official'] / medians['ours']:.2f}x  (batch {args.batch_size}, "
          f"{'paper' if args.paper else 'CPU preset'} sizes, {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
