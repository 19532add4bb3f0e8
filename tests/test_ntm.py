"""The NTM's addressing and memory equations against values computed by hand from the paper."""

import math

import pytest
import torch

from ntm import NTM, NTMConfig, circular_shift, content_weights, interpolate, read_memory, sharpen, write_memory


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_content_addressing_matches_eq_5_and_6_by_hand():
    memory = t([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]).unsqueeze(0)  # (1, N=3, W=2)
    key = t([2.0, 0.0]).view(1, 1, 2)  # cosine ignores the key's length
    w = content_weights(memory, key, torch.ones(1, 1, 1))[0, 0]
    # cosine similarities: 1, 0, 1/sqrt(2); Eq. 5 is their softmax with beta = 1
    sims = [1.0, 0.0, 1 / math.sqrt(2)]
    expected = torch.tensor([math.exp(s) for s in sims]) / sum(math.exp(s) for s in sims)
    assert torch.allclose(w, expected, atol=1e-6)


def test_content_addressing_picks_the_most_similar_row_and_sharpens_with_key_strength():
    memory = torch.randn(1, 16, 8)
    key = (memory[0, 5] + 0.05 * torch.randn(8)).view(1, 1, 8)
    peaks = [content_weights(memory, key, torch.full((1, 1, 1), beta))[0, 0] for beta in (1.0, 10.0, 100.0)]
    assert all(int(w.argmax()) == 5 for w in peaks)
    assert peaks[0].max() < peaks[1].max() < peaks[2].max()
    assert peaks[2].max() > 0.95


def test_interpolation_gate_chooses_between_content_and_previous_weighting():
    content, previous = t([0.7, 0.2, 0.1]).view(1, 1, 3), t([0.0, 0.0, 1.0]).view(1, 1, 3)
    assert torch.equal(interpolate(content, previous, torch.ones(1, 1, 1)), content)
    assert torch.equal(interpolate(content, previous, torch.zeros(1, 1, 1)), previous)
    half = interpolate(content, previous, torch.full((1, 1, 1), 0.5))[0, 0]
    assert torch.allclose(half, t(0.35, 0.1, 0.55))  # Eq. 7 by hand


def test_shift_plus_one_moves_a_one_hot_weighting_one_row_circularly():
    w = torch.zeros(1, 1, 5)
    w[0, 0, 4] = 1.0  # the last row
    plus_one = t([0.0, 0.0, 1.0]).view(1, 1, 3)  # shift distribution over (-1, 0, +1)
    minus_one = t([1.0, 0.0, 0.0]).view(1, 1, 3)
    assert torch.equal(circular_shift(w, plus_one)[0, 0], t(1.0, 0, 0, 0, 0))  # wraps to row 0
    assert torch.equal(circular_shift(w, minus_one)[0, 0], t(0, 0, 0, 1.0, 0))


def test_fractional_shift_is_the_circular_convolution_of_eq_8():
    w = t([0.5, 0.5, 0.0, 0.0]).view(1, 1, 4)
    s = t([0.2, 0.3, 0.5]).view(1, 1, 3)  # s(-1), s(0), s(+1)
    # w~(i) = sum_j w(j) s(i - j): row 0 gets 0.5*s(0) + 0.5*s(-1), row 1 gets 0.5*s(+1) + 0.5*s(0),
    # row 2 gets 0.5*s(+1), row 3 (= row -1) gets 0.5*s(-1)
    assert torch.allclose(circular_shift(w, s)[0, 0], t(0.25, 0.4, 0.25, 0.1))


def test_sharpening_matches_eq_9_and_large_gamma_tends_to_one_hot():
    w = t([0.5, 0.3, 0.2]).view(1, 1, 3)
    expected = t(0.25, 0.09, 0.04) / 0.38
    assert torch.allclose(sharpen(w, torch.full((1, 1, 1), 2.0))[0, 0], expected, atol=1e-6)
    assert torch.allclose(sharpen(w, torch.ones(1, 1, 1))[0, 0], w[0, 0], atol=1e-6)  # gamma = 1 keeps w
    assert sharpen(w, torch.full((1, 1, 1), 200.0))[0, 0, 0] > 0.999
    # zeros in w must not give NaN gradients to gamma
    gamma = torch.full((1, 1, 1), 3.0, requires_grad=True)
    sharpen(t([1.0, 0.0, 0.0]).view(1, 1, 3), gamma).sum().backward()
    assert torch.isfinite(gamma.grad).all()


def test_read_is_the_weighted_sum_of_rows_eq_2():
    memory = t([1.0, 2.0], [3.0, 4.0]).unsqueeze(0)
    w = t([0.25, 0.75]).view(1, 1, 2)
    assert torch.allclose(read_memory(memory, w)[0, 0], t(2.5, 3.5))


def test_erase_then_add_matches_eq_3_and_4_by_hand():
    memory = t([1.0, 2.0], [3.0, 4.0]).unsqueeze(0)
    w = t([1.0, 0.5]).view(1, 1, 2)
    erase, add = t([1.0, 0.0]).view(1, 1, 2), t([0.5, -1.0]).view(1, 1, 2)
    # row 0: [1, 2] * (1 - [1, 0]) + [0.5, -1] = [0.5, 1]
    # row 1: [3, 4] * (1 - 0.5 [1, 0]) + 0.5 [0.5, -1] = [1.75, 3.5]
    assert torch.allclose(write_memory(memory, w, erase, add)[0], t([0.5, 1.0], [1.75, 3.5]))


def test_two_write_heads_multiply_their_erasures_and_sum_their_adds():
    memory = torch.ones(1, 2, 1)
    w = t([1.0, 0.0], [0.5, 0.5]).view(1, 2, 2)  # head 0 on row 0, head 1 spread
    erase, add = t([0.5], [0.5]).view(1, 2, 1), t([1.0], [2.0]).view(1, 2, 1)
    # row 0: 1 * (1 - 0.5)(1 - 0.25) + 1 + 1 = 2.375; row 1: 1 * (1 - 0.25) + 1 = 1.75
    assert torch.allclose(write_memory(memory, w, erase, add)[0, :, 0], t(2.375, 1.75))


@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_every_weighting_of_the_model_sums_to_one(controller):
    config = NTMConfig(controller=controller, num_read_heads=2, num_write_heads=2, memory_size=16)
    logits, internals = NTM(config)(torch.randn(3, 7, 9), return_internals=True)
    assert logits.shape == (3, 7, 8)
    for name in ("read_weights", "write_weights"):
        assert internals[name].shape == (3, 7, 2, 16)
        assert torch.allclose(internals[name].sum(-1), torch.ones(3, 7, 2), atol=1e-5)
        assert (internals[name] >= 0).all()


def test_addressing_stays_in_fp32_under_bf16_autocast():
    model = NTM(NTMConfig(memory_size=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, internals = model(torch.randn(2, 4, 9), return_internals=True)
    assert internals["read_weights"].dtype == torch.float32
    assert internals["write_weights"].dtype == torch.float32
    assert torch.allclose(internals["write_weights"].sum(-1), torch.ones(2, 4, 1), atol=1e-5)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="controller"):
        NTMConfig(controller="gru")
    with pytest.raises(ValueError, match="memory_size"):
        NTMConfig(memory_size=0)

