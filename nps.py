"""
Neural Production Systems, in one file.

Paper: Anirudh Goyal, Aniket Didolkar, Nan Rosemary Ke, Charles Blundell, Philippe Beaudoin,
Nicolas Heess, Michael Mozer, Yoshua Bengio, "Neural Production Systems", NeurIPS 2021,
arXiv:2103.01937. Official code: github.com/anirudh9119/neural_production_systems.

The idea:
- The state is a set of slots (one vector per entity); knowledge is a set of N rules, each a learned
  embedding (its condition) and its own MLP (its action). Rules are shared by all slots.
- Stage 1 (Algorithm 1, step 2): every (rule, slot) pair gets an attention score, query from the rule
  embedding, key from the slot; one pair, the rule and its primary slot, is picked with a hard
  Gumbel-softmax whose gradient passes straight through the softmax while training, argmax at evaluation.
- Stage 2 (step 3): a contextual slot is picked the same way, by attention whose query reads the primary
  slot and the chosen rule's embedding, keys from the other slots.
- Application (step 4): the chosen rule's MLP reads [primary slot, contextual slot] and updates the
  primary slot; every other slot stays as it was. Sequential mode applies K rules one after another;
  parallel mode lets every slot pick its own rule (and context) and updates all slots at once.
- The discrete choice is what makes rules specialise: on the arithmetic task each rule comes to own
  one operation, and a per-step rule generalises to sequences longer than those trained on.

Paper symbol -> variable -> shape  (B batch, T steps, S slots, N rules, H slot size, K applications)
    V = {v_1..v_S}     slots               (B, S, H)   one per input group of x_t (input_groups; with
                                                       image_size, group 0 is an image)
    (condition)        condition           (B, C)      the last condition_size channels of x_t
    R~_r               rule_embeddings     (N, rule_size)
    MLP_r              rule_w1, rule_b1, rule_w2, rule_b2   (N, 2H, rule_hidden), ..., (N, rule_hidden, H)
    q_r, k_i           rule_query(R~), slot_key([V, condition])   (N, key_size), (B, S, key_size)
    (r, i) choice      choice              (B, N, S)   one-hot forward, straight-through backward
    j (context)        context             (B, S)      one-hot likewise
    chosen r, i, j     internals "rules", "primary_slots", "context_slots"   (B, T, K) int64
                       (parallel mode: (B, T, S), the rule and context of every slot; primary = slot)

Choices the paper leaves open, and what we do:
- Slots: the paper gets them from slot attention over images. Here the task says which channels of
  x_t form each slot (`input_groups`; arithmetic: [y_{t-1}] and [d_t]) and each group has its own
  small MLP encoder, all of them computed at once with grouped weights.
- Conditions: a task may give channels that only the rules' conditions read (`condition_size`;
  arithmetic: the one-hot operation). They join every slot's stage 1 key, so they decide which rule
  fires, and no rule MLP sees them, so the rule that fires has to do the work: this is how the official
  arithmetic model makes rules own operations (the operation picks the rule, the rule's MLP reads only
  the numbers). A rule reading [primary, context] that could also read the operation would not need to
  specialise: one rule can learn all three operations, and in our development runs one did.
- Time: slots are built from x_t at every step; nothing else is carried from step to step. Tasks whose
  next input is the model's last output (arithmetic) name the fed-back channels (`feedback_size`):
  training reads the true values there (teacher forcing), evaluation writes the model's own output of
  the step before into them (autoregression), as the official arithmetic code does.
- The update is residual, v_i <- v_i + MLP_r([v_i, v_j]), and the output is read by a decoder MLP from the
  slot the last rule wrote (sequential mode) or from slot `readout_slot` (parallel mode). Reading the
  written slot forces the answer through a rule, as the official arithmetic model does (its rule MLP
  outputs the number itself).
- The contextual slot is another slot than the primary one (Figure 2 matches rules to pairs of slots);
  with a single slot (mnist_transform: the image) the rule reads [slot, slot].
- Gumbel temperature tau = 1 for both stages (the official arithmetic code uses 1 for stage 1).
- Scores are plain dot products q . k, not divided by sqrt(key_size): the hard choice is made against
  Gumbel noise of a fixed scale, and with the division the stage 1 scores stayed small against it for
  long; in our arithmetic development runs two operations then settled on one rule for good.

The MNIST transformations as the official code sets them up (MNIST/run.sh, RuleNetwork.py; the
mnist_transform preset): the image and the transformation are two slots, the image read by a conv
encoder (image_size), the transformation by an MLP; every slot is LayerNormed (slot_norm) and has its
own stage 1 key projection (slot_keys="per_slot", a grouped linear layer), so the transformation
slot's scores depend on the rule and the transformation alone; scores are divided by sqrt(key_size)
(scale_scores); stage 2 samples with tau 0.5 (context_tau); the chosen rule's MLP reads only the stage 2
slot (rule_input="context") and its output replaces the primary slot (residual=False), which a conv
decoder reads: the rule's output is the only path from the image to the reconstruction.

Where the official arithmetic code differs: it has three slots ([y_{t-1}], [d_t], [operation]) and
stage 1 picks a (rule, slot) pair among all three, so the operation's slot carries the choice; its
stage 2 then picks two operands among the two number slots (two independent Gumbel choices by the rule
embedding) and its rule MLP maps them to the result directly. We keep the paper's primary/contextual
form and give the operation to the stage 1 keys as a condition instead of a slot of its own.

Reproduce the arithmetic result: python train.py --model nps --task arithmetic
  (every seed at the official error: --mode parallel --readout_slot 0 --max_iters 6000 --validation
  --eval_interval 250, which keeps the checkpoint best on validation sequences as the official code does)
The MNIST transformations:      python train.py --model nps --task mnist_transform --data_dir DIR
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NPSConfig:
    input_size: int = 5  # set from the task: arithmetic's [y_{t-1}, d_t, one-hot operation]
    output_size: int = 1  # set from the task
    input_groups: tuple = (1, 1)  # set from the task: how many channels of x_t make each slot
    condition_size: int = 3  # set from the task: the last channels of x_t, read by stage 1 keys only
    feedback_size: int = 0  # set from the task: the first channels of x_t hold the output of step t-1
    slot_size: int = 64  # H; the official arithmetic runs use 64 (runner.sh hidden_dim)
    num_rules: int = 3  # N; official arithmetic runs: 3
    rule_size: int = 32  # rule embedding size; official: 32
    key_size: int = 32  # attention query/key size; official: 32
    rule_hidden: int = 128  # hidden units of each rule's MLP; official GroupMLP: 128
    encoder_hidden: int = 64  # hidden units of each slot encoder and the decoder; official: 64
    mode: str = "sequential"  # 'sequential' (K rules one after another) or 'parallel' (every slot)
    num_applications: int = 1  # K, rule applications per step in sequential mode
    tau: float = 1.0  # Gumbel-softmax temperature
    readout_slot: int = -1  # -1: the slot the last rule wrote (sequential); else this slot
    # Options the official MNIST code sets (the defaults are the arithmetic setup; see the header):
    image_size: int = 0  # set from the task: > 0, slot 0 is an image of this side, read by a conv encoder and
    #                      decoded by a conv decoder; 0: every slot and the output are vectors (MLPs)
    slot_norm: bool = False  # LayerNorm every slot after its encoder
    slot_keys: str = "shared"  # stage 1 keys: "shared" (one projection) or "per_slot" (one per slot, grouped)
    scale_scores: bool = False  # divide the attention scores by sqrt(key_size)
    rule_input: str = "pair"  # the rule MLP reads "pair" [primary, context] or "context" (the stage-2 slot only)
    residual: bool = True  # v <- v + MLP_r(...); False: v <- MLP_r(...), so the rule's output is all that is read
    context_tau: float = 0.0  # stage 2 Gumbel temperature; 0: the same as tau (official MNIST: 0.5)

    def __post_init__(self):
        self.input_groups = tuple(self.input_groups)
        if self.mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {self.mode!r}")
        for name in ("input_size", "output_size", "slot_size", "num_rules", "rule_size", "key_size",
                     "rule_hidden", "encoder_hidden", "num_applications"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.condition_size < 0:
            raise ValueError(f"condition_size must be at least 0, got {self.condition_size}")
        if len(self.input_groups) < 1 or min(self.input_groups) < 1 or \
                sum(self.input_groups) + self.condition_size != self.input_size:
            raise ValueError(f"input_groups must be positive sizes adding up, with condition_size "
                             f"{self.condition_size}, to input_size {self.input_size}, got {self.input_groups}")
        if not 0 <= self.feedback_size <= min(self.input_size, self.output_size):
            raise ValueError(f"feedback_size must be in 0..min(input_size, output_size), got {self.feedback_size}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not -1 <= self.readout_slot < len(self.input_groups):
            raise ValueError(f"readout_slot must be -1 or a slot index below {len(self.input_groups)}, got {self.readout_slot}")
        if self.mode == "parallel" and self.readout_slot < 0:
            raise ValueError("parallel mode updates every slot: give the slot to read with readout_slot >= 0")
        if self.slot_keys not in ("shared", "per_slot") or self.rule_input not in ("pair", "context"):
            raise ValueError(f"slot_keys must be 'shared' or 'per_slot' and rule_input 'pair' or 'context', "
                             f"got {self.slot_keys!r}, {self.rule_input!r}")
        if self.context_tau < 0:
            raise ValueError(f"context_tau must be >= 0 (0: tau), got {self.context_tau}")
        if self.image_size and (self.image_size % 8 or self.input_groups[0] != self.image_size ** 2
                                or self.output_size != self.image_size ** 2):
            raise ValueError(f"image_size {self.image_size} needs a side divisible by 8, input group 0 and the output "
                             f"of image_size^2 values, got groups {self.input_groups} and output {self.output_size}")


def hard_choice(scores, tau, sample):
    """One-hot choice over the last dim of scores. sample=True: argmax of (scores + Gumbel noise) / tau
    forward, gradient of the softmax backward (straight-through); sample=False: plain argmax, and the
    gradient of softmax(scores / tau) backward."""
    if sample:
        uniform = torch.rand_like(scores).clamp(1e-10, 1 - 1e-10)
        scores = scores - torch.log(-torch.log(uniform))  # + Gumbel(0, 1) noise
    soft = torch.softmax(scores / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft  # the value of hard, the gradient of soft


def grouped_mlp(x, w1, b1, w2, b2):
    """G small MLPs at once: x (..., G, in) with weights w1 (G, in, hidden), w2 (G, hidden, out)."""
    hidden = torch.relu(torch.einsum("...gi,gih->...gh", x, w1) + b1)
    return torch.einsum("...gh,gho->...go", hidden, w2) + b2


def _uniform(*shape, fan_in):
    bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def conv_encoder(size, hidden):
    """An image (B, 1, size, size) -> (B, hidden): three stride-2 4 x 4 convolutions (32, 32, 64 channels),
    then a linear layer, as the official MNIST encoder's shape (a small conv net into one slot)."""
    side = size // 8
    return nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * side * side, hidden))


