"""The figure scripts of experiments/ and train.py's chart helper, on hand-made run folders."""

import json
import math
import os
import sys

import pytest
import torch

import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import ntm_curves  # noqa: E402


def copy_run_fixture(folder, model, losses, errors, batch_size=32):
    """A train.py copy run folder as ntm_curves reads it: log.jsonl and a checkpoint with the configs."""
    folder.mkdir(parents=True)
    torch.save({"model_name": model, "task_name": "copy", "task_config": {"width": 8, "min_len": 1, "max_len": 20},
                "train_config": {"batch_size": batch_size}}, folder / "ckpt.pt")
    with open(folder / "log.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"iter": 10 * (i + 1), "loss": loss}) + "\n")
        for i, err in enumerate(errors):
            f.write(json.dumps({"iter": 20 * (i + 1), "bit_err@val20": err, "bit_err@20": err}) + "\n")


def test_ntm_curves_turns_per_bit_losses_into_bits_per_sequence_and_draws_figure_3(tmp_path):
    for s, scale in enumerate((1.0, 0.5)):
        copy_run_fixture(tmp_path / "ntm" / f"s{s}", "ntm", [math.log(2) * scale, 0.01], [10.0 * scale, 1.0])
        copy_run_fixture(tmp_path / "lstm" / f"s{s}", "lstm", [math.log(2), 0.3], [60.0, 40.0])
    xs, cost, eval_xs, errors = ntm_curves.read_runs(str(tmp_path / "ntm"), "ntm")[1]
    assert xs == [0.32, 0.64] and eval_xs == [0.64, 1.28] and errors == [5.0, 1.0]
    assert cost[0] == pytest.approx(0.5 * 8 * 10.5)  # half a bit per target bit x 8 bits x mean length 10.5
    assert ntm_curves.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert ntm_curves.spread([[1.0, 2.0], [3.0, 4.0, 9.0]]) == ([2.0, 3.0], [1.0, 2.0], [3.0, 4.0])
    out = tmp_path / "fig.png"
    ntm_curves.main(["--ntm", str(tmp_path / "ntm"), "--lstm", str(tmp_path / "lstm"), "--out", str(out), "--smooth", "1"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(train.UserError, match="no seed folders"):
        ntm_curves.main(["--ntm", str(tmp_path / "none"), "--lstm", str(tmp_path / "lstm"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(train.UserError, match="must be a .png"):
        ntm_curves.main(["--ntm", str(tmp_path / "ntm"), "--lstm", str(tmp_path / "lstm"), "--out", str(tmp_path / "no" / "x.png")])
    assert not (tmp_path / "x.png").exists()


def addition_run_fixture(folder, model, errors, ponders=None, batch_size=32):
    """A train.py addition run folder as act_addition_curves reads it."""
    folder.mkdir(parents=True)
    torch.save({"model_name": model, "task_name": "addition", "task_config": {},
                "train_config": {"batch_size": batch_size}}, folder / "ckpt.pt")
    with open(folder / "log.jsonl", "w") as f:
        for i, err in enumerate(errors):
            f.write(json.dumps({"iter": 100 * (i + 1), "loss": 1.0}) + "\n")
            record = {"iter": 100 * (i + 1), "seq_err@3x2": err}
            if ponders:
                record["ponder@3x2"] = ponders[i]
            f.write(json.dumps(record) + "\n")


def test_act_addition_curves_reads_every_seed_and_reports_when_all_are_under(tmp_path, capsys):
    import act_addition_curves
    for s, errs in enumerate(([90.0, 20.0, 4.0], [95.0, 8.0, 3.0])):
        addition_run_fixture(tmp_path / "act" / f"s{s}", "act", errs, [3.0, 4.0, 3.5])
        addition_run_fixture(tmp_path / "lstm" / f"s{s}", "lstm", [99.0, 60.0, 30.0 + s])
    setting, seeds = act_addition_curves.read_runs(str(tmp_path / "act"), "act")
    assert setting == "3x2" and seeds[1] == [(3.2, 95.0, 3.0), (6.4, 8.0, 4.0), (9.6, 3.0, 3.5)]
    out = tmp_path / "fig.png"
    act_addition_curves.main(["--act", str(tmp_path / "act"), "--lstm", str(tmp_path / "lstm"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "act: seq_err@3x2 3.5 % (mean of 2 seeds) at 10K sequences; every seed under 10 % first at 10K" in printed
    assert "lstm: seq_err@3x2 30.5 %" in printed and "not every seed under 10 %" in printed
    with pytest.raises(train.UserError, match="holds --model lstm"):  # the folders swapped
        act_addition_curves.main(["--act", str(tmp_path / "lstm"), "--lstm", str(tmp_path / "act"), "--out", str(out)])
    with pytest.raises(train.UserError, match="no seed folders"):
        act_addition_curves.main(["--act", str(tmp_path / "none"), "--lstm", str(tmp_path / "lstm"), "--out", str(out)])


def test_line_chart_draws_bands_under_lines_and_clips_to_its_range():
    xs = [0, 1, 2]
    plot = train.line_chart(xs, [([0.5, 0.5, 0.5], (200, 0, 0))], width=50, height=40, pad=5,
                            bands=[([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], (0, 0, 200))], top=1.0)
    assert plot.shape == (40, 50, 3)
    middle = plot[:, 25]
    assert (middle == torch.tensor([200, 0, 0], dtype=torch.uint8)).all(-1).any()  # the line
    assert (middle == torch.tensor([178, 178, 238], dtype=torch.uint8)).all(-1).sum() > 20  # the lighter band
    clipped = train.line_chart(xs, [([5.0, 5.0, 5.0], (200, 0, 0))], width=50, height=40, pad=5, top=1.0)
    assert (clipped[5, 10:40] == torch.tensor([200, 0, 0], dtype=torch.uint8)).all()  # at the top edge, not outside


def test_act_curves_draws_error_and_ponder_over_steps_and_counts_the_batch_wait(tmp_path, capsys):
    import act_curves
    flags = ["--model", "act", "--task", "parity", "--input_size", "8", "--hidden_size", "16", "--eval_samples", "64",
             "--batch_size", "16", "--max_iters", "30", "--eval_interval", "10", "--no-figures"]
    act_run, rnn_run = str(tmp_path / "act"), str(tmp_path / "rnn")
    train.main([*flags, "--out_dir", act_run, "--time_penalty", "1e-4"])
    train.main([*flags, "--out_dir", rnn_run, "--no-act"])
    size, steps, err, ponder = act_curves.read_run(act_run)
    assert size == "8" and steps == [10, 20, 30] and len(err) == len(ponder) == 3
    mean, most, batch_size = act_curves.batch_wait(act_run, 3)
    assert batch_size == 16 and 1 <= mean <= most <= 100  # M = 100: no batch runs longer
    assert act_curves.batch_wait(rnn_run, 3) is None  # one update per input: nothing to wait for
    parts = act_curves.error_by_length(act_run, 600)
    assert [(lo, hi) for lo, hi, _, _ in parts] == [(1, 2), (3, 4), (5, 6), (7, 8)]  # four ranges of 1..8 set entries
    assert all(0 <= err <= 100 and 1 <= n <= 100 for _, _, err, n in parts)
    assert all(n is None for _, _, _, n in act_curves.error_by_length(rnn_run, 600))  # no ponder without ACT
    solved = act_curves.error_by_length(act_run, 600, parts=8)  # eight ranges of 1..8: one k each
    assert len(solved) == 8 and solved[0][:2] == (1, 1)
    out = tmp_path / "curves.png"
    act_curves.main(["--runs", f"{act_run},{rnn_run}", "--labels", "act,rnn", "--out", str(out), "--wait_batches", "2"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "act: err@8" in printed and "largest N per batch" in printed and "rnn: err@8" in printed
    assert "act: error by number of set entries: 1-2 " in printed and "(mean N" in printed
    with pytest.raises(train.UserError, match="has no log.jsonl"):
        act_curves.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(train.UserError, match="as many names as --runs"):
        act_curves.main(["--runs", act_run, "--labels", "a,b", "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
