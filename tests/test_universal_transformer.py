"""The Universal Transformer: per-position ACT halting by hand, weight sharing, the coordinate
embedding, padding, and that it learns."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from universal_transformer import TransformerConfig, UniversalTransformer, UTConfig, sinusoid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**overrides):
    config = dict(vocab_size=12, output_size=5, d_model=16, num_heads=2, d_ff=32, dropout=0.0, max_steps=4,
                  halting_bias_init=-1.0)
    return UniversalTransformer(UTConfig(**{**config, **overrides}))


def logit(p):
    return math.log(p / (1 - p))


def model_reading_halting_from_dim_0(max_steps=3):
    """A model whose halting unit reads dimension 0 of the state: h = sigmoid(H[..., 0]) (Graves Eq. 5)."""
    model = small(max_steps=max_steps)
    with torch.no_grad():
        model.halting_unit.weight.zero_()
        model.halting_unit.weight[0, 0] = 1.0
        model.halting_unit.bias.zero_()
    return model


# ----------------------------------------------------------------------------------------------
# ACT per position, Graves Eq. 5-10, by hand

def test_halting_step_by_hand_per_position():
    """Three positions of one sample, M = 3: h = (0.3, 0.5, 0.4) halts at N = 3 with R = 0.2;
    h = 0.995 halts at once with p = R = 1; h = 0.1 never reaches 0.99 and halts at M with R = 0.8."""
    model = model_reading_halting_from_dim_0()
    h = torch.tensor([[0.3, 0.995, 0.1], [0.5, 0.5, 0.1], [0.4, 0.5, 0.1]])  # (step, position)
    states = [torch.randn(1, 3, 16) for _ in range(3)]
    for n in range(3):
        states[n][0, :, 0] = torch.tensor([logit(float(v)) for v in h[n]])
    state, mean = torch.zeros(1, 3, 16), torch.zeros(1, 3, 16)
    halting_sum, running = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
    probs, steps, frozen = [], torch.zeros(1, 3, dtype=torch.long), []
    for n in range(3):
        steps = steps + running
        state, mean, halting_sum, running, p = model.halting_step(states[n], state, mean, halting_sum, running, n == 2)
        probs.append(p)
        frozen.append(state.clone())
    probs = torch.cat(probs)  # (step, position)
    expected = torch.tensor([[0.3, 1.0, 0.1], [0.5, 0.0, 0.1], [0.2, 0.0, 0.8]])  # Eq. 6, 8
    assert torch.allclose(probs, expected, atol=1e-5)
    assert steps.tolist() == [[3, 1, 3]]  # Eq. 7 and 13
    ponder_cost = steps + (1 - halting_sum)  # Eq. 10
    assert torch.allclose(ponder_cost, torch.tensor([[3.2, 2.0, 3.8]]), atol=1e-5)
    # Eq. 9: the output state is sum_n p^n H^n, position by position
    by_hand = sum(expected[n].view(1, 3, 1) * states[n] for n in range(3))
    assert torch.allclose(mean, by_hand, atol=1e-5)
    # position 1 halted at step 1: its state stays H^1 while the others keep changing
    assert torch.equal(frozen[2][0, 1], states[0][0, 1]) and torch.equal(frozen[2][0, 0], states[2][0, 0])
    assert not running.any()


def test_ponder_cost_gradient_flows_through_the_remainder_only():
    """rho = N + R with R = 1 - sum_{n<N} h^n: d rho / d h^n = -1 before N, 0 at N (Graves Eq. 14)."""
    model = model_reading_halting_from_dim_0()
    pre = torch.tensor([logit(0.3), logit(0.5), logit(0.4)], requires_grad=True)  # one position, three steps
    state, mean = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    halting_sum, running = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    steps = torch.zeros(1, 1, dtype=torch.long)
    for n in range(3):
        new_state = torch.zeros(1, 1, 16).index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), pre[n:n + 1])
        steps = steps + running
        state, mean, halting_sum, running, _ = model.halting_step(new_state, state, mean, halting_sum, running, n == 2)
    (steps + 1 - halting_sum).sum().backward()
    h = torch.tensor([0.3, 0.5, 0.4])
    assert torch.allclose(pre.grad, torch.tensor([-1.0, -1.0, 0.0]) * h * (1 - h), atol=1e-6)  # chain rule through sigmoid


def reference_halting(h, eps, M):
    """Graves Eq. 6-8, 13 on h (..., M), written independently: cumulative sums, first crossing."""
    total, steps, probs = torch.zeros(h.shape[:-1]), torch.full(h.shape[:-1], M), torch.zeros_like(h)
    cumulative = h.cumsum(-1)
    for n in reversed(range(M)):
        steps = torch.where(cumulative[..., n] >= 1 - eps, n + 1, steps)
    for n in range(M):
        before = (n + 1) < steps
        probs[..., n] = torch.where(before, h[..., n], torch.where((n + 1) == steps, 0.0, 0.0))
    remainder = 1 - probs.sum(-1)
    probs.scatter_(-1, (steps - 1).unsqueeze(-1), remainder.unsqueeze(-1))
    return probs, steps, remainder


def test_the_model_halts_every_position_as_the_rule_says_and_probs_sum_to_one():
    torch.manual_seed(0)
    model = small(max_steps=6).eval()
    with torch.no_grad():
        model.halting_unit.weight.normal_(0, 1.0)  # spread the h's so positions halt at different steps
    values = []
    model.halting_unit.register_forward_hook(lambda m, i, out: values.append(out.squeeze(-1).sigmoid()))
    x = torch.randint(1, 12, (3, 7))
    _, internals = model(x, return_internals=True)
    h = torch.stack(values, -1)  # (B, S, K), every position's h at every step the loop ran
    probs, steps, remainder = reference_halting(h.detach(), 0.01, 6)
    K = h.shape[-1]
    if K < 6:  # the loop stopped once all positions halted: steps after K never happen
        assert (steps <= K).all()
    assert torch.equal(internals["steps"], steps)
    assert torch.allclose(internals["halting_probs"], probs, atol=1e-5)
    assert torch.allclose(internals["halting_probs"].sum(-1), torch.ones(3, 7), atol=1e-5)
    assert torch.allclose(internals["ponder_cost"], steps + remainder, atol=1e-5)
    assert len(set(internals["steps"].flatten().tolist())) > 1  # positions halt at different steps


def test_ponder_loss_is_tau_times_the_mean_rho_over_real_positions_and_reaches_the_halting_unit():
    torch.manual_seed(0)
    model = small(time_penalty=0.5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    _, internals = model(torch.randint(1, 12, (2, 4)), padding_mask=mask)
    assert (internals["ponder_cost"][0, 3] == 0) and (internals["ponder_cost"][mask] >= 1).all()
    loss = model.ponder_loss(internals)
    assert torch.allclose(loss, 0.5 * internals["ponder_cost"][mask].mean())
    loss.backward()
    assert model.halting_unit.bias.grad.abs() > 0 and model.halting_unit.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Weight sharing and the coordinate embedding

def test_universal_shares_one_block_and_the_transformer_has_one_per_layer():
    ut = small(act=False, max_steps=4)
    base = UniversalTransformer(TransformerConfig(vocab_size=12, output_size=5, d_model=16, num_heads=2, d_ff=32,
                                                  dropout=0.0, max_steps=4))
    assert len(ut.blocks) == 1 and len(base.blocks) == 4
    block_params = sum(p.numel() for p in ut.blocks[0].parameters())
    others = sum(p.numel() for n, p in ut.named_parameters() if not n.startswith("blocks."))
    assert sum(p.numel() for p in ut.parameters()) == block_params + others
    assert sum(p.numel() for p in base.parameters()) == 4 * block_params + others  # same width, 4 layers
    layers = [dict(b.named_parameters()) for b in base.blocks]
    for name in layers[0]:  # every layer holds its own tensors, with their own values
        assert len({layer[name].data_ptr() for layer in layers}) == 4
        assert not torch.equal(layers[0][name], layers[1][name]) or "norm" in name or "bias" in name
    calls = []
    ut.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    ut(torch.randint(1, 12, (2, 3)))
    assert len(calls) == 4  # the one block, applied T = 4 times


def test_sinusoid_by_hand():
    d = 4
    s = sinusoid(torch.tensor([0.0, 1.0, 3.0]), d)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                             [math.sin(1), math.cos(1), math.sin(1 / 100), math.cos(1 / 100)],
                             [math.sin(3), math.cos(3), math.sin(3 / 100), math.cos(3 / 100)]])  # 10000^(2/4) = 100
    assert torch.allclose(s, expected, atol=1e-6)


def test_every_step_adds_the_position_and_its_own_timestep_signal():
    """UT section 2.1: the block's input at step t is H^{t-1} + P_pos + P_time(t)."""
    torch.manual_seed(0)
    model = small(act=False, max_steps=3).eval()
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out[0])

    model.blocks[0].register_forward_hook(record)
    x = torch.randint(1, 12, (2, 5))
    offset = torch.tensor([0, 7])
    model(x, position_offset=offset)
    previous = [model.embed(x)] + outputs[:-1]
    positions = torch.arange(5) + offset.view(2, 1)
    added = [inputs[t] - previous[t] for t in range(3)]
    for t in range(3):
        assert torch.allclose(added[t], sinusoid(positions, 16) + sinusoid(torch.tensor(t + 1.0), 16), atol=1e-5)
    assert not torch.allclose(added[0], added[1]) and not torch.allclose(added[1], added[2])

    base = UniversalTransformer(TransformerConfig(vocab_size=12, output_size=5, d_model=16, num_heads=2, d_ff=32,
                                                  dropout=0.0, max_steps=2)).eval()
    seen = []
    for block in base.blocks:
        block.register_forward_hook(lambda m, i, out: seen.append((i[0], out[0])) and None)
    base(x)
    assert torch.allclose(seen[0][0], base.embed(x) + sinusoid(torch.arange(5).expand(2, 5), 16))  # once, at the input
    assert torch.equal(seen[1][0], seen[0][1])  # then layer to layer, nothing added


