"""
Universal Transformer with dynamic halting, and the vanilla Transformer baseline, in one file.

Paper: Mostafa Dehghani, Stephan Gouws, Oriol Vinyals, Jakob Uszkoreit, Lukasz Kaiser,
"Universal Transformers", ICLR 2019, arXiv:1807.03819 (cited by section, its formulas written out).
Halting: Alex Graves, "Adaptive Computation Time for Recurrent Neural Networks", 2016,
arXiv:1603.08983 (every "Eq." below is Graves', numbered as in v6).

The idea:
- A Transformer encoder applies L different blocks once each. A Universal Transformer applies ONE
  block (self-attention, then a position-wise transition function, each with a residual connection
  and LayerNorm) T times: a recurrence over depth, in parallel over positions (section 2.1):
      A^t = LayerNorm((H^{t-1} + P^t) + MultiHeadSelfAttention(H^{t-1} + P^t))
      H^t = LayerNorm(A^t + Transition(A^t))
- Before every step the sum of a position signal and a timestep signal is added to the state, so
  the shared block knows both where and when it is (section 2.1's coordinate embedding):
      P^t_{i,2j} = sin(i / 10000^{2j/d}) + sin(t / 10000^{2j/d}), and cos for dimension 2j + 1
- Dynamic halting (section 2.2): every position has its own ACT halting unit. After each step the
  position emits h (Eq. 5); it stops once its h's reach 1 - eps (Eq. 7), the last step
  gets the remainder R (Eq. 6, 8), its output is the p-weighted sum of its states (Eq. 9), and
  the ponder cost rho = N + R (Eq. 10) joins the loss (Eq. 11-12). A halted position's state stops
  changing, but the positions still running keep attending to it.
- universal=False is the baseline of the paper's tables: a Transformer encoder of max_steps
  distinct layers of the same width, the position signal added once at the input.

Paper symbol -> variable -> shape  (B batch, S positions, D d_model, K steps run)
    H^0          embedded          (B, S, D)  token embeddings; bAbI facts: words summed under a
                                              learned positional mask (bAbI experiments, as MemN2N;
                                              the question under its own, as the UT authors' setup)
    P^t          position_signal + timestep_signal[t]   (B, S, D) + (D,)
    H^t          state             (B, S, D)
    H^T (enc.)   memory            (B, S, D)  what the decoder attends to; decoder positions: (B, U, D)
    A^t          after_attention   (B, S, D)
    h^n          halting_value     (B, S)  per position, Graves Eq. 5
    p^n          halting_prob      (B, S); all of them: halting_probs (B, S, K)
    N            steps             (B, S) int64
    R            1 - halting_sum   (B, S)
    rho          ponder_cost       (B, S), 0 at padding
    T, M, eps, tau   max_steps, max_steps, eps, time_penalty

Choices the papers leave open, and what we do:
- The halting unit reads the NEW state of a step, h^n = sigmoid(W_h H^n + b_h), as Graves' Eq. 5
  does; tensor2tensor reads the step's input H^{n-1} + P^n, before the block (halting_input="before"). Outputs and the state returned are Graves'
  weighted sums sum_n p^n H^n (Eq. 9); tensor2tensor interpolates between successive states instead.
- The ponder cost carries its gradient (through R only, as N is piecewise constant: Graves Eq. 14).
  ponder_loss is tau times the mean of rho over the real positions of the batch: Graves' Eq. 12
  with P(x) averaged rather than summed over positions, so tau does not scale with the length.
- A halted position keeps its last state H^N for the positions still running to attend to (with
  the current step's timestep signal added, like every other position); tensor2tensor keeps
  transforming it, weighted 0 in the output (freeze_halted=False).
- The timestep signal is the sinusoid of section 2.1; tensor2tensor's default is a learned vector per
  step (step_signal="learned"). Its adaptive_universal_transformer_tiny caps at 4 steps (max_steps).
- Reading rho: a position that halts at its first step has N = 1, R = 1, rho = 2. The tasks report
  the mean N (steps) and the share of positions with N = 1 (one_step) beside rho.
- Padded positions (padding_mask False) are never attended to, never halt-counted and cost nothing.
- Layout: norm_first=True (the default) puts LayerNorm before each sublayer, H = A + Transition(LN(A)),
  A = x + Attention(LN(x)), with one LayerNorm before the output layer, as tensor2tensor's code does.
  norm_first=False is the paper's section 2.1 layout (LayerNorm after each residual sum); in our runs it sat at
  chance on bAbI task 1 for the first ~250 steps with 8 fixed steps at lr 1e-3 (pre-norm: 0.1% error
  after 500 steps).
- Embeddings are not scaled by sqrt(D); the sinusoids are Vaswani et al.'s, with positions
  counted from 0 (+ an optional per-sample offset, as the paper's algorithmic tasks train with; the
  decoder's positions take the same offset) and timesteps from 1.
- Halting arithmetic is fp32, also under autocast.
- The decoder (decoder=True, for sequence-to-sequence tasks; section 2.1, Fig. 2 right) is the same
  recurrent block with a causal mask on its self-attention and a second attention, over the final
  encoder states, between the two sublayers; it halts per position with its own halting unit. Its
  transition is always the FFN (a convolution over positions would see the future). Training is
  teacher-forced (the true previous output is the next input); evaluation decodes greedily, one
  position at a time, keeping every depth step's keys and values (a halted position's too, since
  later positions still attend to it), so generating T outputs costs T block calls per step, not T^2.
  bAbI needs no decoder: the task reads its answer from the encoder's outputs (their mean over the
  rows, as the UT authors' setup; or the question's row, data.py's question_first layout).

Reproduce: python train.py --model universal_transformer --task babi --data_dir DIR    (bAbI, encoder only)
           python train.py --model universal_transformer --task algo_reverse             (encoder-decoder)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UTConfig:
    vocab_size: int = 32  # set from the task: input token ids 0..vocab_size-1, 0 is padding
    output_size: int = 8  # set from the task: classes predicted at every (encoder or decoder) position
    sentence_length: int = 0  # set from the task: words per fact for bAbI-style (B, S, W) inputs; 0 = tokens (B, S)
    question_position_mask: bool = False  # set from the task: the question row's words under a positional mask
    #                                       of their own (the UT authors' bAbI setup); False: one mask for all rows
    decoder: bool = False  # set from the task: a decoder for sequence-to-sequence outputs (section 2.1)
    d_model: int = 128  # D (the CPU presets in train.py use 64)
    num_heads: int = 4
    d_ff: int = 128  # width of the transition function
    transition: str = "ffn"  # 'ffn' (position-wise, 2 layers, ReLU) or 'sepconv' (separable convolutions, encoder only)
    kernel_size: int = 3  # of the separable convolutions
    dropout: float = 0.1
    norm_first: bool = True  # True: LayerNorm before each sublayer, as tensor2tensor; False: after, as the paper's section 2.1
    universal: bool = True  # True: one shared block; False: max_steps distinct layers (the Transformer)
    act: bool = True  # dynamic halting per position (section 2.2); False: exactly max_steps steps
    max_steps: int = 8  # T without ACT, the cap M with ACT, the number of layers when universal=False
    eps: float = 0.01  # Graves: halt once the h's sum to 1 - eps
    halting_bias_init: float = 1.0  # b_h, Graves section 3: starts pondering little
    time_penalty: float = 0.01  # tau (tensor2tensor's act_loss_weight)
    # where the papers are silent (see the header): "new" = Graves' Eq. 5 on the step's new state H^n;
    # "before" = tensor2tensor, on the step's input H^{n-1} + P^n, before the block
    halting_input: str = "new"
    freeze_halted: bool = True  # a halted position's state stops changing (False: tensor2tensor, it keeps
    #                             being transformed, with weight 0 in the output)
    step_signal: str = "sinusoid"  # the timestep half of P^t: "sinusoid" (section 2.1) or "learned" (tensor2tensor)

    def __post_init__(self):
        for name in ("vocab_size", "output_size", "d_model", "num_heads", "d_ff", "max_steps", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(f"d_model must be even and divisible by num_heads, got {self.d_model}, {self.num_heads}")
        if self.transition not in ("ffn", "sepconv"):
            raise ValueError(f"transition must be 'ffn' or 'sepconv', got {self.transition!r}")
        if self.act and not self.universal:
            raise ValueError("act needs universal=True (halting is a recurrence over one shared block)")
        if not 0 <= self.dropout < 1 or not 0 <= self.eps < 1 or self.time_penalty < 0:
            raise ValueError("need 0 <= dropout < 1, 0 <= eps < 1 and time_penalty >= 0")
        if self.sentence_length < 0:
            raise ValueError(f"sentence_length must be >= 0, got {self.sentence_length}")
        if self.halting_input not in ("new", "before") or self.step_signal not in ("sinusoid", "learned"):
            raise ValueError(f"halting_input must be 'new' or 'before' and step_signal 'sinusoid' or 'learned', "
                             f"got {self.halting_input!r}, {self.step_signal!r}")


@dataclass
class TransformerConfig(UTConfig):
    """The baseline: max_steps distinct layers, no recurrence, no halting (--model transformer)."""
    universal: bool = False
    act: bool = False
    max_steps: int = 6  # layers; the paper's bAbI baseline is a Transformer of the same width


def sinusoid(positions, dim):
    """Vaswani et al.'s signal, the two halves of section 2.1's P^t: sin on even, cos on odd dimensions.
    positions (...) float -> (..., dim)."""
    j = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)  # 2j
    angles = positions.float().unsqueeze(-1) / (10000 ** (j / dim))  # i / 10000^(2j/d)
    signal = torch.zeros(*positions.shape, dim, device=positions.device)
    signal[..., 0::2], signal[..., 1::2] = torch.sin(angles), torch.cos(angles)
    return signal


class Attention(nn.Module):
    """Section 2.1 (after Vaswani et al.): multi-head scaled dot-product attention of x over itself, or
    (cross=True) over a source (the encoder memory), with a key padding mask and optionally a causal mask.
    cache (a dict, decoding only): keys and values computed so far, extended by this call's for
    self-attention, computed once and reused for the fixed source."""

    def __init__(self, c, cross=False):
        super().__init__()
        self.num_heads = c.num_heads
        if cross:
            self.query = nn.Linear(c.d_model, c.d_model)  # W^Q of every head, on x
            self.key_value = nn.Linear(c.d_model, 2 * c.d_model)  # W^K, W^V of every head, on the source
        else:
            self.qkv = nn.Linear(c.d_model, 3 * c.d_model)  # W^Q, W^K, W^V of every head
        self.out = nn.Linear(c.d_model, c.d_model)  # W^O
        self.dropout = nn.Dropout(c.dropout)

    def split(self, t):  # (B, S, D) -> (B, nh, S, hs)
        return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x, key_mask=None, source=None, causal=False, cache=None):
        B, S, D = x.shape
        if source is None:  # self-attention
            q, k, v = map(self.split, self.qkv(x).chunk(3, dim=-1))
            if cache is not None:  # decoding step by step: the positions so far, then this one
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        else:  # attention over the encoder memory: its keys and values once per decoding
            q = self.split(self.query(x))
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = map(self.split, self.key_value(source).chunk(2, dim=-1))
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // self.num_heads)  # softmax(Q K^T / sqrt(d/k)) V
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # padding is never attended to
        if causal:  # decoder: position i sees positions <= i only
            future = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).triu(k.shape[2] - S + 1)
            scores = scores.masked_fill(future, float("-inf"))
        weights = scores.softmax(-1)  # (B, nh, S, S_source)
        heads = self.dropout(weights) @ v  # head_i
        return self.out(heads.transpose(1, 2).reshape(B, S, D)), weights  # Concat(head_1..head_k) W^O


class SeparableConvTransition(nn.Module):
    """Transition function option of section 2.1: two depthwise-separable convolutions over positions
    (depthwise kernel_size, then pointwise), ReLU between. Padding is zeroed before each convolution,
    so a real position sees exactly what it would see at the end of an unpadded sequence."""

    def __init__(self, c):
        super().__init__()
        pad = c.kernel_size // 2
        self.depthwise1 = nn.Conv1d(c.d_model, c.d_model, c.kernel_size, padding=pad, groups=c.d_model)
        self.pointwise1 = nn.Linear(c.d_model, c.d_ff)
        self.depthwise2 = nn.Conv1d(c.d_ff, c.d_ff, c.kernel_size, padding=pad, groups=c.d_ff)
        self.pointwise2 = nn.Linear(c.d_ff, c.d_model)

    def forward(self, x, real):
        keep = real.unsqueeze(-1).to(x.dtype)
        x = self.depthwise1((x * keep).transpose(1, 2)).transpose(1, 2)
        x = F.relu(self.pointwise1(x))
        x = self.depthwise2((x * keep).transpose(1, 2)).transpose(1, 2)
        return self.pointwise2(x)


class Block(nn.Module):
    """One step of section 2.1: A = LayerNorm(x + MultiHeadSelfAttention(x)), H = LayerNorm(A + Transition(A)),
    with x = H^{t-1} + P^t, dropout on every residual branch; or, with norm_first, the same sums with
    LayerNorm moved onto each sublayer's input. A decoder block (cross=True) masks its self-attention
    causally and attends to the encoder memory between the two: A' = LayerNorm(A + Attention(A, memory))."""

    def __init__(self, c, cross=False):
        super().__init__()
        self.attention = Attention(c)
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        if c.transition == "ffn" or cross:
            self.transition = nn.Sequential(nn.Linear(c.d_model, c.d_ff), nn.ReLU(), nn.Linear(c.d_ff, c.d_model))
        else:
            self.transition = SeparableConvTransition(c)
        if cross:
            self.cross_attention, self.norm_cross = Attention(c, cross=True), nn.LayerNorm(c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.norm_first = c.norm_first

    def transform(self, x, real):
        if isinstance(self.transition, SeparableConvTransition):
            return self.transition(x, real)
        return self.transition(x)

    def forward(self, x, real, memory=None, memory_mask=None, cache=None):
        """x (B, S, D), real (B, S) bool -> new state (B, S, D), self-attention weights (B, nh, S, S').
        Decoder: memory (B, S_enc, D) and memory_mask; cache {'self': {}, 'cross': {}} when decoding step by step."""
        cross = memory is not None
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        key_mask = None if cross else real  # decoder: all its positions are real; the causal mask hides the future
        causal = cross and cache is None  # step by step, the cache holds only the past
        if self.norm_first:  # tensor2tensor's layout: x + f(LayerNorm(x)) for every sublayer
            attended, weights = self.attention(self.norm1(x), key_mask, causal=causal, cache=self_cache)
            state = x + self.dropout(attended)
            if cross:
                state = state + self.dropout(self.cross_attention(self.norm_cross(state), memory_mask, memory,
                                                                  cache=cross_cache)[0])
            return state + self.dropout(self.transform(self.norm2(state), real)), weights
        attended, weights = self.attention(x, key_mask, causal=causal, cache=self_cache)
        state = self.norm1(x + self.dropout(attended))  # A^t
        if cross:
            state = self.norm_cross(state + self.dropout(self.cross_attention(state, memory_mask, memory,
                                                                              cache=cross_cache)[0]))
        return self.norm2(state + self.dropout(self.transform(state, real))), weights  # H^t


class UniversalTransformer(nn.Module):
    """forward(x, padding_mask=None, position_offset=None, y=None) with x (B, S) token ids or (B, S, W)
    facts of W word ids -> logits (B, S, output_size), or (B, U, output_size) with a decoder for
    targets y (B, U); internals dict (ponder statistics per position)."""

    def __init__(self, config: UTConfig):
        super().__init__()
        self.config = c = config
        if c.decoder and c.transition != "ffn":
            raise ValueError("the decoder needs transition='ffn' (a convolution over positions would see the future)")
        self.embedding = nn.Embedding(c.vocab_size, c.d_model, padding_idx=0)
        if c.sentence_length:  # bAbI: a fact is the sum of its word embeddings under a learned positional mask
            self.word_position_mask = nn.Parameter(torch.ones(c.sentence_length, c.d_model))
            if c.question_position_mask:  # and the question under its own
                self.question_position_mask = nn.Parameter(torch.ones(c.sentence_length, c.d_model))
        def final_norm():  # pre-norm ends with one LayerNorm
            return nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()

        def halting_unit():  # W_h, b_h (Graves Eq. 5), one per position
            unit = nn.Linear(c.d_model, 1)
            nn.init.constant_(unit.bias, c.halting_bias_init)
            return unit

        def step_embedding():  # tensor2tensor's learned timestep signal: one vector per step, N(0, 1)
            return nn.Parameter(torch.randn(c.max_steps, c.d_model)) if c.universal and c.step_signal == "learned" else None

        layers = 1 if c.universal else c.max_steps
        self.blocks = nn.ModuleList([Block(c) for _ in range(layers)])
        self.step_embedding = step_embedding()
        self.final_norm = final_norm()
        self.output = nn.Linear(c.d_model, c.output_size)
        if c.act:
            self.halting_unit = halting_unit()
        if c.decoder:  # decoder inputs: 0 = start, k + 1 = output class k
            self.target_embedding = nn.Embedding(c.output_size + 1, c.d_model)
            self.decoder_blocks = nn.ModuleList([Block(c, cross=True) for _ in range(layers)])
            self.decoder_step_embedding = step_embedding()
            self.decoder_final_norm = final_norm()
            if c.act:
                self.decoder_halting_unit = halting_unit()

    def embed(self, x, question_rows=None):
        """x (B, S) tokens or (B, S, W) rows of words -> (B, S, D). question_rows (B, S) bool: the rows
        embedded under the question's positional mask, where the config has one."""
        if x.dim() == 3:  # (B, S, W) facts: sum_j mask_j * E[word_j]
            words = self.embedding(x)
            rows = (words * self.word_position_mask[: x.shape[-1]]).sum(-2)
            if question_rows is not None and self.config.question_position_mask:
                questions = (words * self.question_position_mask[: x.shape[-1]]).sum(-2)
                rows = torch.where(question_rows.unsqueeze(-1), questions, rows)
            return rows
        return self.embedding(x)  # (B, S, D)

    def halting_step(self, new_state, state, mean_state, halting_sum, running, last_step, unit=None, reads=None):
        """One ACT step for every position at once (Graves Eq. 5-9, applied over depth per position).
        new_state (B, S, D) is H^n, state H^{n-1}; mean_state the sum of p H so far; halting_sum (B, S)
        the sum of h over the steps taken before the halting one; running (B, S) bool. last_step: n = M.
        unit: the halting unit (default the encoder's); reads: what it reads (default new_state).
        Returns state, mean_state, halting_sum, running updated and halting_prob p^n (B, S)."""
        unit = self.halting_unit if unit is None else unit
        reads = new_state if reads is None else reads
        with torch.autocast(device_type=new_state.device.type, enabled=False):
            halting_value = torch.sigmoid(unit(reads.float())).squeeze(-1)  # Eq. 5: h^n
            # Eq. 7 and 13: step n is N once the h's up to and including h^n reach 1 - eps, or n = M
            halts_now = running & ((halting_sum + halting_value >= 1 - self.config.eps) | last_step)
            continues = running & ~halts_now
            # Eq. 6, 8: p^n = h^n before N; at N the remainder R = 1 - sum_{n < N} h^n; 0 once halted
            halting_prob = torch.where(continues, halting_value, torch.where(halts_now, 1 - halting_sum, 0.0))
            halting_sum = halting_sum + torch.where(continues, halting_value, 0.0)
            mean_state = mean_state + halting_prob.unsqueeze(-1) * new_state.float()  # Eq. 9: sum_n p^n H^n
        if self.config.freeze_halted:  # a halted position stops changing
            state = torch.where(running.unsqueeze(-1), new_state, state)
        else:  # tensor2tensor: every position is transformed at every step; a halted one has p = 0
            state = new_state
        return state, mean_state, halting_sum, continues, halting_prob

    def recur(self, state, position_signal, real, decoder=False, memory=None, memory_mask=None, caches=None):
        """The recurrence over depth (section 2.1), with per-position halting (section 2.2).
        state (B, S, D) embedded inputs; position_signal (B, S, D); real (B, S) bool.
        Decoder: memory, memory_mask, and caches (one per depth step) when decoding step by step.
        Returns the output states (B, S, D) and the statistics (steps, ponder cost, p^n, attention)."""
        c = self.config
        blocks = self.decoder_blocks if decoder else self.blocks
        unit = (self.decoder_halting_unit if decoder else self.halting_unit) if c.act else None
        if not c.universal:  # the Transformer: the position signal once, at the input
            state = state + position_signal
        B, S, D = state.shape
        steps = torch.zeros(B, S, dtype=torch.long, device=state.device)
        if c.act:
            mean_state = torch.zeros(B, S, D, device=state.device)
            halting_sum = torch.zeros(B, S, device=state.device)
            running = real.clone()
        halting_probs, attention = [], []
        step_embedding = self.decoder_step_embedding if decoder else self.step_embedding
        for n in range(1, c.max_steps + 1):
            if c.universal:  # section 2.1: H^{n-1} + P^n, the position and the timestep signal at every step
                if step_embedding is None:
                    timestep = sinusoid(torch.tensor(float(n), device=state.device), D)
                else:  # tensor2tensor's learned step signal
                    timestep = step_embedding[n - 1].to(state.dtype)
                block_input, block = state + position_signal + timestep, blocks[0]
            else:
                block_input, block = state, blocks[n - 1]
            new_state, weights = block(block_input, real, memory, memory_mask, None if caches is None else caches[n - 1])
            attention.append(weights[:, :, 0])  # (B, nh, S'): what position 0 attends to
            if c.act:
                steps = steps + running
                state, mean_state, halting_sum, running, halting_prob = self.halting_step(
                    new_state, state, mean_state, halting_sum, running, n == c.max_steps, unit,
                    block_input if c.halting_input == "before" else None)
                halting_probs.append(halting_prob)
                if not running.any() and caches is None:  # step by step, later positions need every step's keys
                    break
            else:
                state = new_state
                steps = steps + real
        stats = {"steps": steps, "attention": attention}  # N per position (max_steps without ACT), 0 at padding
        if c.act:
            # Graves Eq. 10: rho = N + R; N is constant, the gradient flows through R alone (Eq. 14)
            stats["ponder_cost"] = (steps + (1 - halting_sum)) * real
            stats["halting_probs"] = halting_probs
            state = mean_state.to(state.dtype)  # Eq. 9: the output is sum_n p^n H^n
        return state, stats

    def forward(self, x, return_internals=False, padding_mask=None, position_offset=None, y=None, teacher_forcing=None,
                question_rows=None):
        """y (B, U) target classes, decoder only: the length to produce and, when teacher forcing (the
        default in training), the decoder's inputs (y shifted right after a start token); at evaluation
        the decoder feeds back its own greedy outputs and reads nothing of y but its shape.
        question_rows (B, S) bool, bAbI: the question's row (see embed)."""
        c = self.config
        B, S = x.shape[:2]
        real = torch.ones(B, S, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask.bool()
        offset = torch.zeros(B, 1, dtype=torch.long, device=x.device) if position_offset is None else position_offset.view(B, 1)
        # positions from 0 (+ the algorithmic tasks' random training offsets, so long positions are seen)
        position_signal = sinusoid(torch.arange(S, device=x.device) + offset, c.d_model)  # (B, S, D)
        state, stats = self.recur(self.embed(x, question_rows), position_signal, real)
        output_state = self.final_norm(state)
        internals = {"steps": stats["steps"]}
        if "ponder_cost" in stats:
            internals["ponder_cost"] = stats["ponder_cost"]
        if return_internals:
            if c.act:
                internals["halting_probs"] = torch.stack(stats["halting_probs"], dim=-1)  # (B, S, K), p^n
            internals["first_position_attention"] = torch.stack(stats["attention"], dim=1)  # (B, K, nh, S)
        if not c.decoder:
            return self.output(output_state), internals  # (B, S, output_size)
        if y is None:
            raise ValueError("a decoder needs the targets y (B, U): their length, and their values to teacher-force")
        teacher_forcing = self.training if teacher_forcing is None else teacher_forcing
        decode = self.decode_teacher_forced if teacher_forcing else self.decode_greedy
        logits, decoder_stats = decode(output_state, real, y, offset)
        internals["decoder_steps"] = decoder_stats["steps"]
        if "ponder_cost" in decoder_stats:
            internals["decoder_ponder_cost"] = decoder_stats["ponder_cost"]
        return logits, internals

    def decode_teacher_forced(self, memory, memory_mask, y, offset):
        """All U positions at once under the causal mask: position i reads the true y_{i-1}."""
        B, U = y.shape
        start = torch.zeros(B, 1, dtype=torch.long, device=y.device)
        inputs = torch.cat([start, y[:, :-1] + 1], dim=1)  # (B, U): start, y_0 + 1, ..., y_{U-2} + 1
        position_signal = sinusoid(torch.arange(U, device=y.device) + offset, self.config.d_model)
        real = torch.ones(B, U, dtype=torch.bool, device=y.device)
        state, stats = self.recur(self.target_embedding(inputs), position_signal, real, True, memory, memory_mask)
        return self.output(self.decoder_final_norm(state)), stats

    def decode_greedy(self, memory, memory_mask, y, offset):
        """One position at a time, feeding back the argmax; every depth step's keys and values are kept,
        so each position runs the blocks once per step (section 2.1's decoder, autoregressive)."""
        B, U = y.shape
        caches = [{"self": {}, "cross": {}} for _ in range(self.config.max_steps)]
        token = torch.zeros(B, 1, dtype=torch.long, device=y.device)  # the start token
        real = torch.ones(B, 1, dtype=torch.bool, device=y.device)
        logits, steps, ponder = [], [], []
        for i in range(U):
            position_signal = sinusoid(offset + i, self.config.d_model)  # (B, 1, D)
            state, stats = self.recur(self.target_embedding(token), position_signal, real, True, memory, memory_mask, caches)
            logits.append(self.output(self.decoder_final_norm(state)))
            token = logits[-1].argmax(-1) + 1
            steps.append(stats["steps"])
            ponder.append(stats.get("ponder_cost"))
        stats = {"steps": torch.cat(steps, 1)}
        if self.config.act:
            stats["ponder_cost"] = torch.cat(ponder, 1)
        return torch.cat(logits, 1), stats

    def ponder_loss(self, internals):
        """tau times the mean ponder cost rho over the real positions (Graves Eq. 11-12, see the docstring),
        of the encoder plus, with a decoder, of the decoder. Without ACT there is nothing to learn: 0."""
        if not self.config.act:
            return torch.zeros((), device=internals["steps"].device)
        loss = 0
        for prefix in ("", "decoder_") if "decoder_steps" in internals else ("",):
            real = (internals[prefix + "steps"] > 0).float()
            loss = loss + internals[prefix + "ponder_cost"].sum() / real.sum().clamp(min=1)
        return self.config.time_penalty * loss


if __name__ == "__main__":  # smoke test: python universal_transformer.py
    torch.manual_seed(0)
    for config in (UTConfig(), UTConfig(act=False), TransformerConfig(), UTConfig(sentence_length=6, transition="sepconv")):
        model = UniversalTransformer(config)
        x = torch.randint(1, config.vocab_size, (2, 5, 6) if config.sentence_length else (2, 5))
        logits, internals = model(x, return_internals=True, padding_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        with torch.no_grad():
            print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()}, model.ponder_loss(internals).item())
    for config in (UTConfig(decoder=True), TransformerConfig(decoder=True)):  # sequence to sequence
        model = UniversalTransformer(config).eval()
        x, y = torch.randint(1, config.vocab_size, (2, 5)), torch.randint(0, config.output_size, (2, 7))
        with torch.no_grad():
            greedy, _ = model(x, y=y)  # decodes its own outputs
            forced, _ = model(x, y=greedy.argmax(-1), teacher_forcing=True)  # the same inputs, all at once
        print(greedy.shape, "greedy == teacher-forced on its own outputs:", torch.allclose(greedy, forced, atol=1e-4))
