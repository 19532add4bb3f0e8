"""train.py: reproducible, resumable, honest about bad input, and it learns."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import train
from train import MODELS, UserError, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_len", "4", "--eval_lengths", "4,8", "--eval_samples", "16", "--batch_size", "4",
        "--memory_size", "16", "--controller_size", "16", "--log_interval", "1", "--no-figures"]


def run(tmp_path, *flags, name="run"):
    out = str(tmp_path / name)
    result = main(["--out_dir", out, *TINY, *flags])
    return out, result


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_the_same_seed_gives_the_same_losses(tmp_path):
    a, _ = run(tmp_path, "--max_iters", "5", name="a")
    b, _ = run(tmp_path, "--max_iters", "5", name="b")
    c, _ = run(tmp_path, "--max_iters", "5", "--seed", "1", name="c")
    assert losses(a) == losses(b) and len(losses(a)) == 5
    assert losses(a) != losses(c)


@pytest.mark.parametrize("model", ["ntm", "lstm"])
def test_an_interrupted_run_resumes_with_the_identical_next_losses(tmp_path, model, monkeypatch):
    tiny = TINY[:8] + TINY[12:] if model == "lstm" else TINY  # the NTM's size flags are not LSTM flags
    flags = ["--model", model, *tiny, "--eval_interval", "3", "--max_iters", "6"]
    if model == "lstm":
        flags += ["--hidden_size", "8", "--num_layers", "1"]
    straight = str(tmp_path / "straight")
    main(["--out_dir", straight, *flags])

    calls = {"n": 0}
    real_loss = train.TASKS["copy"][1].loss

    def loss_then_crash(self, logits, batch):  # the machine dies during step 5
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(self, logits, batch)

    resumed = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        patch.setattr(train.TASKS["copy"][1], "loss", loss_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(["--out_dir", resumed, *flags])
    assert torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["iter"] == 3
    main(["--out_dir", resumed, *flags, "--resume"])
    with open(os.path.join(resumed, "log.jsonl")) as f:
        iters = [r["iter"] for r in map(json.loads, f) if "loss" in r]
    assert iters == [1, 2, 3, 4, 4, 5, 6]  # step 4 came after the checkpoint: it is redone
    assert losses(resumed)[4:] == losses(straight)[3:]


def test_eval_only_reproduces_the_final_metrics(tmp_path):
    out, result = run(tmp_path, "--max_iters", "4")
    with open(os.path.join(out, "metrics.json")) as f:
        trained = json.load(f)
    assert set(trained) == {"bit_err@4", "bit_err@8", "bit_err@val4", "iter", "seconds", "compile_seconds",
                            "selected_iter"}
    assert trained == {**result["metrics"], "seconds": trained["seconds"]}
    _, again = run(tmp_path, "--eval_only")
    assert again["metrics"] == trained
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == trained


@pytest.mark.slow  # a minute of the default suite's two; .ci/run runs it with -m slow
def test_a_short_cpu_run_lowers_the_copy_loss_well_below_its_start(tmp_path):
    out = str(tmp_path / "learn")
    result = main(["--out_dir", out, "--min_len", "3", "--max_len", "3", "--eval_lengths", "3",
                   "--eval_samples", "64", "--batch_size", "16", "--lr", "3e-3", "--max_iters", "300",
                   "--eval_interval", "300", "--log_interval", "10", "--no-figures"])
    curve = losses(out)
    assert curve[0] > 0.65  # chance is ln 2 = 0.69 per bit
    assert sum(curve[-3:]) / 3 < 0.6 * curve[0]
    assert result["metrics"]["bit_err@3"] < 6  # chance: half of the 3 x 8 bits


def test_figures_are_valid_pngs_of_outputs_and_memory_weightings(tmp_path):
    out, _ = run(tmp_path, "--max_iters", "2", "--figures")
    names = sorted(os.listdir(out))
    assert {"outputs_4.png", "outputs_8.png", "internals_4.png", "internals_8.png"} <= set(names)
    with open(os.path.join(out, "outputs_8.png"), "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    idat = png[png.index(b"IDAT") + 4:]
    raw = zlib.decompress(idat[: int.from_bytes(png[png.index(b"IDAT") - 4: png.index(b"IDAT")], "big")])
    assert len(raw) == height * (1 + 3 * width)  # one filter byte and RGB per pixel on each row


def test_write_png_round_trips_pixels(tmp_path):
    image = torch.randint(0, 256, (3, 5, 3), dtype=torch.uint8)
    path = str(tmp_path / "x.png")
    train.write_png(path, image)
    with open(path, "rb") as f:
        png = f.read()
    start = png.index(b"IDAT")
    length = int.from_bytes(png[start - 4: start], "big")
    raw = zlib.decompress(png[start + 4: start + 4 + length])
    rows = [raw[i * 16 + 1: (i + 1) * 16] for i in range(3)]
    assert b"".join(rows) == bytes(image.flatten().tolist())


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit, nothing half-written.

@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt"], "unknown model 'gpt': choose one of"),
    (["--task", "sort"], "unknown task 'sort': choose one of"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--controller", "gru"], "controller must be 'lstm' or 'feedforward'"),
    (["--eval_lengths", "a,b"], "comma-separated ints"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--resume"], "no checkpoint at"),
    (["--stop_when", "err@20"], "--stop_when must read METRIC<VALUE or METRIC>VALUE"),
    (["--stop_when", "err@20<low"], "--stop_when must read METRIC<VALUE or METRIC>VALUE"),
    (["--eval_only"], "no checkpoint at"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, flags, message):
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("'", "'")):
        main(["--out_dir", out, *flags])
    assert not os.path.exists(out)


def test_an_out_dir_that_is_a_file_or_lies_under_one_is_refused_before_any_work(tmp_path, monkeypatch):
    def not_built(*args, **kwargs):
        raise AssertionError("the task was built: work started before --out_dir was checked")

    monkeypatch.setitem(train.TASKS, "copy", (train.TASKS["copy"][0], not_built))  # a download, say
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "run", "lies under the file")):
        with pytest.raises(UserError, match=message):
            main(["--out_dir", str(out)])
    assert a_file.read_text() == "keep me"


def test_the_command_line_refuses_an_out_dir_that_is_a_file_with_one_line(tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root")
    proc = subprocess.run([sys.executable, "train.py", "--out_dir", str(a_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out_dir") and proc.stderr.count("\n") == 1
    assert a_file.read_text() == "root"


def test_an_unavailable_device_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="--device cuda is not available"):
        main(["--out_dir", str(tmp_path / "out"), "--device", "cuda"])


def test_a_model_that_does_not_fit_the_task_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(train.MODELS, "imagenet_only", train.ModelEntry(train.LSTMConfig, train.LSTM, ("image",), False))
    with pytest.raises(UserError, match="does not fit --task copy .* use one of ntm, lstm, act"):
        main(["--out_dir", str(tmp_path / "out"), "--model", "imagenet_only"])
    assert not os.path.exists(tmp_path / "out")


def test_checkpoints_of_another_model_or_corrupt_files_are_refused(tmp_path):
    out, _ = run(tmp_path, "--max_iters", "1")
    with pytest.raises(UserError, match="holds --model ntm --task copy, not --model lstm"):
        main(["--out_dir", out, "--model", "lstm", "--eval_only"])
    with pytest.raises(UserError, match="differ from the checkpoint"):
        main(["--out_dir", out, *TINY, "--memory_size", "32", "--resume"])
    with open(os.path.join(out, "ckpt.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        main(["--out_dir", out, "--eval_only"])


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train.TASKS["copy"][1].loss

    def loss_that_breaks(self, logits, batch):
        calls["n"] += 1
        value = real_loss(self, logits, batch)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(train.TASKS["copy"][1], "loss", loss_that_breaks)
    out = str(tmp_path / "nan")
    with pytest.raises(UserError, match="loss became nan at step 5; the last good checkpoint is kept"):
        main(["--out_dir", out, *TINY, "--max_iters", "10", "--eval_interval", "2"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter"] == 4


def test_the_command_line_prints_one_error_line_and_exits_non_zero(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "train.py", "--model", "gpt", "--out_dir", out],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: unknown model 'gpt': choose one of {', '.join(MODELS)}"]
    assert not os.path.exists(out)


def test_help_lists_every_flag_with_its_default():
    proc = subprocess.run([sys.executable, "train.py", "--model", "ntm", "--task", "copy", "-h"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--max_iters", "--batch_size", "--lr", "--seed", "--device", "--out_dir", "--data_dir",
                 "--eval_interval", "--compile", "--resume", "--eval_only", "--memory_size",
                 "--controller", "--eval_lengths"):
        assert flag in proc.stdout
    assert "(default: 128)" in proc.stdout


# ----------------------------------------------------------------------------------------------

def test_model_files_import_and_run_when_copied_alone(tmp_path):
    for name in ("ntm.py", "lstm.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
        proc = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ""})
        assert proc.returncode == 0, proc.stderr
        assert "torch.Size([2, 5, 8])" in proc.stdout


@pytest.mark.slow  # a minute of the default suite's two; .ci/run runs it with -m slow
def test_ddp_with_two_gloo_processes_keeps_parameters_in_agreement(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {ROOT!r})
        torch.set_num_threads(1)
        import train
        result = train.main(["--out_dir", {str(tmp_path / 'ddp')!r}, *{TINY!r}, "--max_iters", "3",
                             "--device", "cpu", "--no-compile"])
        flat = torch.cat([p.detach().flatten() for p in result["model"].parameters()])
        torch.save(flat, {str(tmp_path)!r} + f"/params_{{os.environ['RANK']}}.pt")
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p0, p1 = (torch.load(tmp_path / f"params_{r}.pt") for r in (0, 1))
    assert torch.equal(p0, p1)
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 3 and len(ckpt["rng"]["data"]) == 2  # each rank's data stream is saved
    single, _ = run(tmp_path, "--max_iters", "3", name="single")  # and it did train on different data
    assert not torch.equal(torch.load(os.path.join(single, "ckpt.pt"), weights_only=True)["model"]["init_reads"],
                           ckpt["model"]["init_reads"])


def test_act_on_parity_trains_with_its_ponder_cost_and_reports_it(tmp_path):
    out = str(tmp_path / "act")
    result = main(["--model", "act", "--task", "parity", "--out_dir", out, "--input_size", "8",
                   "--hidden_size", "32", "--eval_samples", "256", "--batch_size", "32", "--max_iters", "400",
                   "--eval_interval", "400", "--log_interval", "10", "--lr", "1e-2", "--time_penalty", "1e-2"])
    metrics = result["metrics"]
    assert set(metrics) == {"err@8", "ponder@8", "iter", "seconds", "compile_seconds"}
    assert metrics["ponder@8"] >= 1.0  # rho = N + R is at least 1
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < curve[0]
    assert metrics["err@8"] < 25  # chance is 50 %
    assert os.path.exists(os.path.join(out, "outputs_8.png"))  # ponder steps vs non-zero inputs


def test_stop_when_ends_training_at_the_first_evaluation_where_it_holds(tmp_path):
    flags = ["--model", "act", "--task", "parity", "--input_size", "8", "--hidden_size", "16", "--eval_samples",
             "64", "--batch_size", "8", "--max_iters", "40", "--eval_interval", "10", "--log_interval", "10", "--no-figures"]
    out = str(tmp_path / "stops")
    metrics = main(["--out_dir", out, *flags, "--stop_when", "err@8<101"])["metrics"]  # holds at once
    assert metrics["iter"] == 10 and len(losses(out)) == 1  # log_interval 10: one loss, then the stop
    assert json.load(open(os.path.join(out, "metrics.json")))["iter"] == 10
    never = main(["--out_dir", str(tmp_path / "runs_on"), *flags, "--stop_when", "err@8<-1"])["metrics"]
    assert never["iter"] == 40
    missing = str(tmp_path / "missing")  # a metric the run does not measure: found at the first evaluation
    with pytest.raises(UserError, match="names 'acc@8', which this run does not measure: pick one of err@8, ponder@8"):
        main(["--out_dir", missing, *flags, "--stop_when", "acc@8>90"])
    assert not os.path.exists(missing)


@pytest.mark.slow  # 6 s of the default suite's two minutes; .ci/run runs it with -m slow
def test_bench_times_a_training_step_and_writes_json_rows(tmp_path):
    rows = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "bench.py", "--models", "ntm,act", "--tasks", "copy,parity",
                           "--batch_sizes", "2", "--runs", "1", "--steps", "1", "--warmup", "0", "--threads", "1", "--modes", "eager",
                           "--json", str(rows)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {(r["model"], r["task"]) for r in results} == {("ntm", "copy"), ("ntm", "parity"), ("act", "copy"), ("act", "parity")}
    assert all(r["ms_per_step"] > 0 and r["batch"] == 2 for r in results)


def test_act_and_lstm_run_on_addition_with_the_papers_settings_as_presets(tmp_path):
    out = str(tmp_path / "add")
    result = main(["--model", "act", "--task", "addition", "--out_dir", out, "--hidden_size", "16",
                   "--max_numbers", "3", "--max_digits", "2", "--eval_samples", "64", "--max_iters", "3"])
    assert set(result["metrics"]) == {"seq_err@3x2", "ponder@3x2", "iter", "seconds", "compile_seconds"}
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model_config"]["cell"] == "lstm" and ckpt["model_config"]["max_steps"] == 20  # section 3.3
    assert os.path.exists(os.path.join(out, "outputs_3x2.png"))
    result = main(["--model", "lstm", "--task", "addition", "--out_dir", str(tmp_path / "lstm"), "--hidden_size", "16",
                   "--max_numbers", "3", "--max_digits", "2", "--eval_samples", "64", "--max_iters", "3"])
    assert set(result["metrics"]) == {"seq_err@3x2", "iter", "seconds", "compile_seconds"}


def test_warmup_ramps_the_learning_rate_linearly_from_zero(tmp_path):
    out, _ = run(tmp_path, "--max_iters", "2", "--warmup_iters", "4", "--lr", "1e-3")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 4)  # the second of 4 warm-up steps


def test_every_preset_builds_its_model_and_task(tmp_path, monkeypatch):
    """Each PRESETS entry gives valid training, model and task settings (tasks that need a dataset are
    built up to the missing file, never downloaded here)."""
    import data
    from data import TASKS, DataError
    from train import MODELS, PRESETS, TrainConfig, model_config_for, split_flags

    def no_download(url, path, *args, **kwargs):
        raise DataError(f"{path} is missing (not downloaded in tests)")

    monkeypatch.setattr(data, "download", no_download)
    for (model_name, task_name), preset in PRESETS.items():
        TrainConfig(**split_flags(preset, TrainConfig))
        config_cls, task_cls = TASKS[task_name]
        try:
            task = task_cls(config_cls(**split_flags(preset, config_cls)), data_dir=str(tmp_path))
        except DataError:
            continue
        model_config_for(model_name, task, split_flags(preset, MODELS[model_name][0]))


def test_input_vocab_is_a_flag_where_the_task_leaves_it_to_the_preset_and_refused_where_the_task_sets_it():
    from types import SimpleNamespace
    _, _, flags = train.parse_args(["--model", "brims", "--task", "seqmnist", "--input_vocab", "0"])
    assert flags["input_vocab"] == 0  # MNIST's binary pixel fed as is, not embedded (the preset embeds it: 2)
    pixels = SimpleNamespace(spec={"kind": "sequence", "input_size": 1, "output_size": 10})
    assert train.model_config_for("brims", pixels, {"input_vocab": 0}).input_vocab == 0
    cifar_bytes = SimpleNamespace(spec={"kind": "sequence", "input_size": 3, "input_vocab": 256, "output_size": 10})
    assert train.model_config_for("brims", cifar_bytes, {}).input_vocab == 256
    with pytest.raises(UserError, match="--input_vocab is set by this task"):
        train.model_config_for("brims", cifar_bytes, {"input_vocab": 0})


def test_copy_keeps_the_checkpoint_with_the_fewest_validation_errors_and_the_test_sets_are_unchanged(tmp_path,
                                                                                                   monkeypatch):
    """A late collapse (NTM copy, docs/ntm.md) is not what gets reported: the checkpoint with the lowest
    bit_err on the validation sequences (training length) is, ties going to the later one; the test
    sequences are the same as without validation."""
    plain, _ = run(tmp_path, "--max_iters", "2", "--no-validation", name="plain")
    picked, result = run(tmp_path, "--max_iters", "6", "--eval_interval", "2", name="picked")
    with open(os.path.join(picked, "log.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "bit_err@val4" in r]
    assert [r["iter"] for r in evals] == [2, 4, 6] and all("bit_err@8" in r for r in evals)  # every length logged
    lowest = min(r["bit_err@val4"] for r in evals)
    chosen = max(r["iter"] for r in evals if r["bit_err@val4"] == lowest)
    assert result["metrics"]["selected_iter"] == chosen
    reported = next(r for r in evals if r["iter"] == chosen)
    assert result["metrics"]["bit_err@8"] == reported["bit_err@8"]  # the test sets scored on that checkpoint
    with open(os.path.join(plain, "metrics.json")) as f:
        first = json.load(f)
    assert evals[0]["bit_err@8"] == first["bit_err@8"]  # step 2: the same test sequences, the same score
