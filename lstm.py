"""
LSTM baseline, in one file.

Paper: Sepp Hochreiter, Juergen Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
The NTM paper (Graves et al. 2014, arXiv:1410.5401, section 4) compares against a stack of
3 LSTM layers of 256 units each (Table 3): a network whose only memory is its hidden state,
so it can learn to copy sequences as long as those it saw in training but not longer.

- Same interface as every sequence model here: forward(x) with x (B, T, input_size)
  returns logits (B, T, output_size) and a dict of internals (the top layer's hidden
  states per step, on request).
- Uses torch's fused nn.LSTM: the baseline should be as fast as an LSTM can be.
- forget_bias opens the forget gates at the start (Jozefowicz et al. 2015): the sequential-MNIST and
  copying-with-delay presets set it to 1, which the RIMs comparisons need to leave chance in a CPU budget.
- Tasks whose next input is the last output (the NPS arithmetic task) set feedback_size F: the first F
  input channels hold the true previous target while training (teacher forcing); at evaluation the
  LSTM runs one step at a time and writes its own previous output there (autoregression).
- Sequence-to-sequence tasks of token ids (the UT paper's algorithmic tasks, whose LSTM baseline is a
  sequence-to-sequence LSTM) set vocab_size and decoder: an encoder LSTM reads the embedded input
  tokens, and a decoder LSTM starting from its final state writes the output y (B, U) one token at
  a time (Sutskever et al. 2014), reading the true previous token while training and its own greedy
  choice at evaluation. Inputs padded at the end (a padding_mask) are packed, so padding never reaches it.

Compare with the NTM on copy: python train.py --model lstm --task copy
"""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LSTMConfig:
    input_size: int = 9  # set from the task
    output_size: int = 8  # set from the task
    hidden_size: int = 256  # NTM paper, Table 3: 3 x 256 LSTM units
    num_layers: int = 3  # NTM paper, Table 3
    feedback_size: int = 0  # set from the task: the first channels of x_t hold the output of step t-1
    vocab_size: int = 0  # set from the task: x holds token ids 0..vocab_size-1 (embedded), 0 = x holds vectors
    decoder: bool = False  # set from the task: encode x, then decode outputs y (needs vocab_size)
    # added to every forget gate's initial bias: 1.0 as Jozefowicz et al. 2015 and TensorFlow's LSTMCell;
    # 0 keeps torch's init (uniform in +-1/sqrt(hidden_size)), the default, as the NTM paper's baseline rows ran
    forget_bias: float = 0.0

    def __post_init__(self):
        for name in ("input_size", "output_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.feedback_size <= min(self.input_size, self.output_size):
            raise ValueError(f"feedback_size must be in 0..min(input_size, output_size), got {self.feedback_size}")
        if self.vocab_size < 0 or (self.decoder and not self.vocab_size):
            raise ValueError(f"vocab_size must be >= 0, and > 0 for a decoder, got {self.vocab_size}")


class LSTM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = c = config
        if c.vocab_size:  # token ids in
            self.embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.decoder:  # decoder inputs: 0 = start, k + 1 = output class k
            self.encoder = nn.LSTM(c.hidden_size, c.hidden_size, c.num_layers, batch_first=True)
            self.target_embedding = nn.Embedding(c.output_size + 1, c.hidden_size)
        self.lstm = nn.LSTM(c.hidden_size if c.vocab_size else c.input_size, c.hidden_size, c.num_layers, batch_first=True)
        self.output = nn.Linear(c.hidden_size, c.output_size)
        with torch.no_grad():  # every layer of the LSTM(s); torch's gate order is i, f, g, o: f is the second quarter
            for name, bias in self.named_parameters():
                if ".bias_ih_l" in name:
                    bias[c.hidden_size: 2 * c.hidden_size] += c.forget_bias

    def forward(self, x, return_internals=False, teacher_forcing=None, y=None, padding_mask=None):
        F = self.config.feedback_size
        teacher_forcing = self.training if teacher_forcing is None else teacher_forcing
        if self.config.vocab_size:
            x = self.embedding(x)
        if self.config.decoder:
            return self.decode(x, y, teacher_forcing, return_internals, padding_mask)
        if teacher_forcing or F == 0:
            hidden, _ = self.lstm(x)  # (B, T, hidden_size), the top layer at every step
            logits = self.output(hidden)  # (B, T, output_size)
        else:  # autoregression: step t reads the output of step t - 1 in its first F channels
            state, outputs, hiddens = None, [], []
            for t in range(x.shape[1]):
                x_t = x[:, t:t + 1] if t == 0 else torch.cat([outputs[-1][..., :F].to(x.dtype), x[:, t:t + 1, F:]], -1)
                h, state = self.lstm(x_t, state)
                hiddens.append(h), outputs.append(self.output(h))
            hidden, logits = torch.cat(hiddens, 1), torch.cat(outputs, 1)
        return logits, ({"hidden": hidden} if return_internals else {})

    def decode(self, x, y, teacher_forcing, return_internals, padding_mask=None):
        """x (B, S, hidden) embedded inputs, y (B, U) target classes -> logits (B, U, output_size).
        padding_mask (B, S): the real inputs, padding at the end; the encoder's final state is then
        each string's own last step (a packed sequence), not the padding's."""
        if y is None:
            raise ValueError("a decoder needs the targets y (B, U): their length, and their values to teacher-force")
        if padding_mask is not None:
            lengths = padding_mask.sum(1).cpu()
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.encoder(x)  # the final (h, c) of every layer
        start = torch.zeros_like(y[:, :1])
        if teacher_forcing:  # the inputs are start, y_0 + 1, ..., y_{U-2} + 1
            hidden, _ = self.lstm(self.target_embedding(torch.cat([start, y[:, :-1] + 1], dim=1)), state)
            logits = self.output(hidden)
        else:  # greedy: each step reads the previous step's argmax
            token, outputs, hiddens = start, [], []
            for _ in range(y.shape[1]):
                h, state = self.lstm(self.target_embedding(token), state)
                hiddens.append(h), outputs.append(self.output(h))
                token = outputs[-1].argmax(-1) + 1
            hidden, logits = torch.cat(hiddens, 1), torch.cat(outputs, 1)
        return logits, ({"hidden": hidden} if return_internals else {})


if __name__ == "__main__":  # smoke test: python lstm.py
    logits, internals = LSTM(LSTMConfig())(torch.randn(2, 5, 9), return_internals=True)
    print(logits.shape, internals["hidden"].shape)
    model = LSTM(LSTMConfig(vocab_size=12, output_size=10, decoder=True)).eval()  # sequence to sequence
    logits, _ = model(torch.randint(1, 12, (2, 5)), y=torch.zeros(2, 7, dtype=torch.long))
    print(logits.shape)
