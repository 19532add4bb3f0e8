"""ACT's halting rule and ponder cost against values computed by hand from the paper's equations."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from act import ACT, ACTConfig, halting_distribution

CELL_TYPES = ["rnn", "lstm", "gru"]


def small(**overrides):
    """A tiny ACT net; halting bias -1 (h about 0.27) makes it ponder a few steps from the start."""
    config = dict(input_size=5, output_size=3, hidden_size=16, halting_bias_init=-1.0)
    return ACT(ACTConfig(**{**config, **overrides}))


class RecordingCell(nn.Module):
    """Wraps a model's cell and keeps, for every call, its input, the state it got and the state it made."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.calls = cell, []

    def forward(self, cell_input, state):
        new_state = self.cell(cell_input, state)
        as_tuple = lambda s: s if isinstance(s, tuple) else (s,)
        self.calls.append((cell_input.detach(), as_tuple(state), as_tuple(new_state)))
        return new_state


def record_halting_values(model):
    """A list that fills with h_t^n (B,) of every ponder step, read off the halting unit (Eq. 5)."""
    values = []
    model.halting_unit.register_forward_hook(lambda module, inputs, out: values.append(out[:, 0].sigmoid()))
    return values


def split_by_input_step(records, steps):
    """Split per-ponder-step records into input steps: the loop ran max_b N_b(t) ponder steps at step t."""
    split, start = [], 0
    for t in range(steps.shape[1]):
        K = int(steps[:, t].max())
        split.append(records[start:start + K])
        start += K
    assert start == len(records)
    return split


# ----------------------------------------------------------------------------------------------
# The pure halting rule, Eq. 6-8 and 13, by hand

def test_halting_distribution_matches_eq_6_to_8_by_hand_and_eq_14_gradient():
    h = torch.tensor([[0.3, 0.5, 0.4]], requires_grad=True)
    p, steps, remainder = halting_distribution(h, eps=0.01)
    # sums 0.3, 0.8, 1.2: the first to reach 0.99 is step 3; R = 1 - 0.3 - 0.5 = 0.2
    assert steps.tolist() == [3]
    assert torch.allclose(p, torch.tensor([[0.3, 0.5, 0.2]]))
    assert torch.allclose(remainder, torch.tensor([0.2]))
    ponder_cost = steps + remainder  # Eq. 10
    assert torch.allclose(ponder_cost, torch.tensor([3.2]))
    ponder_cost.sum().backward()
    # Eq. 14: -1 for each step before N(t), 0 for step N(t); N(t) itself carries no gradient
    assert torch.allclose(h.grad, torch.tensor([[-1.0, -1.0, 0.0]]))


def test_never_reaching_the_threshold_halts_at_m_with_the_remainder():
    h = torch.full((1, 5), 0.001)  # M = 5 columns
    p, steps, remainder = halting_distribution(h, eps=0.01)
    assert steps.tolist() == [5]  # Eq. 13
    assert torch.allclose(remainder, torch.tensor([0.996]))
    assert torch.allclose(p, torch.tensor([[0.001, 0.001, 0.001, 0.001, 0.996]]))
    assert torch.allclose(p.sum(-1), torch.ones(1))


def test_a_sum_exactly_at_the_threshold_halts_at_that_step():
    # eps = 0.25: threshold 0.75. All values are exact in binary, so the comparison is exact.
    # sums 0.5, 0.75, 1.25: Eq. 7 (">=", up to and including n) halts at step 2.
    # Counting the current h twice (0.5 + 0.5 >= 0.75) would halt at step 1; comparing only the
    # sum before n, or using ">", would halt at step 3.
    h = torch.tensor([[0.5, 0.25, 0.5]])
    p, steps, remainder = halting_distribution(h, eps=0.25)
    assert steps.tolist() == [2]
    assert torch.equal(p, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.equal(remainder, torch.tensor([0.5]))


def test_each_row_halts_on_its_own():
    h = torch.tensor([[0.995, 0.1, 0.1], [0.25, 0.25, 0.25], [0.6, 0.6, 0.6]])
    p, steps, remainder = halting_distribution(h, eps=0.01)
    assert steps.tolist() == [1, 3, 2]
    # one step: R = 1 - (empty sum) = 1, so rho = N + R = 2
    assert torch.allclose(remainder, torch.tensor([1.0, 0.5, 0.4]))
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.6, 0.4, 0.0]]))


