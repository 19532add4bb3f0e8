"""
The tasks. Each one knows its problem and nothing about models:
- its config dataclass (every field becomes a train.py flag),
- `spec`: what its inputs and targets look like, so train.py can size a model,
- `train_batch(batch_size, generator)`: a fresh seeded batch from the training distribution,
- `eval_settings`: the generalisation settings, declared in one place, and `eval_batch(...)`,
- `loss(logits, batch)` and `metrics(logits, batch, internals)` (internals: what the model
  returned beside its outputs, e.g. an ACT model's ponder cost),
- `figure_panels(logits, batch, internals)`: 2-D arrays in [0, 1] that train.py draws,
- `bench_setting`: the evaluation setting bench.py times training on (a fixed shape).

A batch is a dict of tensors. Sequence tasks give x (B, T, in), targets y (B, T, ...) and
mask (B, T), 1 where the model is scored. Everything is generated on the fly from a torch.Generator, so
the same seed gives the same data. Add a task: write its class here and add it to TASKS.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class SequenceTask:
    """A sequence in, a sequence of targets out. The loss and metric here are for binary target
    vectors (the NTM tasks); tasks with other targets override them. Subclasses define
    make_batch(batch_size, generator, **setting), sample_train_setting and eval_settings."""

    kind = "sequence"
    metric = "bit_err"  # mean number of wrong bits per sequence, the paper's "cost per sequence"

    def __init__(self, config, data_dir=None):
        self.config = config

    def train_batch(self, batch_size, generator):
        return self.make_batch(batch_size, generator, **self.sample_train_setting(generator))

    def eval_batch(self, setting, batch_size, generator):
        return self.make_batch(batch_size, generator, **self.eval_settings[setting])

    def loss(self, logits, batch):
        """Binary cross-entropy on the scored positions, mean per scored bit."""
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["y"], reduction="none")
        mask = batch["mask"].unsqueeze(-1)
        return (bce * mask).sum() / (mask.sum() * logits.shape[-1])

    def metrics(self, logits, batch, internals):
        """Sums over the batch (train.py adds them up over batches and divides by 'count')."""
        wrong = ((logits > 0).float() != batch["y"]).float() * batch["mask"].unsqueeze(-1)
        return {self.metric: wrong.sum().item(), "count": logits.shape[0], **ponder_sum(internals)}

    def figure_panels(self, logits, batch, internals, index=0):
        """Target and output of one sequence over its scored steps: (channels, time) each."""
        keep = batch["mask"][index] > 0
        return [("target", batch["y"][index][keep].T),
                ("output", torch.sigmoid(logits[index].float())[keep].T)]


def ponder_sum(internals):
    """For models that ponder (ACT): the sum over the batch of each sequence's mean ponder cost
    per input step, so that dividing by the count gives the mean rho per input step."""
    if "ponder_cost" not in internals:
        return {}
    return {"ponder": internals["ponder_cost"].float().mean(1).sum().item()}


def _check_positive(config, *names):
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


def _randint(low, high, generator):
    """One integer uniform in [low, high], from the task's generator."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _bits(shape, generator):
    return torch.randint(0, 2, shape, generator=generator).float()


# ----------------------------------------------------------------------------------------------
# NTM paper, section 4.1: copy

@dataclass
class CopyConfig:
    width: int = 8  # section 4.1: random 8-bit vectors
    min_len: int = 1  # section 4.1: training lengths uniform in 1..20
    max_len: int = 20
    eval_lengths: tuple = (10, 20, 30, 50, 120)  # Fig. 4: generalisation to 30, 50, 120
    eval_samples: int = 256  # test sequences per length

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        _check_positive(self, "width", "eval_samples")
        if not self.eval_lengths or min(self.eval_lengths) < 1:
            raise ValueError(f"eval_lengths must be positive, got {self.eval_lengths}")


class Copy(SequenceTask):
    """Input: L random vectors, then a delimiter on an extra channel. Output: the same L
    vectors, during the L steps after the delimiter (inputs are zero then)."""

    bench_setting = "20"  # the longest training sequences

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.spec = {"kind": self.kind, "input_size": config.width + 1, "output_size": config.width}
        self.eval_settings = {str(n): {"length": n} for n in config.eval_lengths}

    def sample_train_setting(self, generator):
        return {"length": _randint(self.config.min_len, self.config.max_len, generator)}

    def make_batch(self, batch_size, generator, length):
        W, L = self.config.width, length
        bits = _bits((batch_size, L, W), generator)
        x = torch.zeros(batch_size, 2 * L + 1, W + 1)
        x[:, :L, :W] = bits
        x[:, L, W] = 1.0  # delimiter
        y = torch.zeros(batch_size, 2 * L + 1, W)
        y[:, L + 1:] = bits
        mask = torch.zeros(batch_size, 2 * L + 1)
        mask[:, L + 1:] = 1.0
        return {"x": x, "y": y, "mask": mask}


