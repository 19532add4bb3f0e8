"""
Bidirectional Recurrent Independent Mechanisms (BRIMs), in one file.

Paper: Sarthak Mittal, Alex Lamb, Anirudh Goyal, Vikram Voleti, Murray Shanahan, Guillaume Lajoie,
Michael Mozer, Yoshua Bengio, "Learning to Combine Top-Down and Bottom-Up Signals in Recurrent Neural
Networks with Attention over Modules", ICML 2020, arXiv:2006.16981.

The idea:
- A stack of RIMs layers (Goyal et al. 2019, arXiv:1909.10893). Each layer's state is split into
  modules with their own small LSTM/GRU; only the top-k modules of a layer update at a step.
- A module reads its input through attention over three rows: a null row (zeros), the layer below
  at this step (bottom-up; the input itself for the first layer) and the layer above at the previous
  step (top-down; the top layer has none). Each source has its own key and value maps.
- The modules of a layer that attend least to the null row win the competition and update; the
  others keep their state exactly. The selection carries no gradient.
- Active modules then read the modules of their own layer (communication attention) through a gate.
- How much a module listens to the layer above is learned and varies with the input: when the
  input gets noisy, the paper's Figure 2 shows attention moving from the input to the layer above.

Equation numbers below are the RIMs paper's (Eq. 1 input attention, Eq. 2 the per-module cell,
Eq. 3 communication), which BRIMs reuse per layer; BRIMs extend Eq. 1's rows to [null, bottom-up, top-down].

Paper symbol -> variable -> shape  (B batch, T steps, L layers; per layer l: M = k_T modules,
S = module size = hidden_size[l] / M, dk = input_key_size, dv = input_value_size)
    x_t                    x[:, t]              (B, input_size)
    h^l_{t,k}, c^l_{t,k}   states[l] = (h, c)   (B, M, S)
    q^l_k (Eq. 1)          query                (B, M, dk), one query weight per module
    K, V over [null, h^{l-1}_t, h^{l+1}_{t-1}]  key, value  (B, 1 + n, dk) and (B, 1 + n, dv); the null row's are 0
    attention (Eq. 1)      source_attention     (B, M, 3) over [null, bottom-up, top-down]
    S^l_t (top-k)          active               (B, M) bool, exactly num_active[l] True
    Eq. 2 (per-module LSTM) cell                (B, M, S) new h, c for every module, kept for the active
    Eq. 3 (communication)  communicate          multi-head attention among the M modules of a layer
    y_t                    logits               (B, T, output_size), a linear read of the top layer

Choices the paper leaves open, and what we do:
- A source row is the whole state of the layer below (or above): all its modules' h concatenated,
  one row per source, mapped to a key and a value by bias-free maps of its own, so the null row's
  key and value are exactly 0 and its score is 0. The attention weight on each source is one softmax
  over [0, q.k_bu / sqrt(dk), q.k_td / sqrt(dk)]; the top layer softmaxes over [null, bottom-up] and
  reports 0 on top-down. A module reads p_bu v_bu + p_td v_td.
- The first layer's bottom-up row is the input x_t: with a bias-free map an all-zero input is the
  null row, as in our rims.py. With input_vocab > 0 the input holds integer codes per channel
  (CIFAR's RGB bytes, 0..255; MNIST's binary pixels, 0..1) and each channel's code is embedded by a
  lookup table (the paper embeds pixel values); the embeddings of the channels are summed.
- Sequential MNIST embeds its binary pixel with a 2-entry table of the layer's size (train.py's preset:
  input_vocab 2, embed_size = hidden size), as the official code does (nn.Embedding(2, emsize) with
  emsize = nhid in MNIST/train_mnist.py and rnn_models.py). Fed the pixel itself (a 1 -> dk + dv
  map, so a background pixel is exactly the null row), two layers did not start learning in the
  README's 300-step protocol while one layer did. Short diagnostic runs (150 steps, one seed) pointed
  at the top-down row: with its map frozen at zero, two layers left chance within 70-110 steps, as one
  layer does; reading every layer in the classifier or starting the map at zero did not help (Adam moves every
  weight by about lr per step, so a map started at zero is back to its usual size within tens of
  steps). A likely reason: the pixel's row is one number wide against the top-down row's hidden-size
  numbers, and it is the null row itself on the ~80 % background pixels, so the first layer hears
  little but the layer above. The embedding gives the pixel a row as wide as the top-down one, with a
  key of its own for background, and then two layers leave chance in all three seeds (README, "BRIMs").
- The top-down row at step t is the layer above's state after step t - 1 (zeros at t = 0). Within a
  step the layers update from the bottom up, so layer l + 1's bottom-up row is layer l's new state.
- Ties in null attention go to the lowest module index (a stable sort on detached scores).
- Communication, the gated residual and the treatment of inactive modules are those of our rims.py:
  inactive modules are read with their kept, detached state, so they get no gradient through it.
- The logits read the top layer only, as the official code does. No dropout (short runs).
- Each module's LSTM forget gate starts with forget_bias (1) added to its bias (Jozefowicz et al.
  2015; TensorFlow's LSTMCell default), as in our rims.py.
- Speed (same results): per step one batched matmul gives both the query and the cells' recurrent
  gates (step_weights, built once per sequence), the first layer's bottom-up keys and values are
  computed for all steps at once, and the softmaxes run over a non-last dimension (faster on CPU).

Where the official code (github.com/sarthmit/BRIMs) differs: it feeds a top-down row only into
the first layer (the top layer's previous state, `use_higher` on layer 0 only), while the paper's
Figure 1 and text give every layer but the top one a top-down row from the layer above; we follow
the paper (with two layers, the default, the two coincide). Its input attention has 4 heads,
averaged for the top-k choice (we use one); its per-module LSTM is a dense LSTM with off-diagonal
blocks zeroed (we use grouped weights: a batched matmul over a module axis); its attention maps start at
0.01 * N(0, 1) (ours: torch's Linear default); and it trains with dropout 0.5 and Adam at 1e-3 (the
default of MNIST/train_mnist.py and CIFAR10/train_cifar.py).

Reproduce: python train.py --model brims --task seqmnist ; python experiments/brims_noise.py
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BRIMsConfig:
    input_size: int = 1  # set from the task: channels per step
    output_size: int = 10  # set from the task
    input_vocab: int = 0  # set from the task: > 0 when x holds integer codes per channel (CIFAR bytes: 256)
    embed_size: int = 64  # size of the code embedding (used only when input_vocab > 0)
    num_layers: int = 2  # the paper's sequential-image models stack two RIMs layers
    # per layer; one value applies to every layer. Defaults: RIMs' Table 1 values in each layer
    num_modules: tuple = (6,)  # k_T
    num_active: tuple = (4,)  # k_A (top-k)
    hidden_size: tuple = (600,)  # total h of the layer's modules
    cell: str = "lstm"  # 'lstm' or 'gru', each module's dynamics
    forget_bias: float = 1.0  # added to each LSTM forget gate's initial bias (Jozefowicz et al. 2015; 0 = torch's init)
    input_key_size: int = 64  # RIMs Table 3: input attention key (and query) size
    input_value_size: int = 400  # RIMs Table 3: input attention value size
    comm_heads: int = 4  # RIMs Table 3: communication heads
    comm_key_size: int = 32  # RIMs Table 3
    comm_value_size: int = 32  # RIMs Table 3
    communication: bool = True  # False: modules of a layer never read each other (an ablation)

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        for name in ("input_size", "output_size", "embed_size", "num_layers", "input_key_size",
                     "input_value_size", "comm_heads", "comm_key_size", "comm_value_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.input_vocab < 0:
            raise ValueError(f"input_vocab must be 0 (real-valued inputs) or positive, got {self.input_vocab}")
        for name in ("num_modules", "num_active", "hidden_size"):
            values = tuple(getattr(self, name))
            if len(values) == 1:
                values = values * self.num_layers
            if len(values) != self.num_layers or min(values) < 1:
                raise ValueError(f"{name} needs one positive value, or one per layer ({self.num_layers}), got {values}")
            setattr(self, name, values)
        for layer, (M, k, H) in enumerate(zip(self.num_modules, self.num_active, self.hidden_size)):
            if k > M:
                raise ValueError(f"layer {layer}: num_active ({k}) must be at most num_modules ({M})")
            if H % M:
                raise ValueError(f"layer {layer}: hidden_size ({H}) must be divisible by num_modules ({M})")


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


class BRIMsLayer(nn.Module):
    """One layer of modules: attention over [null, bottom-up, top-down], top-k, grouped cells,
    communication. below_size / above_size: the sizes of its source rows (above_size 0: top layer)."""

    def __init__(self, config, num_modules, num_active, hidden_size, below_size, above_size):
        super().__init__()
        c = config
        self.config, self.num_modules, self.num_active = c, num_modules, num_active
        M, S = num_modules, hidden_size // num_modules
        self.module_size = S
        dk, dv = c.input_key_size, c.input_value_size
        gates = 4 if c.cell == "lstm" else 3
        bound = 1 / math.sqrt(S)
        # Eq. 1: per-module queries; a key and value map per source (no bias: the null row maps to 0)
        self.input_query = grouped(M, S, dk, bound)
        self.bottom_up_key_value = nn.Linear(below_size, dk + dv, bias=False)
        self.top_down_key_value = nn.Linear(above_size, dk + dv, bias=False) if above_size else None
        # Eq. 2: one cell per module, weights (M, in, gates * S), torch's gate order and initialisation
        self.cell_input_weight = grouped(M, dv, gates * S, bound)
        self.cell_hidden_weight = grouped(M, S, gates * S, bound)
        self.cell_input_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        self.cell_hidden_bias = nn.Parameter(torch.empty(M, gates * S).uniform_(-bound, bound))
        if c.cell == "lstm":
            with torch.no_grad():
                self.cell_input_bias[:, S: 2 * S] += c.forget_bias  # the forget gate f starts more open
        # Eq. 3: communication among the layer's modules, gated residual
        if c.communication:
            H, ck, cv = c.comm_heads, c.comm_key_size, c.comm_value_size
            self.comm_query = grouped(M, S, H * ck, bound)
            self.comm_key_value = grouped(M, S, H * (ck + cv), bound)
            self.comm_output_gate = grouped(M, H * cv, 2 * S, 1 / math.sqrt(H * cv))  # W_o and W_g side by side
            self.comm_output_gate_bias = nn.Parameter(torch.zeros(M, 2 * S))

    def step_weights(self):
        """What every step reads from h_{t-1}, as one matrix per module, built once per sequence (outside
        the time loop): [W_q / sqrt(dk) | W_hh] side by side (M, S, dk + gates * S) with its bias (the
        cell's two biases summed for an LSTM; a GRU keeps its input bias apart), and the communication
        query scaled by 1 / sqrt(dk_comm). Scaling the query instead of the scores is the same softmax."""
        c, M = self.config, self.num_modules
        dk = c.input_key_size
        hidden_bias = self.cell_hidden_bias + (self.cell_input_bias if c.cell == "lstm" else 0)
        weights = {"from_h": torch.cat([self.input_query / math.sqrt(dk), self.cell_hidden_weight], dim=-1),
                   "from_h_bias": F.pad(hidden_bias, (dk, 0)).unsqueeze(1)}  # no bias on the query
        if c.communication:
            weights["comm_query"] = self.comm_query / math.sqrt(c.comm_key_size)
            weights["comm_output_gate_bias"] = self.comm_output_gate_bias.unsqueeze(1)
        return weights

    def source_attention(self, query, key_value):
        """Eq. 1's attention. query (B, M, dk), already scaled by 1 / sqrt(dk); key_value (B, 1 + n, dk + dv)
        the rows [null (zeros), bottom-up, top-down] (n = 2; n = 1 for the top layer, no top-down).
        Returns the attention (B, M, 1 + n) and what each module read, sum_s p_s v_s (B, M, dv)."""
        key, value = key_value.split((self.config.input_key_size, self.config.input_value_size), dim=-1)
        # softmax_s(q_k . k_s / sqrt(dk)), null: 0; laid out (B, 1 + n, M) with the softmax over dim 1, which
        # torch's CPU kernel does several times faster than over a short last dimension
        attention = torch.softmax(key @ query.transpose(1, 2), dim=1).transpose(1, 2)  # (B, M, 1 + n)
        return attention, attention @ value  # the null's value is 0

    def select_active(self, null_attention):
        """Top-k: the modules with the lowest null attention, ties to the lowest index. (B, M) bool,
        computed on detached scores: the choice carries no gradient."""
        order = torch.sort(null_attention.detach(), dim=1, stable=True).indices
        active = torch.zeros_like(null_attention, dtype=torch.bool)
        return active.scatter(1, order[:, : self.num_active], True)

    def cell(self, read, h, c, from_hidden):
        """Eq. 2 for every module at once: module k runs its own LSTM/GRU (weights W[k]) on read[:, k].
        from_hidden (B, M, gates * S): W_hh h + the bias (step_weights), computed with the query."""
        S = self.module_size
        if self.config.cell == "lstm":
            gates = per_module(read, self.cell_input_weight, from_hidden.transpose(0, 1))  # W_ih x + W_hh h + b
            i, f, _, o = torch.sigmoid(gates).split(S, dim=-1)
            c_new = torch.addcmul(f * c, i, torch.tanh(gates[..., 2 * S: 3 * S]))
            return o * torch.tanh(c_new), c_new
        from_input = per_module(read, self.cell_input_weight, self.cell_input_bias.unsqueeze(1))
        (ri, zi, ni), (rh, zh, nh) = from_input.split(S, dim=-1), from_hidden.split(S, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        h_new = (1 - z) * torch.tanh(ni + r * nh) + z * h
        return h_new, h_new  # a GRU has no cell state: c mirrors h

    def communicate(self, h_cell, h_kept, active, weights):
        """Eq. 3: every module queries the layer's modules (multi-head), gated residual. Keys and values
        come from h~ of active modules and the kept, detached h_{t-1} of inactive ones."""
        c = self.config
        B, M, S = h_cell.shape
        H, dk, dv = c.comm_heads, c.comm_key_size, c.comm_value_size
        source = torch.where(active.unsqueeze(-1), h_cell, h_kept.detach())
        query = torch.bmm(h_cell.transpose(0, 1), weights["comm_query"]).view(M, B, H, dk).permute(1, 2, 3, 0)
        key, value = torch.bmm(source.transpose(0, 1), self.comm_key_value).split((H * dk, H * dv), dim=-1)
        key, value = key.view(M, B, H, dk).permute(1, 2, 0, 3), value.view(M, B, H, dv).permute(1, 2, 0, 3)
        # scores (B, H, key module, query module), already / sqrt(dk), softmax over the keys on dim -2 (faster,
        # as above); then each query module's mix of values (B, H, M, dv)
        heads = torch.softmax(key @ query, dim=-2).transpose(-1, -2) @ value
        heads = heads.permute(2, 0, 1, 3).reshape(M, B, H * dv)
        output, gate = torch.baddbmm(weights["comm_output_gate_bias"], heads, self.comm_output_gate).split(S, -1)
        return torch.addcmul(h_cell, torch.sigmoid(gate).transpose(0, 1), torch.tanh(output).transpose(0, 1))

    def forward(self, bottom_up_key_value, top_down, h, c, weights=None):
        """One step of the layer. bottom_up_key_value (B, dk + dv): the bottom-up row already mapped
        (its map is linear, so the first layer's is computed for all steps at once); top_down
        (B, above_size) the layer above's state at t - 1, or None for the top layer; h, c (B, M, S);
        weights: step_weights() (built here if not given). Returns the new h, c, the active mask (B, M)
        and the attention (B, M, 3) over [null, bottom-up, top-down] (top layer: 0 on top-down)."""
        weights = weights if weights is not None else self.step_weights()
        dk = self.config.input_key_size
        rows = [torch.zeros_like(bottom_up_key_value), bottom_up_key_value]  # the null row, then bottom-up
        if self.top_down_key_value is not None:
            rows.append(self.top_down_key_value(top_down))
        query, from_hidden = per_module(h, weights["from_h"], weights["from_h_bias"]).split(
            (dk, weights["from_h"].shape[-1] - dk), dim=-1)  # q_k / sqrt(dk) and W_hh h + b: one matmul
        attention, read = self.source_attention(query, torch.stack(rows, dim=1))  # Eq. 1
        active = self.select_active(attention[..., 0])  # top-k on the null attention
        h_cell, c_cell = self.cell(read, h, c, from_hidden)  # Eq. 2, computed for all, kept for the active
        if self.config.communication:
            h_cell = self.communicate(h_cell, h, active, weights)  # Eq. 3
        keep = active.unsqueeze(-1)  # inactive modules: h_t = h_{t-1}, c likewise, exactly
        return torch.where(keep, h_cell, h), torch.where(keep, c_cell, c), active, F.pad(attention, (0, 3 - attention.shape[-1]))


class BRIMs(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: BRIMsConfig):
        super().__init__()
        self.config = c = config
        if c.input_vocab:  # one lookup table per channel, stored as one table of input_size * vocab rows
            self.embedding = nn.Embedding(c.input_size * c.input_vocab, c.embed_size)
        below = c.embed_size if c.input_vocab else c.input_size
        sizes = c.hidden_size
        self.layers = nn.ModuleList()
        for layer in range(c.num_layers):
            above = sizes[layer + 1] if layer + 1 < c.num_layers else 0
            self.layers.append(BRIMsLayer(c, c.num_modules[layer], c.num_active[layer], sizes[layer],
                                          below if layer == 0 else sizes[layer - 1], above))
        self.output = nn.Linear(sizes[-1], c.output_size)  # y_t from the top layer

    def initial_state(self, batch_size, device):
        return [(torch.zeros(batch_size, l.num_modules, l.module_size, device=device),) * 2 for l in self.layers]

    def embed(self, x):
        """x (B, T, input_size) -> the first layer's bottom-up rows (B, T, below_size)."""
        if not self.config.input_vocab:
            return x
        codes = x.long().clamp(0, self.config.input_vocab - 1)
        offsets = torch.arange(self.config.input_size, device=x.device) * self.config.input_vocab
        return self.embedding(codes + offsets).sum(dim=2)  # each channel's own table, summed

    def step(self, bottom_up_key_value, states, weights=None):
        """One time step of every layer, bottom to top. bottom_up_key_value (B, dk + dv): the input's
        row for the first layer; states: a list of (h, c) per layer, the states after t - 1; weights:
        each layer's step_weights() (built here if not given). Returns the new states, and per layer
        the active mask and the source attention."""
        weights = weights if weights is not None else [layer.step_weights() for layer in self.layers]
        new_states, actives, attentions = [], [], []
        row = bottom_up_key_value
        for index, layer in enumerate(self.layers):
            h, c = states[index]
            above = states[index + 1][0].flatten(1) if index + 1 < len(self.layers) else None  # h^{l+1}_{t-1}
            h, c, active, attention = layer(row, above, h, c, weights[index])
            new_states.append((h, c))
            actives.append(active)
            attentions.append(attention)
            if index + 1 < len(self.layers):
                row = self.layers[index + 1].bottom_up_key_value(h.flatten(1))  # h^l_t for the layer above
        return new_states, actives, attentions

    def forward(self, x, return_internals=False):
        B = x.shape[0]
        states = self.initial_state(B, x.device)
        rows = self.layers[0].bottom_up_key_value(self.embed(x))  # (B, T, dk + dv), all steps at once
        weights = [layer.step_weights() for layer in self.layers]  # once per sequence, not per step
        tops, actives, attentions = [], [], []
        for row in rows.unbind(1):
            states, active, attention = self.step(row, states, weights)
            tops.append(states[-1][0].flatten(1))
            actives.append(active)
            attentions.append(attention)
        logits = self.output(torch.stack(tops, dim=1))  # (B, T, output_size)
        internals = {}
        if return_internals:
            for index in range(len(self.layers)):
                # (B, T, M) 1 where the module updated; (B, T, M, 3) attention on [null, bottom-up, top-down]
                internals[f"active_modules_l{index}"] = torch.stack([a[index] for a in actives], dim=1).float()
                internals[f"source_attention_l{index}"] = torch.stack([a[index] for a in attentions], dim=1)
        return logits, internals


if __name__ == "__main__":  # smoke test: python brims.py
    model = BRIMs(BRIMsConfig(input_size=3, output_size=5, hidden_size=(60, 30), num_modules=(6, 3), num_active=(4, 2)))
    logits, internals = model(torch.randn(2, 7, 3), return_internals=True)
    print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()})
    print("active per step, layer 0:", internals["active_modules_l0"].sum(-1)[0].tolist())
    print("attention on [null, bottom-up, top-down], layer 0:", internals["source_attention_l0"].mean((0, 1, 2)).tolist())
