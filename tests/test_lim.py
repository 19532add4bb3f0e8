"""Learning Independent Causal Mechanisms: the experts, the competition, the mechanisms, the task."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from data import MECHANISMS, MNISTMechanisms, MNISTMechanismsConfig, apply_mechanisms, mechanism_ownership
from lim import LIM, LIMConfig
from test_rims_tasks import write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import lim_curves  # noqa: E402
import lim_scores  # noqa: E402


def tiny(**kw):
    values = dict(image_size=16, num_experts=3, expert_layers=3, expert_channels=6, disc_channels=(4, 4),
                  disc_hidden=8, identity_iters=0)
    return LIMConfig(**{**values, **kw})


def blobs(n, seed=0, size=16):
    """n images of a bright square at a random place: something like a digit on a dark background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    for i, (r, c) in enumerate(torch.randint(2, size - 6, (n, 2), generator=g).tolist()):
        images[i, 0, r:r + 4, c:c + 4] = 1.0
    return images


def expert_grads(model):
    """(N',) the gradient norm of every expert's own slice of every expert weight."""
    return torch.stack([torch.stack([p.grad[j].norm() for p in [*model.experts.weight, *model.experts.bias]]).sum()
                        for j in range(model.config.num_experts)])


def test_the_identity_phase_makes_every_expert_close_to_the_identity_on_the_transformed_images():
    torch.manual_seed(0)
    model = LIM(tiny(identity_iters=30))
    x, real = blobs(8), torch.rand(8, 1, 16, 16)  # real: anything; the identity phase must not read it
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    with torch.no_grad():
        before = F.mse_loss(model.experts(x)[0], x.unsqueeze(1).expand(-1, 3, -1, -1, -1), reduction="none").mean((0, 2, 3, 4))
    for _ in range(30):
        _, internals = model(x, real=real)
        optimizer.zero_grad()
        internals["loss"].backward()
        optimizer.step()
    assert "identity_loss" in internals and int(model.train_steps) == 30
    model.eval()
    with torch.no_grad():
        after = F.mse_loss(model.experts(x)[0], x.unsqueeze(1).expand(-1, 3, -1, -1, -1), reduction="none").mean((0, 2, 3, 4))
    assert (after < 0.01).all() and (after < before / 10).all(), (before, after)


def test_the_identity_loss_reads_the_transformed_images_not_the_canonical_ones():
    torch.manual_seed(0)
    model = LIM(tiny(identity_iters=5))
    x = blobs(4)
    losses = [model(x, real=real)[1]["loss"].item() for real in (torch.zeros(4, 1, 16, 16), torch.ones(4, 1, 16, 16))]
    assert losses[0] == pytest.approx(losses[1])
    model.train_steps.zero_()
    with torch.no_grad():
        outputs = model.experts(x)[0]
    assert model(x, real=x)[1]["loss"].item() == pytest.approx(F.mse_loss(outputs, x.unsqueeze(1).expand_as(outputs)).item(), rel=1e-5)


def test_only_the_winning_expert_of_each_image_receives_gradient():
    torch.manual_seed(1)
    model = LIM(tiny(num_experts=4))
    x, real = blobs(3, seed=1), blobs(3, seed=2)
    _, internals = model(x, real=real)
    internals["loss"].backward()
    winners = set(internals["winner"].tolist())
    assert 0 < len(winners) < 4, "the test needs an expert that wins nothing"
    grads = expert_grads(model)
    for j in range(4):
        assert (grads[j] > 0) == (j in winners), (j, winners, grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())


