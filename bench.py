"""
Training throughput of every model on its tasks: one optimizer step (forward, backward,
Adam) on a fixed batch shape, timed after warm-up, median over several runs.

    python bench.py                                   # every model on copy, batch 1, 16 and 32
    python bench.py --models ntm --tasks copy,associative_recall --batch_sizes 16
    python bench.py --device cuda --modes compiled    # on a GPU, compiled, bf16 autocast
    python bench.py --models rims,lstm --tasks copy_delay --batch_sizes 64 --set hidden_size=600,num_layers=1
    python bench.py --models lim --tasks mnist_mechanisms --batch_sizes 32 --set identity_iters=0 --data_dir DIR

Prints one row per (model, task, batch size): eager and compiled side by side (ms per step, sequences
per second, the speed-up and the seconds the first compiled step spent compiling) and, with --json FILE,
writes one JSON line per mode.
The shape is the task's `bench_setting` (copy: length-20 sequences, 41 steps). Each model is built
as train.py builds it for the task (its preset's model fields included); --set overrides model
fields, for every model that has them (e.g. the same total hidden_size for RIMs and the LSTM; for LIM,
identity_iters=0 times the adversarial step rather than the identity phase that starts its training).
"""

import argparse
import json
import statistics
import time
from dataclasses import fields

import torch

from data import TASKS
from train import (MODELS, PRESETS, autocast_for, autodetect_device, compile_for_training, model_config_for,
                   model_inputs, objective, split_flags)


def parse_settings(text):
    """'hidden_size=600,num_layers=1' -> {'hidden_size': '600', ...} (converted per model field)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"--set takes name=value pairs separated by commas, got {text!r}")
    return dict(pairs)


def model_values(model_name, task_name, settings):
    """The preset's model fields for (model, task), then --set values for the fields this model has."""
    config_cls = MODELS[model_name][0]
    values = split_flags(PRESETS.get((model_name, task_name), {}), config_cls)
    for f in fields(config_cls):
        if f.name in settings:
            text = settings[f.name]
            if f.type is tuple:  # per-layer values separated by '/' (commas separate the pairs): 120/60
                values[f.name] = tuple(type(f.default[0])(v) for v in text.split("/"))
            else:
                values[f.name] = f.type(text) if f.type is not bool else text == "true"
    return values


def time_training(model_name, task_name, batch_size, device, compile_model, warmup, runs, steps,
                  settings=None, data_dir=None):
    task = TASKS[task_name][1](TASKS[task_name][0](), data_dir=data_dir)
    values = model_values(model_name, task_name, settings or {})
    model = raw = MODELS[model_name][1](model_config_for(model_name, task, values)).to(device)
    if compile_model:
        model = compile_for_training(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = task.eval_batch(task.bench_setting, batch_size, torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in batch.items()}
    device_type = device.split(":")[0]
    autocast = autocast_for(device_type)

    def train_step():
        with autocast:
            logits, internals = model(batch["x"], **model_inputs(task, batch, raw))
        loss = objective(task, logits, internals, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    train_step()  # compiles, when compiling
    sync()
    first_step = time.perf_counter() - t0
    for _ in range(warmup):
        train_step()
    sync()
    per_step = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step()
        sync()
        per_step.append((time.perf_counter() - t0) / steps)
    ms = 1000 * statistics.median(per_step)
    compile_seconds = max(0.0, first_step - ms / 1000) if compile_model else 0.0
    return {"model": model_name, "task": task_name, "setting": task.bench_setting, "batch": batch_size,
            "config": values, "params": sum(p.numel() for p in model.parameters()),
            "device": device, "compile": compile_model, "threads": torch.get_num_threads(),
            "ms_per_step": round(ms, 2), "ms_per_seq": round(ms / batch_size, 3),
            "seq_per_s": round(1000 * batch_size / ms, 1), "compile_seconds": round(compile_seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--tasks", default="copy", help="comma-separated")
    parser.add_argument("--batch_sizes", default="1,16,32", help="comma-separated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="eager,compiled",
                        help="eager, compiled (torch.compile of the model, or of the step of recurrent ones) or both")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    parser.add_argument("--json", default="", help="also append the rows to this file as JSON lines")
    parser.add_argument("--set", default="", help="model fields for every model that has them, e.g. hidden_size=600")
    parser.add_argument("--data_dir", default="", help="for tasks on real datasets (seqmnist)")
    args = parser.parse_args()
    models, tasks = args.models.split(","), args.tasks.split(",")
    unknown = [m for m in models if m not in MODELS] + [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown model or task {', '.join(unknown)}: models are {', '.join(MODELS)}, tasks {', '.join(TASKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = autodetect_device(args.device)
    if device == "cpu":
        torch.set_flush_denormal(True)  # as train.py
    modes = args.modes.split(",")
    if not modes or any(m not in ("eager", "compiled") for m in modes):
        parser.error(f"--modes takes eager, compiled or eager,compiled, got {args.modes!r}")
    header = "".join(f" {m + ' ms/step':>19} {m + ' seq/s':>17}" for m in modes)
    print(f"{'model':<22} {'task':<20} {'batch':>5}{header}" + (f" {'speed-up':>9} {'compile s':>10}"
                                                               if modes == ["eager", "compiled"] else ""))
    for task_name in tasks:
        for model_name in models:
            if TASKS[task_name][1].kind not in MODELS[model_name][2]:  # e.g. ntm on algo_copy
                continue
            for batch_size in map(int, args.batch_sizes.split(",")):
                rows = [time_training(model_name, task_name, batch_size, device, mode == "compiled",
                                      args.warmup, args.runs, args.steps, parse_settings(args.set),
                                      args.data_dir or None) for mode in modes]
                cells = "".join(f" {r['ms_per_step']:>19.2f} {r['seq_per_s']:>17.1f}" for r in rows)
                if len(rows) == 2:
                    cells += f" {rows[0]['ms_per_step'] / rows[1]['ms_per_step']:>8.2f}x {rows[1]['compile_seconds']:>10.1f}"
                print(f"{model_name:<22} {task_name:<20} {batch_size:>5}{cells}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