def test_tensor2tensor_halting_reads_the_step_input_before_the_block():
    torch.manual_seed(0)
    model = small(halting_input="before", max_steps=3).eval()
    block_inputs, unit_inputs = [], []
    model.blocks[0].register_forward_hook(lambda m, args, out: block_inputs.append(args[0]))
    model.halting_unit.register_forward_hook(lambda m, args, out: unit_inputs.append(args[0]))
    model(torch.randint(1, 12, (2, 5)))
    assert len(unit_inputs) == len(block_inputs) > 0
    assert all(torch.allclose(u, b) for u, b in zip(unit_inputs, block_inputs))
    graves = small(max_steps=3).eval()  # the default: Eq. 5 on the new state
    outputs, unit_inputs = [], []
    graves.blocks[0].register_forward_hook(lambda m, args, out: outputs.append(out[0]))
    graves.halting_unit.register_forward_hook(lambda m, args, out: unit_inputs.append(args[0]))
    graves(torch.randint(1, 12, (2, 5)))
    assert all(torch.allclose(u, o) for u, o in zip(unit_inputs, outputs))


def test_without_freezing_a_halted_position_keeps_changing_for_the_others_to_read():
    torch.manual_seed(0)
    frozen = model_reading_halting_from_dim_0(max_steps=4).eval()
    running = small(max_steps=4, freeze_halted=False).eval()
    running.load_state_dict(frozen.state_dict())
    x = torch.randint(1, 12, (2, 6))
    with torch.no_grad():
        frozen.embedding.weight[:, 0] = torch.linspace(-4, 6, 12)  # h = sigmoid(state dim 0): some halt at once
    running.load_state_dict(frozen.state_dict())
    states = {}
    for name, model in (("frozen", frozen), ("running", running)):
        seen = []
        model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
        _, internals = model(x)
        states[name] = seen
    steps = internals["steps"]
    assert steps.min() < steps.max()  # some positions halt before others
    # the block's input at the last step differs where a position had halted: frozen keeps H^N
    assert not torch.allclose(states["frozen"][-1], states["running"][-1])
    assert torch.allclose(states["frozen"][0], states["running"][0])  # identical until something halts


