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

    def __post_init__(self):
        for name in ("input_size", "output_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class LSTM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.input_size, config.hidden_size, config.num_layers, batch_first=True)
        self.output = nn.Linear(config.hidden_size, config.output_size)

    def forward(self, x, return_internals=False):
        hidden, _ = self.lstm(x)  # (B, T, hidden_size), the top layer at every step
        logits = self.output(hidden)  # (B, T, output_size)
        return logits, ({"hidden": hidden} if return_internals else {})


if __name__ == "__main__":  # smoke test: python lstm.py
    logits, internals = LSTM(LSTMConfig())(torch.randn(2, 5, 9), return_internals=True)
    print(logits.shape, internals["hidden"].shape)
