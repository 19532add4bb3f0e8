"""Properties every sequence model here must have, checked on the NTM, the LSTM baseline, RIMs and BRIMs."""

import pytest
import torch

from lstm import LSTM, LSTMConfig
from ntm import NTM, NTMConfig
from rims import RIMs, RIMsConfig
from brims import BRIMs, BRIMsConfig

MODELS = {
    "ntm_lstm_controller": lambda: NTM(NTMConfig(memory_size=16, controller_size=32)),
    "ntm_feedforward_2x2_heads": lambda: NTM(NTMConfig(controller="feedforward", memory_size=16,
                                                       num_read_heads=2, num_write_heads=2)),
    "lstm": lambda: LSTM(LSTMConfig(hidden_size=32, num_layers=2)),
    "rims": lambda: RIMs(RIMsConfig(input_size=9, output_size=8, hidden_size=24, input_value_size=16)),
    "brims": lambda: BRIMs(BRIMsConfig(input_size=9, output_size=8, hidden_size=(24, 12), num_modules=(6, 3),
                                       num_active=(4, 2), input_value_size=16)),
}


@pytest.mark.parametrize("name", MODELS)
def test_a_samples_output_does_not_depend_on_the_rest_of_its_batch(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(5, 9, 9)
    together, _ = model(x)
    alone, _ = model(x[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-5)
    changed = x.clone()
    changed[0] += 1.0  # disturbing another sample changes nothing for sample 2
    assert torch.allclose(model(changed)[0][2], together[2], atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    logits, _ = model(torch.randn(3, 6, 9))
    logits.pow(2).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_causal_in_time(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(2, 8, 9)
    later = x.clone()
    later[:, 5:] = torch.randn(2, 3, 9)  # changing the future leaves the past alone
    assert torch.allclose(model(x)[0][:, :5], model(later)[0][:, :5], atol=1e-6)


def test_the_seq2seq_lstm_decodes_greedily_as_it_would_teacher_forced_on_its_own_outputs():
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=12, output_size=10, decoder=True, hidden_size=16, num_layers=2)).eval()
    x = torch.randint(1, 12, (3, 6))
    greedy, _ = model(x, y=torch.zeros(3, 5, dtype=torch.long))
    forced, _ = model(x, y=greedy.argmax(-1), teacher_forcing=True)
    assert greedy.shape == (3, 5, 10) and torch.allclose(greedy, forced, atol=1e-5)
    y = greedy.argmax(-1)
    later = y.clone()
    later[:, 2:] = (y[:, 2:] + 1) % 10
    assert torch.allclose(model(x, y=later, teacher_forcing=True)[0][:, :3], forced[:, :3], atol=1e-6)  # causal
    assert not torch.allclose(model(x, y=later, teacher_forcing=True)[0][:, 3], forced[:, 3], atol=1e-4)
    with pytest.raises(ValueError, match="vocab_size"):
        LSTMConfig(decoder=True)


@pytest.mark.parametrize("name", ["lstm", "rims", "brims"])
def test_the_forget_gate_bias_is_what_the_config_says_in_every_lstm(name):
    """forget_bias is added to torch's init of every forget gate (torch's gate order i, f, g, o) and
    nowhere else: two models built from one seed differ by exactly forget_bias there."""
    make = {"lstm": lambda fb: LSTM(LSTMConfig(input_size=3, output_size=2, hidden_size=8, num_layers=2, forget_bias=fb)),
            "rims": lambda fb: RIMs(RIMsConfig(input_size=3, output_size=2, hidden_size=12, forget_bias=fb)),
            "brims": lambda fb: BRIMs(BRIMsConfig(input_size=3, output_size=2, hidden_size=(12, 6), num_modules=(6, 3),
                                                  num_active=(4, 2), forget_bias=fb))}[name]
    torch.manual_seed(0)
    base = dict(make(0.0).named_parameters())
    torch.manual_seed(0)
    opened = dict(make(1.5).named_parameters())
    forget_slices = 0
    for key, weight in opened.items():
        difference = (weight - base[key]).detach()
        if "bias_ih" in key or key.endswith("cell_input_bias"):
            size = difference.shape[-1] // 4  # the module (or layer) size S
            expected = torch.zeros_like(difference)
            expected[..., size: 2 * size] = 1.5
            assert torch.allclose(difference, expected), key
            forget_slices += 1
        else:
            assert torch.equal(difference, torch.zeros_like(difference)), key
    assert forget_slices == {"lstm": 2, "rims": 1, "brims": 2}[name]  # every layer's cells