def test_the_learned_step_signal_is_one_trained_vector_per_step():
    torch.manual_seed(0)
    model = small(step_signal="learned", act=False, max_steps=3, decoder=True)
    assert model.step_embedding.shape == (3, 16) and model.decoder_step_embedding.shape == (3, 16)
    inputs, outputs = [], []
    model.blocks[0].register_forward_hook(lambda m, args, out: inputs.append(args[0]) or outputs.append(out[0]))
    x, y = torch.randint(1, 12, (2, 5)), torch.randint(0, 5, (2, 4))
    logits, _ = model(x, y=y)
    previous = [model.embed(x)] + outputs[:-1]
    for t in range(3):
        assert torch.allclose(inputs[t] - previous[t], sinusoid(torch.arange(5).expand(2, 5), 16) + model.step_embedding[t],
                              atol=1e-5)
    logits.sum().backward()
    assert model.step_embedding.grad.abs().sum(1).gt(0).all() and model.decoder_step_embedding.grad.abs().sum() > 0
    assert small().step_embedding is None  # the default: section 2.1's sinusoid


# ----------------------------------------------------------------------------------------------
# Padding and batch independence

VARIANTS = {
    "ut_act": dict(),
    "ut_fixed_steps": dict(act=False),
    "ut_sepconv": dict(transition="sepconv"),
    "ut_post_norm": dict(norm_first=False),  # the paper's section 2.1 layout
    "ut_t2t_halting": dict(halting_input="before", freeze_halted=False, step_signal="learned"),
    "transformer": dict(universal=False, act=False),
    "facts": dict(sentence_length=4),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_leaves_the_real_positions_unchanged(name):
    torch.manual_seed(0)
    model = small(**VARIANTS[name]).eval()
    shape = (2, 5, 4) if name == "facts" else (2, 5)
    x = torch.randint(1, 12, shape)
    plain, plain_internals = model(x)
    padded_x = torch.cat([x, torch.randint(1, 12, (2, 3, *shape[2:]))], dim=1)  # 3 rows of junk, masked out
    mask = torch.arange(8).expand(2, 8) < 5
    padded, internals = model(padded_x, padding_mask=mask)
    assert torch.allclose(padded[:, :5], plain, atol=1e-5)
    assert torch.equal(internals["steps"][:, :5], plain_internals["steps"]) and (internals["steps"][:, 5:] == 0).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_a_sample_does_not_depend_on_its_batch_neighbours(name):
    torch.manual_seed(0)
    model = small(**VARIANTS[name]).eval()
    shape = (4, 6, 4) if name == "facts" else (4, 6)
    x = torch.randint(1, 12, shape)
    mask = torch.arange(6).expand(4, 6) < torch.tensor([[6], [3], [5], [1]])
    together, _ = model(x, padding_mask=mask)
    alone, _ = model(x[1:2, :3], padding_mask=mask[1:2, :3])
    assert torch.allclose(together[1, :3], alone[0], atol=1e-5)
    changed = x.clone()
    changed[0] = torch.randint(1, 12, changed[0].shape)  # another sample, other tokens (other halting)
    assert torch.allclose(model(changed, padding_mask=mask)[0][1:], together[1:], atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for overrides in ({}, {"transition": "sepconv", "sentence_length": 3}, {"universal": False, "act": False}):
        model = small(**overrides)
        x = torch.randint(1, 12, (3, 5, 3) if "sentence_length" in overrides else (3, 5))
        logits, internals = model(x)
        (logits.pow(2).sum() + model.ponder_loss(internals)).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (overrides, pname)


# ----------------------------------------------------------------------------------------------
# The decoder (sequence to sequence)

DECODERS = {"ut_act": dict(), "ut_fixed_steps": dict(act=False), "ut_post_norm": dict(norm_first=False),
            "transformer": dict(universal=False, act=False)}


def seq2seq(**overrides):
    return small(decoder=True, output_size=6, **overrides)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_decoding_step_by_step_equals_teacher_forcing_on_its_own_outputs(name):
    """Greedy decoding runs one position at a time with cached keys and values (halted positions' too);
    fed its own outputs all at once under the causal mask, the decoder must give the same logits."""
    torch.manual_seed(0)
    model = seq2seq(**DECODERS[name]).eval()
    x, mask = torch.randint(1, 12, (3, 6)), torch.arange(6).expand(3, 6) < torch.tensor([[6], [4], [5]])
    offset = torch.tensor([0, 3, 9])
    greedy, internals = model(x, padding_mask=mask, position_offset=offset, y=torch.zeros(3, 7, dtype=torch.long))
    forced, forced_internals = model(x, padding_mask=mask, position_offset=offset, y=greedy.argmax(-1), teacher_forcing=True)
    assert greedy.shape == (3, 7, 6) and torch.allclose(greedy, forced, atol=1e-5)
    assert torch.equal(internals["decoder_steps"], forced_internals["decoder_steps"])
    if name == "ut_act":  # positions halt at different steps, so the cache must serve halted positions
        assert len(set(internals["decoder_steps"].flatten().tolist())) > 1


def test_greedy_decoding_reads_nothing_of_y_but_its_length():
    torch.manual_seed(0)
    model = seq2seq().eval()
    x = torch.randint(1, 12, (2, 5))
    one, _ = model(x, y=torch.zeros(2, 4, dtype=torch.long))
    other, _ = model(x, y=torch.randint(0, 6, (2, 4)))
    assert torch.equal(one, other)


@pytest.mark.parametrize("name", DECODERS)
def test_the_decoder_is_causal_and_reads_the_encoder(name):
    """Teacher-forced position i reads y_0..y_{i-1}: changing y_3 onwards leaves positions 0..3 alone,
    and changes position 4; changing the input changes every position."""
    torch.manual_seed(0)
    model = seq2seq(**DECODERS[name]).eval()
    x, y = torch.randint(1, 12, (2, 5)), torch.randint(0, 6, (2, 7))
    logits, _ = model(x, y=y, teacher_forcing=True)
    later = y.clone()
    later[:, 3:] = (y[:, 3:] + 1) % 6
    changed, _ = model(x, y=later, teacher_forcing=True)
    assert torch.allclose(changed[:, :4], logits[:, :4], atol=1e-6)
    assert not torch.allclose(changed[:, 4], logits[:, 4], atol=1e-4)
    other_input, _ = model((x % 11) + 1, y=y, teacher_forcing=True)
    assert not torch.allclose(other_input[:, 0], logits[:, 0], atol=1e-4)


def test_encoder_padding_leaves_the_decoder_unchanged():
    torch.manual_seed(0)
    model = seq2seq().eval()
    x, y = torch.randint(1, 12, (2, 5)), torch.randint(0, 6, (2, 4))
    plain, _ = model(x, y=y)
    padded, _ = model(torch.cat([x, torch.randint(1, 12, (2, 3))], 1), padding_mask=torch.arange(8).expand(2, 8) < 5, y=y)
    assert torch.allclose(padded, plain, atol=1e-5)


def test_the_decoder_ponders_and_its_cost_has_gradient():
    torch.manual_seed(0)
    model = seq2seq()
    logits, internals = model(torch.randint(1, 12, (2, 5)), y=torch.randint(0, 6, (2, 4)))
    rho_enc, rho_dec = internals["ponder_cost"], internals["decoder_ponder_cost"]
    assert rho_dec.shape == (2, 4) and (rho_dec >= 1).all()
    assert torch.allclose(model.ponder_loss(internals), 0.01 * (rho_enc.mean() + rho_dec.mean()))
    model.ponder_loss(internals).backward()
    assert model.decoder_halting_unit.bias.grad.abs() > 0 and model.halting_unit.bias.grad.abs() > 0
    with pytest.raises(ValueError, match="decoder needs the targets"):
        model(torch.randint(1, 12, (2, 5)))
    with pytest.raises(ValueError, match="transition='ffn'"):
        seq2seq(transition="sepconv")


def test_a_decoded_sample_does_not_depend_on_its_batch_neighbours():
    torch.manual_seed(0)
    model = seq2seq().eval()
    x, y = torch.randint(1, 12, (4, 6)), torch.zeros(4, 5, dtype=torch.long)
    together, _ = model(x, y=y)
    alone, _ = model(x[1:2], y=y[1:2])
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_halting_arithmetic_stays_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, internals = model(torch.randint(1, 12, (2, 5)), return_internals=True)
    assert internals["ponder_cost"].dtype == torch.float32 and internals["halting_probs"].dtype == torch.float32


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="act needs universal=True"):
        UTConfig(universal=False, act=True)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        UTConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="transition"):
        UTConfig(transition="lstm")
    with pytest.raises(ValueError, match="max_steps"):
        UTConfig(max_steps=0)


def test_universal_transformer_py_runs_alone_in_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(ROOT, "universal_transformer.py"), tmp_path / "universal_transformer.py")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "universal_transformer.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("torch.Size([2, 5, 8])") == 4
    assert result.stdout.count("greedy == teacher-forced on its own outputs: True") == 2