# ----------------------------------------------------------------------------------------------
# NTM paper, section 4.2: repeat copy

@dataclass
class RepeatCopyConfig:
    width: int = 8  # section 4.2: random 8-bit vectors
    min_len: int = 1  # section 4.2: lengths and repeat counts uniform in 1..10
    max_len: int = 10
    min_repeats: int = 1
    max_repeats: int = 10
    # Fig. 9: generalisation to longer sequences (20 x 10) and more repeats (10 x 20)
    eval_settings: tuple = ("10x10", "10x20", "20x10")  # "<length>x<repeats>"
    eval_samples: int = 256  # test sequences per setting

    def __post_init__(self):
        if not (1 <= self.min_len <= self.max_len and 1 <= self.min_repeats <= self.max_repeats):
            raise ValueError("need 1 <= min_len <= max_len and 1 <= min_repeats <= max_repeats")
        _check_positive(self, "width", "eval_samples")
        for s in self.eval_settings:
            parts = s.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"repeat_copy eval settings look like '10x20' (length x repeats), got {s!r}")


class RepeatCopy(SequenceTask):
    """Input: L random vectors, then one step with the delimiter channel on and the repeat
    count R (divided by max_repeats) on a second extra channel. Output: the sequence R
    times, then an end marker on an extra output channel."""

    bench_setting = "10x10"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        W = config.width
        self.spec = {"kind": self.kind, "input_size": W + 2, "output_size": W + 1}
        self.eval_settings = {s: dict(zip(("length", "repeats"), map(int, s.split("x"))))
                              for s in config.eval_settings}

    def sample_train_setting(self, generator):
        c = self.config
        return {"length": _randint(c.min_len, c.max_len, generator),
                "repeats": _randint(c.min_repeats, c.max_repeats, generator)}

    def make_batch(self, batch_size, generator, length, repeats):
        W, L, R = self.config.width, length, repeats
        T = L + 1 + L * R + 1
        bits = _bits((batch_size, L, W), generator)
        x = torch.zeros(batch_size, T, W + 2)
        x[:, :L, :W] = bits
        x[:, L, W] = 1.0  # delimiter
        x[:, L, W + 1] = R / self.config.max_repeats  # how many copies
        y = torch.zeros(batch_size, T, W + 1)
        y[:, L + 1: L + 1 + L * R, :W] = bits.repeat(1, R, 1)
        y[:, T - 1, W] = 1.0  # end marker
        mask = torch.zeros(batch_size, T)
        mask[:, L + 1:] = 1.0
        return {"x": x, "y": y, "mask": mask}


# ----------------------------------------------------------------------------------------------
# NTM paper, section 4.3: associative recall

@dataclass
class AssociativeRecallConfig:
    width: int = 6  # section 4.3: items of three 6-bit vectors
    item_len: int = 3
    min_items: int = 2  # section 4.3: 2..6 items in training
    max_items: int = 6
    eval_items: tuple = (6, 10, 15, 20)  # Fig. 12: generalisation up to 20 items
    eval_samples: int = 256  # test sequences per setting

    def __post_init__(self):
        if not 2 <= self.min_items <= self.max_items or min(self.eval_items) < 2:
            raise ValueError("associative_recall needs at least 2 items (min_items <= max_items)")
        _check_positive(self, "width", "item_len", "eval_samples")


