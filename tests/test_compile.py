"""torch.compile in training: on by default where MODELS says it is faster on the CPU, an eager fallback
after one warning line when compiling fails, compile time reported apart from training time, and
compiled steps that compute what the eager ones do (those tests compile, so they are `slow`:
python -m pytest -m slow)."""

import json
import os

import pytest
import torch

import train
from train import main

TINY = ["--max_len", "4", "--eval_lengths", "4,8", "--eval_samples", "16", "--batch_size", "4",
        "--memory_size", "16", "--controller_size", "16", "--log_interval", "1", "--no-figures", "--max_iters", "3"]


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.compile_default
def test_compile_is_the_cpu_default_exactly_for_the_models_marked_faster(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(train, "compile_for_training", lambda model: compiled.append(type(model).__name__) or model)
    main(["--out_dir", str(tmp_path / "ntm"), *TINY, "--device", "cpu"])
    main(["--out_dir", str(tmp_path / "off"), *TINY, "--device", "cpu", "--no-compile"])
    main(["--out_dir", str(tmp_path / "lstm"), "--model", "lstm", "--hidden_size", "8", "--max_len", "4",
          "--eval_lengths", "4", "--eval_samples", "8", "--batch_size", "4", "--no-figures", "--max_iters", "3",
          "--device", "cpu"])
    assert compiled == ["NTM"]  # ntm is marked, lstm is not, and --no-compile wins
    assert train.MODELS["ntm"].cpu_compile and not train.MODELS["lstm"].cpu_compile
    assert not train.MODELS["act"].cpu_compile and not train.MODELS["nps"].cpu_compile


def test_a_failing_compile_warns_once_and_training_goes_on_eager(tmp_path, monkeypatch, capsys):
    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return call

    eager = str(tmp_path / "eager")
    main(["--out_dir", eager, *TINY, "--no-compile"])
    capsys.readouterr()
    monkeypatch.setattr(train.torch, "compile", broken_compile)
    out = str(tmp_path / "fallback")
    result = main(["--out_dir", out, *TINY, "--compile"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "eager" in warnings[0]
    assert "No working C++ compiler" in warnings[0] and "more detail" not in err  # one line
    assert result["metrics"]["iter"] == 3 and losses(out) == losses(eager)  # the same training as eager
    assert "step" not in result["model"].__dict__  # the model is left with its own step


def test_compile_seconds_are_reported_apart_from_training_seconds(tmp_path, monkeypatch):
    def slow_compile(fn, *args, **kwargs):
        state = {"first": True}

        def call(*a, **k):
            if state["first"]:  # the first call is where a real compile spends its time
                state["first"] = False
                import time
                time.sleep(0.5)
            return fn(*a, **k)
        return call

    monkeypatch.setattr(train.torch, "compile", slow_compile)
    out = str(tmp_path / "run")
    metrics = main(["--out_dir", out, *TINY, "--compile"])["metrics"]
    assert metrics["compile_seconds"] >= 0.5 and metrics["seconds"] < metrics["compile_seconds"]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["compile_seconds"] == pytest.approx(
        metrics["compile_seconds"], abs=0.1)
    assert main(["--out_dir", out, *TINY, "--eval_only"])["metrics"]["compile_seconds"] == metrics["compile_seconds"]


def test_evaluation_runs_the_eager_step_while_training_holds_a_compiled_one(tmp_path, monkeypatch):
    calls = {"training": 0, "evaluation": 0}
    phase = ["training"]

    def counting_compile(fn, *args, **kwargs):
        def call(*a, **k):
            calls[phase[0]] += 1
            return fn(*a, **k)
        return call

    real_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        phase[0] = "evaluation"
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            phase[0] = "training"

    monkeypatch.setattr(train.torch, "compile", counting_compile)
    monkeypatch.setattr(train, "evaluate", evaluate)
    result = main(["--out_dir", str(tmp_path / "run"), *TINY[:-2], "--max_iters", "2", "--eval_interval", "1",
                   "--compile"])
    assert calls["training"] > 0 and calls["evaluation"] == 0  # no recompiling for evaluation's batch shapes
    assert "step" in result["model"].__dict__  # and the compiled step is back in place afterwards


# ----------------------------------------------------------------------------------------------
# Compiled and eager steps agree (these compile: tens of seconds each)

def tiny_model(name):
    from brims import BRIMs, BRIMsConfig
    from ntm import NTM, NTMConfig
    from rims import RIMs, RIMsConfig
    from slot_attention import SlotAttention, SlotAttentionConfig
    if name == "ntm":
        return NTM(NTMConfig(input_size=6, output_size=4, controller_size=16, memory_size=8, memory_width=5)), (2, 5, 6)
    if name == "rims":
        return RIMs(RIMsConfig(input_size=5, output_size=3, num_modules=6, num_active=4, hidden_size=24, input_key_size=8,
                               input_value_size=10, comm_heads=2, comm_key_size=4, comm_value_size=4)), (2, 5, 5)
    if name == "brims":
        return BRIMs(BRIMsConfig(input_size=5, output_size=3, num_layers=2, num_modules=(6, 4), num_active=(4, 2),
                                 hidden_size=(24, 16), input_key_size=8, input_value_size=10, comm_heads=2,
                                 comm_key_size=4, comm_value_size=4)), (2, 5, 5)
    if name == "neural_interpreter":
        from neural_interpreter import NeuralInterpreter, NIConfig
        return NeuralInterpreter(NIConfig(image_size=28, in_channels=1, patch_size=7, width=16, code_size=16, type_size=8,
                                          num_functions=3, num_iterations=2, num_heads=2, head_size=4)), (2, 1, 28, 28)
    return SlotAttention(SlotAttentionConfig(image_size=16, num_slots=3, slot_size=16, mlp_hidden_size=32,
                                             encoder_channels=8, decoder_channels=8, encoder_stride_layers=1,
                                             decoder_init_size=4)), (2, 3, 16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, entry in train.MODELS.items() if entry.cpu_compile])
def test_compiled_training_step_matches_eager_outputs_and_gradients(name, monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the same random numbers as eager
    torch.manual_seed(0)
    model, shape = tiny_model(name)
    x = torch.rand(shape) if name in ("slot_attention", "neural_interpreter") else (torch.rand(shape) > 0.5).float()

    def outputs_and_grads(module):
        torch.manual_seed(1)
        module.zero_grad(set_to_none=True)
        logits, _ = module(x)
        logits.float().square().mean().backward()
        return logits.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_out, eager_grads = outputs_and_grads(model)
    compiled = train.compile_for_training(model)
    compiled_out, compiled_grads = outputs_and_grads(compiled)
    assert torch.allclose(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    assert len(compiled_grads) == len(eager_grads)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        assert torch.allclose(g_compiled, g_eager, atol=1e-5, rtol=1e-4)
    train.undo_compile(model)


@pytest.mark.slow
def test_bench_reports_eager_and_compiled_side_by_side(tmp_path):
    import subprocess
    import sys
    rows = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "bench.py", "--models", "ntm", "--tasks", "copy", "--batch_sizes", "2",
                           "--runs", "1", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(rows)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    eager, compiled = [json.loads(line) for line in rows.read_text().splitlines()]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0
    assert "speed-up" in proc.stdout and "compile s" in proc.stdout