def test_alternate_updates_train_d_at_one_step_and_only_the_winners_at_the_next():
    torch.manual_seed(1)
    model = LIM(tiny(num_experts=4, updates="alternate", identity_iters=2))
    x, real = blobs(3, seed=1), blobs(3, seed=2)
    for _ in range(2):  # the identity phase: every expert, as joint
        model(x, real=real)
    _, internals = model(x, real=real)  # the first adversarial step: line 5 only
    internals["loss"].backward()
    assert set(internals) >= {"discriminator_loss"} and "expert_loss" not in internals
    assert all(p.grad is None for p in model.experts.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    _, internals = model(x, real=real)  # the next: line 6 only, against the same D
    internals["loss"].backward()
    assert "expert_loss" in internals and "discriminator_loss" not in internals
    assert all(p.grad is None for p in model.discriminator.parameters())
    winners = set(internals["winner"].tolist())
    grads = expert_grads(model)
    assert all((grads[j] > 0) == (j in winners) for j in range(4)), (winners, grads)
    assert int(model.train_steps) == 4


def test_the_expert_gradient_is_that_of_minus_log_d_of_the_winners_output_once_and_d_is_held_fixed():
    """Against a plain reference: every expert on every image, the winner's output picked, -log D of it.
    A doubled backward (a bug of a public implementation) would give twice this."""
    torch.manual_seed(2)
    model = LIM(tiny(expert_batch_norm=False))
    x, real = blobs(6, seed=3), blobs(6, seed=4)
    _, internals = model(x, real=real)
    model.zero_grad()
    internals["loss"].backward()
    ours = [p.grad.clone() for p in model.experts.weight]
    model.zero_grad()
    outputs, _ = model.experts(x)
    won = outputs[torch.arange(6), internals["winner"]]
    reference = -F.logsigmoid(model.discriminator(won)).mean()
    reference.backward()
    for mine, theirs in zip(ours, (p.grad for p in model.experts.weight)):
        assert torch.allclose(mine, theirs, atol=1e-6)


def test_the_routed_pass_equals_the_winners_outputs_of_the_full_pass_with_batch_norm():
    torch.manual_seed(3)
    model = LIM(tiny(num_experts=3))
    x = blobs(5, seed=5)
    with torch.no_grad():
        outputs, stats = model.experts(x)
        winner = torch.tensor([2, 0, 1, 2, 2])
        routed = model.experts(x, winner=winner, stats=stats)
    assert torch.allclose(routed, outputs[torch.arange(5), winner], atol=1e-5)


def test_the_discriminator_loss_counts_every_experts_output_as_a_fake():
    torch.manual_seed(4)
    model = LIM(tiny(num_experts=3))
    real = blobs(4)
    scores = torch.randn(4, 3, requires_grad=True)
    loss = model.discriminator_loss(real, scores)
    (grad,) = torch.autograd.grad(loss, scores)
    # d/ds of -mean log(1 - sigmoid(s)) over B x N' fakes = sigmoid(s) / (B N'): every expert, every image
    assert torch.allclose(grad, torch.sigmoid(scores.detach()) / 12, atol=1e-7)
    expected = -(F.logsigmoid(model.discriminator(real)).mean() + torch.log(1 - torch.sigmoid(scores)).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_d_scores_the_experts_outputs_not_the_raw_inputs():
    """A public version scored the raw input x' for every expert: then all experts tie and none learns."""
    torch.manual_seed(5)
    model = LIM(tiny(num_experts=3)).eval()
    x = blobs(4, seed=6)
    best, internals = model(x, return_internals=True)
    with torch.no_grad():
        expected = model.discriminator(internals["expert_outputs"])  # (B, N')
        raw = model.discriminator(x)
    assert torch.allclose(internals["scores"], expected, atol=1e-6)
    assert not torch.allclose(internals["scores"], raw.unsqueeze(1).expand(-1, 3), atol=1e-3)
    assert torch.equal(internals["winner"], expected.argmax(1))
    assert torch.allclose(best, internals["expert_outputs"][torch.arange(4), internals["winner"]])
    # and in training the winners get gradient from D's score of their output
    model.train()
    _, internals = model(x, real=blobs(4, seed=7))
    internals["loss"].backward()
    assert expert_grads(model)[internals["winner"][0]] > 0


def test_each_mechanism_by_hand_on_a_tiny_image():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10, 10] = 1.0
    moved = {"up_left": (6, 6), "up": (6, 10), "up_right": (6, 14), "left": (10, 6), "right": (10, 14),
             "down_left": (14, 6), "down": (14, 10), "down_right": (14, 14)}
    for k, name in enumerate(MECHANISMS):
        out = apply_mechanisms(image, torch.tensor([k]), 4, 0.5, torch.Generator().manual_seed(0))[0, 0]
        if name in moved:
            assert out.sum() == 1 and out[moved[name]] == 1, name
        elif name == "invert":
            assert torch.equal(out, 1 - image[0, 0])
    grey = torch.full((1, 1, 28, 28), 0.5)
    noisy = apply_mechanisms(grey, torch.tensor([MECHANISMS.index("noise")]), 4, 0.1, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and 0.08 < (noisy - 0.5).std() < 0.12
    clamped = apply_mechanisms(grey, torch.tensor([MECHANISMS.index("noise")]), 4, 2.0, torch.Generator().manual_seed(0))
    assert clamped.min() == 0 and clamped.max() == 1  # clamped to [0, 1]
    # a shift pushes content off the edge and brings zeros in
    full = torch.ones(1, 1, 28, 28)
    out = apply_mechanisms(full, torch.tensor([MECHANISMS.index("right")]), 4, 0.5, torch.Generator())[0, 0]
    assert out[:, :4].sum() == 0 and out[:, 4:].min() == 1


def test_ownership_counts_mechanisms_whose_main_expert_is_theirs_alone():
    counts = torch.zeros(10, 10)
    for m in range(10):
        counts[m, m] = 9
        counts[m, (m + 1) % 10] = 1
    assert mechanism_ownership(counts)["owned"] == 10 and mechanism_ownership(counts)["purity"] == pytest.approx(0.9)
    counts[1] = 0
    counts[1, 0] = 10  # mechanism 1 goes to mechanism 0's expert: neither is owned
    result = mechanism_ownership(counts)
    assert result["owned"] == 8 and result["expert_up"] == 0
    counts[2] = 1  # spread over every expert: no majority, not owned
    assert mechanism_ownership(counts)["owned"] == 7


def test_the_task_splits_mnist_into_unpaired_halves_and_tests_every_digit_under_every_mechanism(tmp_path):
    write_mnist(str(tmp_path), n_train=20, n_test=6)
    task = MNISTMechanisms(MNISTMechanismsConfig(train_size=20, eval_samples=3, evaluator_iters=2), data_dir=str(tmp_path))
    assert len(task.canonical) == len(task.transformed) == 10
    assert task.canonical.mean() < 0.5  # canonical digits are not contrast-inverted (a public pipeline's bug)
    batch = task.train_batch(7, torch.Generator().manual_seed(0))
    assert batch["x"].shape == batch["real"].shape == (7, 1, 28, 28) and "label" not in batch
    chunks = [task.eval_batch("test", 12, torch.Generator().manual_seed(0)) for _ in range(3)]
    assert task.eval_count("test") == 30
    assert chunks[0]["mechanism"].tolist() == list(range(10)) + [0, 1]
    assert torch.equal(chunks[0]["original"][:10], task.test_images[:1].expand(10, -1, -1, -1))
    assert torch.equal(chunks[0]["x"][8], 1 - chunks[0]["original"][8])  # invert


def test_lim_trains_on_mnist_mechanisms_and_reports_figure_6_and_8(tmp_path, capsys):
    write_mnist(str(tmp_path / "mnist"), n_train=40, n_test=4)
    out = tmp_path / "out"
    result = train.main(["--model", "lim", "--task", "mnist_mechanisms", "--data_dir", str(tmp_path / "mnist"),
                         "--train_size", "40", "--eval_samples", "2", "--evaluator_iters", "5", "--max_iters", "8",
                         "--identity_iters", "3", "--eval_interval", "4", "--log_interval", "2", "--batch_size", "4",
                         "--num_experts", "3", "--expert_layers", "3", "--expert_channels", "4", "--disc_hidden", "8",
                         "--out_dir", str(out)])
    metrics = result["metrics"]
    for key in ("acc_transformed@test", "acc_inverted@test", "acc_original@test", "purity@test"):
        assert 0 <= metrics[key] <= 1, key
    assert 0 <= metrics["owned@test"] <= 10 and {f"expert_{m}@test" for m in MECHANISMS} <= set(metrics)
    assert (out / "outputs_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["iter"] for r in records if "acc_inverted@test" in r] == [4, 8]
    # resumes in the adversarial phase: the step counter is in the checkpoint
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert int(ckpt["model"]["train_steps"]) == 8
    # experiments/lim_scores.py: D's score of every expert per mechanism; its main expert is the model's winner
    model, task = result["model"].eval(), MNISTMechanisms(MNISTMechanismsConfig(train_size=40, eval_samples=2,
                                                                                evaluator_iters=5), str(tmp_path / "mnist"))
    canonical, rows = lim_scores.score_table(model, task)
    assert 0 <= canonical <= 1 and [r[0] for r in rows] == list(MECHANISMS)
    for m, (name, as_is, per_expert, best, main) in enumerate(rows):
        x = apply_mechanisms(task.test_images, torch.full((2,), m), 4, 0.5, torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, internals = model(x)
        assert per_expert.shape == (3,) and best >= per_expert.max().item() - 1e-6
        if m != MECHANISMS.index("noise"):  # noise is drawn afresh
            assert main == int(torch.bincount(internals["winner"], minlength=3).argmax())
    lim_scores.main(["--run", str(out), "--data_dir", str(tmp_path / "mnist")])
    assert capsys.readouterr().out.count("\n| ") == len(MECHANISMS) + 1  # the header and one row per mechanism


def test_lim_refuses_tasks_it_does_not_fit(tmp_path):
    with pytest.raises(train.UserError, match="does not fit"):
        train.main(["--model", "lim", "--task", "copy", "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_lim_file_imports_and_runs_when_copied_alone(tmp_path):
    shutil.copy(os.path.join(ROOT, "lim.py"), tmp_path / "lim.py")
    proc = subprocess.run([sys.executable, "lim.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "identity (4, 1, 28, 28)" in proc.stdout and "adversarial (4, 1, 28, 28)" in proc.stdout


def test_bad_lim_settings_are_refused():
    for bad in (dict(num_experts=0), dict(expert_layers=1), dict(identity_iters=-1), dict(image_size=30),
                dict(disc_channels=()), dict(updates="sequential")):
        with pytest.raises(ValueError):
            LIMConfig(**bad)
    for bad in (dict(shift=28), dict(noise_std=-0.1), dict(train_size=1), dict(eval_samples=10001)):
        with pytest.raises(ValueError):
            MNISTMechanismsConfig(**bad)


def test_lim_curves_draws_figure_6_from_run_logs_and_refuses_a_folder_without_them(tmp_path):
    run = tmp_path / "s0"
    run.mkdir()
    final = {"acc_transformed@test": 0.3, "acc_inverted@test": 0.8, "acc_original@test": 0.99, "owned@test": 5.0,
             **{f"expert_{m}@test": float(i % 5) for i, m in enumerate(MECHANISMS)},
             **{f"share_{m}@test": 0.9 for m in MECHANISMS}}
    with open(run / "log.jsonl", "w") as f:
        f.write(json.dumps({"iter": 50, "loss": 1.0}) + "\n")
        for step, inverted in ((250, 0.5), (500, 0.8)):
            f.write(json.dumps({**final, "iter": step, "acc_inverted@test": inverted}) + "\n")
    (run / "metrics.json").write_text(json.dumps(final))
    out = tmp_path / "fig.png"
    lim_curves.main(["--runs", str(run), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(train.UserError, match="run it first"):
        lim_curves.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(train.UserError, match="must be a .png"):
        lim_curves.main(["--runs", str(run), "--out", str(tmp_path / "nowhere" / "x.png")])
    assert not (tmp_path / "x.png").exists()