# ----------------------------------------------------------------------------------------------
# The model

def test_the_model_halts_exactly_as_halting_distribution_says():
    torch.manual_seed(0)
    model = small()
    halting_values = record_halting_values(model)
    x = 3 * torch.randn(6, 4, 5)
    _, internals = model(x, return_internals=True)
    steps = internals["steps"]
    assert len(set(steps.flatten().tolist())) > 1  # the samples do halt at different steps
    for t, values in enumerate(split_by_input_step(halting_values, steps)):
        K = len(values)
        p, N, R = halting_distribution(torch.stack(values, dim=-1), model.config.eps)  # h (B, K)
        assert torch.equal(N, steps[:, t])
        assert torch.allclose(p, internals["halting_probs"][:, t, :K], atol=1e-6)
        assert torch.allclose(N + R, internals["ponder_cost"][:, t], atol=1e-6)


def test_constant_halting_values_cross_the_threshold_exactly_at_step_two_in_the_model():
    model = small(eps=0.0)  # threshold 1.0
    with torch.no_grad():
        model.halting_unit.weight.zero_()
        model.halting_unit.bias.zero_()  # h = sigmoid(0) = 0.5 exactly, every step
    _, internals = model(torch.randn(3, 4, 5), return_internals=True)
    # sums 0.5, 1.0 >= 1.0: N = 2, p = (0.5, R = 0.5), rho = 2.5; double counting would give N = 1
    assert (internals["steps"] == 2).all()
    assert torch.equal(internals["halting_probs"], torch.full((3, 4, 2), 0.5))
    assert torch.equal(internals["ponder_cost"], torch.full((3, 4), 2.5))


