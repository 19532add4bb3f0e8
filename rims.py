"""
Recurrent Independent Mechanisms, in one file.

Paper: Anirudh Goyal, Alex Lamb, Jordan Hoffmann, Shagun Sodhani, Sergey Levine, Yoshua Bengio,
Bernhard Schoelkopf, "Recurrent Independent Mechanisms", 2019 (ICLR 2021), arXiv:1909.10893.

The idea:
- The recurrent state is split into k_T modules ("RIMs"), each with its own small LSTM or GRU and
  its own weights: the dynamics of one module never read another module's recurrent weights.
- Modules compete to read the input (section 2.2). Each module queries two rows, a null input
  (all zeros) and the real input x_t. The k_A modules that attend least to the null row are active
  at this step; the others are not updated at all: they keep h and c exactly, and no gradient
  passes through the choice (it is a hard top-k on detached scores).
- Active modules run their own cell on what they read (section 2.3), then read from every module
  through multi-head attention (section 2.4) and add the result to their state through a gate.
  Inactive modules can be read, but they receive no gradient through this communication.
- A module that stays inactive keeps its state unchanged for as long as it stays inactive, which
  is why RIMs can hold information over delays far longer than those seen in training.

Paper symbol -> variable -> shape  (B batch, T steps, M = k_T modules, S = module_size = hidden_size / M;
section numbers of the paper beside each)
    x_t                   x[:, t]            (B, input_size)
    h_{t,k}, c_{t,k}      h, c               (B, M, S)
    Q, 2.2                input_query        (M, S, input_key_size): one query map per module
    K, V of x_t, 2.2      input_key/value    (B, T, input_key_size), (B, T, input_value_size); the null's are 0
    softmax over [0, x]   input_attention    (B, M), attention on x_t; the null row gets 1 minus it
    A^(in)_k, 2.2         input_attention * V, fed to module k's cell as W_k A_k = p_k (W_k V): weighted_value
    S_t                   active             (B, M) bool, exactly k_A True per sample
    h~_{t,k}, 2.3         h_cell, c_cell     (B, M, S)
    communication, 2.4    comm_*             comm_heads heads of size comm_key_size / comm_value_size over the M modules
    y_t                   logits             (B, T, output_size), a linear read of all modules' h

Choices the paper leaves open, and what we do:
- The null input is a row of zeros and the input key and value maps have no bias, so the null's
  key and value are 0 and its score is 0: attention on the input is sigmoid(q . k / sqrt(d)), on the
  null 1 minus that. An input of zeros (an MNIST background pixel) is therefore the null input.
- Ties in null attention (e.g. on a zero input, where every module scores exactly 0.5) are broken
  by module index: the lowest-numbered modules win. Deterministic, and a stable sort does it.
- During communication an inactive module is read with the state it keeps, h_{t-1,k}, detached.
  The official code reads the new state its cell computed and then throws away (and masks its
  gradient); both give an inactive module no gradient through communication.
- Gated residual (section 2.4 says "+ h~"): h = h~ + sigmoid(W_g a) * tanh(W_o a), with a the heads'
  concatenated output, as in the official code. All weights of sections 2.2-2.4 that act on one module's
  state (input query, cell, communication query/key/value/output/gate) are per module.
- The input key/value maps are shared by the modules (they read the same input); one input head.
- Dropout on the attention weights (0.1 in the paper) is left out: our runs are short.

Where the official code (github.com/anirudh9119/RIMs) differs: it builds the k_T cells as one
dense LSTM of the total size with the off-diagonal blocks of its recurrent matrix zeroed, about k_T
times the work of grouped weights; its communication uses key and value size 16 (we take 32 from
the paper's Table 3); its input attention also applies a top-k sparsification to the attention
rows, and its copying loss averages over all positions, not only the recalled ones.

Reproduce: python train.py --model rims --task copy_delay ; python train.py --model rims --task seqmnist
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class RIMsConfig:
    input_size: int = 1  # set from the task
    output_size: int = 10  # set from the task
    num_modules: int = 6  # k_T, Table 1
    num_active: int = 4  # k_A, Table 1 (the best sequential MNIST row)
    hidden_size: int = 600  # total h over all modules, Table 1; each module has hidden_size / k_T
    cell: str = "lstm"  # 'lstm' or 'gru', the dynamics of each module
    input_key_size: int = 64  # Table 3: input attention key (and query) size
    input_value_size: int = 400  # Table 3: input attention value size
    comm_heads: int = 4  # Table 3: communication attention heads
    comm_key_size: int = 32  # Table 3 (the official code uses 16)
    comm_value_size: int = 32  # Table 3 (the official code uses 16)
    communication: bool = True  # False: modules never read each other (an ablation, and for tests)

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        for name in ("input_size", "output_size", "num_modules", "num_active", "hidden_size",
                     "input_key_size", "input_value_size", "comm_heads", "comm_key_size", "comm_value_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_active > self.num_modules:
            raise ValueError(f"num_active (k_A = {self.num_active}) must be at most num_modules (k_T = {self.num_modules})")
        if self.hidden_size % self.num_modules:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_modules ({self.num_modules})")


def grouped(num_modules, fan_in, fan_out, scale):
    """One (fan_in, fan_out) weight matrix per module, uniform in [-scale, scale]: (M, fan_in, fan_out)."""
    return nn.Parameter(torch.empty(num_modules, fan_in, fan_out).uniform_(-scale, scale))


def per_module(x, weight):
    """Every module applies its own matrix to its own vector: (B, M, i), (M, i, o) -> (B, M, o)."""
    return torch.einsum("bmi,mio->bmo", x, weight)


class RIMs(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: RIMsConfig):
        super().__init__()
        self.config = c = config
        M, S = c.num_modules, c.hidden_size // c.num_modules
        self.module_size = S
        gates = 4 if c.cell == "lstm" else 3
        # Section 2.2, input attention: per-module queries, shared keys and values of the input (no bias: null -> 0)
        self.input_query = grouped(M, S, c.input_key_size, 1 / math.sqrt(S))
        self.input_key = nn.Linear(c.input_size, c.input_key_size, bias=False)
        self.input_value = nn.Linear(c.input_size, c.input_value_size, bias=False)
        # Section 2.3, independent dynamics: one cell per module, weights (M, in, gates * S), torch's gate order
        # (lstm: i, f, g, o; gru: r, z, n) and torch's initialisation, uniform in +-1/sqrt(S)
        bound = 1 / math.sqrt(S)
        self.cell_input_weight = grouped(M, c.input_value_size, gates * S, bound)
        self.cell_hidden_weight = grouped(M, S, gates * S, bound)
        self.cell_input_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        self.cell_hidden_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        # Section 2.4, communication: per-module query, key, value, and the gated output back to S
        if c.communication:
            H, dk, dv = c.comm_heads, c.comm_key_size, c.comm_value_size
            self.comm_query = grouped(M, S, H * dk, bound)
            self.comm_key_value = grouped(M, S, H * (dk + dv), bound)  # key and value maps side by side
            self.comm_output_gate = grouped(M, H * dv, 2 * S, 1 / math.sqrt(H * dv))  # W_o and W_g side by side
            self.comm_output_gate_bias = nn.Parameter(torch.zeros(M, 2 * S))
        self.output = nn.Linear(c.hidden_size, c.output_size)  # y_t from all modules' h

    def initial_state(self, batch_size, device):
        zeros = torch.zeros(batch_size, self.config.num_modules, self.module_size, device=device)
        return zeros, zeros

    def input_projections(self, x):
        """What sections 2.2 and 2.3 compute from the input alone, for all steps at once (they are linear in it).
        x (B, T, input_size) -> keys (B, T, dk), and each module's cell input weights applied to the
        value: (B, T, M, gates * S). Module k's cell reads A_k = p_k V; since W_k (p_k V) = p_k (W_k V),
        the step scales these by the attention p_k instead of multiplying a (B, M, dv) read per step."""
        key, value = self.input_key(x), self.input_value(x)  # the null row's key and value are 0
        return key, torch.einsum("btd,mdg->btmg", value, self.cell_input_weight)

    def input_attention(self, key, h):
        """Section 2.2's attention over the rows [null, x_t]. key (B, dk) of x_t, h (B, M, S).
        Returns the attention on x_t (B, M); the null row gets 1 minus it."""
        query = per_module(h, self.input_query)  # (B, M, dk)
        score = (query * key.unsqueeze(1)).sum(-1) / math.sqrt(self.config.input_key_size)  # q_k . k_x
        # softmax over the two scores [0 (null), score (input)] = sigmoid of their difference
        return torch.sigmoid(score)

    def select_active(self, null_attention):
        """Top-k_A: the modules with the lowest null attention, ties to the lowest index. (B, M) bool,
        computed on detached scores, so the choice itself carries no gradient."""
        order = torch.sort(null_attention.detach(), dim=1, stable=True).indices  # ascending
        active = torch.zeros_like(null_attention, dtype=torch.bool)
        return active.scatter(1, order[:, : self.config.num_active], True)

    def cell(self, from_input, h, c):
        """Section 2.3 for every module at once. from_input (B, M, gates * S): each module's input weights
        applied to what it read (per_module(read, cell_input_weight)); h, c (B, M, S) -> new h, c.
        Equal to running module k's own nn.LSTMCell / nn.GRUCell, weights W[k].T, on its slice."""
        S = self.module_size
        from_input = from_input + self.cell_input_bias  # (B, M, gates * S)
        from_hidden = per_module(h, self.cell_hidden_weight) + self.cell_hidden_bias
        if self.config.cell == "lstm":
            i, f, g, o = (from_input + from_hidden).split(S, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c_new), c_new
        (ri, zi, ni), (rh, zh, nh) = from_input.split(S, dim=-1), from_hidden.split(S, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        h_new = (1 - z) * torch.tanh(ni + r * nh) + z * h
        return h_new, h_new  # a GRU has no cell state: c mirrors h

    def communicate(self, h_cell, h_kept, active):
        """Section 2.4: active modules read every module through multi-head attention, gated residual.
        Queries come from the new states h~ (B, M, S); keys and values from each module's state at
        this step, h~ for active modules and the kept, detached h_{t-1} for inactive ones."""
        c = self.config
        B, M, _ = h_cell.shape
        H, dk, dv = c.comm_heads, c.comm_key_size, c.comm_value_size
        source = torch.where(active.unsqueeze(-1), h_cell, h_kept.detach())
        query = per_module(h_cell, self.comm_query).view(B, M, H, dk)
        key, value = per_module(source, self.comm_key_value).split((H * dk, H * dv), dim=-1)
        key, value = key.reshape(B, M, H, dk), value.reshape(B, M, H, dv)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, M, d)
        weights = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(dk), dim=-1)  # (B, H, M, M)
        heads = (weights @ value).transpose(1, 2).reshape(B, M, H * dv)
        output, gate = (per_module(heads, self.comm_output_gate) + self.comm_output_gate_bias).split(self.module_size, -1)
        return h_cell + torch.sigmoid(gate) * torch.tanh(output)

    def step(self, key, weighted_value, h, c):
        """One time step. key (B, dk) and weighted_value (B, M, gates * S): x_t's row of
        input_projections; h and c (B, M, S).
        Returns the new h, c, the active mask (B, M) and the attention on the null input (B, M)."""
        input_attention = self.input_attention(key, h)  # section 2.2
        null_attention = 1 - input_attention
        active = self.select_active(null_attention)  # S_t, top-k_A
        from_input = input_attention.unsqueeze(-1) * weighted_value  # W_k A_k, A_k = p_k V (the null's V is 0)
        h_cell, c_cell = self.cell(from_input, h, c)  # section 2.3 (computed for all, kept for the active)
        if self.config.communication:
            h_cell = self.communicate(h_cell, h, active)  # section 2.4
        keep = active.unsqueeze(-1)
        # inactive modules: h_{t,k} = h_{t-1,k}, c likewise, exactly
        return torch.where(keep, h_cell, h), torch.where(keep, c_cell, c), active, null_attention

    def forward(self, x, return_internals=False):
        B, T, _ = x.shape
        h, c = self.initial_state(B, x.device)
        keys, weighted_values = self.input_projections(x)
        hs, actives, nulls = [], [], []
        # unbind, not keys[:, t]: the backward of T slices would be T full-size zero tensors
        for key, weighted_value in zip(keys.unbind(1), weighted_values.unbind(1)):
            h, c, active, null_attention = self.step(key, weighted_value, h, c)
            hs.append(h.reshape(B, -1))
            actives.append(active)
            nulls.append(null_attention)
        logits = self.output(torch.stack(hs, dim=1))  # (B, T, output_size)
        internals = {}
        if return_internals:
            internals = {"active_modules": torch.stack(actives, dim=1).float(),  # (B, T, M)
                         "input_attention": 1 - torch.stack(nulls, dim=1)}  # (B, T, M), on x_t vs null
        return logits, internals


if __name__ == "__main__":  # smoke test: python rims.py
    model = RIMs(RIMsConfig(input_size=3, output_size=5, hidden_size=60))
    logits, internals = model(torch.randn(2, 7, 3), return_internals=True)
    print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()})
    print("active per step:", internals["active_modules"].sum(-1)[0].tolist())
