"""slot_attention.py: the module of Algorithm 1 (arXiv:2006.15055), the autoencoder and the set predictor."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from slot_attention import SlotAttention, SlotAttentionConfig, SlotAttentionModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=16, num_slots=3, slot_size=16, mlp_hidden_size=32, encoder_channels=8,
             decoder_channels=8, encoder_stride_layers=1, decoder_init_size=4)


def module(**overrides):
    torch.manual_seed(0)
    settings = dict(num_slots=4, num_iterations=3, input_size=6, slot_size=8, mlp_hidden_size=16)
    return SlotAttentionModule(**{**settings, **overrides})


def test_attention_is_a_softmax_over_slots_so_each_input_sums_to_one():
    history, attention = module()(torch.randn(2, 10, 6))
    assert attention.shape == (2, 3, 4, 10) and history.shape == (2, 3, 4, 8)  # (B, T, K, N), (B, T, K, D)
    assert torch.allclose(attention.sum(dim=2), torch.ones(2, 3, 10), atol=1e-6)  # over slots, not inputs
    assert not torch.allclose(attention.sum(dim=3), torch.ones(2, 3, 4))


def test_one_iteration_is_algorithm_1_written_out_by_hand():
    m = module()
    inputs, slots = torch.randn(2, 10, 6), torch.randn(2, 4, 8)
    new_slots, attention = m.iterate(slots, m.project_k(m.norm_inputs(inputs)), m.project_v(m.norm_inputs(inputs)))
    x = F.layer_norm(inputs, (6,), m.norm_inputs.weight, m.norm_inputs.bias)  # line 2
    k, v = x @ m.project_k.weight.T, x @ m.project_v.weight.T  # no bias
    q = F.layer_norm(slots, (8,), m.norm_slots.weight, m.norm_slots.bias) @ m.project_q.weight.T  # line 5
    attn = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=1)  # line 6: over the slot axis
    w = (attn + 1e-8) / (attn + 1e-8).sum(-1, keepdim=True)  # line 7: weighted mean over inputs
    updates = w @ v
    gru = m.gru  # line 8: GRU(state = previous slots, input = updates)
    gates_x = updates @ gru.weight_ih.T + gru.bias_ih
    gates_h = slots @ gru.weight_hh.T + gru.bias_hh
    r = torch.sigmoid(gates_x[..., :8] + gates_h[..., :8])
    z = torch.sigmoid(gates_x[..., 8:16] + gates_h[..., 8:16])
    n = torch.tanh(gates_x[..., 16:] + r * gates_h[..., 16:])
    s = (1 - z) * n + z * slots
    s = s + m.mlp(F.layer_norm(s, (8,), m.norm_mlp.weight, m.norm_mlp.bias))  # line 9: residual MLP
    assert torch.allclose(attention, attn, atol=1e-6)
    assert torch.allclose(new_slots, s, atol=1e-5)


def test_projections_have_no_bias_and_the_epsilon_is_added_before_renormalising():
    m = module()
    assert m.project_q.bias is None and m.project_k.bias is None and m.project_v.bias is None
    # slot 0 wins every input outright, so slot 1's attention underflows to exactly 0; with
    # attn + eps renormalised over the inputs its update is then the plain mean of the values
    with torch.no_grad():
        m.project_q.weight.copy_(torch.eye(8))
    slots = torch.zeros(1, 2, 8)
    slots[0, 0, 0], slots[0, 1, 0] = 1.0, -1.0
    keys = torch.zeros(1, 5, 8)
    keys[..., 0] = 1000.0
    values = torch.randn(1, 5, 8)
    seen = []
    m.gru.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    new_slots, attention = m.iterate(slots, keys, values)
    assert torch.equal(attention[0, 1], torch.zeros(5)) and torch.equal(attention[0, 0], torch.ones(5))
    updates = seen[0].view(1, 2, 8)
    assert torch.allclose(updates[0, 1], values[0].mean(0), atol=1e-6)  # eps / (N eps): uniform weights
    assert torch.allclose(updates[0, 0], values[0].mean(0), atol=1e-6)  # all ones: uniform too
    assert torch.isfinite(new_slots).all()


def test_mu_and_log_sigma_are_parameters_and_both_receive_gradient():
    m = module()
    names = {name for name, _ in m.named_parameters()}
    assert {"slots_mu", "slots_log_sigma"} <= names
    history, _ = m(torch.randn(3, 10, 6))
    history[:, -1].pow(2).sum().backward()
    assert m.slots_mu.grad.abs().sum() > 0 and m.slots_log_sigma.grad.abs().sum() > 0


def test_permuting_the_initial_slots_permutes_the_output_slots():
    m = module()
    inputs, init = torch.randn(2, 10, 6), torch.randn(2, 4, 8)
    perm = torch.tensor([2, 0, 3, 1])
    history, attention = m(inputs, slots=init)
    history_p, attention_p = m(inputs, slots=init[:, perm])
    assert torch.allclose(history_p, history[:, :, perm], atol=1e-5)
    assert torch.allclose(attention_p, attention[:, :, perm], atol=1e-6)


def test_num_slots_and_iterations_can_be_overridden_per_call():
    history, attention = module()(torch.randn(2, 10, 6), num_slots=7, num_iterations=5)
    assert history.shape == (2, 5, 7, 8) and attention.shape == (2, 5, 7, 10)


def test_implicit_grad_differentiates_only_the_last_iteration_and_still_trains_the_init():
    inputs, init = torch.randn(2, 10, 6), torch.randn(2, 4, 8, requires_grad=True)
    m = module(implicit_grad=True)
    history, _ = m(inputs, slots=init)
    history[:, -1].pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    init_grad = init.grad.clone()

    # by hand: two iterations without a graph, then one iteration from those slots with one
    reference = module()
    keys = lambda: reference.project_k(reference.norm_inputs(inputs))
    values = lambda: reference.project_v(reference.norm_inputs(inputs))
    with torch.no_grad():
        slots = init
        for _ in range(2):
            slots, _ = reference.iterate(slots, keys(), values())
    start = slots.clone().requires_grad_(True)
    last, _ = reference.iterate(start, keys(), values())
    last.pow(2).sum().backward()
    for name, p in reference.named_parameters():
        if name in ("slots_mu", "slots_log_sigma"):
            continue
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name
    assert torch.allclose(init_grad, start.grad, atol=1e-6)  # straight through to the init

    # and without the flag the gradient goes back through every iteration: it differs
    full = module()
    init.grad = None
    full(inputs, slots=init)[0][:, -1].pow(2).sum().backward()
    assert not torch.allclose(full.project_q.weight.grad, grads["project_q.weight"], atol=1e-5)
    assert not torch.allclose(init.grad, init_grad, atol=1e-5)


def test_with_implicit_grad_mu_and_log_sigma_still_receive_gradient():
    m = module(implicit_grad=True)
    m(torch.randn(3, 10, 6))[0][:, -1].pow(2).sum().backward()
    assert m.slots_mu.grad.abs().sum() > 0 and m.slots_log_sigma.grad.abs().sum() > 0


def test_the_autoencoder_reconstructs_as_the_alpha_mixture_of_the_slot_images():
    torch.manual_seed(0)
    model = SlotAttention(SlotAttentionConfig(**SMALL))
    x = torch.rand(2, 3, 16, 16)
    reconstruction, internals = model(x, return_internals=True)
    masks, rgb = internals["masks"], internals["slot_rgb"]
    assert reconstruction.shape == x.shape and masks.shape == (2, 3, 16, 16) and rgb.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(masks.sum(1), torch.ones(2, 16, 16), atol=1e-6)  # alphas softmaxed over slots
    assert torch.allclose(reconstruction, (rgb * masks.unsqueeze(2)).sum(1), atol=1e-6)
    assert internals["attention"].shape == (2, 3, 3, 8, 8)  # (B, T, K, h, w) at the encoder's 8 x 8
    assert internals["masks_per_iteration"].shape == (2, 3, 3, 16, 16)
    assert torch.equal(internals["masks_per_iteration"][:, -1], masks)
    assert set(model(x)[1]) == {"masks"}  # training and metrics: only what they need
    F.mse_loss(reconstruction, x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_full_size_broadcast_decoder_of_multi_dsprites_builds():
    model = SlotAttention(SlotAttentionConfig(image_size=16, num_slots=2, slot_size=8, mlp_hidden_size=8,
                                              encoder_channels=4, decoder_channels=4))
    reconstruction, internals = model(torch.rand(1, 3, 16, 16))
    assert reconstruction.shape == (1, 3, 16, 16) and internals["masks"].shape == (1, 2, 16, 16)


def test_a_samples_output_does_not_depend_on_the_rest_of_its_batch():
    torch.manual_seed(0)
    model = SlotAttention(SlotAttentionConfig(**SMALL))
    with torch.no_grad():
        model.slot_attention.slots_log_sigma.fill_(-30.0)  # sigma ~ 0: the same init for every sample
    x = torch.rand(4, 3, 16, 16)
    together, _ = model(x)
    alone, _ = model(x[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-5)
    changed = x.clone()
    changed[0] = torch.rand(3, 16, 16)
    assert torch.allclose(model(changed)[0][2], together[2], atol=1e-5)


def test_set_prediction_gives_properties_in_0_1_per_slot():
    torch.manual_seed(0)
    model = SlotAttention(SlotAttentionConfig(**{**SMALL, "output_size": 7}))
    properties, internals = model(torch.rand(2, 3, 16, 16), return_internals=True, num_slots=5)
    assert properties.shape == (2, 5, 7) and properties.min() >= 0 and properties.max() <= 1
    assert internals["attention"].shape == (2, 3, 5, 8, 8)
    assert not hasattr(model, "decoder")


@pytest.mark.parametrize("bad", [dict(num_slots=0), dict(output_size=-1), dict(encoder_stride_layers=4),
                                 dict(image_size=32, decoder_init_size=6), dict(kernel_size=4),
                                 dict(image_size=32, decoder_init_size=2, decoder_layers=3)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SlotAttentionConfig(**bad)


def test_slot_attention_py_runs_alone_in_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(ROOT, "slot_attention.py"), tmp_path / "slot_attention.py")
    proc = subprocess.run([sys.executable, "slot_attention.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "masks sum to one over slots: True" in proc.stdout


# ----------------------------------------------------------------------------------------------
# With train.py: object discovery and set prediction end to end, figures, the paper-scale command

TINY = ["--image_size", "16", "--num_slots", "3", "--slot_size", "16", "--mlp_hidden_size", "16",
        "--encoder_channels", "8", "--decoder_channels", "8", "--encoder_stride_layers", "1",
        "--decoder_init_size", "4", "--max_objects", "2", "--eval_samples", "8", "--batch_size", "4",
        "--log_interval", "1", "--eval_interval", "4"]


def test_train_py_runs_object_discovery_and_draws_the_slots_and_attention(tmp_path):
    import train
    out = tmp_path / "sprites"
    result = train.main(["--model", "slot_attention", "--task", "sprites", "--out_dir", str(out),
                         "--max_iters", "4", *TINY])
    assert set(result["metrics"]) == {"fg_ari@test", "ari@test", "mbo@test", "mse@test", "grid_fg_ari@test",
                                      "grid_mbo@test", "stripes_fg_ari@test", "stripes_mbo@test", "iter", "seconds",
                                      "compile_seconds"}
    assert -100 <= result["metrics"]["fg_ari@test"] <= 100 and 0 <= result["metrics"]["mbo@test"] <= 100
    png = (out / "outputs_test.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not (out / "internals_test.png").exists()  # no per-time panel
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["image_size"] == 16 and ckpt["model_config"]["output_size"] == 0


def test_train_py_runs_set_prediction_with_ap_at_every_threshold(tmp_path):
    import train
    result = train.main(["--model", "slot_attention", "--task", "sprites_sets", "--out_dir", str(tmp_path / "sets"),
                         "--max_iters", "2", *TINY])
    assert set(result["metrics"]) == ({f"ap@{t}@test" for t in ("inf", "1", "0.5", "0.25", "0.125")} | {"iter", "seconds", "compile_seconds"}
                                      | {f"{p}@test" for p in ("shape_acc", "colour_acc", "size_acc", "position_err")})
    ckpt = torch.load(tmp_path / "sets" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["output_size"] == 18  # sized by the task: 2 + 4 + 8 + 3 + 1


def test_warm_up_and_exponential_decay_of_the_learning_rate(tmp_path, monkeypatch):
    import train
    seen = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    train.main(["--model", "slot_attention", "--task", "sprites", "--out_dir", str(tmp_path / "lr"), *TINY,
                "--max_iters", "4", "--no-figures", "--lr", "1e-3", "--warmup_iters", "2", "--lr_half_life", "2"])
    expected = [1e-3 * 0.5 ** (i / 2) * min(1, (i + 1) / 2) for i in range(4)]  # Appendix E.1, scaled down
    assert seen == pytest.approx(expected)


def test_the_paper_scale_command_builds_the_papers_model(tmp_path):
    import train
    result = train.main(["--model", "slot_attention", "--task", "sprites", "--out_dir", str(tmp_path / "paper"),
                         "--image_size", "64", "--num_slots", "6", "--encoder_stride_layers", "0",
                         "--decoder_init_size", "0", "--decoder_channels", "32", "--batch_size", "64",
                         "--lr", "4e-4", "--warmup_iters", "10000", "--lr_half_life", "100000",
                         "--max_iters", "0", "--eval_samples", "1", "--no-figures"])
    model = result["model"]
    assert model.config.image_size == 64 and model.decoder_init_size == 64 and model.feature_size == 64
    assert sum(p.numel() for p in model.parameters()) > 0
    # the set-prediction command of docs/slot_attention.md (the official schedule): its flags parse and build
    result = train.main(["--model", "slot_attention", "--task", "sprites_sets", "--out_dir", str(tmp_path / "sets"),
                         "--num_slots", "10", "--max_objects", "10", "--no-distinct_colours", "--image_size", "128",
                         "--batch_size", "512", "--max_iters", "0", "--lr", "4e-4", "--warmup_iters", "1000",
                         "--lr_half_life", "50000", "--grad_clip", "0", "--eval_samples", "1", "--no-figures"])
    assert result["model"].config.num_slots == 10 and result["model"].config.output_size == 2 + 4 + 8 + 3 + 1


def test_bench_times_slot_attention_on_sprites():
    import bench
    row = bench.time_training("slot_attention", "sprites_sets", 2, "cpu", False, warmup=0, runs=1, steps=1)
    assert row["ms_per_step"] > 0 and row["setting"] == "test"


@pytest.mark.parametrize("flags,message", [
    (["--task", "copy"], "does not fit --task copy"),
    (["--task", "sprites_sets", "--num_slots", "3"], "3 slots cannot predict up to 5 objects"),
    (["--task", "sprites", "--decoder_init_size", "6"], "decoder_init_size"),
    (["--task", "sprites", "--background", "pink"], "background"),
])
def test_bad_image_settings_are_refused_before_anything_is_written(tmp_path, flags, message):
    import train
    out = tmp_path / "out"
    with pytest.raises(train.UserError, match=message):
        train.main(["--model", "slot_attention", "--out_dir", str(out), *flags])
    assert not out.exists()


def test_official_init_is_glorot_uniform_with_zero_biases_and_an_orthogonal_gru_recurrent_matrix():
    torch.manual_seed(0)
    model = SlotAttention(SlotAttentionConfig(image_size=16, num_slots=3, encoder_stride_layers=1,
                                              decoder_init_size=8, official_init=True))
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)
            assert m.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() > 0.8 * (6 / (fan_in + fan_out)) ** 0.5  # uniform up to the bound
            assert m.bias is None or not m.bias.any()
    gru = model.slot_attention.gru
    D = gru.hidden_size
    assert torch.allclose(gru.weight_hh.T @ gru.weight_hh, torch.eye(D), atol=1e-5)  # orthonormal columns
    assert not gru.bias_ih.any() and not gru.bias_hh.any()
    default = SlotAttention(SlotAttentionConfig(image_size=16, num_slots=3, encoder_stride_layers=1, decoder_init_size=8))
    assert default.slot_attention.gru.bias_ih.any()  # PyTorch's default init is kept otherwise


def test_the_mask_figure_draws_each_scene_from_a_trained_run(tmp_path):
    import struct
    import train
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import slot_attention_masks
    out = tmp_path / "run"
    train.main(["--model", "slot_attention", "--task", "sprites", "--out_dir", str(out), "--max_iters", "1",
                "--no-figures", "--no-compile", *TINY])
    sizes = []
    for scenes in (1, 2):
        png = tmp_path / f"masks{scenes}.png"
        slot_attention_masks.main(["--run", str(out), "--scenes", str(scenes), "--out", str(png)])
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append(struct.unpack(">II", data[16:24]))  # (width, height)
    (w1, h1), (w2, h2) = sizes
    assert h2 / w2 > 1.5 * h1 / w1  # one block of rows per scene, the same columns
    with pytest.raises(train.UserError, match="--scenes must be 1..4"):
        slot_attention_masks.main(["--run", str(out), "--scenes", "5", "--out", str(tmp_path / "x.png")])
    with pytest.raises(train.UserError, match="no checkpoint"):
        slot_attention_masks.main(["--run", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])