class AssociativeRecall(SequenceTask):
    """Input: n items, each a delimiter step (channel W) and item_len vectors; then a query
    delimiter (channel W+1), one of the items but the last, another query delimiter.
    Output: the item that followed the queried one."""

    bench_setting = "6"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        W = config.width
        self.spec = {"kind": self.kind, "input_size": W + 2, "output_size": W}
        self.eval_settings = {str(n): {"items": n} for n in config.eval_items}

    def sample_train_setting(self, generator):
        return {"items": _randint(self.config.min_items, self.config.max_items, generator)}

    def make_batch(self, batch_size, generator, items):
        W, K, n, B = self.config.width, self.config.item_len, items, batch_size
        item_bits = _bits((B, n, K, W), generator)
        query = torch.randint(0, n - 1, (B,), generator=generator)  # never the last item
        T = n * (K + 1) + 1 + K + 1 + K
        x = torch.zeros(B, T, W + 2)
        story = torch.zeros(B, n, K + 1, W + 2)
        story[:, :, 0, W] = 1.0  # item delimiter before every item
        story[:, :, 1:, :W] = item_bits
        x[:, : n * (K + 1)] = story.reshape(B, n * (K + 1), W + 2)
        q0 = n * (K + 1)
        rows = torch.arange(B)
        x[:, q0, W + 1] = 1.0  # query delimiter
        x[:, q0 + 1: q0 + 1 + K, :W] = item_bits[rows, query]
        x[:, q0 + 1 + K, W + 1] = 1.0  # query delimiter
        y = torch.zeros(B, T, W)
        y[:, T - K:] = item_bits[rows, query + 1]
        mask = torch.zeros(B, T)
        mask[:, T - K:] = 1.0
        return {"x": x, "y": y, "mask": mask}


# ----------------------------------------------------------------------------------------------
# ACT paper (Graves 2016, arXiv:1603.08983), section 3.1: parity

@dataclass
class ParityConfig:
    input_size: int = 64  # section 3.1: 64-element vectors
    eval_samples: int = 4096  # fresh test vectors

    def __post_init__(self):
        _check_positive(self, "input_size", "eval_samples")


class Parity(SequenceTask):
    """One vector per sequence (T = 1): its first k entries (k uniform in 1..input_size) are
    +1 or -1 at random, the rest 0; the target is 1 when the number of +1 entries is odd.
    Metrics: err, the % of wrong answers, and ponder, the mean ponder cost, for ACT models."""

    metric = "err"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.spec = {"kind": self.kind, "input_size": config.input_size, "output_size": 1}
        self.eval_settings = {str(config.input_size): {}}
        self.bench_setting = str(config.input_size)

    def sample_train_setting(self, generator):
        return {}

    def make_batch(self, batch_size, generator):
        n = self.config.input_size
        nonzero = torch.randint(1, n + 1, (batch_size, 1), generator=generator)  # how many entries are set
        signs = torch.randint(0, 2, (batch_size, n), generator=generator).float() * 2 - 1
        x = signs * (torch.arange(n) < nonzero)  # (B, n): the first `nonzero` entries are +-1
        y = ((x == 1).sum(-1) % 2).float()  # odd number of +1 entries
        return {"x": x.unsqueeze(1), "y": y.view(batch_size, 1, 1), "mask": torch.ones(batch_size, 1)}

    def metrics(self, logits, batch, internals):
        wrong = ((logits > 0).float() != batch["y"]).float().sum().item()
        return {"err": 100.0 * wrong, "count": logits.shape[0], **ponder_sum(internals)}

    def figure_panels(self, logits, batch, internals):
        """Paper Fig. 6 as a 2-D histogram: ponder steps (rows, 1 at the top) against the number
        of non-zero inputs (columns), each column normalised; and right/wrong per column."""
        if "steps" not in internals:
            return []
        nonzero = (batch["x"][:, 0] != 0).sum(-1)  # (B,)
        steps = internals["steps"][:, 0].long()
        n, top = self.config.input_size, int(steps.max())
        counts = torch.zeros(top, n)
        counts.index_put_((steps - 1, nonzero - 1), torch.ones(len(steps)), accumulate=True)
        return [("ponder steps vs nonzero inputs", counts / counts.sum(0, keepdim=True).clamp(min=1))]


# ----------------------------------------------------------------------------------------------
# ACT paper, section 3.3: addition

@dataclass
class AdditionConfig:
    max_numbers: int = 5  # section 3.3: sequences of 1 to 5 numbers
    max_digits: int = 5  # section 3.3: each number has D digits, D uniform in 1..5
    eval_samples: int = 1024  # test sequences

    def __post_init__(self):
        _check_positive(self, "max_numbers", "max_digits", "eval_samples")


