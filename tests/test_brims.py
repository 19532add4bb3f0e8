"""BRIMs: attention over [null, bottom-up, top-down], top-down from the layer above at the previous
step, top-k modules per layer that keep their state when inactive, grouped dynamics."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from brims import BRIMs, BRIMsConfig, per_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**overrides):
    config = dict(input_size=5, output_size=3, num_layers=2, num_modules=(6, 4), num_active=(4, 2),
                  hidden_size=(24, 16), input_key_size=8, input_value_size=10, comm_heads=2, comm_key_size=4,
                  comm_value_size=4)
    return BRIMs(BRIMsConfig(**{**config, **overrides}))


def random_states(model, batch_size):
    return [(torch.randn(batch_size, l.num_modules, l.module_size), torch.randn(batch_size, l.num_modules, l.module_size))
            for l in model.layers]


def one_step(model, x, states):
    """model.step on one input x (B, input_size) from the given states."""
    return model.step(model.layers[0].bottom_up_key_value(model.embed(x.unsqueeze(1)))[:, 0], states)


# ----------------------------------------------------------------------------------------------
# Attention over [null, bottom-up, top-down]

def test_attention_over_null_bottom_up_and_top_down_sums_to_one_and_the_top_layer_has_no_top_down():
    torch.manual_seed(0)
    model = small(num_layers=3, num_modules=(6,), num_active=(3,), hidden_size=(12,))
    _, internals = model(torch.randn(4, 7, 5), return_internals=True)
    for layer in range(3):
        attention = internals[f"source_attention_l{layer}"]  # (B, T, M, 3)
        assert attention.shape == (4, 7, 6, 3) and (attention >= 0).all()
        assert torch.allclose(attention.sum(-1), torch.ones(4, 7, 6), atol=1e-6)
        assert (attention[..., 2] > 0).all() == (layer < 2)
    assert torch.equal(internals["source_attention_l2"][..., 2], torch.zeros(4, 7, 6))  # exactly none
    assert model.layers[2].top_down_key_value is None and model.layers[1].top_down_key_value is not None
    assert model.layers[1].top_down_key_value.in_features == 12  # the layer above's whole state


def test_attention_is_the_softmax_over_the_three_rows_by_hand():
    torch.manual_seed(0)
    model = small()
    layer = model.layers[0]
    h = torch.randn(2, 6, 4)
    key_value = torch.randn(2, 2, 8 + 10)  # bottom-up and top-down rows
    weights = layer.step_weights()
    scaled_query = per_module(h, weights["from_h"], weights["from_h_bias"])[..., :8]  # what a step computes
    rows = torch.cat([torch.zeros(2, 1, 18), key_value], dim=1)  # the null row first
    attention, read = layer.source_attention(scaled_query, rows)
    query = torch.stack([h[:, k] @ layer.input_query[k] for k in range(6)], dim=1)  # (B, M, dk), by hand
    key, value = key_value[..., :8], key_value[..., 8:]
    scores = torch.cat([torch.zeros(2, 6, 1), torch.einsum("bmd,bsd->bms", query, key) / 8 ** 0.5], dim=-1)
    expected = torch.softmax(scores, dim=-1)
    assert torch.allclose(attention, expected, atol=1e-6)
    assert torch.allclose(read, expected[..., 1:2] * value[:, None, 0] + expected[..., 2:] * value[:, None, 1], atol=1e-6)


def test_a_zero_input_with_a_zero_layer_above_is_the_null_row():
    model = small()
    states = random_states(model, 2)
    states[1] = (torch.zeros_like(states[1][0]), states[1][1])  # the layer above says nothing
    _, _, attentions = one_step(model, torch.zeros(2, 5), states)
    assert torch.allclose(attentions[0], torch.full((2, 6, 3), 1 / 3))  # three equal scores of 0


# ----------------------------------------------------------------------------------------------
# Top-down comes from the layer above at the previous step

def test_top_down_at_t_reads_the_layer_above_at_t_minus_1_not_its_new_state():
    torch.manual_seed(0)
    model = small()
    x, states = torch.randn(3, 5), random_states(model, 3)
    before, _, attention_before = one_step(model, x, states)
    # the upper layer's state after t - 1 changes: the lower layer's attention and state at t change
    changed = [states[0], (states[1][0] + 1.0, states[1][1])]
    after, _, attention_after = one_step(model, x, changed)
    assert not torch.allclose(attention_after[0], attention_before[0])
    # the upper layer's own step at t changes (other weights): the lower layer at t does not notice
    with torch.no_grad():
        model.layers[1].cell_hidden_weight.add_(1.0)
        model.layers[1].input_query.add_(1.0)
    again, _, attention_again = one_step(model, x, states)
    assert torch.equal(again[0][0], before[0][0]) and torch.equal(attention_again[0], attention_before[0])
    assert not torch.allclose(again[1][0], before[1][0])


def test_perturbing_the_upper_layer_at_t_changes_the_lower_layer_only_from_t_plus_1():
    torch.manual_seed(0)
    model = small()
    x = torch.randn(2, 6, 5)
    rows = model.layers[0].bottom_up_key_value(model.embed(x))

    def run(perturb_at=None):
        states, lower = model.initial_state(2, "cpu"), []
        for t in range(6):
            states, _, attentions = model.step(rows[:, t], states)
            if t == perturb_at:
                states[1] = (states[1][0] + 0.5, states[1][1])  # the upper layer's state at t
            lower.append((states[0][0], attentions[0]))
        return lower

    clean, perturbed = run(), run(perturb_at=2)
    for t in range(3):  # up to and including t: identical
        assert torch.equal(clean[t][0], perturbed[t][0]) and torch.equal(clean[t][1], perturbed[t][1])
    assert not torch.allclose(clean[3][1], perturbed[3][1])  # t + 1: the lower layer's attention moved


def test_outputs_at_a_step_do_not_depend_on_later_inputs():
    torch.manual_seed(0)
    model = small()
    x = torch.randn(2, 8, 5)
    later = x.clone()
    later[:, 5:] = torch.randn(2, 3, 5)
    (a, ia), (b, ib) = model(x, return_internals=True), model(later, return_internals=True)
    assert torch.equal(a[:, :5], b[:, :5])
    assert torch.equal(ia["source_attention_l0"][:, :5], ib["source_attention_l0"][:, :5])


# ----------------------------------------------------------------------------------------------
# Top-k per layer, inactive modules

def test_exactly_k_active_modules_per_layer_and_step_chosen_by_lowest_null_attention():
    torch.manual_seed(0)
    model = small()
    _, internals = model(torch.randn(4, 9, 5), return_internals=True)
    for layer, k in ((0, 4), (1, 2)):
        active = internals[f"active_modules_l{layer}"].bool()
        null = internals[f"source_attention_l{layer}"][..., 0]
        assert torch.equal(active.sum(-1), torch.full((4, 9), k))
        worst_active = torch.where(active, null, -1.0).max(-1).values
        best_inactive = torch.where(active, 2.0, null).min(-1).values
        assert (worst_active <= best_inactive).all()


def test_selection_by_hand_ties_to_the_lowest_index_and_no_gradient():
    layer = small().layers[0]  # 6 modules, 4 active
    null = torch.tensor([[0.9, 0.2, 0.5, 0.1, 0.7, 0.3], [0.5] * 6], requires_grad=True)
    expected = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    active = layer.select_active(null)
    assert torch.equal(active, expected) and not active.requires_grad


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inactive_modules_keep_their_state_exactly_in_every_layer(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    states = random_states(model, 5)
    new_states, actives, _ = one_step(model, torch.randn(5, 5), states)
    for (h, c), (h_new, c_new), active in zip(states, new_states, actives):
        assert torch.equal(h_new[~active], h[~active])
        if cell == "lstm":
            assert torch.equal(c_new[~active], c[~active])
        assert not torch.allclose(h_new[active], h[active])


def test_no_gradient_reaches_an_inactive_module_through_communication():
    torch.manual_seed(0)
    model = small(num_layers=1, num_modules=(6,), num_active=(4,), hidden_size=(24,))
    h, c = random_states(model, 1)[0]
    h.requires_grad_(True)
    new_states, actives, _ = one_step(model, torch.randn(1, 5), [(h, c)])
    active = actives[0][0]
    new_states[0][0][0, active].pow(2).sum().backward()
    assert torch.equal(h.grad[0, ~active], torch.zeros_like(h.grad[0, ~active]))
    assert h.grad[0, active].abs().sum() > 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_grouped_dynamics_equal_separate_torch_cells_run_one_by_one(cell):
    torch.manual_seed(0)
    layer = small(cell=cell).layers[0]
    read, h, c = torch.randn(3, 6, 10), torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    weights = layer.step_weights()  # W_hh h + bias comes out of the same matmul as the query
    h_grouped, c_grouped = layer.cell(read, h, c, per_module(h, weights["from_h"], weights["from_h_bias"])[..., 8:])
    assert layer.cell_hidden_weight.shape == (6, 4, (4 if cell == "lstm" else 3) * 4)  # no dense (24, 96) matrix
    for k in range(6):
        torch_cell = nn.LSTMCell(10, 4) if cell == "lstm" else nn.GRUCell(10, 4)
        with torch.no_grad():
            torch_cell.weight_ih.copy_(layer.cell_input_weight[k].T)
            torch_cell.weight_hh.copy_(layer.cell_hidden_weight[k].T)
            torch_cell.bias_ih.copy_(layer.cell_input_bias[k])
            torch_cell.bias_hh.copy_(layer.cell_hidden_bias[k])
        if cell == "lstm":
            h_k, c_k = torch_cell(read[:, k], (h[:, k], c[:, k]))
            assert torch.allclose(c_grouped[:, k], c_k, atol=1e-6)
        else:
            h_k = torch_cell(read[:, k], h[:, k])
        assert torch.allclose(h_grouped[:, k], h_k, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Integer inputs, the whole model

def test_integer_codes_are_embedded_per_channel():
    torch.manual_seed(0)
    model = small(input_size=3, input_vocab=256, embed_size=7)
    codes = torch.tensor([[[0.0, 255.0, 7.0]]])
    expected = model.embedding.weight[0] + model.embedding.weight[256 + 255] + model.embedding.weight[512 + 7]
    assert torch.allclose(model.embed(codes)[0, 0], expected)
    logits, internals = model(torch.randint(0, 256, (2, 5, 3)).float(), return_internals=True)
    assert logits.shape == (2, 5, 3) and internals["active_modules_l1"].shape == (2, 5, 4)


def test_gradients_reach_every_parameter():
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
    assert torch.equal(internals["active_modules_l1"][2:3], alone_internals["active_modules_l1"])
    changed = x.clone()
    changed[0] += 1.0
    assert torch.allclose(model(changed)[0][2], together[2], atol=1e-6)


def test_a_short_run_lowers_the_loss():
    torch.manual_seed(0)
    model = small(output_size=2)
    x = torch.randn(8, 4, 5)
    y = (x[:, 0, 0] > 0).long()  # remember the sign of the first input until the last step
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x)[0][:, -1], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_config_is_refused():
    for bad in (dict(num_active=(7,)), dict(hidden_size=(25,)), dict(num_modules=(6, 6, 6)), dict(cell="rnn"),
                dict(num_layers=0), dict(input_vocab=-1)):
        with pytest.raises(ValueError):
            BRIMsConfig(**bad)
    assert BRIMsConfig(num_layers=3, hidden_size=(60,)).hidden_size == (60, 60, 60)


def test_brims_file_imports_and_runs_when_copied_alone(tmp_path):
    shutil.copy(os.path.join(ROOT, "brims.py"), tmp_path / "brims.py")
    proc = subprocess.run([sys.executable, "brims.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([2, 7, 5])" in proc.stdout and "[4.0, 4.0" in proc.stdout
