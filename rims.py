"""
Recurrent Independent Mechanisms, in one file.

Paper: Anirudh Goyal, Alex Lamb, Jordan Hoffmann, Shagun Sodhani, Sergey Levine, Yoshua Bengio,
Bernhard Schoelkopf, "Recurrent Independent Mechanisms", 2019 (ICLR 2021), arXiv:1909.10893.

The idea:
- The recurrent state is split into k_T modules ("RIMs"), each with its own small LSTM or GRU and
  its own weights: the dynamics of one module never read another module's recurrent weights.
- Modules compete to read the input (section 2.2). Each module queries two rows, a null input
  (all zeros) and the real input x_t, embedded so that no real input is the null row. The k_A
  modules that attend least to the null row are active at this step; the others are not updated
  at all: they keep h and c exactly, and no gradient passes through the choice (it is a hard top-k
  on detached scores).
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
  null 1 minus that. An input of zeros is therefore the null input, so every real input must be
  embedded: the official code looks every token up in an nn.Embedding (the copy blank included).
  Here a one-hot input over every token (the copy task's blank has its own channel) does the same,
  its bias-free key and value maps being lookup tables, and integer codes (MNIST's binary pixel:
  input_vocab 2) are looked up in a table of embed_size. Fed a blank or a background pixel as a zero
  vector (the ablation: copy_delay --null_blank, seqmnist --input_vocab 0), every module scores
  exactly 0.5 there, modules 0-3 always update and 4-5 never do, an invariance built in, not learned.
- Ties in null attention (as on such a zero input) are broken by module index: the lowest-numbered
  modules win. Deterministic, and a stable sort does it.
- During communication an inactive module is read with the state it keeps, h_{t-1,k}, detached.
  The official code reads the new state its cell computed and then throws away (and masks its
  gradient); both give an inactive module no gradient through communication.
- Gated residual (section 2.4 says "+ h~"): h = h~ + sigmoid(W_g a) * tanh(W_o a), with a the heads'
  concatenated output, as in the official code. All weights of sections 2.2-2.4 that act on one module's
  state (input query, cell, communication query/key/value/output/gate) are per module.
- The input key/value maps are shared by the modules (they read the same input); one input head.
- Each module's LSTM forget gate starts with forget_bias (1) added to its bias (Jozefowicz et al.
  2015; TensorFlow's LSTMCell default): with torch's default init (about 0) an LSTM of 120 on 14 x 14
  sequential MNIST stays at chance several times longer (docs/rims.md).
- Dropout on the attention weights (0.1 in the paper) is left out: our runs are short.
- Speed (same arithmetic): per step one batched matmul over the module axis gives both the input
  query and the cells' recurrent gates (step_weights, built once per sequence), and the
  communication softmax runs over a non-last dimension (faster on the CPU), as in our brims.py.

Where the official code (github.com/anirudh9119/RIMs) differs: it builds the k_T cells as one
dense LSTM of the total size with the off-diagonal blocks of its recurrent matrix zeroed, about k_T
times the work of grouped weights; its communication uses key and value size 16 (we take 32 from
the paper's Table 3); its attention maps start at 0.01 * N(0, 1) (ours: torch's Linear default;
attention_init_std 0.01 gives theirs); and its copying loss averages over all positions, not only the recalled ones. (Its input attention also
keeps the top-k entries of each attention row; with two rows, [null, input], that changes nothing.)

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
    input_vocab: int = 0  # > 0: x holds integer codes per channel (a binary pixel: 2), looked up in a table
    embed_size: int = 64  # size of that table's rows (used only when input_vocab > 0)
    num_modules: int = 6  # k_T, Table 1
    num_active: int = 4  # k_A, Table 1 (the best sequential MNIST row)
    hidden_size: int = 600  # total h over all modules, Table 1; each module has hidden_size / k_T
    cell: str = "lstm"  # 'lstm' or 'gru', the dynamics of each module
    forget_bias: float = 1.0  # added to each LSTM forget gate's initial bias (Jozefowicz et al. 2015; 0 = torch's init)
    input_key_size: int = 64  # Table 3: input attention key (and query) size
    input_value_size: int = 400  # Table 3: input attention value size
    attention_init_std: float = 0.0  # > 0: input query/key/value weights start at N(0, std^2) (official: 0.01)
    comm_heads: int = 4  # Table 3: communication attention heads
    comm_key_size: int = 32  # Table 3 (the official code uses 16)
    comm_value_size: int = 32  # Table 3 (the official code uses 16)
    communication: bool = True  # False: modules never read each other (an ablation, and for tests)

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        for name in ("input_size", "output_size", "embed_size", "num_modules", "num_active", "hidden_size",
                     "input_key_size", "input_value_size", "comm_heads", "comm_key_size", "comm_value_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.input_vocab < 0 or self.attention_init_std < 0:
            raise ValueError(f"input_vocab and attention_init_std must be >= 0, got {self.input_vocab}, "
                             f"{self.attention_init_std}")
        if self.num_active > self.num_modules:
            raise ValueError(f"num_active (k_A = {self.num_active}) must be at most num_modules (k_T = {self.num_modules})")
        if self.hidden_size % self.num_modules:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_modules ({self.num_modules})")


def grouped(num_modules, fan_in, fan_out, scale):
    """One (fan_in, fan_out) weight matrix per module, uniform in [-scale, scale]: (M, fan_in, fan_out)."""
    return nn.Parameter(torch.empty(num_modules, fan_in, fan_out).uniform_(-scale, scale))


def per_module(x, weight, bias=None):
    """Every module applies its own matrix to its own vector: (B, M, i), (M, i, o) -> (B, M, o), plus
    bias (M, 1, o) if given. One batched matmul over the module axis. x is copied to (M, B, i) first: with
    a transposed view the weight's gradient (x^T @ grad) takes a slow path in torch's CPU bmm."""
    x = x.transpose(0, 1).contiguous()  # (M, B, i)
    out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)
    return out.transpose(0, 1)


class RIMs(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: RIMsConfig):
        super().__init__()
        self.config = c = config
        M, S = c.num_modules, c.hidden_size // c.num_modules
        self.module_size = S
        gates = 4 if c.cell == "lstm" else 3
        if c.input_vocab:  # one lookup table per channel, stored as one table of input_size * vocab rows
            self.embedding = nn.Embedding(c.input_size * c.input_vocab, c.embed_size)
        in_size = c.embed_size if c.input_vocab else c.input_size
        # Section 2.2, input attention: per-module queries, shared keys and values of the input (no bias: null -> 0)
        self.input_query = grouped(M, S, c.input_key_size, 1 / math.sqrt(S))
        self.input_key = nn.Linear(in_size, c.input_key_size, bias=False)
        self.input_value = nn.Linear(in_size, c.input_value_size, bias=False)
        if c.attention_init_std:  # the official code's init: near-uniform attention at the start
            for weight in (self.input_query, self.input_key.weight, self.input_value.weight):
                nn.init.normal_(weight, std=c.attention_init_std)
        # Section 2.3, independent dynamics: one cell per module, weights (M, in, gates * S), torch's gate order
        # (lstm: i, f, g, o; gru: r, z, n) and torch's initialisation, uniform in +-1/sqrt(S)
        bound = 1 / math.sqrt(S)
        self.cell_input_weight = grouped(M, c.input_value_size, gates * S, bound)
        self.cell_hidden_weight = grouped(M, S, gates * S, bound)
        self.cell_input_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        self.cell_hidden_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        if c.cell == "lstm":
            with torch.no_grad():
                self.cell_input_bias[:, S: 2 * S] += c.forget_bias  # the forget gate f starts more open
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

    def embed(self, x):
        """x (B, T, input_size) -> what the input maps read (B, T, embed_size or input_size)."""
        if not self.config.input_vocab:
            return x
        codes = x.long().clamp(0, self.config.input_vocab - 1)
        offsets = torch.arange(self.config.input_size, device=x.device) * self.config.input_vocab
        return self.embedding(codes + offsets).sum(dim=2)  # each channel's own table, summed

    def input_projections(self, x):
        """What sections 2.2 and 2.3 compute from the input alone, for all steps at once (they are linear in it).
        x (B, T, input_size) -> keys (B, T, dk), and each module's cell input weights applied to the
        value: (B, T, M, gates * S). Module k's cell reads A_k = p_k V; since W_k (p_k V) = p_k (W_k V),
        the step scales these by the attention p_k instead of multiplying a (B, M, dv) read per step."""
        x = self.embed(x)
        key, value = self.input_key(x), self.input_value(x)  # the null row's key and value are 0
        B, T, dv = value.shape
        weighted = torch.matmul(value.reshape(1, B * T, dv), self.cell_input_weight)  # (M, B * T, gates * S)
        return key, weighted.view(-1, B, T, weighted.shape[-1]).permute(1, 2, 0, 3)

    def step_weights(self):
        """What every step reads from h_{t-1}, built once per sequence (outside the time loop):
        [W_q / sqrt(dk) | W_hh] side by side per module (M, S, dk + gates * S) with its bias (the cell's
        two biases summed for an LSTM; a GRU keeps its input bias apart), and the communication maps,
        the query scaled by 1 / sqrt(dk_comm) (scaling the query instead of the scores is the same softmax)."""
        c = self.config
        dk = c.input_key_size
        hidden_bias = self.cell_hidden_bias + (self.cell_input_bias if c.cell == "lstm" else 0)
        weights = {"from_h": torch.cat([self.input_query / math.sqrt(dk), self.cell_hidden_weight], dim=-1),
                   "from_h_bias": nn.functional.pad(hidden_bias, (dk, 0)).unsqueeze(1)}  # no bias on the query
        if c.communication:
            weights["comm_query"] = self.comm_query / math.sqrt(c.comm_key_size)
            weights["comm_output_gate_bias"] = self.comm_output_gate_bias.unsqueeze(1)
        return weights

    def input_attention(self, key, h, query=None):
        """Section 2.2's attention over the rows [null, x_t]. key (B, dk) of x_t, h (B, M, S); query
        (B, M, dk) already / sqrt(dk) if the step computed it. Returns the attention on x_t (B, M);
        the null row gets 1 minus it."""
        if query is None:
            query = per_module(h, self.input_query) / math.sqrt(self.config.input_key_size)
        score = (query @ key.unsqueeze(-1)).squeeze(-1)  # q_k . k_x / sqrt(dk)
        # softmax over the two scores [0 (null), score (input)] = sigmoid of their difference
        return torch.sigmoid(score)

    def select_active(self, null_attention):
        """Top-k_A: the modules with the lowest null attention, ties to the lowest index. (B, M) bool,
        computed on detached scores, so the choice itself carries no gradient."""
        order = torch.sort(null_attention.detach(), dim=1, stable=True).indices  # ascending
        active = torch.zeros_like(null_attention, dtype=torch.bool)
        return active.scatter(1, order[:, : self.config.num_active], True)

    def cell(self, from_input, h, c, from_hidden=None):
        """Section 2.3 for every module at once. from_input (B, M, gates * S): each module's input weights
        applied to what it read (per_module(read, cell_input_weight)); h, c (B, M, S) -> new h, c;
        from_hidden (B, M, gates * S): W_hh h plus the bias(es), if the step computed it with the query.
        Equal to running module k's own nn.LSTMCell / nn.GRUCell, weights W[k].T, on its slice."""
        S, lstm = self.module_size, self.config.cell == "lstm"
        if from_hidden is None:
            from_hidden = per_module(h, self.cell_hidden_weight) + self.cell_hidden_bias
            from_hidden = from_hidden + self.cell_input_bias if lstm else from_hidden
        if lstm:
            gates = from_input + from_hidden  # W_ih x + W_hh h + b
            i, f, _, o = torch.sigmoid(gates).split(S, dim=-1)
            c_new = torch.addcmul(f * c, i, torch.tanh(gates[..., 2 * S: 3 * S]))
            return o * torch.tanh(c_new), c_new
        from_input = from_input + self.cell_input_bias
        (ri, zi, ni), (rh, zh, nh) = from_input.split(S, dim=-1), from_hidden.split(S, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        h_new = (1 - z) * torch.tanh(ni + r * nh) + z * h
        return h_new, h_new  # a GRU has no cell state: c mirrors h

    def communicate(self, h_cell, h_kept, active, weights=None):
        """Section 2.4: active modules read every module through multi-head attention, gated residual.
        Queries come from the new states h~ (B, M, S); keys and values from each module's state at
        this step, h~ for active modules and the kept, detached h_{t-1} for inactive ones."""
        c = self.config
        weights = weights if weights is not None else self.step_weights()
        B, M, S = h_cell.shape
        H, dk, dv = c.comm_heads, c.comm_key_size, c.comm_value_size
        source = torch.where(active.unsqueeze(-1), h_cell, h_kept.detach())
        query = torch.bmm(h_cell.transpose(0, 1), weights["comm_query"]).view(M, B, H, dk).permute(1, 2, 3, 0)
        key, value = torch.bmm(source.transpose(0, 1), self.comm_key_value).split((H * dk, H * dv), dim=-1)
        key, value = key.view(M, B, H, dk).permute(1, 2, 0, 3), value.view(M, B, H, dv).permute(1, 2, 0, 3)
        # scores (B, H, key module, query module), already / sqrt(dk); the softmax over the keys runs on
        # dim -2 (several times faster on the CPU than over a short last dimension); then each query
        # module's mix of values (B, H, M, dv)
        heads = torch.softmax(key @ query, dim=-2).transpose(-1, -2) @ value
        heads = heads.permute(2, 0, 1, 3).reshape(M, B, H * dv)
        output, gate = torch.baddbmm(weights["comm_output_gate_bias"], heads, self.comm_output_gate).split(S, -1)
        return torch.addcmul(h_cell, torch.sigmoid(gate).transpose(0, 1), torch.tanh(output).transpose(0, 1))

    def step(self, key, weighted_value, h, c, weights=None):
        """One time step. key (B, dk) and weighted_value (B, M, gates * S): x_t's row of
        input_projections; h and c (B, M, S); weights: step_weights() (built here if not given).
        Returns the new h, c, the active mask (B, M) and the attention on the null input (B, M)."""
        weights = weights if weights is not None else self.step_weights()
        dk = self.config.input_key_size
        query, from_hidden = per_module(h, weights["from_h"], weights["from_h_bias"]).split(
            (dk, self.cell_hidden_weight.shape[-1]), dim=-1)  # q_k / sqrt(dk) and W_hh h + b: one matmul
        input_attention = self.input_attention(key, h, query)  # section 2.2
        null_attention = 1 - input_attention
        active = self.select_active(null_attention)  # S_t, top-k_A
        from_input = input_attention.unsqueeze(-1) * weighted_value  # W_k A_k, A_k = p_k V (the null's V is 0)
        h_cell, c_cell = self.cell(from_input, h, c, from_hidden)  # section 2.3 (computed for all, kept for the active)
        if self.config.communication:
            h_cell = self.communicate(h_cell, h, active, weights)  # section 2.4
        keep = active.unsqueeze(-1)
        # inactive modules: h_{t,k} = h_{t-1,k}, c likewise, exactly
        return torch.where(keep, h_cell, h), torch.where(keep, c_cell, c), active, null_attention

    def forward(self, x, return_internals=False):
        B, T, _ = x.shape
        h, c = self.initial_state(B, x.device)
        keys, weighted_values = self.input_projections(x)
        weights = self.step_weights()  # once per sequence, not per step
        hs, actives, nulls = [], [], []
        # unbind, not keys[:, t]: the backward of T slices would be T full-size zero tensors
        for key, weighted_value in zip(keys.unbind(1), weighted_values.unbind(1)):
            h, c, active, null_attention = self.step(key, weighted_value, h, c, weights)
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
