"""RIMs: top-k competition, modules that keep their state, grouped independent dynamics, and
communication that sends no gradient to inactive modules."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from rims import RIMs, RIMsConfig, per_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**overrides):
    config = dict(input_size=5, output_size=3, num_modules=6, num_active=4, hidden_size=24,
                  input_key_size=8, input_value_size=10, comm_heads=2, comm_key_size=4, comm_value_size=4)
    return RIMs(RIMsConfig(**{**config, **overrides}))


def one_step(model, x, h, c):
    """model.step on one input x (B, input_size) from state h, c."""
    key, weighted_value = model.input_projections(x.unsqueeze(1))
    return model.step(key[:, 0], weighted_value[:, 0], h, c)


def random_state(model, batch_size):
    shape = (batch_size, model.config.num_modules, model.module_size)
    return torch.randn(shape), torch.randn(shape)


# ----------------------------------------------------------------------------------------------
# Input attention and the top-k competition (section 2.2)

def test_input_attention_is_the_softmax_over_the_null_row_and_the_input_by_hand():
    torch.manual_seed(0)
    model = small()
    x, (h, _) = torch.randn(3, 5), random_state(model, 3)
    query = torch.stack([h[:, k] @ model.input_query[k] for k in range(6)], dim=1)  # (B, M, dk)
    key = x @ model.input_key.weight.T
    scores = torch.stack([torch.zeros(3, 6), (query * key.unsqueeze(1)).sum(-1) / math.sqrt(8)], dim=-1)  # [null, x]
    expected = torch.softmax(scores, dim=-1)[..., 1]  # attention on the input
    got = model.input_attention(key, h)
    assert torch.allclose(got, expected, atol=1e-6)


def test_exactly_k_active_modules_per_sample_and_step_chosen_by_lowest_null_attention():
    torch.manual_seed(0)
    model = small(num_active=3)
    x = torch.randn(4, 9, 5)
    _, internals = model(x, return_internals=True)
    active, null = internals["active_modules"], 1 - internals["input_attention"]  # (B, T, M)
    assert torch.equal(active.sum(-1), torch.full((4, 9), 3.0))
    # every active module attends to the null row no more than any inactive one
    worst_active = torch.where(active.bool(), null, -1.0).max(-1).values
    best_inactive = torch.where(active.bool(), 2.0, null).min(-1).values
    assert (worst_active <= best_inactive).all()


def test_selection_by_hand_and_ties_go_to_the_lowest_module_index():
    model = small(num_active=2)
    null = torch.tensor([[0.9, 0.2, 0.5, 0.1, 0.7, 0.3],
                         [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])  # second row: a zero input, all tied
    expected = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(model.select_active(null), expected)


def test_a_zero_input_equals_the_null_input():
    model = small()
    h, _ = random_state(model, 2)
    key, weighted_value = model.input_projections(torch.zeros(2, 1, 5))
    assert torch.equal(model.input_attention(key[:, 0], h), torch.full((2, 6), 0.5))
    assert torch.equal(weighted_value, torch.zeros_like(weighted_value))  # it reads nothing


def test_the_selection_mask_carries_no_gradient():
    model = small()
    null = torch.rand(3, 6, requires_grad=True)
    active = model.select_active(null)
    assert active.dtype == torch.bool and not active.requires_grad
    # in the model, the inactive modules' query weights get no gradient at all from a step
    # (test_no_gradient_reaches_an_inactive_module_through_communication): the choice itself is not differentiated


# ----------------------------------------------------------------------------------------------
# Inactive modules (section 2.3)

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inactive_modules_keep_their_state_exactly(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    h, c = random_state(model, 5)
    h_new, c_new, active, _ = one_step(model, torch.randn(5, 5), h, c)
    inactive = ~active
    assert torch.equal(h_new[inactive], h[inactive])
    assert torch.equal(c_new[inactive], c[inactive]) if cell == "lstm" else True
    assert not torch.allclose(h_new[active], h[active])  # the active ones did update


def test_no_gradient_reaches_an_inactive_module_through_communication():
    torch.manual_seed(0)
    model = small()
    h, c = random_state(model, 1)  # one sample: a module is either active or not
    h.requires_grad_(True)
    c.requires_grad_(True)
    h_new, c_new, active, _ = one_step(model, torch.randn(1, 5), h, c)
    assert active.sum() == 4
    # a loss on what the active modules became, after reading every module
    (h_new[active].pow(2).sum() + c_new[active].pow(2).sum()).backward()
    inactive = ~active[0]
    assert torch.equal(h.grad[0, inactive], torch.zeros_like(h.grad[0, inactive]))
    assert torch.equal(c.grad[0, inactive], torch.zeros_like(c.grad[0, inactive]))
    assert h.grad[0, active[0]].abs().sum() > 0
    for weight in (model.cell_hidden_weight, model.cell_input_weight, model.input_query):
        assert torch.equal(weight.grad[inactive], torch.zeros_like(weight.grad[inactive]))  # its own dynamics: none
        assert weight.grad[active[0]].abs().sum() > 0


@pytest.mark.parametrize("communication", [True, False])
def test_active_modules_read_the_inactive_ones_only_through_communication(communication):
    torch.manual_seed(0)
    model = small(communication=communication)
    h, c = random_state(model, 1)
    x = torch.zeros(1, 5)  # a null input: all modules tie, so modules 0-3 are active whatever h is
    h_before, _, active, _ = one_step(model, x, h, c)
    changed = h.clone()
    changed[0, 4:] += 1.0  # the inactive modules' states
    h_after, _, active_after, _ = one_step(model, x, changed, c)
    assert torch.equal(active[0], torch.tensor([True] * 4 + [False] * 2)) and torch.equal(active, active_after)
    assert torch.allclose(h_after[0, :4], h_before[0, :4]) != communication


# ----------------------------------------------------------------------------------------------
# Independent dynamics (section 2.3): grouped weights, one cell per module

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_grouped_dynamics_equal_separate_torch_cells_run_one_by_one(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    M, S, dv = 6, model.module_size, 10
    read = torch.randn(3, M, dv)  # what each module read
    h, c = random_state(model, 3)
    h_grouped, c_grouped = model.cell(per_module(read, model.cell_input_weight), h, c)
    for k in range(M):
        torch_cell = nn.LSTMCell(dv, S) if cell == "lstm" else nn.GRUCell(dv, S)
        with torch.no_grad():
            torch_cell.weight_ih.copy_(model.cell_input_weight[k].T)
            torch_cell.weight_hh.copy_(model.cell_hidden_weight[k].T)
            torch_cell.bias_ih.copy_(model.cell_input_bias[k])
            torch_cell.bias_hh.copy_(model.cell_hidden_bias[k])
        if cell == "lstm":
            h_k, c_k = torch_cell(read[:, k], (h[:, k], c[:, k]))
            assert torch.allclose(c_grouped[:, k], c_k, atol=1e-6)
        else:
            h_k = torch_cell(read[:, k], h[:, k])
        assert torch.allclose(h_grouped[:, k], h_k, atol=1e-6)


def test_a_modules_update_does_not_depend_on_another_modules_recurrent_weights():
    torch.manual_seed(0)
    model = small(communication=False)
    h, c = random_state(model, 4)
    x = torch.randn(4, 5)
    h_before, c_before, active, _ = one_step(model, x, h, c)
    with torch.no_grad():
        model.cell_hidden_weight[2] += torch.randn_like(model.cell_hidden_weight[2])  # perturb module 2 only
        model.cell_input_weight[2] += torch.randn_like(model.cell_input_weight[2])
    h_after, c_after, active_after, _ = one_step(model, x, h, c)
    assert torch.equal(active, active_after)
    others = [k for k in range(6) if k != 2]
    assert torch.equal(h_after[:, others], h_before[:, others])
    assert torch.equal(c_after[:, others], c_before[:, others])
    assert not torch.allclose(h_after[active[:, 2], 2], h_before[active[:, 2], 2])  # module 2 did change


def test_the_dynamics_are_computed_with_grouped_weights_not_a_dense_masked_matrix():
    model = small()
    assert model.cell_hidden_weight.shape == (6, 4, 16)  # (modules, S, 4 gates * S): no (24, 96) matrix
    assert model.cell_input_weight.shape == (6, 10, 16)
    assert sum(p.numel() for p in model.parameters()) < 6 * 24 * 96  # a dense 24 -> 4 x 24 cell alone is more


# ----------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter_over_a_sequence():
    torch.manual_seed(0)
    model = small()
    logits, _ = model(torch.randn(4, 8, 5))
    logits.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_sample_does_not_depend_on_its_batch_neighbours():
    torch.manual_seed(0)
    model = small()
    x = torch.randn(5, 7, 5)
    together, internals = model(x, return_internals=True)
    alone, alone_internals = model(x[2:3], return_internals=True)
    assert torch.allclose(together[2:3], alone, atol=1e-5)
    assert torch.equal(internals["active_modules"][2:3], alone_internals["active_modules"])
    changed = x.clone()
    changed[0] += 1.0
    assert torch.allclose(model(changed)[0][2], together[2], atol=1e-6)


def test_bad_config_is_refused():
    for bad in (dict(num_active=7), dict(hidden_size=25), dict(cell="rnn"), dict(comm_heads=0)):
        with pytest.raises(ValueError):
            RIMsConfig(**bad)


def test_rims_file_imports_and_runs_when_copied_alone(tmp_path):
    shutil.copy(os.path.join(ROOT, "rims.py"), tmp_path / "rims.py")
    proc = subprocess.run([sys.executable, "rims.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([2, 7, 5])" in proc.stdout and "[4.0, 4.0" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Inputs that are not the null row, and the fused step

def test_an_embedded_blank_or_background_pixel_is_not_scored_like_the_null_row():
    from data import CopyDelay, CopyDelayConfig
    torch.manual_seed(0)
    task = CopyDelay(CopyDelayConfig(length=2, delay=3, num_symbols=4))
    x = task.make_batch(2, torch.Generator().manual_seed(0), delay=3)["x"]  # (B, 7, 6), one-hot with the blank
    model = small(input_size=x.shape[-1])
    key, weighted_value = model.input_projections(x)
    blank = x[..., 0] == 1
    assert blank.any() and (key[blank].abs().sum(-1) > 0).all()  # the blank has a key of its own
    h, _ = random_state(model, 1)
    attention = model.input_attention(key[:1, 3], h)  # step 3 is a blank
    assert not torch.allclose(attention, torch.full_like(attention, 0.5))  # no tie at 0.5
    pixels = small(input_size=1, input_vocab=2, embed_size=12)
    key, _ = pixels.input_projections(torch.tensor([[[0.0], [1.0]]]))  # a background and an ink pixel
    assert (key[0].abs().sum(-1) > 0).all() and not torch.allclose(key[0, 0], key[0, 1])
    null = small(input_size=1)  # the ablation: the pixel fed as is, so background is the null row
    key, _ = null.input_projections(torch.zeros(1, 1, 1))
    assert torch.equal(null.input_attention(key[:, 0], h), torch.full((1, 6), 0.5))


def reference_forward(model, x):
    """The per-step arithmetic of sections 2.2-2.4 written plainly (einsum per module, no fused matmul,
    softmax over the last dimension): what the fused step must equal."""
    c, S = model.config, model.module_size
    M, H, dk, dv = c.num_modules, c.comm_heads, c.comm_key_size, c.comm_value_size
    B, T, _ = x.shape
    x = model.embed(x)
    h = cell_state = torch.zeros(B, M, S)
    outputs, actives = [], []
    for t in range(T):
        key, value = model.input_key(x[:, t]), model.input_value(x[:, t])
        query = torch.einsum("bms,msd->bmd", h, model.input_query)
        p = torch.sigmoid((query * key.unsqueeze(1)).sum(-1) / math.sqrt(c.input_key_size))  # (B, M)
        active = model.select_active(1 - p)
        read = p.unsqueeze(-1) * value.unsqueeze(1)  # (B, M, dv)
        gates = (torch.einsum("bmi,mig->bmg", read, model.cell_input_weight) + model.cell_input_bias
                 + torch.einsum("bms,msg->bmg", h, model.cell_hidden_weight) + model.cell_hidden_bias)
        i, f, g, o = gates.split(S, dim=-1)
        c_new = torch.sigmoid(f) * cell_state + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        source = torch.where(active.unsqueeze(-1), h_new, h)
        q = torch.einsum("bms,msd->bmd", h_new, model.comm_query).view(B, M, H, dk).transpose(1, 2)
        k, v = torch.einsum("bms,msd->bmd", source, model.comm_key_value).split((H * dk, H * dv), -1)
        k, v = k.reshape(B, M, H, dk).transpose(1, 2), v.reshape(B, M, H, dv).transpose(1, 2)
        heads = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dk), -1) @ v).transpose(1, 2).reshape(B, M, -1)
        out, gate = (torch.einsum("bmi,mio->bmo", heads, model.comm_output_gate) + model.comm_output_gate_bias).split(S, -1)
        h_new = h_new + torch.sigmoid(gate) * torch.tanh(out)
        keep = active.unsqueeze(-1)
        h, cell_state = torch.where(keep, h_new, h), torch.where(keep, c_new, cell_state)
        outputs.append(model.output(h.reshape(B, -1)))
        actives.append(active)
    return torch.stack(outputs, 1), torch.stack(actives, 1).float()


@pytest.mark.parametrize("vocab", [0, 3])
def test_the_fused_step_equals_the_plain_arithmetic_logits_and_active_modules(vocab):
    torch.manual_seed(0)
    model = small(input_vocab=vocab, embed_size=7)
    x = torch.randint(0, 3, (4, 9, 5)).float() if vocab else torch.randn(4, 9, 5)
    logits, internals = model(x, return_internals=True)
    expected_logits, expected_active = reference_forward(model, x)
    assert torch.equal(internals["active_modules"], expected_active)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