class Addition(SequenceTask):
    """Each input is a number of D digits as D one-hot blocks of 10, most significant first, then
    zeros (input size 10 * max_digits). The target at every step but the first is the running sum,
    as max_digits + 1 classifications over 11 classes: the digits, most significant first, then
    class 10 ('*') for the places after the end of the number. Sequences in a batch have their own
    lengths; 'valid' marks the steps that hold an input. Metric seq_err: % of sequences (with at
    least one target) that get any digit wrong; ponder: mean ponder cost per input step."""

    metric = "seq_err"
    classes = 11

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.places = config.max_digits + 1  # the sum of 5 five-digit numbers has at most 6 digits
        self.spec = {"kind": self.kind, "input_size": 10 * config.max_digits,
                     "output_size": self.places * self.classes}
        self.eval_settings = {f"{config.max_numbers}x{config.max_digits}": {}}
        self.bench_setting = next(iter(self.eval_settings))

    def sample_train_setting(self, generator):
        return {}

    def digits(self, numbers, places):
        """numbers (...) -> (..., places) digit classes, most significant first, 10 after the end."""
        length = numbers.clamp(min=1).float().log10().floor().long() + 1  # how many digits
        power = 10 ** (length.unsqueeze(-1) - 1 - torch.arange(places))  # place value of each slot
        digit = torch.div(numbers.unsqueeze(-1), power.clamp(min=1), rounding_mode="floor") % 10
        return torch.where(power >= 1, digit, torch.full_like(digit, 10))

    def make_batch(self, batch_size, generator):
        c, B, T = self.config, batch_size, self.config.max_numbers
        lengths = torch.randint(1, T + 1, (B, 1), generator=generator)
        valid = (torch.arange(T) < lengths).float()  # (B, T): steps with an input
        num_digits = torch.randint(1, c.max_digits + 1, (B, T), generator=generator)
        raw = torch.randint(0, 10, (B, T, c.max_digits), generator=generator)
        used = torch.arange(c.max_digits) < num_digits.unsqueeze(-1)  # (B, T, max_digits)
        onehot = F.one_hot(raw, 10).float() * used.unsqueeze(-1)  # unused places are zeros
        x = onehot.reshape(B, T, 10 * c.max_digits) * valid.unsqueeze(-1)
        place = 10 ** (num_digits.unsqueeze(-1) - 1 - torch.arange(c.max_digits)).clamp(min=0)
        numbers = (raw * place * used).sum(-1) * valid.long()  # (B, T), the value of each input
        targets = self.digits(numbers.cumsum(1), self.places)  # (B, T, places)
        mask = valid.clone()
        mask[:, 0] = 0.0  # no target for the first number (section 3.3)
        return {"x": x, "y": targets, "mask": mask, "valid": valid}

    def loss(self, logits, batch):
        """Joint cross-entropy of the digit classifications, summed over places, mean over scored steps."""
        B, T = batch["mask"].shape
        ce = F.cross_entropy(logits.float().reshape(B * T * self.places, self.classes),
                             batch["y"].reshape(-1), reduction="none").view(B, T, self.places).sum(-1)
        return (ce * batch["mask"]).sum() / batch["mask"].sum().clamp(min=1)

    def metrics(self, logits, batch, internals):
        B, T = batch["mask"].shape
        predicted = logits.reshape(B, T, self.places, self.classes).argmax(-1)
        wrong_step = (predicted != batch["y"]).any(-1).float() * batch["mask"]  # (B, T)
        scored = batch["mask"].sum(1) > 0  # sequences of one number have nothing to score
        result = {"seq_err": 100.0 * (wrong_step.sum(1) > 0).sum().item(), "count": int(scored.sum())}
        if "ponder_cost" in internals:  # mean over the steps that hold an input, per sequence
            per_seq = (internals["ponder_cost"] * batch["valid"]).sum(1) / batch["valid"].sum(1)
            result["ponder"] = (per_seq * scored).sum().item()
        return result

    def figure_panels(self, logits, batch, internals, index=0):
        """Target and predicted digit classes (rows: places, columns: steps), and ponder per step."""
        B, T = batch["mask"].shape
        keep = batch["valid"][index] > 0
        predicted = logits[index].reshape(T, self.places, self.classes).argmax(-1)
        panels = [("target digits", batch["y"][index][keep].T / 10), ("predicted digits", predicted[keep].T / 10)]
        if "ponder_cost" in internals:
            ponder = internals["ponder_cost"][index][keep].unsqueeze(0)
            panels.append(("ponder per input", ponder / ponder.max()))
        return panels


# ----------------------------------------------------------------------------------------------

TASKS = {  # name -> (config class, task class)
    "copy": (CopyConfig, Copy),
    "repeat_copy": (RepeatCopyConfig, RepeatCopy),
    "associative_recall": (AssociativeRecallConfig, AssociativeRecall),
    "parity": (ParityConfig, Parity),
    "addition": (AdditionConfig, Addition),
}
