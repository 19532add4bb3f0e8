"""Neural Production Systems: the two-stage hard selection, rule application and the arithmetic task."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from data import Arithmetic, ArithmeticConfig, rule_purity
from nps import NPS, NPSConfig, grouped_mlp, hard_choice

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))


def small(**overrides):
    config = dict(slot_size=16, rule_size=8, key_size=8, rule_hidden=16, encoder_hidden=16)
    return NPS(NPSConfig(**{**config, **overrides}))


def test_straight_through_choice_is_one_hot_forward_and_softmax_gradient_backward():
    torch.manual_seed(0)
    scores = torch.randn(6, 4, requires_grad=True)
    choice = hard_choice(scores, tau=1.0, sample=True)
    assert torch.equal(choice.detach().sum(-1), torch.ones(6))
    assert set(choice.detach().flatten().tolist()) <= {0.0, 1.0}
    weights = torch.randn(4)
    (choice * weights).sum().backward()
    # the gradient is that of softmax(scores + noise): row-wise it sums to zero and is not all zero
    assert scores.grad.abs().sum() > 0
    assert torch.allclose(scores.grad.sum(-1), torch.zeros(6), atol=1e-6)


def test_at_evaluation_the_choice_is_the_argmax_and_deterministic():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    choice = hard_choice(scores, tau=1.0, sample=False)
    assert choice.argmax(-1).tolist() == [1, 0]
    torch.manual_seed(0)
    model = small(feedback_size=1).eval()
    x = torch.rand(4, 7, 5)
    first, internals_first = model(x)
    second, internals_second = model(x)
    assert torch.equal(first, second) and torch.equal(internals_first["rules"], internals_second["rules"])
    # the chosen pair is the argmax of the stage 1 scores
    slots = model.encode(x[:, 0])
    scores = model.match_scores(slots, x[:, 0, 2:]).reshape(4, -1)
    expected_rule = scores.argmax(-1) // slots.shape[1]
    assert torch.equal(internals_first["rules"][:, 0, 0], expected_rule)


def test_gradient_reaches_the_rule_embeddings_and_the_slot_keys_through_the_hard_choice():
    torch.manual_seed(0)
    model = small(input_groups=(1, 1, 3), condition_size=0).train()  # three slots: the context is a real choice
    logits, _ = model(torch.rand(8, 3, 5))
    logits.pow(2).sum().backward()
    grads = dict(model.named_parameters())
    for name in ("rule_embeddings", "rule_query.weight", "slot_key.weight", "context_query.weight",
                 "context_key.weight"):
        assert grads[name].grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sequential_mode_with_one_application_changes_only_the_primary_slot():
    torch.manual_seed(0)
    model = small().eval()
    slots = torch.randn(5, 3, 16)
    new_slots, primary_mask, rule, primary, context = model.apply_sequential(slots, torch.rand(5, 3))
    changed = (new_slots != slots).any(-1)  # (B, S)
    assert torch.equal(changed, torch.nn.functional.one_hot(primary, 3).bool())
    assert torch.equal(primary_mask.argmax(-1), primary)
    assert (context != primary).all()  # the contextual slot is another slot
    # the update is the chosen rule's MLP on [primary, context], added to the primary slot
    rows = torch.arange(5)
    p, c = slots[rows, primary], slots[rows, context]
    h = torch.relu(torch.einsum("bi,bih->bh", torch.cat([p, c], -1), model.rule_w1[rule]) + model.rule_b1[rule])
    update = torch.einsum("bh,bho->bo", h, model.rule_w2[rule]) + model.rule_b2[rule]
    assert torch.allclose(new_slots[rows, primary], p + update, atol=1e-5)


def test_parallel_mode_updates_every_slot_with_its_own_rule():
    torch.manual_seed(0)
    model = small(mode="parallel", readout_slot=0).eval()
    slots = torch.randn(4, 3, 16)
    new_slots, rules, contexts = model.apply_parallel(slots, torch.rand(4, 3))
    assert rules.shape == (4, 3) and (contexts != torch.arange(3)).all()
    outputs = model.rule_outputs(slots, slots[torch.arange(4)[:, None], contexts])  # (B, S, N, H)
    expected = slots + outputs.gather(2, rules[..., None, None].expand(-1, -1, 1, 16)).squeeze(2)
    assert torch.allclose(new_slots, expected, atol=1e-5)
    logits, internals = model(torch.rand(4, 2, 5))
    assert internals["rules"].shape == (4, 2, 2)


def test_grouped_rule_mlps_equal_the_rules_run_one_by_one():
    torch.manual_seed(0)
    model = small(num_rules=4)
    primary, context = torch.randn(6, 16), torch.randn(6, 16)
    together = model.rule_outputs(primary, context)  # (B, N, H)
    for r in range(4):
        mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
        with torch.no_grad():
            mlp[0].weight.copy_(model.rule_w1[r].T), mlp[0].bias.copy_(model.rule_b1[r])
            mlp[2].weight.copy_(model.rule_w2[r].T), mlp[2].bias.copy_(model.rule_b2[r])
        assert torch.allclose(together[:, r], mlp(torch.cat([primary, context], -1)), atol=1e-5)
    # the slot encoders are grouped MLPs too: group s reads only its own channels
    x = torch.rand(3, 5)
    changed = x.clone()
    changed[:, 1] += 1.0  # d_t's channel: slot 0 (y_{t-1}) stays as it was
    assert torch.allclose(model.encode(x)[:, 0], model.encode(changed)[:, 0])
    assert not torch.allclose(model.encode(x)[:, 1], model.encode(changed)[:, 1])
    # the condition channels (the operation) reach no slot, only the stage 1 keys
    condition_changed = x.clone()
    condition_changed[:, 2:] += 1.0
    assert torch.equal(model.encode(x), model.encode(condition_changed))
    assert grouped_mlp(torch.zeros(2, 1, 1), torch.ones(1, 1, 1), torch.ones(1, 1), torch.ones(1, 1, 1),
                       torch.zeros(1, 1)).tolist() == [[[1.0]], [[1.0]]]


def test_a_samples_output_does_not_depend_on_the_rest_of_its_batch():
    torch.manual_seed(0)
    model = small(feedback_size=1).eval()
    x = torch.rand(5, 6, 5)
    together, _ = model(x)
    alone, _ = model(x[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-6)
    changed = x.clone()
    changed[0] += 1.0
    assert torch.allclose(model(changed)[0][2], together[2], atol=1e-6)


def test_evaluation_feeds_back_the_models_own_output_and_training_the_true_value():
    torch.manual_seed(0)
    model = small(feedback_size=1).eval()
    x = torch.rand(2, 4, 5)
    auto, _ = model(x)
    by_hand, prev = [], x[:, 0, :1]
    for t in range(4):
        x_t = x[:, t].clone()
        if t > 0:
            x_t[:, :1] = prev
        out = model.step(x_t)[0]
        by_hand.append(out)
        prev = out
    assert torch.allclose(auto, torch.stack(by_hand, 1), atol=1e-6)
    forced, _ = model(x, teacher_forcing=True)
    assert torch.allclose(forced[:, 0], auto[:, 0]) and not torch.allclose(forced, auto)


def test_the_arithmetic_generator_follows_y_t_by_hand():
    task = Arithmetic(ArithmeticConfig(train_sequences=10))
    batch = task.make_batch(3, torch.Generator().manual_seed(7), 6)
    x, y, ops = batch["x"], batch["y"], batch["op"]
    assert x.shape == (3, 6, 5) and y.shape == (3, 6, 1) and ops.shape == (3, 6)
    for b in range(3):
        value = 0.0  # y_0
        for t in range(6):
            d = x[b, t, 1].item()
            assert abs(d * 100 - round(d * 100)) < 1e-4 and 0 <= d <= 1  # two decimals
            assert x[b, t, 2:].tolist() == [float(ops[b, t] == k) for k in range(3)]
            assert abs(x[b, t, 0].item() - value) < 1e-6  # the previous result, fed in
            value = {0: value + d, 1: value - d, 2: value * d}[int(ops[b, t])]
            assert abs(y[b, t, 0].item() - value) < 1e-5
    # a fixed seed gives the same data; the training set is fixed by data_seed
    again = task.make_batch(3, torch.Generator().manual_seed(7), 6)
    assert torch.equal(again["x"], x)
    assert torch.equal(Arithmetic(ArithmeticConfig(train_sequences=10)).train_set["x"], task.train_set["x"])


def test_mse_sums_squared_errors_over_steps_and_rule_purity_matches_operations_to_rules():
    task = Arithmetic(ArithmeticConfig(train_sequences=10))
    batch = {"y": torch.zeros(2, 3, 1), "op": torch.tensor([[0, 1, 2], [0, 0, 1]])}
    logits = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.0, 0.3]]).unsqueeze(-1)
    rules = torch.tensor([[2, 0, 1], [2, 2, 1]]).unsqueeze(-1)  # + -> rule 2 always, - -> 0 once, 1 once
    totals = task.metrics(logits, batch, {"rules": rules})
    assert abs(totals["mse"] - (0.01 + 0.04 + 0.09)) < 1e-6 and totals["count"] == 2
    final = task.finish_metrics(totals, totals.pop("count"))
    assert abs(final["mse"] - 0.07) < 1e-6
    # + : 3/3 on rule 2; - : 1/2 on rule 0 (or 1/2 on rule 1); * : 1/1 on rule 1 -> best (1 + 1/2 + 1) / 3
    assert abs(final["rule_purity"] - 2.5 / 3) < 1e-6
    # one rule for every operation is not pure: it owns one operation only
    assert abs(rule_purity(torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])) - 1 / 3) < 1e-6
    assert rule_purity(torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])) == 1.0


def test_nps_file_runs_when_copied_alone(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(__file__)), "nps.py"), tmp_path)
    result = subprocess.run([sys.executable, "nps.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 6, 1])" in result.stdout


def test_bad_nps_settings_are_refused():
    with pytest.raises(ValueError, match="mode"):
        NPSConfig(mode="both")
    with pytest.raises(ValueError, match="input_groups"):
        NPSConfig(input_groups=(2, 2))  # 4 + condition 3 != input_size 5
    with pytest.raises(ValueError, match="readout_slot"):
        NPSConfig(mode="parallel")


@pytest.mark.parametrize("model", ["nps", "lstm"])
def test_a_short_run_on_arithmetic_lowers_the_loss_and_reports_mse_and_purity(tmp_path, model):
    out = tmp_path / model
    size = ["--slot_size", "32", "--rule_hidden", "32", "--batch_size", "16"] if model == "nps" else ["--hidden_size", "32"]
    result = train.main(["--model", model, "--task", "arithmetic", "--max_iters", "60", "--eval_interval", "60",
                         "--log_interval", "10", "--lr", "1e-2", "--train_sequences", "200", "--eval_samples", "50",
                         "--eval_lengths", "10,30", "--out_dir", str(out), "--no-figures", *size])
    losses = [r["loss"] for r in map(eval_json, open(out / "log.jsonl")) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    metrics = result["metrics"]
    assert {"mse@10", "mse@30"} <= set(metrics)
    assert ("rule_purity@10" in metrics) == (model == "nps")
    assert metrics["mse@10"] < metrics["mse@30"]  # autoregressive errors add up over longer sequences


def eval_json(line):
    import json
    return json.loads(line)


def test_arithmetic_validation_keeps_the_test_sets_and_reports_the_checkpoint_lowest_on_validation(tmp_path):
    plain = train.fixed_eval_data(Arithmetic(ArithmeticConfig(eval_samples=8, eval_lengths=(10, 30))), 8)
    task = Arithmetic(ArithmeticConfig(eval_samples=8, eval_lengths=(10, 30), validation=True))
    with_val = train.fixed_eval_data(task, 8)
    assert list(with_val) == ["10", "30", "val20"] and task.selection_metric == "mse@val20" and task.selection_minimise
    for setting in ("10", "30"):  # the test sequences are the same with and without a validation set
        assert torch.equal(plain[setting][0]["x"], with_val[setting][0]["x"])
    assert not torch.equal(with_val["val20"][0]["x"][:, :10], with_val["10"][0]["x"])  # drawn apart from them
    out = tmp_path / "run"
    result = train.main(["--model", "nps", "--task", "arithmetic", "--validation", "--max_iters", "40",
                         "--eval_interval", "10", "--lr", "1e-2", "--slot_size", "16", "--rule_hidden", "16",
                         "--batch_size", "16", "--train_sequences", "200", "--eval_samples", "50",
                         "--eval_lengths", "10,30", "--out_dir", str(out), "--no-figures"])
    evals = [r for r in map(eval_json, open(out / "log.jsonl")) if "mse@val20" in r]
    best = min(evals, key=lambda r: (r["mse@val20"], -r["iter"]))
    metrics = result["metrics"]
    assert metrics["selected_iter"] == best["iter"]
    assert metrics["mse@10"] == pytest.approx(best["mse@10"]) and metrics["mse@val20"] == pytest.approx(best["mse@val20"])


def test_the_mode_flag_is_not_taken_for_an_abbreviated_model_flag():
    model, task, flags = train.parse_args(["--model", "nps", "--task", "arithmetic", "--mode", "parallel",
                                           "--readout_slot", "0"])
    assert (model, task, flags["mode"], flags["readout_slot"]) == ("nps", "arithmetic", "parallel", 0)
    with pytest.raises(train.UserError, match="unrecognized arguments: --max_it"):
        train.parse_args(["--model", "nps", "--task", "arithmetic", "--max_it", "5"])


def test_models_that_cannot_feed_back_are_refused_on_arithmetic(tmp_path):
    with pytest.raises(train.UserError, match="use one of lstm, nps"):
        train.main(["--model", "ntm", "--task", "arithmetic", "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# mnist_transform, on a fake MNIST written here

def test_mnist_transformations_move_a_pixel_where_they_should(tmp_path):
    from data import MNISTTransform, MNISTTransformConfig, TRANSFORMS
    from test_rims_tasks import write_mnist
    write_mnist(str(tmp_path), n_train=8, n_test=4)
    task = MNISTTransform(MNISTTransformConfig(transforms="quarter_shift", shift=3, train_size=8, eval_samples=4),
                          data_dir=str(tmp_path))
    image = torch.zeros(1, 28, 28)
    image[0, 10, 5] = 1.0  # row 10, column 5
    expected = {"rotate_left": (22, 10), "rotate_right": (5, 17), "up": (7, 5), "down": (13, 5),
                "left": (10, 2), "right": (10, 8)}
    for k, name in enumerate(TRANSFORMS):
        moved = task.transform(image, torch.tensor([k]))[0]
        assert moved.sum() == 1 and moved[expected[name]] == 1, name
    batch = task.train_batch(5, torch.Generator().manual_seed(0))
    assert batch["x"].shape == (5, 1, 790) and batch["y"].shape == (5, 1, 784)
    which = batch["x"][:, 0, 784:].argmax(-1)
    assert torch.equal(which, batch["op"][:, 0])
    again = task.transform(batch["x"][:, 0, :784].reshape(5, 28, 28), which).reshape(5, 1, 784)
    assert torch.equal(again, batch["y"])


def test_the_official_transformations_rotate_a_pixel_by_60_degrees_and_shift_it_by_a_fifth_of_the_canvas(tmp_path):
    from data import MNISTTransform, MNISTTransformConfig, OFFICIAL_TRANSFORMS, affine_images
    side, centre = 40, 19.5
    image = torch.zeros(1, 1, side, side)
    r, c = 12, 27  # 7.5 rows above and 7.5 columns right of the centre
    image[0, 0, r - 1:r + 2, c - 1:c + 2] = 1.0  # a 3 x 3 blob, so bilinear sampling keeps a clear peak
    for angle in (60.0, -60.0):
        moved = affine_images(image, torch.tensor([angle]), torch.tensor([0.0]))[0, 0]
        t = math.radians(angle)  # clockwise on screen (y down): x' = x cos - y sin, y' = x sin + y cos
        dx, dy = c - centre, r - centre
        expected = (centre + dx * math.sin(t) + dy * math.cos(t), centre + dx * math.cos(t) - dy * math.sin(t))
        rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
        mass = (rows * moved).sum() / moved.sum(), (cols * moved).sum() / moved.sum()  # the blob's centre of mass
        assert abs(mass[0] - expected[0]) < 0.3 and abs(mass[1] - expected[1]) < 0.3, (angle, mass, expected)
        assert moved.sum().item() == pytest.approx(9.0, rel=0.1)  # mass is kept inside the canvas
    up = affine_images(image, torch.tensor([0.0]), torch.tensor([-8.0]))[0, 0]
    assert torch.allclose(up[r - 9:r - 6, c - 1:c + 2], torch.ones(3, 3)) and up.sum() == 9  # 8 px up, exact
    write_mnist_for(tmp_path)
    task = MNISTTransform(MNISTTransformConfig(train_size=8, eval_samples=4), data_dir=str(tmp_path))
    assert task.names == OFFICIAL_TRANSFORMS and task.spec["input_groups"] == (1600, 4) and task.spec["image_size"] == 40
    batch = task.train_batch(3, torch.Generator().manual_seed(0))
    assert batch["x"].shape == (3, 4, 1604) and batch["y"].shape == (3, 4, 1600) and batch["op"].shape == (3, 4)
    assert torch.equal(batch["x"][:, 1:, :1600], batch["y"][:, :-1])  # each frame predicts the next
    assert torch.equal(batch["x"][:, :, 1600:].argmax(-1), batch["op"])
    for t in range(4):
        again = task.transform(batch["x"][:, t, :1600].reshape(3, 40, 40), batch["op"][:, t]).reshape(3, 1600)
        assert torch.allclose(again, batch["y"][:, t])
    assert batch["x"][:, 0, :1600].reshape(3, 40, 40)[:, :6].sum() == 0  # the digit starts at the centre


def write_mnist_for(folder):
    from test_rims_tasks import write_mnist
    write_mnist(str(folder), n_train=16, n_test=8)


def official_nps(**overrides):
    values = dict(input_size=32 * 32 + 4, output_size=32 * 32, input_groups=(1024, 4), condition_size=0, image_size=32,
                  num_rules=4, slot_size=16, rule_size=6, key_size=8, rule_hidden=16, encoder_hidden=16,
                  slot_norm=True, slot_keys="per_slot", scale_scores=True, rule_input="context", residual=False,
                  context_tau=0.5)
    return NPS(NPSConfig(**{**values, **overrides}))


def test_the_transformation_slots_scores_depend_only_on_rule_and_transformation():
    torch.manual_seed(0)
    model = official_nps().eval()
    op = torch.nn.functional.one_hot(torch.tensor([2, 2, 0]), 4).float()
    x = torch.cat([torch.rand(3, 1024), op], -1)
    scores = model.match_scores(model.encode(x), x[:, :0])  # (B, N, S): slot 1 is the transformation's
    assert torch.allclose(scores[0, :, 1], scores[1, :, 1], atol=1e-6)  # other images, same transformation
    assert not torch.allclose(scores[0, :, 1], scores[2, :, 1])  # another transformation
    assert not torch.allclose(scores[0, :, 0], scores[1, :, 0])  # the image slot's do depend on the image
    shared = official_nps(slot_keys="shared")
    assert not hasattr(shared, "slot_key_weight") and model.slot_key_weight.shape == (2, 16, 8)
    raw = official_nps(scale_scores=False).eval()
    raw.load_state_dict(model.state_dict())
    assert torch.allclose(raw.match_scores(raw.encode(x), x[:, :0]) * 8 ** -0.5, scores, atol=1e-6)


def test_the_rule_output_is_the_only_path_from_the_image_to_the_decoder():
    torch.manual_seed(0)
    model = official_nps().eval()
    with torch.no_grad():  # every rule outputs its bias alone: nothing of the slot it reads gets through
        model.rule_w2.zero_()
    op = torch.nn.functional.one_hot(torch.tensor([1, 1]), 4).float()
    x = torch.cat([torch.rand(2, 1024), op], -1)
    logits, internals = model(x.unsqueeze(1))
    if internals["rules"][0, 0, 0] == internals["rules"][1, 0, 0]:  # the same rule for both images
        assert torch.allclose(logits[0], logits[1], atol=1e-6)
    # and the gradient reaches the image encoder only through the rule (and the choice's soft scores)
    model = official_nps().train()
    logits, _ = model(x.unsqueeze(1))
    logits.sum().backward()
    assert model.rule_w1.grad.abs().sum() > 0 and model.image_encoder[0].weight.grad.abs().sum() > 0
    residual = official_nps(residual=True).eval()
    slots = residual.encode(x)
    new, mask, *_ = residual.apply_sequential(slots, x[:, :0])
    assert torch.allclose((new - slots) * (1 - mask.unsqueeze(-1)), torch.zeros_like(slots))  # one slot moves


def test_nps_trains_on_mnist_transform_and_reports_bce_purity_and_a_figure(tmp_path):
    from test_rims_tasks import write_mnist
    write_mnist(str(tmp_path / "mnist"), n_train=16, n_test=8)
    for name, extra in (("official", ["--canvas", "32", "--chain", "2"]), ("quarter", ["--transforms", "quarter_shift"]),
                        ("key", ["--canvas", "32", "--chain", "2", "--condition", "key"])):
        out = tmp_path / name
        result = train.main(["--model", "nps", "--task", "mnist_transform", "--data_dir", str(tmp_path / "mnist"),
                             "--train_size", "16", "--eval_samples", "8", "--max_iters", "20", "--eval_interval", "20",
                             "--log_interval", "5", "--batch_size", "8", "--slot_size", "16", "--encoder_hidden", "16",
                             "--rule_hidden", "16", "--lr", "1e-2", "--out_dir", str(out), *extra])
        metrics = result["metrics"]
        assert metrics["bce@test"] > 0 and 1 / 6 <= metrics["rule_purity@test"] <= 1
        assert (out / "outputs_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl") if '"loss"' in line]
        assert losses[-1] < losses[0]
        if name == "key":  # the transformation is a condition of the one image slot's key
            assert (result["model"].config.input_groups, result["model"].config.condition_size) == ((1024,), 4)
        if name == "quarter":
            assert result["model"].config.image_size == 0


def test_the_per_rule_figure_forces_each_rule_and_agrees_with_the_model_where_it_chose_that_rule(tmp_path, capsys):
    import nps_rule_outputs
    import nps_score_spread
    from test_rims_tasks import write_mnist
    write_mnist(str(tmp_path / "mnist"), n_train=16, n_test=8)
    out = tmp_path / "run"
    result = train.main(["--model", "nps", "--task", "mnist_transform", "--data_dir", str(tmp_path / "mnist"),
                         "--train_size", "16", "--eval_samples", "8", "--max_iters", "4", "--eval_interval", "4",
                         "--batch_size", "8", "--slot_size", "16", "--encoder_hidden", "16", "--rule_hidden", "16",
                         "--canvas", "32", "--chain", "2", "--out_dir", str(out), "--no-figures"])
    model = result["model"].eval()
    x = torch.rand(5, 32 * 32 + 4)
    x[:, 1024:] = torch.nn.functional.one_hot(torch.arange(5) % 4, 4).float()
    with torch.no_grad():
        logits, internals = model(x.unsqueeze(1))
    forced = nps_rule_outputs.every_rule(model, x)  # (rules, 5, 1024)
    chosen = internals["rules"][:, 0, 0]
    assert forced.shape == (4, 5, 1024)
    assert torch.allclose(forced[chosen, torch.arange(5)], torch.sigmoid(logits[:, 0]), atol=1e-5)
    nps_rule_outputs.main(["--run", str(out), "--data_dir", str(tmp_path / "mnist"), "--digits", "3",
                           "--out", str(tmp_path / "rules.png")])
    assert (tmp_path / "rules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nps_score_spread.main(["--runs", str(out), "--data_dir", str(tmp_path / "mnist"), "--seeds", "0"])
    assert "stage 1 scores, std over (rule, slot)" in capsys.readouterr().out
    with pytest.raises(train.UserError, match="must be a .png file"):
        nps_rule_outputs.main(["--run", str(out), "--data_dir", str(tmp_path / "mnist"), "--out", str(tmp_path / "no" / "x.png")])
