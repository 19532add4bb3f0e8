"""Neural Interpreters: the kernel and compatibility, ModLin, function permutation,
transfer that trains only CLS tokens and codes, the ViT baseline and the digits stand-in through train.py."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from data import DIGIT_DOMAINS, Digits, DigitsConfig
from neural_interpreter import ModLin, NeuralInterpreter, NIConfig, compatibility
from vit import ViT, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**overrides):
    values = dict(image_size=28, in_channels=1, patch_size=7, width=16, code_size=16, type_size=8, num_functions=3,
                  num_iterations=2, num_heads=2, head_size=4, num_domains=2)
    return NeuralInterpreter(NIConfig(**{**values, **overrides}))


def test_compatibility_sums_to_one_over_functions_and_is_exactly_zero_beyond_tau_without_nan():
    signatures = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    types = torch.tensor([[[1.0, 0.2], [0.3, 1.0], [-1.0, -1.0]]], requires_grad=True)  # the last is far from both
    bandwidth = torch.tensor(1.0, requires_grad=True)
    C = compatibility(signatures, types, bandwidth, truncation=1.2)
    assert torch.allclose(C[0, :, :2].sum(0), torch.ones(2), atol=1e-5)
    assert torch.equal(C[0, :, 2], torch.zeros(2))  # 1 - cos > 1.2 for both signatures: no function
    d = 1 - torch.nn.functional.cosine_similarity(signatures[:, None], types[0, None, :2], dim=-1)  # (U, 2)
    kernel = torch.exp(-d)
    assert torch.allclose(C[0, :, :2], kernel / (kernel.sum(0) + 1e-6), atol=1e-5)  # the kernel by hand
    (C * torch.arange(6.0).view(1, 2, 3)).sum().backward()
    assert torch.isfinite(types.grad).all() and torch.isfinite(bandwidth.grad)
    assert types.grad[0, 2].abs().sum() == 0  # the truncated token gets no gradient
    # a bandwidth of 2 flattens the kernel: the two compatibilities come closer
    wide = compatibility(signatures, types.detach(), torch.tensor(2.0), truncation=1.2)
    assert (wide[0, 0, 0] - wide[0, 1, 0]).abs() < (C[0, 0, 0] - C[0, 1, 0]).abs()


def test_modlin_is_a_linear_layer_whose_input_is_scaled_by_the_layernormed_code_projection():
    torch.manual_seed(0)
    layer = ModLin(4, 3, code_size=2)
    with torch.no_grad():  # W_c c = [3, -3, 3, -3] for the code [1, 0]: LayerNormed, [1, -1, 1, -1]
        layer.scale.weight.copy_(torch.tensor([[3.0, 0.0], [-3.0, 0.0], [3.0, 0.0], [-3.0, 0.0]]))
    codes = torch.tensor([[1.0, 0.0]])  # one function
    x = torch.randn(2, 1, 5, 4)  # (B, U, N, in)
    plain = torch.nn.Linear(4, 3)
    with torch.no_grad():
        plain.weight.copy_(layer.linear.weight * torch.tensor([1.0, -1.0, 1.0, -1.0]))
        plain.bias.copy_(layer.linear.bias)
    assert torch.allclose(layer(x, codes), plain(x), atol=1e-4)


def test_permuting_the_functions_with_their_codes_signatures_and_biases_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = small().eval()
    x, domain = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 0])
    logits, internals = model(x, domain=domain)
    perm = torch.tensor([2, 0, 1])
    permuted = small().eval()
    state = model.state_dict()
    for name in list(state):
        if name.endswith(("signatures", "codes", "position_bias")):
            state[name] = state[name][perm]
    permuted.load_state_dict(state)
    again, internals_again = permuted(x, domain=domain)
    assert torch.allclose(logits, again, atol=1e-5)
    assert torch.allclose(internals["compatibility"][:, :, perm], internals_again["compatibility"], atol=1e-5)


def test_each_token_of_each_iteration_sums_to_one_or_zero_and_the_cls_token_of_the_domain_is_read():
    torch.manual_seed(0)
    model = small().eval()
    x = torch.rand(2, 1, 28, 28)
    _, internals = model(x, domain=torch.tensor([0, 1]))
    sums = internals["compatibility"].sum(2)  # (B, L, N)
    assert internals["compatibility"].shape == (2, 2, 3, 17)
    assert ((sums - 1).abs() < 1e-4).logical_or(sums == 0).all()
    a, _ = model(x, domain=torch.tensor([0, 0]))
    b, _ = model(x, domain=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)  # another dataset's CLS token, another answer


@pytest.mark.parametrize("mode,trained", [("cls", {"cls_tokens"}), ("cls_codes", {"cls_tokens", "scripts.0.codes"})])
def test_transfer_trains_only_the_cls_tokens_and_codes_and_leaves_every_other_weight_bit_identical(mode, trained):
    torch.manual_seed(0)
    model = small(train_only=mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits, _ = model(torch.rand(4, 1, 28, 28), domain=torch.tensor([1, 1, 1, 1]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trained


def test_the_vit_baseline_fine_tunes_its_head_alone_when_asked():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=28, in_channels=1, patch_size=7, width=16, depth=1, num_heads=2, mlp_size=16,
                          train_only="head"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.0.weight", "head.0.bias",
                                                                            "head.1.weight", "head.1.bias"}
    logits, _ = model(torch.rand(2, 1, 28, 28), domain=torch.tensor([0, 2]) % 3)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(width=15), dict(truncation=0), dict(train_only="heads"),
                                 dict(num_functions=0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        NIConfig(**{**dict(image_size=28, patch_size=7, width=16, num_heads=2), **bad})


def test_the_digits_domains_are_mnist_inverted_and_rotated(tmp_path):
    from test_rims_tasks import write_mnist
    write_mnist(str(tmp_path), n_train=12, n_test=6)
    tasks = {d: Digits(DigitsConfig(domain=d, train_size=12, eval_samples=6), data_dir=str(tmp_path)) for d in DIGIT_DOMAINS}
    g = torch.Generator()
    batches = {d: t.eval_batch("test", 6, g) for d, t in tasks.items()}
    plain = batches["mnist"]["x"]
    assert torch.allclose(batches["inverted"]["x"], 1 - plain)
    assert torch.equal(batches["rotated"]["x"], torch.rot90(plain, 1, (2, 3)))
    assert [int(b["domain"][0]) for b in batches.values()] == [0, 1, 2]
    assert torch.equal(batches["mnist"]["y"], torch.arange(6))  # the test images in order
    assert tasks["mnist"].spec == {"kind": "classify", "image_size": 28, "in_channels": 1, "output_size": 10,
                                   "num_domains": 3}


def test_train_py_trains_both_models_on_digits_and_transfers_with_init_from(tmp_path):
    from test_rims_tasks import write_mnist
    write_mnist(str(tmp_path / "mnist"), n_train=64, n_test=16)
    common = ["--task", "digits", "--data_dir", str(tmp_path / "mnist"), "--train_size", "64", "--eval_samples", "16",
              "--max_iters", "6", "--eval_interval", "6", "--batch_size", "8", "--width", "16", "--num_heads", "2",
              "--no-compile"]
    ni = ["--model", "neural_interpreter", "--code_size", "16", "--type_size", "8", "--num_iterations", "2",
          "--head_size", "4"]
    result = train.main([*ni, *common, "--out_dir", str(tmp_path / "ni")])
    metrics = result["metrics"]
    assert 0 <= metrics["acc@test"] <= 100 and sum(metrics[f"usage_{u}@test"] for u in range(5)) == pytest.approx(1, abs=0.05)
    assert (tmp_path / "ni" / "outputs_test.png").exists()
    vit = train.main(["--model", "vit", *common, "--mlp_size", "16", "--depth", "1", "--out_dir", str(tmp_path / "vit")])
    assert 0 <= vit["metrics"]["acc@test"] <= 100
    start = torch.load(tmp_path / "ni" / "ckpt.pt", weights_only=True)["model"]
    moved = train.main([*ni, *common, "--domain", "inverted", "--train_only", "cls", "--init_from",
                        str(tmp_path / "ni" / "ckpt.pt"), "--out_dir", str(tmp_path / "transfer")])
    after = moved["model"].state_dict()
    assert {k for k in start if not torch.equal(start[k], after[k])} == {"cls_tokens"}
    assert not torch.equal(start["cls_tokens"][1], after["cls_tokens"][1]) and torch.equal(start["cls_tokens"][0], after["cls_tokens"][0])
    with pytest.raises(train.UserError, match="holds --model neural_interpreter"):
        train.main(["--model", "vit", *common, "--init_from", str(tmp_path / "ni" / "ckpt.pt"), "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(train.UserError, match="no such checkpoint"):
        train.main([*ni, *common, "--init_from", str(tmp_path / "none.pt"), "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(train.UserError, match="does not fit"):
        train.main(["--model", "ntm", *common[:8], "--out_dir", str(tmp_path / "y")])


def test_neural_interpreter_py_and_vit_py_run_alone_in_an_empty_folder(tmp_path):
    for name in ("neural_interpreter.py", "vit.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    both = "import runpy; runpy.run_path('neural_interpreter.py', run_name='__main__'); runpy.run_path('vit.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", both], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert "sums over functions [1.0, 1.0, 1.0, 1.0, 1.0]" in out.stdout and "(2, 10)" in out.stdout