def test_the_model_halts_at_max_steps_and_the_last_step_takes_the_remainder():
    model = small(max_steps=5)
    with torch.no_grad():
        model.halting_unit.weight.zero_()
        model.halting_unit.bias.fill_(-10.0)
    h = torch.sigmoid(torch.tensor(-10.0))
    _, internals = model(torch.randn(3, 2, 5), return_internals=True)
    assert (internals["steps"] == 5).all()
    expected = torch.tensor([h, h, h, h, 1 - 4 * h])
    assert torch.allclose(internals["halting_probs"], expected.expand(3, 2, 5))
    assert torch.allclose(internals["ponder_cost"], torch.full((3, 2), 6 - 4 * h.item()))


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_halting_probabilities_sum_to_one_and_vanish_after_n(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    logits, internals = model(torch.randn(4, 3, 5), return_internals=True)
    p, steps, ponder_cost = internals["halting_probs"], internals["steps"], internals["ponder_cost"]
    assert logits.shape == (4, 3, 3) and steps.shape == ponder_cost.shape == (4, 3)
    assert steps.dtype == torch.int64 and p.shape == (4, 3, int(steps.max()))
    assert torch.allclose(p.sum(-1), torch.ones(4, 3), atol=1e-6)
    # p > 0 for n <= N (R > eps), 0 after; and N < rho <= N + 1
    assert torch.equal((p > 0).sum(-1), steps)
    assert (steps < ponder_cost).all() and (ponder_cost <= steps + 1).all()


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_state_and_output_are_the_p_weighted_sums_of_eq_9(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    model.cell = recorder = RecordingCell(model.cell)
    x = torch.randn(4, 2, 5)
    logits, internals = model(x, return_internals=True)
    first, second = split_by_input_step(recorder.calls, internals["steps"])
    p = internals["halting_probs"][:, 0, :len(first)]  # (B, K)
    intermediate = [torch.stack([new[i] for _, _, new in first], dim=1) for i in range(len(first[0][2]))]
    expected_state = [(p.unsqueeze(-1) * s).sum(1) for s in intermediate]  # s_t = sum_n p s^n, h (and c)
    passed_on = second[0][1]  # the state the first ponder step of t = 2 started from
    assert len(passed_on) == (2 if cell == "lstm" else 1)
    for got, want in zip(passed_on, expected_state):
        assert torch.allclose(got, want, atol=1e-6)
    expected_logits = (p.unsqueeze(-1) * model.output(intermediate[0])).sum(1)  # y_t = sum_n p y^n
    assert torch.allclose(logits[:, 0], expected_logits, atol=1e-6)


def test_the_first_step_flag_is_set_on_the_first_ponder_step_only():
    torch.manual_seed(0)
    model = small()
    model.cell = recorder = RecordingCell(model.cell)
    x = torch.randn(3, 4, 5)
    _, internals = model(x)
    for t, calls in enumerate(split_by_input_step(recorder.calls, internals["steps"])):
        assert len(calls) > 1
        for n, (cell_input, _, _) in enumerate(calls, start=1):
            assert torch.equal(cell_input[:, :5], x[:, t])  # Eq. 3: x_t^n = x_t + delta_{n,1}
            assert (cell_input[:, 5] == (1.0 if n == 1 else 0.0)).all()


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_a_halted_samples_state_stops_changing_while_others_ponder(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    with torch.no_grad():
        model.halting_unit.weight.mul_(4)  # spread the samples' halting steps apart
    model.cell = recorder = RecordingCell(model.cell)
    _, internals = model(3 * torch.randn(6, 3, 5))
    steps, checked = internals["steps"], 0
    for t, calls in enumerate(split_by_input_step(recorder.calls, steps)):
        for b, N in enumerate(steps[:, t].tolist()):
            halted_state = calls[N - 1][2]  # s_t^N of sample b (h, and c for an LSTM)
            for _, state_in, _ in calls[N + 1:]:  # two or more ponder steps after b halted
                checked += 1
                assert all(torch.equal(s[b], h[b]) for s, h in zip(state_in, halted_state))
    assert checked > 0


def test_ponder_cost_gradient_reaches_the_halting_unit_through_r_only():
    torch.manual_seed(0)
    model = small()
    halting_values = record_halting_values(model)
    _, internals = model(torch.randn(4, 1, 5))  # one input step, as in parity: b_h reaches rho only via h
    assert internals["ponder_cost"].requires_grad
    internals["ponder_cost"].sum().backward()
    # Eq. 14: d rho / d h^n = -1 for n < N, 0 at N (N is constant); and d h / d b_h = h (1 - h)
    steps = internals["steps"][:, 0]
    h = torch.stack(halting_values, dim=-1).detach()  # (B, K)
    before_halting = torch.arange(1, h.shape[1] + 1) < steps.unsqueeze(-1)
    expected = -(h * (1 - h) * before_halting).sum()
    assert torch.allclose(model.halting_unit.bias.grad, expected.view(1), atol=1e-6)
    assert model.halting_unit.weight.grad.abs().sum() > 0


def test_the_remainder_keeps_its_gradient_so_the_halting_probs_sum_to_one_under_differentiation():
    torch.manual_seed(0)
    model = small()
    _, internals = model(torch.randn(4, 3, 5), return_internals=True)
    internals["halting_probs"].sum().backward()
    # sum_n p^n = 1 identically: Eq. 18 (d p^N / d h^n = -1 for n < N) cancels every d p^n / d h^n = 1.
    # A detached R(t) would leave sum_{n < N} h (1 - h) > 0 here.
    assert model.halting_unit.bias.grad.abs().item() < 1e-5
    assert model.halting_unit.weight.grad.abs().max().item() < 1e-5


def test_ponder_loss_is_tau_times_the_per_sequence_sum_averaged_over_the_batch():
    model = small(time_penalty=0.01)
    internals = {"ponder_cost": torch.tensor([[2.5, 3.0], [4.0, 2.5]])}
    # sequences cost 5.5 and 6.5: mean 6.0, times tau
    assert torch.allclose(model.ponder_loss(internals), torch.tensor(0.06))


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_a_samples_steps_and_output_do_not_depend_on_the_rest_of_its_batch(cell):
    torch.manual_seed(0)
    model = small(cell=cell)
    x = 3 * torch.randn(5, 4, 5)
    together, internals = model(x)
    alone, alone_internals = model(x[2:3])
    assert torch.equal(internals["steps"][2:3], alone_internals["steps"])
    assert torch.allclose(together[2:3], alone, atol=1e-5)
    changed = x.clone()
    changed[0] += 1.0  # disturbing another sample changes nothing for sample 2
    logits, changed_internals = model(changed)
    assert torch.equal(changed_internals["steps"][2], internals["steps"][2])
    assert torch.allclose(logits[2], together[2], atol=1e-6)


def test_outputs_are_causal_in_time():
    torch.manual_seed(0)
    model = small()
    x = torch.randn(2, 6, 5)
    later = x.clone()
    later[:, 4:] = torch.randn(2, 2, 5)
    assert torch.allclose(model(x)[0][:, :4], model(later)[0][:, :4], atol=1e-6)


@pytest.mark.parametrize("cell, act", [(c, True) for c in CELL_TYPES] + [("rnn", False)])
def test_gradients_reach_every_parameter(cell, act):
    torch.manual_seed(0)
    model = small(cell=cell, act=act)
    logits, _ = model(torch.randn(3, 3, 5))
    logits.pow(2).sum().backward()  # the task loss alone reaches the halting unit, through p (Eq. 9)
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_without_act_it_is_the_plain_rnn_of_eq_1_and_2_with_constant_ponder_cost():
    torch.manual_seed(0)
    model = small(act=False)
    assert model.cell.input_size == 5  # no first-step flag
    assert not any(name.startswith("halting_unit") for name, _ in model.named_parameters())
    x = torch.randn(2, 3, 5)
    logits, internals = model(x, return_internals=True)
    cell, h = model.cell, torch.zeros(2, 16)
    for t in range(3):  # Eq. 1-2 by hand: s_t = tanh(W x_t + U s_{t-1} + b), y_t = W_y s_t + b_y
        h = torch.tanh(x[:, t] @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh)
        assert torch.allclose(logits[:, t], model.output(h), atol=1e-6)
    assert torch.equal(internals["steps"], torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(internals["halting_probs"], torch.ones(2, 3, 1))
    # as an ACT net halting at once: N = 1, R = 1, rho = 2, with nothing to differentiate
    assert torch.equal(internals["ponder_cost"], torch.full((2, 3), 2.0))
    loss = model.ponder_loss(internals)
    assert not loss.requires_grad
    assert torch.allclose(loss, torch.tensor(model.config.time_penalty * 6.0))


def test_halting_arithmetic_stays_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = small(cell="lstm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, internals = model(torch.randn(2, 3, 5), return_internals=True)
    assert internals["ponder_cost"].dtype == torch.float32
    assert internals["halting_probs"].dtype == torch.float32
    assert torch.allclose(internals["halting_probs"].sum(-1), torch.ones(2, 3), atol=1e-6)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="cell"):
        ACTConfig(cell="transformer")
    with pytest.raises(ValueError, match="max_steps"):
        ACTConfig(max_steps=0)
    with pytest.raises(ValueError, match="eps"):
        ACTConfig(eps=1.0)
    with pytest.raises(ValueError, match="time_penalty"):
        ACTConfig(time_penalty=-0.1)


def test_act_py_runs_alone_in_an_empty_folder(tmp_path):
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "act.py")
    shutil.copy(source, tmp_path / "act.py")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "act.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 5, 1])" in result.stdout

