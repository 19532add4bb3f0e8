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
- Tasks whose next input is the last output (the NPS arithmetic task) set feedback_size F: the first F
  input channels hold the true previous target while training (teacher forcing); at evaluation the
  LSTM runs one step at a time and writes its own previous output there (autoregression).

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

    def __post_init__(self):
        for name in ("input_size", "output_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.feedback_size <= min(self.input_size, self.output_size):
            raise ValueError(f"feedback_size must be in 0..min(input_size, output_size), got {self.feedback_size}")


class LSTM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.input_size, config.hidden_size, config.num_layers, batch_first=True)
        self.output = nn.Linear(config.hidden_size, config.output_size)

    def forward(self, x, return_internals=False, teacher_forcing=None):
        F = self.config.feedback_size
        teacher_forcing = self.training if teacher_forcing is None else teacher_forcing
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


if __name__ == "__main__":  # smoke test: python lstm.py
    logits, internals = LSTM(LSTMConfig())(torch.randn(2, 5, 9), return_internals=True)
    print(logits.shape, internals["hidden"].shape)