def conv_decoder(size, hidden):
    """(B, hidden) -> image logits (B, size * size): the encoder mirrored with transposed convolutions."""
    side = size // 8
    return nn.Sequential(nn.Linear(hidden, 64 * side * side), nn.ReLU(), nn.Unflatten(1, (64, side, side)),
                         nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
                         nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Flatten())


class NPS(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: NPSConfig):
        super().__init__()
        self.config = c = config
        S, H, N = len(c.input_groups), c.slot_size, c.num_rules
        first = 1 if c.image_size else 0  # slot 0 is an image with a conv encoder of its own
        G = max(c.input_groups[first:], default=1)
        # slot encoders, one MLP per input group, zero-padded to the widest group
        index = torch.zeros(S - first, G, dtype=torch.long)
        present = torch.zeros(S - first, G)
        start = c.input_groups[0] if first else 0
        for s, size in enumerate(c.input_groups[first:]):
            index[s, :size] = torch.arange(start, start + size)
            present[s, :size] = 1.0
            start += size
        self.register_buffer("group_index", index, persistent=False)
        self.register_buffer("group_present", present, persistent=False)
        M = S - first  # the slots with MLP encoders
        self.enc_w1, self.enc_b1 = _uniform(M, G, c.encoder_hidden, fan_in=G), _uniform(M, c.encoder_hidden, fan_in=G)
        self.enc_w2 = _uniform(M, c.encoder_hidden, H, fan_in=c.encoder_hidden)
        self.enc_b2 = _uniform(M, H, fan_in=c.encoder_hidden)
        if c.image_size:
            self.image_encoder = conv_encoder(c.image_size, H)
        self.slot_norm = nn.LayerNorm(H) if c.slot_norm else nn.Identity()
        # rules: embeddings and one MLP each, [primary, context] (2H) or the context (H) -> update (H)
        R = 2 * H if c.rule_input == "pair" else H
        self.rule_embeddings = nn.Parameter(torch.randn(N, c.rule_size))
        self.rule_w1, self.rule_b1 = _uniform(N, R, c.rule_hidden, fan_in=R), _uniform(N, c.rule_hidden, fan_in=R)
        self.rule_w2, self.rule_b2 = _uniform(N, c.rule_hidden, H, fan_in=c.rule_hidden), _uniform(N, H, fan_in=c.rule_hidden)
        # stage 1: rule -> query, slot -> key; stage 2: [primary slot, rule] -> query, slot -> key
        self.rule_query = nn.Linear(c.rule_size, c.key_size, bias=False)
        if c.slot_keys == "per_slot":  # one key projection per slot (the official grouped linear layer)
            self.slot_key_weight = _uniform(S, H + c.condition_size, c.key_size, fan_in=H + c.condition_size)
        else:
            self.slot_key = nn.Linear(H + c.condition_size, c.key_size, bias=False)
        self.context_query = nn.Linear(H + c.rule_size, c.key_size, bias=False)
        self.context_key = nn.Linear(H, c.key_size, bias=False)
        if c.image_size:
            self.decoder = conv_decoder(c.image_size, H)
        else:
            self.decoder = nn.Sequential(nn.Linear(H, c.encoder_hidden), nn.ReLU(), nn.Linear(c.encoder_hidden, c.output_size))
        self.score_scale = c.key_size ** -0.5 if c.scale_scores else 1.0

    # ------------------------------------------------------------------------------------------
    def encode(self, x):
        """x (B, input_size) -> slots (B, S, H): each input group through its own encoder (the image's
        a conv net, the others MLPs, all of them at once), LayerNormed with slot_norm."""
        groups = x[:, self.group_index] * self.group_present  # (B, S', G)
        slots = grouped_mlp(groups, self.enc_w1, self.enc_b1, self.enc_w2, self.enc_b2)
        if self.config.image_size:
            side = self.config.image_size
            image = self.image_encoder(x[:, :side * side].reshape(-1, 1, side, side))
            slots = torch.cat([image.unsqueeze(1), slots], 1)
        return self.slot_norm(slots)

    def rule_outputs(self, primary, context):
        """Every rule's MLP on [primary, context] (or the context alone) at once: (..., H) each -> (..., N, H)."""
        inputs = (torch.cat([primary, context], -1) if self.config.rule_input == "pair" else context).unsqueeze(-2)
        inputs = inputs.expand(*inputs.shape[:-2], self.config.num_rules, inputs.shape[-1])
        return grouped_mlp(inputs, self.rule_w1, self.rule_b1, self.rule_w2, self.rule_b2)

    def match_scores(self, slots, condition):
        """Stage 1 scores of every (rule, slot) pair: (B, N, S). condition (B, C), C may be 0."""
        query = self.rule_query(self.rule_embeddings)  # (N, key)
        condition = condition.unsqueeze(1).expand(-1, slots.shape[1], -1)
        keys_in = torch.cat([slots, condition], -1)
        if self.config.slot_keys == "per_slot":
            key = torch.einsum("bsi,sik->bsk", keys_in, self.slot_key_weight)  # (B, S, key), slot s by its own map
        else:
            key = self.slot_key(keys_in)  # (B, S, key)
        return torch.einsum("nk,bsk->bns", query, key) * self.score_scale  # q_r . k_i (see the header)

    def context_scores(self, slots, primary, rule):
        """Stage 2 scores of every slot as context for (primary (..., H), rule (..., rule_size)):
        (..., S) for slots (B, S, H), where ... is (B,) or (B, S) (parallel: one primary per slot)."""
        query = self.context_query(torch.cat([primary, rule], -1))  # (..., key)
        key = self.context_key(slots)  # (B, S, key)
        if query.dim() == 2:
            return torch.einsum("bk,bsk->bs", query, key) * self.score_scale
        return torch.einsum("bpk,bsk->bps", query, key) * self.score_scale

    def apply_sequential(self, slots, condition):
        """One rule application: choose (rule, primary slot), then a context slot, update the primary.
        Returns new slots, the primary slot mask (B, S), and the chosen rule, primary, context (B,)."""
        B, S, H = slots.shape
        N, tau, sample = self.config.num_rules, self.config.tau, self.training
        choice = hard_choice(self.match_scores(slots, condition).reshape(B, N * S), tau, sample).view(B, N, S)  # step 2
        rule_mask, primary_mask = choice.sum(2), choice.sum(1)  # (B, N), (B, S), one-hot each
        primary = torch.einsum("bs,bsh->bh", primary_mask, slots)
        rule = rule_mask @ self.rule_embeddings  # (B, rule_size)
        scores = self.context_scores(slots, primary, rule)  # step 3: another slot than the primary
        if S > 1:
            scores = scores.masked_fill(primary_mask.detach() > 0.5, float("-inf"))
        context_mask = hard_choice(scores, self.config.context_tau or tau, sample)  # (B, S)
        context = torch.einsum("bs,bsh->bh", context_mask, slots)
        update = torch.einsum("bn,bnh->bh", rule_mask, self.rule_outputs(primary, context))  # step 4
        written = primary_mask.unsqueeze(-1)
        if self.config.residual:
            slots = slots + written * update.unsqueeze(1)  # only the primary slot moves
        else:  # the primary slot becomes the rule's output
            slots = slots * (1 - written) + written * update.unsqueeze(1)
        return slots, primary_mask, rule_mask.argmax(-1), primary_mask.argmax(-1), context_mask.argmax(-1)

    def apply_parallel(self, slots, condition):
        """Every slot picks a rule (over rules) and a context slot; all slots update at once.
        Returns new slots and each slot's rule and context (B, S)."""
        B, S, H = slots.shape
        tau, sample = self.config.tau, self.training
        rule_mask = hard_choice(self.match_scores(slots, condition).transpose(1, 2), tau, sample)  # (B, S, N)
        rule = rule_mask @ self.rule_embeddings  # (B, S, rule_size)
        scores = self.context_scores(slots, slots, rule)  # (B, S, S): row p, the context of slot p
        if S > 1:
            scores = scores.masked_fill(torch.eye(S, dtype=torch.bool, device=slots.device), float("-inf"))
        context_mask = hard_choice(scores, self.config.context_tau or tau, sample)  # (B, S, S)
        context = context_mask @ slots  # (B, S, H)
        update = torch.einsum("bsn,bsnh->bsh", rule_mask, self.rule_outputs(slots, context))
        return (slots + update if self.config.residual else update), rule_mask.argmax(-1), context_mask.argmax(-1)

    def step(self, x):
        """One time step: x (B, input_size) -> output (B, output_size), rules, primaries, contexts."""
        c = self.config
        slots, condition = self.encode(x), x[:, sum(c.input_groups):]
        if c.mode == "parallel":
            slots, rules, contexts = self.apply_parallel(slots, condition)
            primaries = torch.arange(slots.shape[1], device=x.device).expand_as(rules)
            return self.decoder(slots[:, c.readout_slot]), rules, primaries, contexts
        rules, primaries, contexts = [], [], []
        for _ in range(c.num_applications):
            slots, primary_mask, rule, primary, context = self.apply_sequential(slots, condition)
            rules.append(rule), primaries.append(primary), contexts.append(context)
        if c.readout_slot >= 0:
            readout = slots[:, c.readout_slot]
        else:  # the slot the last rule wrote (straight-through, so the choice gets this gradient too)
            readout = torch.einsum("bs,bsh->bh", primary_mask, slots)
        return self.decoder(readout), torch.stack(rules, -1), torch.stack(primaries, -1), torch.stack(contexts, -1)

    def forward(self, x, return_internals=False, teacher_forcing=None):
        """teacher_forcing (default: while training) reads the fed-back channels from x; without it
        they hold the model's own output of the step before (the first step keeps x's values)."""
        B, T, _ = x.shape
        F_ = self.config.feedback_size
        teacher_forcing = self.training if teacher_forcing is None else teacher_forcing
        if teacher_forcing or F_ == 0 or T == 1:  # every step at once
            out, rules, primaries, contexts = self.step(x.reshape(B * T, -1))
            logits = out.view(B, T, -1)
            internals = {k: v.view(B, T, -1) for k, v in
                         (("rules", rules), ("primary_slots", primaries), ("context_slots", contexts))}
            return logits, internals
        outputs, all_rules, all_primaries, all_contexts = [], [], [], []
        for t in range(T):  # autoregression: step t reads the output of step t - 1
            x_t = x[:, t] if t == 0 else torch.cat([outputs[-1][:, :F_].to(x.dtype), x[:, t, F_:]], -1)
            out, rules, primaries, contexts = self.step(x_t)
            outputs.append(out), all_rules.append(rules), all_primaries.append(primaries), all_contexts.append(contexts)
        internals = {"rules": torch.stack(all_rules, 1), "primary_slots": torch.stack(all_primaries, 1),
                     "context_slots": torch.stack(all_contexts, 1)}
        return torch.stack(outputs, 1), internals


if __name__ == "__main__":  # smoke test: python nps.py
    model = NPS(NPSConfig(feedback_size=1)).eval()
    logits, internals = model(torch.rand(2, 6, 5), return_internals=True)
    print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()})
