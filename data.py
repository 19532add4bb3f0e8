"""
The tasks. Each one knows its problem and nothing about models:
- its config dataclass (every field becomes a train.py flag),
- `spec`: what its inputs and targets look like, so train.py can size a model,
- `train_batch(batch_size, generator)`: a fresh seeded batch from the training distribution,
- `eval_settings`: the generalisation settings, declared in one place, and `eval_batch(...)`,
- `loss(logits, batch)` and `metrics(logits, batch, internals)` (internals: what the model
  returned beside its outputs, e.g. an ACT model's ponder cost),
- `figure_panels(logits, batch, internals)`: 2-D arrays in [0, 1] that train.py draws,
- `bench_setting`: the evaluation setting bench.py times training on (a fixed shape),
- `eval_count(setting)` and `metric_key(metric, setting)`: how many test samples a setting has and
  the name its metrics get in metrics.json ('<metric>@<setting>' unless the task says otherwise),
- optionally `selection_settings` and `selection_metric`: a task with a validation split (seqmnist)
  has train.py evaluate only those settings during training, keep the checkpoint where
  `selection_metric` is highest (lowest, ties to the later checkpoint, where `selection_minimise`),
  and report every setting (the test sets) for that checkpoint.

A batch is a dict of tensors. Sequence tasks give x (B, T, in), targets y (B, T, ...) and
mask (B, T), 1 where the model is scored. Everything is generated on the fly from a torch.Generator, so
the same seed gives the same data. Add a task: write its class here and add it to TASKS.
Optional hooks: `model_inputs`, the batch keys the model takes as keyword tensors beside x (e.g. a
padding mask, or a sequence-to-sequence task's targets y for the decoder; train.py passes each one
the model's forward accepts); `eval_data(chunk, generator)`, the evaluation batches when they come
from a dataset's test files rather than eval_batch; `eval_count(setting)`, the samples per setting (default eval_samples);
`metric_key(metric, setting)`, the metrics.json name (default '<metric>@<setting>');
`finish_metrics(totals, count)`, the final values from the summed metrics (default: totals / count);
`summary(results)`, metrics over all settings (e.g. bAbI's mean error).

Real datasets (bAbI) are downloaded from their canonical URL on first use, checksum-verified, and
read offline after that; a missing or corrupt file raises DataError (train.py prints one line).
"""

import gzip
import hashlib
import itertools
import math
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class DataError(Exception):
    """A dataset file that is missing, corrupt or cannot be fetched; the message names the fix."""


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


def halting_sums(internals, real, prefix=""):
    """For models that halt per position (the UT): per sequence, the mean over its real positions of
    the ponder cost rho = N + R (ponder), of the number of steps N (steps) and the % of positions with
    N = 1 (one_step), summed over the batch. A position that halts at its first step has rho = 2 (N = 1,
    R = 1), so rho 2.0 means one step, not two. prefix: "" (encoder) or "decoder_"."""
    if prefix + "ponder_cost" not in internals:
        return {}
    real = real.float()
    per_seq = lambda t: ((t.float() * real).sum(1) / real.sum(1).clamp(min=1)).sum().item()
    steps = internals[prefix + "steps"]
    return {prefix + "ponder": per_seq(internals[prefix + "ponder_cost"]), prefix + "steps": per_seq(steps),
            prefix + "one_step": 100 * per_seq(steps == 1)}


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
    # keep the checkpoint with the fewest wrong bits on fixed validation sequences of length max_len
    # (training lengths only; drawn after the test sets, which stay as they were); False: the last step
    validation: bool = True

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
        if config.validation:  # NTM training is prone to sudden collapses late in training (docs/ntm.md)
            self.eval_settings[f"val{config.max_len}"] = {"length": config.max_len}
            self.selection_settings = tuple(self.eval_settings)  # the test lengths too: log.jsonl shows them
            self.selection_metric, self.selection_minimise = f"bit_err@val{config.max_len}", True

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
    """Input: L random vectors, one step with the delimiter channel on, then one step with the
    repeat count R on a second extra channel, normalised to mean 0 and variance 1 over the
    training counts (section 4.2: "normalised to have mean zero and variance one"; uniform
    1..10 gives (R - 5.5) / 2.87). Output: the sequence R times, then an end marker on an extra
    output channel."""

    bench_setting = "10x10"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        W = config.width
        self.spec = {"kind": self.kind, "input_size": W + 2, "output_size": W + 1}
        self.eval_settings = {s: dict(zip(("length", "repeats"), map(int, s.split("x"))))
                              for s in config.eval_settings}
        # mean and standard deviation of a count drawn uniformly from min_repeats..max_repeats
        n = config.max_repeats - config.min_repeats + 1
        self.count_mean = (config.min_repeats + config.max_repeats) / 2
        self.count_std = max(((n * n - 1) / 12) ** 0.5, 1.0)  # one training count: leave it unscaled

    def sample_train_setting(self, generator):
        c = self.config
        return {"length": _randint(c.min_len, c.max_len, generator),
                "repeats": _randint(c.min_repeats, c.max_repeats, generator)}

    def make_batch(self, batch_size, generator, length, repeats):
        W, L, R = self.config.width, length, repeats
        T = L + 2 + L * R + 1
        bits = _bits((batch_size, L, W), generator)
        x = torch.zeros(batch_size, T, W + 2)
        x[:, :L, :W] = bits
        x[:, L, W] = 1.0  # delimiter
        x[:, L + 1, W + 1] = (R - self.count_mean) / self.count_std  # how many copies, on its own step
        y = torch.zeros(batch_size, T, W + 1)
        y[:, L + 2: L + 2 + L * R, :W] = bits.repeat(1, R, 1)
        y[:, T - 1, W] = 1.0  # end marker
        mask = torch.zeros(batch_size, T)
        mask[:, L + 2:] = 1.0
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
# RIMs paper (Goyal et al. 2019, arXiv:1909.10893), section 4.1 and Table 1: copying over a delay

@dataclass
class CopyDelayConfig:
    num_symbols: int = 8  # symbols 1..8 (0 is the blank, num_symbols + 1 the delimiter)
    length: int = 10  # symbols to remember and reproduce
    delay: int = 50  # T, Table 1: trained with T = 50
    eval_delays: tuple = (50, 200)  # Table 1: tested with T = 200
    eval_samples: int = 512  # test sequences per delay
    null_blank: bool = False  # True: the blank is the all-zero input (no channel of its own), an ablation

    def __post_init__(self):
        _check_positive(self, "num_symbols", "length", "delay", "eval_samples")
        if not self.eval_delays or min(self.eval_delays) < 1:
            raise ValueError(f"eval_delays must be positive, got {self.eval_delays}")


class CopyDelay(SequenceTask):
    """Tokens: `length` symbols drawn uniformly from 1..num_symbols, then T - 1 blanks (0), the
    delimiter (num_symbols + 1), then `length` blanks during which the symbols must be reproduced
    in order: length + T + length steps. Inputs are one-hot over every token, the blank included, so a
    model's bias-free input map is a lookup table of all of them, as the official RIMs code embeds
    every token (nn.Embedding). With null_blank the blank is the zero vector instead: RIMs' null input
    (an ablation). Targets are token ids over the whole vocabulary, the blank everywhere but the
    recall positions.
    Only the `length` recall positions are scored: averaged over all positions, a model that
    always answers blank would look almost perfect. Metrics: ce, the mean cross-entropy (nats)
    per recall position, and acc, the % of recalled symbols right; drop@T, the points of acc lost
    from the training delay to a longer test delay T."""

    metric = "acc"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.vocab = config.num_symbols + 2
        self.spec = {"kind": self.kind, "input_size": self.vocab - config.null_blank, "output_size": self.vocab}
        self.eval_settings = {str(t): {"delay": t} for t in config.eval_delays}
        self.bench_setting = str(config.delay)

    def sample_train_setting(self, generator):
        return {"delay": self.config.delay}

    def make_batch(self, batch_size, generator, delay):
        c, B = self.config, batch_size
        T = c.length + delay + c.length
        symbols = torch.randint(1, c.num_symbols + 1, (B, c.length), generator=generator)
        tokens = torch.zeros(B, T, dtype=torch.long)
        tokens[:, : c.length] = symbols
        tokens[:, c.length + delay - 1] = c.num_symbols + 1  # the delimiter, after T - 1 blanks
        y = torch.zeros(B, T, dtype=torch.long)
        y[:, T - c.length:] = symbols
        mask = torch.zeros(B, T)
        mask[:, T - c.length:] = 1.0
        x = F.one_hot(tokens, self.vocab)[..., int(c.null_blank):].float()  # null_blank: the blank (0) is all zeros
        return {"x": x, "y": y, "mask": mask}

    def loss(self, logits, batch):
        """Cross-entropy on the recall positions, mean per position."""
        ce = F.cross_entropy(logits.float().transpose(1, 2), batch["y"], reduction="none")  # (B, T)
        return (ce * batch["mask"]).sum() / batch["mask"].sum()

    def metrics(self, logits, batch, internals):
        mask = batch["mask"]
        ce = F.cross_entropy(logits.float().transpose(1, 2), batch["y"], reduction="none")
        right = (logits.argmax(-1) == batch["y"]).float()
        per_seq = mask.sum(1)
        return {"ce": ((ce * mask).sum(1) / per_seq).sum().item(),
                "acc": 100.0 * ((right * mask).sum(1) / per_seq).sum().item(), "count": logits.shape[0]}

    def summary(self, results):
        """drop@T: the recall accuracy lost from the training delay to each longer test delay T, in points
        (when the training delay is one of eval_delays): how well copying generalises to longer delays."""
        trained = f"acc@{self.config.delay}"
        if trained not in results:
            return {}
        return {f"drop@{t}": results[trained] - results[f"acc@{t}"] for t in self.config.eval_delays
                if t > self.config.delay and f"acc@{t}" in results}

    def figure_panels(self, logits, batch, internals, index=0):
        """Input tokens over time, then target and output distributions over the recall positions."""
        keep = batch["mask"][index] > 0
        target = F.one_hot(batch["y"][index][keep], self.vocab).float().T
        return [("input tokens", batch["x"][index].T), ("target", target),
                ("output", torch.softmax(logits[index].float(), -1)[keep].T)]


# ----------------------------------------------------------------------------------------------
# Datasets on disk: fetched once, verified, then read offline.

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanosystem2")


def file_digest(path, algorithm="sha256"):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, path, digest, algorithm="sha256"):
    """Fetch url to path unless it is already there; raise DataError unless its digest (sha256 or
    md5, as the dataset publishes it) matches. Written whole or not at all: a failed or corrupt
    download leaves nothing at path."""
    if not os.path.exists(path):
        folder = os.path.abspath(os.path.dirname(path) or ".")
        created = []  # the folders made for this download, removed again if it fails
        while not os.path.exists(folder):
            created.append(folder)
            folder = os.path.dirname(folder)
        tmp = f"{path}.part"

        def clean_up():
            if os.path.exists(tmp):
                os.remove(tmp)
            for made in created:  # innermost first; only folders this call made, and only if empty
                if os.path.isdir(made) and not os.listdir(made):
                    os.rmdir(made)

        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            clean_up()
            raise DataError(f"could not download {url} ({e}): fetch it by hand into {os.path.dirname(path)} "
                            "or pass --data_dir to a verified copy")
        found = file_digest(tmp, algorithm)
        if found != digest:
            clean_up()
            raise DataError(f"{url} has {algorithm} {found}, expected {digest} (wrong {algorithm}): the download "
                            "is corrupt or changed; try again, or pass --data_dir to a verified copy")
        os.replace(tmp, path)
    elif file_digest(path, algorithm) != digest:
        raise DataError(f"{path} does not have {algorithm} {digest} (wrong {algorithm}): delete it to download it "
                        "again, or pass --data_dir to a verified copy")
    return path


def extract_tar(archive, dest, strip, keep):
    """Unpack the regular files of archive whose names, less the prefix strip, start with one of keep,
    into dest. Names are checked (no absolute paths, no '..', no links), so nothing lands outside
    dest; the folders of keep appear whole or not at all."""
    staging = f"{dest}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name[len(strip):] if member.name.startswith(strip) else None
                if not name or not member.isfile() or not name.startswith(keep):
                    continue
                parts = name.split("/")
                if os.path.isabs(name) or ".." in parts:
                    raise DataError(f"{archive} holds an unsafe path {member.name!r}: delete it")
                target = os.path.join(staging, *parts)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive} is not a readable tar archive ({e}): delete it to download it again")
    os.makedirs(dest, exist_ok=True)
    for folder in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
        if not os.path.exists(os.path.join(dest, folder)):
            os.replace(os.path.join(staging, folder), os.path.join(dest, folder))
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# bAbI (Weston et al. 2015, arXiv:1502.05698), as the UT paper trains on it (its bAbI experiments, Table 1)

BABI_URL = "http://www.thespermwhale.com/jaseweston/babi/tasks_1-20_v1-2.tar.gz"
BABI_SHA256 = "0364ebde659f14d11bc21744516c5ec49d3d06cb692733f66680771244998898"
BABI_NAMES = {1: "single-supporting-fact", 2: "two-supporting-facts", 3: "three-supporting-facts",
              4: "two-arg-relations", 5: "three-arg-relations", 6: "yes-no-questions", 7: "counting",
              8: "lists-sets", 9: "simple-negation", 10: "indefinite-knowledge", 11: "basic-coreference",
              12: "conjunction", 13: "compound-coreference", 14: "time-reasoning", 15: "basic-deduction",
              16: "basic-induction", 17: "positional-reasoning", 18: "size-reasoning", 19: "path-finding",
              20: "agents-motivations"}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nanosystem2")


def babi_words(text):
    """'Mary moved to the bathroom.' -> ['mary', 'moved', 'to', 'the', 'bathroom']"""
    return text.lower().replace(".", " ").replace("?", " ").split()


def parse_babi(path):
    """One bAbI file -> a list of questions, each a dict: facts (the story's statements before the
    question, each a list of words; earlier questions are left out), question (words), answer (the
    answer string: 'n,w' for path finding is one class), supporting (indices into facts)."""
    samples, facts, fact_index = [], [], {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            number, text = line.strip().split(" ", 1)
            if number == "1":  # line numbers restart with every story
                facts, fact_index = [], {}
            if "\t" in text:
                question, answer, support = text.split("\t")
                samples.append({"facts": list(facts), "question": babi_words(question), "answer": answer.strip(),
                                "supporting": [fact_index[int(s)] for s in support.split()]})
            else:
                fact_index[int(number)] = len(facts)
                facts.append(babi_words(text))
    return samples


@dataclass
class BabiConfig:
    tasks: tuple = (1,)  # bAbI task numbers 1-20; one task = single-task training, several = joint
    split: str = "en-10k"  # 'en-10k' (10K training questions per task) or 'en' (1K)
    max_facts: int = 130  # keep the last max_facts statements of a story (the UT authors: 130, task 3's longest)
    # "story_first": the UT authors' layout, the facts then the question as the last row, the question's
    # words under their own positional mask, the answer from the mean over rows; "question_first": row 0
    # the question, one positional mask for every row, the answer read at row 0
    layout: str = "story_first"

    def __post_init__(self):
        if not self.tasks or any(t not in BABI_NAMES for t in self.tasks):
            raise ValueError(f"tasks must be bAbI task numbers 1-20, got {self.tasks}")
        if self.split not in ("en", "en-10k"):
            raise ValueError(f"split must be 'en' or 'en-10k', got {self.split!r}")
        if self.layout not in ("story_first", "question_first"):
            raise ValueError(f"layout must be 'story_first' or 'question_first', got {self.layout!r}")
        _check_positive(self, "max_facts")


class Babi:
    """Each question becomes one sample: x (S, W) word ids, one row per fact of the story in order and
    one for the question, W words per row; padding_mask (S,) marks the real rows, question_rows (S,)
    the question's; y the answer class. Layout story_first (the UT authors'): the facts, then the
    question as the last real row, the answer read from the mean of the outputs over the real rows;
    question_first: the question at row 0, the facts after it, the answer read at row 0. Word ids
    and answer classes come from the training files only
    (0 is padding, 1 an unknown word; a test answer never seen in training is always wrong).
    Metrics per task: err, the % of wrong answers on its test file, and for models that halt ponder
    (rho = N + R), steps (N) and one_step (% of rows with N = 1) per row (halting_sums); summary:
    mean_err and failed (tasks with err > 5)."""

    kind = "story"
    model_inputs = ("padding_mask", "question_rows")

    def __init__(self, config, data_dir=None):
        self.config = config
        root = data_dir or os.path.join(DEFAULT_CACHE, "babi")
        folder = os.path.join(root, config.split)
        if not os.path.isdir(folder):  # first use: fetch the official tarball into root
            try:
                archive = download(BABI_URL, os.path.join(root, "tasks_1-20_v1-2.tar.gz"), BABI_SHA256)
            except DataError as e:
                raise DataError(f"no {config.split}/ folder in {root} (--data_dir) and no bAbI there to unpack: {e}")
            extract_tar(archive, root, "tasks_1-20_v1-2/", ("en/", "en-10k/"))
        files = {(t, part): os.path.join(folder, f"qa{t}_{BABI_NAMES[t]}_{part}.txt")
                 for t in config.tasks for part in ("train", "test")}
        for path in files.values():
            if not os.path.isfile(path):
                raise DataError(f"missing {path}: --data_dir must hold en/ and en-10k/ as the bAbI v1.2 tarball's "
                                "tasks_1-20_v1-2/ folder does (or leave --data_dir out to download it)")
        train = {t: parse_babi(files[t, "train"]) for t in config.tasks}
        test = {t: parse_babi(files[t, "test"]) for t in config.tasks}
        words = sorted({w for t in train for s in train[t] for w in s["question"] + sum(s["facts"], [])})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 padding, 1 unknown
        self.answers = {a: i for i, a in enumerate(sorted({s["answer"] for t in train for s in train[t]}))}
        self.sentence_length = max(len(row) for t in train for s in train[t] for row in [s["question"]] + s["facts"])
        self.spec = {"kind": self.kind, "vocab_size": len(self.vocab) + 2, "output_size": len(self.answers),
                     "sentence_length": self.sentence_length,
                     "question_position_mask": config.layout == "story_first"}
        self.train_data = self.encode([s for t in config.tasks for s in train[t]])
        self.test_data = {f"qa{t}": self.encode(test[t]) for t in config.tasks}
        self.eval_settings = {name: {} for name in self.test_data}
        self.bench_setting = next(iter(self.eval_settings))

    def encode(self, samples):
        """-> x (N, 1 + max_facts, W) int32 word ids, lengths (N,) real rows, question (N,) the question's
        row, y (N,) answer classes."""
        S, W = 1 + self.config.max_facts, self.sentence_length
        story_first = self.config.layout == "story_first"
        ids, lengths, question, y = [], [], [], []
        for sample in samples:
            facts = sample["facts"][-self.config.max_facts:]
            rows = facts + [sample["question"]] if story_first else [sample["question"]] + facts
            rows = [[self.vocab.get(w, 1) for w in row[:W]] for row in rows]
            ids.append([row + [0] * (W - len(row)) for row in rows] + [[0] * W] * (S - len(rows)))
            lengths.append(len(rows))
            question.append(len(rows) - 1 if story_first else 0)
            y.append(self.answers.get(sample["answer"], -100))  # -100: unseen in training, never right
        return {"x": torch.tensor(ids, dtype=torch.int32).view(len(samples), S, W),
                "lengths": torch.tensor(lengths), "question": torch.tensor(question), "y": torch.tensor(y)}

    @staticmethod
    def batch_of(data, index):
        lengths = data["lengths"][index]
        S = int(lengths.max())  # pad to the longest story in this batch only
        rows = torch.arange(S)
        return {"x": data["x"][index, :S].long(), "y": data["y"][index], "padding_mask": rows < lengths.unsqueeze(1),
                "question_rows": rows == data["question"][index].unsqueeze(1)}

    def readout(self, logits, batch):
        """The answer logits (B, classes): the mean over the real rows (story_first, as tensor2tensor's
        class-label output pools), or row 0 (question_first)."""
        if self.config.layout == "question_first":
            return logits[:, 0].float()
        real = batch["padding_mask"].unsqueeze(-1).float()
        return (logits.float() * real).sum(1) / real.sum(1)

    def train_batch(self, batch_size, generator):
        index = torch.randint(0, len(self.train_data["y"]), (batch_size,), generator=generator)
        return self.batch_of(self.train_data, index)

    def eval_batch(self, setting, batch_size, generator):
        """The first batch_size questions of the task's test file."""
        return self.batch_of(self.test_data[setting], torch.arange(min(batch_size, len(self.test_data[setting]["y"]))))

    def eval_data(self, chunk, generator):
        """Every question of each task's test file, in order."""
        return {name: [self.batch_of(data, torch.arange(i, min(i + chunk, len(data["y"]))))
                       for i in range(0, len(data["y"]), chunk)] for name, data in self.test_data.items()}

    def loss(self, logits, batch):
        """Cross-entropy of the answer (readout)."""
        return F.cross_entropy(self.readout(logits, batch), batch["y"], ignore_index=-100)

    def metrics(self, logits, batch, internals):
        wrong = (self.readout(logits, batch).argmax(-1) != batch["y"]).float().sum().item()
        result = {"err": 100.0 * wrong, "count": len(batch["y"])}
        return result | halting_sums(internals, batch["padding_mask"])  # per story over its real rows

    def summary(self, results):
        """UT paper Table 1: the mean error over the tasks and the number of failed tasks (> 5 %)."""
        errors = [results[f"err@{name}"] for name in self.test_data]
        return {"mean_err": sum(errors) / len(errors), "failed": sum(e > 5 for e in errors)}

    def figure_panels(self, logits, batch, internals, index=0):
        """UT paper Fig. 3: ponder time and steps N per row (the rows in input order: facts, then the
        question for story_first); and, question_first, the attention of the question over the rows at
        each step, averaged over heads (one row per step)."""
        S = int(batch["padding_mask"][index].sum())
        order = "facts, then question" if self.config.layout == "story_first" else "question, then facts"
        panels = []
        if "ponder_cost" in internals:
            ponder = internals["ponder_cost"][index, :S].float().unsqueeze(0)
            steps = internals["steps"][index, :S].float().unsqueeze(0)
            panels.append((f"ponder per row, {order} (max {ponder.max():.1f})", ponder / ponder.max()))
            panels.append((f"steps n per row (max {int(steps.max())})", steps / steps.max()))
        if "first_position_attention" in internals and self.config.layout == "question_first":
            attention = internals["first_position_attention"][index, :, :, :S].float().mean(1)  # (K, S)
            panels.append(("question attention per step", attention / attention.max(-1, keepdim=True).values))
        return panels


# ----------------------------------------------------------------------------------------------
# UT paper, algorithmic tasks: Copy, Reverse and Addition on decimal strings

@dataclass
class AlgorithmicConfig:
    min_len: int = 1  # training lengths uniform in min_len..max_len (addition: at least 3)
    max_len: int = 40  # the paper trains on strings of length 40
    eval_lengths: tuple = (40, 400)  # and evaluates on length 400
    # tensor2tensor's algorithmic_*_decimal40 dev set: each string's length uniform in 1..400 ("lo-hi")
    eval_ranges: tuple = ("1-400",)
    random_offset: bool = True  # the paper: positions start at a random offset in training
    eval_samples: int = 128  # test sequences per length

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not (self.eval_lengths or self.eval_ranges) or min(self.eval_lengths, default=1) < 1:
            raise ValueError(f"eval_lengths must be positive, got {self.eval_lengths}")
        for r in self.eval_ranges:
            parts = r.split("-")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
                raise ValueError(f"eval_ranges look like '1-400' (lengths uniform in 1..400), got {r!r}")
        _check_positive(self, "eval_samples")


class Algorithmic(SequenceTask):
    """Sequence to sequence, as the UT paper's algorithmic tasks (section 3.3): the input is a string of
    decimal digits as token ids 1-10 (digit + 1; 11 is '+', 0 padding), the output a string of digit
    classes y (B, U) that a decoder writes one at a time, scored where mask is 1. Training positions
    (of input and output alike) start at an offset uniform in 0..max(eval_lengths) - length
    (position_offset), so the positions of the long test strings have been seen. Test settings: a fixed
    length ("400"), or lengths uniform in a range ("1-400", as tensor2tensor's dev set; the strings of a
    batch are padded at the end, padding_mask marks the real inputs and mask the scored outputs).
    Metrics: char_acc, the fraction of scored output digits right, averaged over sequences;
    token_char_acc, the same over all scored digits of the setting (long strings weigh more, as
    tensor2tensor's metric); seq_acc, the fraction of sequences with every scored digit right
    (evaluation decodes greedily: no true digit is fed back); for models that report them, ponder
    (rho) and steps (N) per position, encoder and decoder_*, and one_step, the % of positions that
    take a single step."""

    kind = "seq2seq"
    model_inputs = ("position_offset", "y", "padding_mask")  # y: the decoder's length, and its inputs when teacher forcing
    min_length = 1  # the shortest string encode() can make

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.spec = {"kind": self.kind, "vocab_size": 12, "output_size": 10, "decoder": True}
        self.eval_settings = {str(n): {"length": n, "offset": False} for n in config.eval_lengths}
        for r in config.eval_ranges:
            low, high = map(int, r.split("-"))
            self.eval_settings[r] = {"length": high, "offset": False, "shortest": max(low, self.min_length)}
        self.bench_setting = str(config.max_len) if config.max_len in config.eval_lengths else next(iter(self.eval_settings))

    def sample_train_setting(self, generator):
        return {"length": _randint(self.config.min_len, self.config.max_len, generator), "offset": self.config.random_offset}

    def make_batch(self, batch_size, generator, length, offset, shortest=None):
        if shortest is not None:  # a test batch of lengths uniform in shortest..length, padded
            return self.mixed_batch(batch_size, generator, shortest, length)
        digits = torch.randint(0, 10, (batch_size, length), generator=generator)
        x, y, mask = self.encode(digits, generator)
        longest = max([*self.config.eval_lengths, *(int(r.split("-")[1]) for r in self.config.eval_ranges)])
        top = max(longest - length, 0)
        position_offset = torch.randint(0, top + 1, (batch_size,), generator=generator) if offset else torch.zeros(batch_size, dtype=torch.long)
        return {"x": x, "y": y, "mask": mask, "position_offset": position_offset}

    def mixed_batch(self, batch_size, generator, shortest, longest):
        """Strings of lengths uniform in shortest..longest, each encoded alone, padded at the end: x and
        padding_mask (B, S), y and mask (B, U) with mask 0 past each string's output."""
        lengths = torch.randint(shortest, longest + 1, (batch_size,), generator=generator).tolist()
        samples = [self.encode(torch.randint(0, 10, (1, n), generator=generator), generator) for n in lengths]
        S, U = max(lengths), max(y.shape[1] for _, y, _ in samples)
        x, y, mask = torch.zeros(batch_size, S, dtype=torch.long), torch.zeros(batch_size, U, dtype=torch.long), torch.zeros(batch_size, U)
        for b, (xb, yb, mb) in enumerate(samples):
            x[b, :xb.shape[1]], y[b, :yb.shape[1]], mask[b, :mb.shape[1]] = xb[0], yb[0], mb[0]
        return {"x": x, "y": y, "mask": mask, "padding_mask": torch.arange(S) < torch.tensor(lengths).unsqueeze(1),
                "position_offset": torch.zeros(batch_size, dtype=torch.long)}

    def loss(self, logits, batch):
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten(), reduction="none").view_as(batch["mask"])
        return (ce * batch["mask"]).sum() / batch["mask"].sum()

    def metrics(self, logits, batch, internals):
        right = (logits.argmax(-1) == batch["y"]).float() * batch["mask"]
        per_seq = right.sum(1) / batch["mask"].sum(1)
        result = {"char_acc": per_seq.sum().item(), "seq_acc": (per_seq == 1).float().sum().item(), "count": len(per_seq),
                  "right_chars": right.sum().item(), "scored_chars": batch["mask"].sum().item()}
        real = batch.get("padding_mask", torch.ones(batch["x"].shape[:2], dtype=torch.bool, device=logits.device)).float()
        for prefix, where in (("", real), ("decoder_", batch["mask"])):  # decoder: the scored outputs
            result.update(halting_sums(internals, where, prefix))
        return result

    def finish_metrics(self, totals, count):
        """Means over the setting's sequences, and token_char_acc over all its scored digits."""
        right, scored = totals.pop("right_chars"), totals.pop("scored_chars")
        return {**{k: v / count for k, v in totals.items()}, "token_char_acc": right / max(scored, 1)}

    def figure_panels(self, logits, batch, internals, index=0):
        """Target and greedy output digits (the scored ones); ponder (rho) and steps (N) per input and output
        position (rho = N + R: a position with N = 1 has rho = 2)."""
        keep = batch["mask"][index] > 0
        panels = [("target", batch["y"][index][keep].unsqueeze(0) / 9),
                  ("output", logits[index].argmax(-1)[keep].unsqueeze(0) / 9)]
        for prefix in ("", "decoder_"):
            if f"{prefix}ponder_cost" in internals:
                ponder = internals[f"{prefix}ponder_cost"][index].float().unsqueeze(0)
                steps = internals[f"{prefix}steps"][index].float().unsqueeze(0)
                panels.append((f"{prefix}ponder per position (max {ponder.max():.1f})", ponder / ponder.max()))
                panels.append((f"{prefix}steps n per position (max {int(steps.max())})", steps / steps.max().clamp(min=1)))
        return panels


class AlgoCopy(Algorithmic):
    """Copy: the output is the input string."""

    def encode(self, digits, generator):
        return digits + 1, digits, torch.ones(digits.shape)


class AlgoReverse(Algorithmic):
    """Reverse: the output is the input string backwards."""

    def encode(self, digits, generator):
        return digits + 1, digits.flip(1), torch.ones(digits.shape)


class AlgoAddition(Algorithmic):
    """Addition: the input is 'a+b' (la + 1 + lb = L digits and '+', la uniform in 1..L-2, leading zeros
    allowed), the output a + b in max(la, lb) + 1 digits; every number is written least significant
    digit first, as tensor2tensor's algorithmic addition (the generator the paper used) writes them.
    Outputs shorter than the batch's longest are padded at the end, where mask is 0."""

    min_length = 3  # 'a+b'

    def __init__(self, config, data_dir=None):
        if config.min_len < 3:
            raise ValueError("min_len must be at least 3 for addition (an input holds at least 'a+b'): "
                             "pass --min_len 3 or more")
        super().__init__(config, data_dir)

    def encode(self, digits, generator):
        B, L = digits.shape
        left = torch.randint(1, L - 1, (B, 1), generator=generator)  # la: '+' sits at position la
        column = torch.arange(L).expand(B, L)  # k: the 10^k place
        x = torch.where(column == left, 11, digits + 1)
        right = L - 1 - left  # lb
        a = torch.where(column < left, digits, 0)  # a's 10^k digit sits at position k
        b = torch.where(column < right, digits.gather(1, (left + 1 + column).clamp(max=L - 1)), 0)  # b's at la + 1 + k
        width = torch.maximum(left, right) + 1  # (B, 1)
        U = int(width.max())
        y, carry = torch.zeros(B, U, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        for k in range(U):  # schoolbook addition, one place at a time, for the whole batch
            place = a[:, k] + b[:, k] + carry
            y[:, k], carry = place % 10, place // 10
        mask = (torch.arange(U) < width).float()
        return x, y * mask.long(), mask


# ----------------------------------------------------------------------------------------------
# Slot Attention (Locatello et al. 2020, arXiv:2006.15055): multi-object sprites, generated here.
# Like Multi-dSprites (section 4.1): 2-5 shapes of several colours, sizes, positions and
# orientations, drawn in painter's order so later objects occlude earlier ones.

SHAPES = ("square", "ellipse", "triangle", "heart")
PALETTE = torch.tensor([[0.95, 0.15, 0.15], [0.15, 0.85, 0.2], [0.2, 0.35, 1.0], [1.0, 0.9, 0.1],
                        [0.95, 0.2, 0.9], [0.1, 0.9, 0.95], [1.0, 0.55, 0.05], [0.6, 0.35, 1.0]])
SIZES = (0.12, 0.16, 0.2)  # object scale (half-extent) as a fraction of the image side
BACKGROUNDS = ("black", "grey", "colour")


def shape_mask(shape, u, v):
    """Which points (u, v) of the unit object frame (u right, v down, about [-1, 1]) the shape covers."""
    if shape == "square":
        return (u.abs() <= 0.85) & (v.abs() <= 0.85)
    if shape == "ellipse":
        return u ** 2 + (v / 0.6) ** 2 <= 1
    if shape == "triangle":  # apex up at v = -1, base at v = 0.6
        return (v <= 0.6) & (u.abs() * 3 ** 0.5 <= v + 1)
    x, y = 1.15 * u, 0.15 - 1.15 * v  # heart: (x^2 + y^2 - 1)^3 <= x^2 y^3, point down
    return (x ** 2 + y ** 2 - 1) ** 3 <= x ** 2 * y ** 3


@dataclass
class SpritesConfig:
    image_size: int = 32  # CPU scale; 64 like Multi-dSprites (section 4.1)
    min_objects: int = 2  # Multi-dSprites: 2-5 objects per image
    max_objects: int = 5
    background: str = "black"  # black, grey, or colour (a random dull colour per image)
    min_visible: float = 0.3  # every object keeps at least this fraction of its area visible
    distinct_colours: bool = True  # no two objects of a scene share a colour (False: drawn with replacement,
    #                                so a grouping by colour alone would merge objects)
    signed: bool = True  # pixels in [-1, 1] as the official code feeds them (False: [0, 1])
    eval_samples: int = 320  # test images (the metrics are means over them)

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if self.distinct_colours and self.max_objects > len(PALETTE):
            raise ValueError(f"distinct colours allow at most {len(PALETTE)} objects, got max_objects {self.max_objects}: "
                             "lower it or pass --no-distinct_colours")
        _check_positive(self, "eval_samples")


def _uniform(generator, low=0.0, high=1.0):
    return low + (high - low) * float(torch.rand((), generator=generator))


class Sprites:
    """Object discovery. x: images (B, 3, H, W) in [-1, 1] (signed; else [0, 1]); segmentation (B, H, W) int64, 0 for the
    background and i for the i-th object drawn (painter's order: higher i on top); per object
    (M = max_objects, zero-padded): exists (B, M), position (B, M, 2) centre (x, y) in [0, 1] of the
    image side, shape, colour, size (B, M) class indices, angle (B, M) radians.
    Metrics (x100 where a percentage): fg_ari, ari, mbo (mean best overlap), mse; and what no learning
    scores on the same scenes: fg_ari and mbo of a fixed grid of K cells (grid_*) and of K horizontal
    stripes (stripes_*), K = the model's number of slots."""

    kind = "image"
    bench_setting = "test"

    def __init__(self, config, data_dir=None):
        self.config = config
        self.spec = {"kind": self.kind, "image_size": config.image_size, "in_channels": 3}
        self.eval_settings = {"test": {}}

    def train_batch(self, batch_size, generator):
        return self.make_batch(batch_size, generator)

    def eval_batch(self, setting, batch_size, generator):
        return self.make_batch(batch_size, generator, **self.eval_settings[setting])

    def make_scene(self, generator):
        c, S = self.config, self.config.image_size
        centres = (torch.arange(S) + 0.5)  # pixel centres
        py, px = torch.meshgrid(centres, centres, indexing="ij")
        count = _randint(c.min_objects, c.max_objects, generator)
        while True:  # rejection: every object keeps min_visible of its area and at least 4 pixels
            objects, masks = [], []
            colours = torch.randperm(len(PALETTE), generator=generator)[:count].tolist() if c.distinct_colours else None
            for o in range(count):
                shape, colour, size = (_randint(0, len(SHAPES) - 1, generator),
                                       colours[o] if colours else _randint(0, len(PALETTE) - 1, generator),
                                       _randint(0, len(SIZES) - 1, generator))
                radius = SIZES[size] * S
                cx, cy = _uniform(generator, radius, S - radius), _uniform(generator, radius, S - radius)
                angle = _uniform(generator, 0, 2 * math.pi)
                dx, dy = (px - cx) / radius, (py - cy) / radius
                u = dx * math.cos(angle) + dy * math.sin(angle)
                v = -dx * math.sin(angle) + dy * math.cos(angle)
                objects.append((shape, colour, size, cx / S, cy / S, angle))
                masks.append(shape_mask(SHAPES[shape], u, v))
            segmentation = torch.zeros(S, S, dtype=torch.long)
            for i, mask in enumerate(masks):  # painter's order
                segmentation[mask] = i + 1
            visible = [(segmentation == i + 1).sum() for i in range(count)]
            if all(vis >= max(4, c.min_visible * m.sum()) for vis, m in zip(visible, masks)):
                break
        if c.background == "black":
            background = torch.zeros(3)
        elif c.background == "grey":
            background = torch.full((3,), 0.5)
        else:  # a dull random colour, so the saturated palette stands out
            background = 0.15 + 0.35 * torch.rand(3, generator=generator)
        image = background.view(3, 1, 1).expand(3, S, S).clone()
        for i, (shape, colour, *_rest) in enumerate(objects):
            image[:, segmentation == i + 1] = PALETTE[colour].unsqueeze(1)
        return (2 * image - 1 if c.signed else image), segmentation, objects

    def to_display(self, images):
        """Task pixels -> [0, 1] for figures."""
        return ((images + 1) / 2 if self.config.signed else images).clamp(0, 1)

    def make_batch(self, batch_size, generator):
        c, S, M = self.config, self.config.image_size, self.config.max_objects
        x = torch.zeros(batch_size, 3, S, S)
        segmentation = torch.zeros(batch_size, S, S, dtype=torch.long)
        exists = torch.zeros(batch_size, M)
        position, angle = torch.zeros(batch_size, M, 2), torch.zeros(batch_size, M)
        shape, colour, size = (torch.zeros(batch_size, M, dtype=torch.long) for _ in range(3))
        for b in range(batch_size):  # scenes are built one by one (rejection sampling)
            x[b], segmentation[b], objects = self.make_scene(generator)
            for i, (sh, co, si, cx, cy, an) in enumerate(objects):
                exists[b, i], shape[b, i], colour[b, i], size[b, i] = 1.0, sh, co, si
                position[b, i] = torch.tensor([cx, cy])
                angle[b, i] = an
        return {"x": x, "segmentation": segmentation, "exists": exists, "position": position,
                "shape": shape, "colour": colour, "size": size, "angle": angle}

    def loss(self, reconstruction, batch):
        """Section 2.2: the pixel MSE of the reconstruction."""
        return F.mse_loss(reconstruction.float(), batch["x"])

    def metrics(self, reconstruction, batch, internals):
        """Sums over the batch: FG-ARI, ARI and mBO (x100) of the argmax of the alpha masks, the MSE, and
        FG-ARI and mBO of the two fixed partitions into as many cells as there are slots."""
        predicted = internals["masks"].argmax(dim=1)  # (B, H, W): each pixel's slot
        true = batch["segmentation"]
        mse = ((reconstruction.float() - batch["x"]) ** 2).flatten(1).mean(1)
        result = {"fg_ari": 100 * adjusted_rand_index(true, predicted, true > 0).sum().item(),
                  "ari": 100 * adjusted_rand_index(true, predicted).sum().item(),
                  "mbo": 100 * mean_best_overlap(true, predicted).sum().item(),
                  "mse": mse.sum().item(), "count": true.shape[0]}
        for name, partition in fixed_partitions(internals["masks"].shape[1], true.shape[-1]).items():
            partition = partition.to(true.device).expand_as(true)
            result[f"{name}_fg_ari"] = 100 * adjusted_rand_index(true, partition, true > 0).sum().item()
            result[f"{name}_mbo"] = 100 * mean_best_overlap(true, partition).sum().item()
        return result

    def figure_panels(self, reconstruction, batch, internals, images=4):
        """Paper Fig. 2: per test image, input | reconstruction | each slot's masked reconstruction;
        then each slot's attention at every iteration (2b) and its decoded mask at every iteration (2c)
        (white = 1). RGB panels (H, W, 3) in [0, 1]."""
        panels = []
        for b in range(min(images, len(batch["x"]))):
            row = [self.to_display(batch["x"][b]), self.to_display(reconstruction[b].float())]
            if "slot_rgb" in internals:  # each slot: rgb * alpha on white where alpha is low
                masks = internals["masks"][b].unsqueeze(1)  # (K, 1, H, W)
                row += list((self.to_display(internals["slot_rgb"][b].float()) * masks + (1 - masks)))
            panels.append((f"image {b}: input, reconstruction, slots", _image_row(row)))
            if "attention" in internals:
                attention = internals["attention"][b].float()  # (T, K, h, w)
                up = self.config.image_size // attention.shape[-1]
                for t in range(attention.shape[0]):
                    maps = attention[t].repeat_interleave(up, -2).repeat_interleave(up, -1)
                    panels.append((f"attention iteration {t + 1}", _image_row([m.expand(3, -1, -1) for m in maps])))
            if "masks_per_iteration" in internals:  # Fig. 2c: the slots of every iteration, decoded to masks
                for t, masks in enumerate(internals["masks_per_iteration"][b].float()):
                    panels.append((f"decoded masks iteration {t + 1}", _image_row([m.expand(3, -1, -1) for m in masks])))
        return panels


def _image_row(images, gap=2):
    """A list of (3, H, W) images in [0, 1] -> one (H, W_total, 3) strip with grey gaps."""
    spaced = []
    for img in images:
        spaced += [img, torch.full((3, img.shape[1], gap), 0.4)]
    return torch.cat(spaced[:-1], dim=2).permute(1, 2, 0)


def adjusted_rand_index(true, predicted, include=None):
    """Adjusted Rand index (Hubert & Arabie 1985) of each image's segmentation, as the reference
    segmentation metrics of the multi-object datasets compute it: from the contingency table of
    true and predicted labels over the included pixels. true, predicted: (B, H, W) int64;
    include: (B, H, W) bool (fg_ari: the foreground). Returns (B,) in [-1, 1]. When both
    labelings put all included pixels in one cluster the index is 0/0 and we return 1, as the
    reference does; otherwise the denominator is positive."""
    B = true.shape[0]
    true, predicted = true.reshape(B, -1), predicted.reshape(B, -1)
    weight = torch.ones_like(true, dtype=torch.float64) if include is None else include.reshape(B, -1).double()
    n_true, n_pred = int(true.max()) + 1, int(predicted.max()) + 1
    # contingency table n_ij: how many included pixels have true label i and predicted label j
    table = torch.zeros(B, n_true * n_pred, dtype=torch.float64)
    table.scatter_add_(1, true * n_pred + predicted, weight)
    table = table.view(B, n_true, n_pred)
    a, b, n = table.sum(2), table.sum(1), table.sum((1, 2))
    pairs = lambda t: (t * (t - 1)).sum(-1)  # twice the number of pairs, sum_i C(t_i, 2) * 2
    index = pairs(table.flatten(1))
    true_pairs, pred_pairs = pairs(a), pairs(b)
    expected = true_pairs * pred_pairs / (n * (n - 1)).clamp(min=1)
    maximum = (true_pairs + pred_pairs) / 2
    denominator = maximum - expected
    ari = (index - expected) / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ari, torch.ones_like(ari)).float()


def mean_best_overlap(true, predicted):
    """Mean best overlap (mBO; Pont-Tuset et al. 2017, as used for object discovery): for each object
    of an image (labels >= 1 of true; the background does not count) the best intersection over union
    with any predicted segment, averaged over the image's objects. true, predicted: (B, H, W) int64.
    Returns (B,) in [0, 1]; an image without objects scores 1."""
    B = true.shape[0]
    true, predicted = true.reshape(B, -1), predicted.reshape(B, -1)
    n_true, n_pred = int(true.max()) + 1, int(predicted.max()) + 1
    table = torch.zeros(B, n_true * n_pred, dtype=torch.float64)
    table.scatter_add_(1, true * n_pred + predicted, torch.ones_like(true, dtype=torch.float64))
    table = table.view(B, n_true, n_pred)  # intersections
    union = table.sum(2, keepdim=True) + table.sum(1, keepdim=True) - table
    best = (table / union.clamp(min=1)).amax(2)[:, 1:]  # (B, objects)
    present = table.sum(2)[:, 1:] > 0
    objects = present.sum(1)
    return torch.where(objects > 0, (best * present).sum(1) / objects.clamp(min=1), torch.ones(B, dtype=torch.float64)).float()


def fixed_partitions(k, size):
    """What no learning scores: a partition of a size x size image into k cells that ignores the image.
    "grid": rows x cols cells with rows * cols = k, as square as possible (k = 6: 3 rows x 2 columns);
    "stripes": k horizontal bands. Each is (size, size) int64 of cell indices."""
    rows = next(r for r in range(math.isqrt(k), 0, -1) if k % r == 0)
    rows = max(rows, k // rows)
    y = torch.arange(size).view(size, 1).expand(size, size)
    return {"grid": (y * rows // size) * (k // rows) + y.T * (k // rows) // size, "stripes": y * k // size}


def hungarian(cost):
    """Exact minimum-cost assignment (Kuhn 1955, Munkres 1957; the O(n^2 m) shortest augmenting path
    form with row and column potentials). cost: (n, m) tensor with n <= m. Returns, for each row,
    the column it gets (a LongTensor of n distinct columns)."""
    a = cost.tolist()
    n, m = len(a), len(a[0]) if a else 0
    if n > m:
        raise ValueError(f"hungarian needs rows <= columns, got {n} x {m}")
    inf = float("inf")
    row_pot, col_pot = [0.0] * (n + 1), [0.0] * (m + 1)  # potentials; index 0 is a virtual column/row
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) that holds column j, 0 if free
    previous = [0] * (m + 1)  # the column before j on the current augmenting path
    for row in range(1, n + 1):
        owner[0], free_col = row, 0
        slack, done = [inf] * (m + 1), [False] * (m + 1)
        while True:  # grow a tree of tight edges from `row` until it reaches a free column
            done[free_col] = True
            i, delta, next_col = owner[free_col], inf, 0
            for j in range(1, m + 1):
                if not done[j]:
                    reduced = a[i - 1][j - 1] - row_pot[i] - col_pot[j]
                    if reduced < slack[j]:
                        slack[j], previous[j] = reduced, free_col
                    if slack[j] < delta:
                        delta, next_col = slack[j], j
            for j in range(m + 1):  # shift potentials so the cheapest new edge becomes tight
                if done[j]:
                    row_pot[owner[j]] += delta
                    col_pot[j] -= delta
                else:
                    slack[j] -= delta
            free_col = next_col
            if owner[free_col] == 0:
                break
        while free_col:  # flip the path: every row on it moves to the next column
            before = previous[free_col]
            owner[free_col] = owner[before]
            free_col = before
    assignment = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            assignment[owner[j] - 1] = j - 1
    return torch.tensor(assignment, dtype=torch.long)


class SpritesSets(Sprites):
    """Set prediction (section 2.2, 4.2) on the same scenes. Each object's target vector is
    [x, y, shape one-hot (4), colour one-hot (8), size one-hot (3), 1 (a real object)], in [0, 1];
    slots left without an object are matched to all-zero targets. Loss: Huber between Hungarian-
    matched predictions and targets. Metrics ap@inf, ap@1, ap@0.5, ap@0.25, ap@0.125: average
    precision where a prediction is right if its shape, colour and size classes are right and its
    centre is within the threshold, in units of 1/6 of the image side (CLEVR's coordinates span
    [-3, 3], i.e. 6 units across the scene: see README); confidence = the predicted objectness."""

    thresholds = {"inf": math.inf, "1": 1.0, "0.5": 0.5, "0.25": 0.25, "0.125": 0.125}  # Table 2

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.fields = (("shape", len(SHAPES)), ("colour", len(PALETTE)), ("size", len(SIZES)))
        self.spec["output_size"] = 2 + sum(k for _, k in self.fields) + 1

    def check_model(self, model_config):
        if getattr(model_config, "num_slots", self.config.max_objects) < self.config.max_objects:
            raise ValueError(f"{model_config.num_slots} slots cannot predict up to {self.config.max_objects} "
                             "objects: raise --num_slots or lower --max_objects")

    def targets(self, batch, num_slots):
        parts = [batch["position"]] + [F.one_hot(batch[name], k).float() for name, k in self.fields]
        y = torch.cat(parts + [batch["exists"].unsqueeze(-1)], dim=-1) * batch["exists"].unsqueeze(-1)
        if num_slots < y.shape[1]:
            raise ValueError(f"{num_slots} slots cannot predict up to {y.shape[1]} objects: raise num_slots")
        return F.pad(y, (0, 0, 0, num_slots - y.shape[1]))  # (B, K, P)

    def matched(self, predictions, batch):
        """Hungarian matching on the Huber cost. Returns the pair costs (B, K predictions, K targets),
        the targets (B, K, P) and, for each prediction, the target it is matched to (B, K)."""
        y = self.targets(batch, predictions.shape[1]).to(predictions.device)
        pair_cost = F.smooth_l1_loss(predictions.unsqueeze(2).expand(-1, -1, y.shape[1], -1),
                                     y.unsqueeze(1).expand(-1, predictions.shape[1], -1, -1),
                                     reduction="none").sum(-1)
        cost = pair_cost.detach().cpu()
        match = torch.stack([hungarian(cost[b]) for b in range(len(cost))]).to(predictions.device)
        return pair_cost, y, match

    def loss(self, predictions, batch):
        """Huber loss summed over properties, mean over slots and images, after Hungarian matching."""
        pair_cost, _, match = self.matched(predictions.float(), batch)
        return pair_cost.gather(2, match.unsqueeze(-1)).mean()

    def metrics(self, predictions, batch, internals):
        """AP per threshold over this batch's images, times the count (train.py divides by it); and,
        for diagnosis, per image the % of its objects whose matched slot has the right shape,
        colour and size class, and the mean distance of the matched centres (units of 1/6 side)."""
        predictions = predictions.float().cpu()
        batch = {k: v.cpu() for k, v in batch.items()}
        count = len(predictions)
        result = {f"ap@{name}": 100 * count * self.average_precision(predictions, batch, t)
                  for name, t in self.thresholds.items()}
        _, y, match = self.matched(predictions, batch)
        matched = torch.zeros_like(y).scatter_(1, match.unsqueeze(-1).expand_as(y), predictions)  # row j: for target j
        exists = y[..., -1]
        objects = exists.sum(1)
        offset = 2
        for name, k in self.fields:
            right = matched[..., offset:offset + k].argmax(-1) == y[..., offset:offset + k].argmax(-1)
            result[f"{name}_acc"] = (100 * (right * exists).sum(1) / objects).sum().item()
            offset += k
        distance = 6 * (matched[..., :2] - y[..., :2]).norm(dim=-1)
        result["position_err"] = ((distance * exists).sum(1) / objects).sum().item()
        return result | {"count": count}

    def average_precision(self, predictions, batch, threshold):
        """The official CLEVR set-prediction AP (slot_attention set_prediction/utils.py): all predictions
        of all images, by descending confidence; each is matched to the nearest object of its image with
        the same classes, claimed or not; it is a true positive if that distance is below the threshold
        (strictly) and the object is not yet claimed (it then claims it), else a false positive; AP = area
        under the precision-recall curve with precision made monotone (VOC style)."""
        B, K, _ = predictions.shape
        offset, classes = 2, []
        for name, k in self.fields:
            classes.append(predictions[..., offset:offset + k].argmax(-1))
            offset += k
        confidence = predictions[..., -1]
        same = torch.ones(B, K, batch["exists"].shape[1], dtype=torch.bool)
        for (name, _), predicted in zip(self.fields, classes):
            same &= predicted.unsqueeze(2) == batch[name].cpu().unsqueeze(1)
        distance = 6 * torch.cdist(predictions[..., :2], batch["position"].cpu())  # (B, K, M), units of 1/6 side
        candidate = same & (batch["exists"].cpu() > 0).unsqueeze(1)
        nearest_distance, nearest = torch.where(candidate, distance, torch.full_like(distance, math.inf)).min(2)
        order = confidence.flatten().argsort(descending=True).tolist()
        claimed = torch.zeros(B, batch["exists"].shape[1], dtype=torch.bool)
        hits = []
        for index in order:
            b, k = divmod(index, K)
            d, j = float(nearest_distance[b, k]), int(nearest[b, k])
            hit = d < threshold and not claimed[b, j]  # no same-class object: d = inf, never a hit
            if hit:
                claimed[b, j] = True
            hits.append(hit)
        hits = torch.tensor(hits, dtype=torch.float64)
        true_positives = hits.cumsum(0)
        precision = true_positives / torch.arange(1, len(hits) + 1)
        recall = true_positives / batch["exists"].sum().double()
        precision = torch.cat([torch.zeros(1), precision.double(), torch.zeros(1)]).double()
        recall = torch.cat([torch.zeros(1), recall, torch.ones(1)]).double()
        precision = precision.flip(0).cummax(0).values.flip(0)  # the precision envelope
        steps = torch.nonzero(recall[1:] != recall[:-1]).flatten()
        return float(((recall[steps + 1] - recall[steps]) * precision[steps + 1]).sum())

    def figure_panels(self, predictions, batch, internals, images=4):
        """Per test image: the input and each slot's last attention map."""
        panels = []
        for b in range(min(images, len(batch["x"]))):
            row = [self.to_display(batch["x"][b])]
            if "attention" in internals:
                attention = internals["attention"][b, -1].float()  # (K, h, w)
                up = self.config.image_size // attention.shape[-1]
                row += [m.repeat_interleave(up, -2).repeat_interleave(up, -1).expand(3, -1, -1) for m in attention]
            panels.append((f"image {b}: input, attention of each slot", _image_row(row)))
        return panels


# ----------------------------------------------------------------------------------------------
# MNIST from its four IDX files: downloaded once, checksum-verified, read offline afterwards

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # the mirror torchvision reads
MNIST_FILES = {  # name -> md5 of the gzipped file (the values in torchvision's mnist.py)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def read_idx(path):
    """An IDX file (gzipped or raw) -> uint8 tensor of the shape its header gives."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
        count = math.prod(shape)
        if len(data) != 4 + 4 * ndim + count:
            raise ValueError(f"{len(data) - 4 - 4 * ndim} bytes of data for shape {shape}: truncated")
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as e:
        raise DataError(f"{path} is not a readable IDX file ({e}): delete it and fetch it again")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*shape)


def dataset_file(data_dir, name, md5, url):
    """The path of `name` (or `name`.gz) in data_dir; the gzipped file is downloaded from url if neither
    is there. A gzipped file must have the md5 given; a raw one is checked by its IDX header."""
    raw, packed = os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")
    if os.path.exists(raw) and not os.path.exists(packed):
        return raw
    return download(url + name + ".gz", packed, md5, "md5")  # checks the md5 of a file already there too


def load_mnist(data_dir=None, split="train"):
    """MNIST's images (N, 28, 28) uint8 and labels (N,) int64, split 'train' (60,000) or 'test'
    (10,000), from the IDX files in data_dir (default ~/.cache/nanosystem2/mnist); a missing file
    is downloaded from MNIST_URL and its md5 checked."""
    folder = data_dir or os.path.join(DEFAULT_DATA_DIR, "mnist")
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = (read_idx(dataset_file(folder, f"{prefix}-{kind}", MNIST_FILES[f"{prefix}-{kind}"], MNIST_URL))
                      for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(f"the MNIST {split} files in {folder} do not match (images {tuple(images.shape)}, "
                           f"labels {tuple(labels.shape)}): delete them and fetch them again")
    return images, labels.long()


def binarise_and_resize(images, size, threshold=0.5):
    """uint8 images (N, 28, 28) -> {0, 1} float images (N, size, size): pixels above threshold * 255
    are 1, then nearest-neighbour resizing (torch's 'nearest-exact', pixel centres), so every pixel
    stays 0 or 1. The same function makes the training and the test resolutions."""
    binary = (images.float() > threshold * 255).float().unsqueeze(1)  # (N, 1, 28, 28)
    return F.interpolate(binary, size=(size, size), mode="nearest-exact").squeeze(1)


# ----------------------------------------------------------------------------------------------
# RIMs paper, section 4.1 and Table 1: sequential MNIST at resolutions not seen in training

@dataclass
class SeqMNISTConfig:
    resolution: int = 14  # Table 1: trained at 14 x 14
    eval_resolutions: tuple = (16, 19, 24)  # Table 1: tested at 16, 19, 24 (and 14)
    threshold: float = 0.5  # binarise: pixel > threshold * 255
    val_size: int = 12000  # 48k / 12k train / validation split of the 60k training images
    train_size: int = 0  # use only this many of the 48k training images (0 = all)
    eval_samples: int = 10000  # test images per resolution (the first ones of the test set)
    val_samples: int = 12000  # validation images used to select the checkpoint

    def __post_init__(self):
        _check_positive(self, "resolution", "val_size", "eval_samples", "val_samples")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.val_size >= 60000 or self.train_size < 0 or self.val_samples > self.val_size:
            raise ValueError("need val_size < 60000, train_size >= 0 and val_samples <= val_size")
        if min(self.eval_resolutions, default=1) < 1 or self.eval_samples > 10000:
            raise ValueError("eval_resolutions must be positive and eval_samples at most 10000")


class SeqMNIST(SequenceTask):
    """Binarised MNIST digits read one pixel per step in row-major order (R * R steps, input size 1),
    classified from the output at the last step. Trained at `resolution`; the validation split (the
    same resolution) selects the checkpoint; the test set is read at every resolution for the final
    report. Metrics: acc@R, % of test images right at R x R, and val_acc@R on the validation split."""

    metric = "acc"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        c = config
        self.spec = {"kind": self.kind, "input_size": 1, "output_size": 10}
        images, labels = load_mnist(data_dir, "train")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # a fixed split
        val, train = order[: c.val_size], order[c.val_size:]
        train = train[: c.train_size] if c.train_size else train
        self.train_images, self.train_labels = binarise_and_resize(images[train], c.resolution, c.threshold), labels[train]
        self.val_images = binarise_and_resize(images[val[: c.val_samples]], c.resolution, c.threshold)
        self.val_labels = labels[val[: c.val_samples]]
        test_images, self.test_labels = load_mnist(data_dir, "test")
        test_images, self.test_labels = test_images[: c.eval_samples], self.test_labels[: c.eval_samples]
        resolutions = sorted({c.resolution, *c.eval_resolutions})
        self.test_images = {r: binarise_and_resize(test_images, r, c.threshold) for r in resolutions}
        # the validation setting first: train.py evaluates the settings named in selection_settings
        # during training and all of them for the final report
        self.eval_settings = {f"val{c.resolution}": {}, **{str(r): {} for r in resolutions}}
        self.selection_settings = (f"val{c.resolution}",)
        self.selection_metric = f"val_acc@{c.resolution}"
        self.bench_setting = str(c.resolution)
        self.eval_cursor = {}

    def eval_count(self, setting):
        return len(self.val_labels) if setting.startswith("val") else len(self.test_labels)

    def metric_key(self, metric, setting):
        """'acc' on 'val14' -> 'val_acc@14'; on '16' -> 'acc@16'."""
        return f"val_{metric}@{setting[3:]}" if setting.startswith("val") else f"{metric}@{setting}"

    def as_batch(self, images, labels):
        """images (B, R, R) or (B, R, R, channels) -> x (B, R * R, channels), row-major pixels."""
        B, R = images.shape[:2]
        mask = torch.zeros(B, R * R)
        mask[:, -1] = 1.0  # classified from the last step
        return {"x": images.reshape(B, R * R, -1).float(), "y": labels, "mask": mask}

    def train_batch(self, batch_size, generator):
        index = torch.randint(0, len(self.train_labels), (batch_size,), generator=generator)
        return self.as_batch(self.train_images[index], self.train_labels[index])

    def eval_batch(self, setting, batch_size, generator):
        """The next batch_size images of the setting's fixed set (validation or test), in order."""
        images, labels = ((self.val_images, self.val_labels) if setting.startswith("val")
                          else (self.test_images[int(setting)], self.test_labels))
        start = self.eval_cursor.get(setting, 0) % len(labels)
        self.eval_cursor[setting] = start + batch_size
        return self.as_batch(images[start: start + batch_size], labels[start: start + batch_size])

    def loss(self, logits, batch):
        return F.cross_entropy(logits[:, -1].float(), batch["y"])

    def metrics(self, logits, batch, internals):
        right = (logits[:, -1].argmax(-1) == batch["y"]).float().sum().item()
        return {"acc": 100.0 * right, "count": logits.shape[0]}

    def figure_panels(self, logits, batch, internals, index=0):
        """The digit, then for each module the steps it was active at, laid out as the image (for
        models with layers of modules, 'active_modules_l<layer>', each layer's modules in turn)."""
        R = math.isqrt(batch["x"].shape[1])
        panels = [("digit", batch["x"][index].view(R, R))]
        for name, value in internals.items():
            if name.startswith("active_modules"):
                layer = f"layer {name.rsplit('_l', 1)[1]} " if name != "active_modules" else ""
                active = value[index].T.reshape(-1, R, R)  # (M, R, R)
                panels += [(f"{layer}module {m} active", a) for m, a in enumerate(active)]
        return panels


# ----------------------------------------------------------------------------------------------
# Neural Production Systems (Goyal et al. 2021, arXiv:2103.01937): the synthetic arithmetic task, as the
# official code defines it (synthetic/data.py and synthetic/main.py of anirudh9119/neural_production_systems)

OPERATIONS = ("+", "-", "*")


@dataclass
class ArithmeticConfig:
    length: int = 20  # official: sequences of 20 steps
    train_sequences: int = 10000  # official: 10k training sequences (ArithmeticData(10000, 20))
    data_seed: int = 0  # the fixed training set is drawn from this seed, the same for every run
    eval_lengths: tuple = (10, 20, 30, 40, 50)  # evaluated autoregressively at these lengths
    eval_samples: int = 2000  # official: 2k validation sequences
    # keep the checkpoint with the lowest mse on validation sequences of the training length (drawn apart from
    # the test sets) and report the test lengths for it; the official code keeps its best-evaluating model too
    validation: bool = False

    def __post_init__(self):
        _check_positive(self, "length", "train_sequences", "eval_samples")
        if not self.eval_lengths or min(self.eval_lengths) < 1:
            raise ValueError(f"eval_lengths must be positive, got {self.eval_lengths}")


class Arithmetic(SequenceTask):
    """y_0 = 0; at step t a number d_t = U(0, 1) rounded to two decimals and an operation o_t uniform over
    +, -, * give y_t = y_{t-1} o_t d_t. Input x_t = [y_{t-1}, d_t, one-hot o_t], target y_t. Slot models
    get two slots, [y_{t-1}] and [d_t], and the operation as a condition that only decides which rule
    fires (the official model has it as a third slot that only the rule choice reads; nps.py explains).
    The first channel is fed back (spec feedback_size): it holds the true y_{t-1} in training (teacher
    forcing) and models write their own previous output into it at evaluation (autoregression).
    Metrics: mse, the sum over the steps of the squared error, mean over sequences (the official eval's
    sum over steps of the per-step MSE); rule_purity, for models that report the rule used at each step."""

    kind = "autoregressive"
    metric = "mse"
    bench_setting = "20"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        # slot models: two slots, [y_{t-1}] and [d_t]; the operation is a condition (see the docstring)
        self.spec = {"kind": self.kind, "input_size": 5, "output_size": 1, "input_groups": (1, 1),
                     "condition_size": 3, "feedback_size": 1}
        self.eval_settings = {str(n): {"length": n} for n in config.eval_lengths}
        if config.validation:  # the autoregressive error at the end of training swings by up to 10x (docs/nps.md)
            self.eval_settings[f"val{config.length}"] = {"length": config.length}
            self.selection_settings = tuple(self.eval_settings)  # the test lengths too: log.jsonl shows them
            self.selection_metric, self.selection_minimise = f"mse@val{config.length}", True
        self.train_set = self.make_batch(config.train_sequences, torch.Generator().manual_seed(config.data_seed),
                                         config.length)

    def train_batch(self, batch_size, generator):
        pick = torch.randint(0, self.config.train_sequences, (batch_size,), generator=generator)
        return {k: v[pick] for k, v in self.train_set.items()}

    def make_batch(self, batch_size, generator, length):
        numbers = (torch.rand(batch_size, length, generator=generator, dtype=torch.float64) * 100).round() / 100
        ops = torch.randint(0, 3, (batch_size, length), generator=generator)
        y = torch.zeros(batch_size, length + 1, dtype=torch.float64)  # y[:, 0] = y_0 = 0
        for t in range(length):
            prev, d = y[:, t], numbers[:, t]
            y[:, t + 1] = torch.where(ops[:, t] == 0, prev + d, torch.where(ops[:, t] == 1, prev - d, prev * d))
        x = torch.cat([y[:, :-1, None], numbers[..., None], F.one_hot(ops, 3).double()], -1).float()
        return {"x": x, "y": y[:, 1:, None].float(), "mask": torch.ones(batch_size, length), "op": ops}

    def loss(self, logits, batch):
        """Mean squared error per step (official: nn.MSELoss over every step, teacher-forced)."""
        return F.mse_loss(logits.float(), batch["y"])

    def metrics(self, logits, batch, internals):
        squared = (logits.float() - batch["y"]).pow(2).sum((1, 2))  # (B,), summed over the steps
        result = {"mse": squared.sum().item(), "count": logits.shape[0]}
        if "rules" in internals:  # operation x rule counts, of the first rule applied at each step
            result["op_rule_counts"] = op_rule_counts(batch["op"], internals["rules"], len(OPERATIONS))
        return result

    def finish_metrics(self, totals, count):
        return rule_metrics(totals, count)

    def figure_panels(self, logits, batch, internals, index=0):
        """Target and output over the steps of one sequence (one scale), and, for models that report
        rules, the operation x rule count matrix over the batch (rows +, -, *; each row normalised)."""
        target, output = batch["y"][index, :, 0], logits[index, :, 0].float()
        low, high = min(target.min(), output.min()), max(target.max(), output.max())
        scale = lambda v: ((v - low) / (high - low).clamp(min=1e-8)).unsqueeze(0)
        panels = [("target y_t", scale(target)), ("output", scale(output))]
        if "rules" in internals:
            counts = self.metrics(logits, batch, internals)["op_rule_counts"]
            used = int(internals["rules"].max()) + 1
            panels.append(("operation (add sub mul) x rule", counts[:, :used] / counts.sum(1, keepdim=True).clamp(min=1)))
        return panels


RULE_COLUMNS = 64  # the most rules op_rule_counts tells apart


def op_rule_counts(ops, rules, num_ops):
    """ops (B, T) int, rules (B, T, K) int (the model's internals) -> (num_ops, RULE_COLUMNS) counts of
    the first rule applied at each step, per operation."""
    rules = rules[..., 0].long().cpu().clamp(max=RULE_COLUMNS - 1)
    counts = torch.zeros(num_ops, RULE_COLUMNS)
    counts.index_put_((ops.cpu().reshape(-1), rules.reshape(-1)), torch.ones(rules.numel()), accumulate=True)
    return counts


def rule_metrics(totals, count):
    """finish_metrics of the rule tasks: the summed metrics per sample, and the operation x rule counts
    summed over every batch -> rule_purity (it does not average over batches)."""
    result = {key: value / count for key, value in totals.items() if key != "op_rule_counts"}
    if "op_rule_counts" in totals:
        result["rule_purity"] = rule_purity(totals["op_rule_counts"])
    return result


def rule_purity(counts):
    """counts (operations, rules) -> the mean over operations of the fraction of an operation's steps
    sent to its own rule, under the one-to-one matching of operations to distinct rules that scores
    best. 1.0: each operation has a rule of its own; one rule for everything scores 1 / operations."""
    counts = counts[:, counts.sum(0) > 0] if counts.sum() > 0 else counts[:, :1]
    rows, cols = counts.shape
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)
    pad = torch.zeros(rows, max(0, rows - cols))  # fewer rules used than operations: the rest get none
    fractions = torch.cat([fractions, pad], 1)
    best = max(sum(fractions[o, r] for o, r in enumerate(choice))
               for choice in itertools.permutations(range(fractions.shape[1]), rows))
    return float(best) / rows


# ----------------------------------------------------------------------------------------------
# Neural Production Systems, the MNIST transformation experiment (official code: MNIST/crl/dataloader/
# mnist_transforms.py and MNIST/run.sh: digits on a 64 x 64 canvas, four transformations, rotations by
# +-60 degrees and translations by 0.2 of the canvas, in chains of 4 where each frame predicts the next)

OFFICIAL_TRANSFORMS = ("rotate_right", "rotate_left", "up", "down")  # run.sh: num_transforms 4, the first four
TRANSFORMS = ("rotate_left", "rotate_right", "up", "down", "left", "right")  # the quarter_shift set


@dataclass
class MNISTTransformConfig:
    # "official": rotate by 60 degrees clockwise and anticlockwise, translate up and down by 0.2 of the
    # canvas, bilinear, on a canvas with the digit at its centre, in chains; "quarter_shift": quarter turns
    # and `shift`-pixel shifts in four directions (exact) on 28 x 28, one step
    transforms: str = "official"
    canvas: int = 40  # the canvas side (official: 64; a multiple of 8 for the conv encoder)
    chain: int = 4  # transformations per sequence (official transform_length 4); quarter_shift: 1
    shift: int = 4  # pixels per translation (quarter_shift only)
    # official only: "slot", the one-hot transformation is a slot of its own (official); "key", it joins the
    # image slot's stage 1 key as a condition instead (one slot; how quarter_shift gives it)
    condition: str = "slot"
    train_size: int = 10000  # training digits: the first ones of MNIST's 60k training images
    eval_samples: int = 2000  # test digits: the first ones of MNIST's 10k test images

    def __post_init__(self):
        _check_positive(self, "shift", "train_size", "eval_samples", "chain")
        if self.shift >= 28 or self.train_size > 60000 or self.eval_samples > 10000:
            raise ValueError("need shift < 28, train_size <= 60000 and eval_samples <= 10000")
        if self.transforms not in ("official", "quarter_shift"):
            raise ValueError(f"transforms must be 'official' or 'quarter_shift', got {self.transforms!r}")
        if self.condition not in ("slot", "key"):
            raise ValueError(f"condition must be 'slot' or 'key', got {self.condition!r}")
        if self.transforms == "official" and (self.canvas < 32 or self.canvas % 8):
            raise ValueError(f"canvas must be a multiple of 8 and at least 32, got {self.canvas}")


def affine_images(images, angle, shift_y):
    """images (B, 1, H, W); angle (B,) degrees, clockwise on screen, about the centre; shift_y (B,) pixels,
    positive moves the content down. Bilinear, zeros come in (grid_sample, align_corners=False)."""
    B, _, H, W = images.shape
    theta = torch.deg2rad(angle.float())
    cos, sin = torch.cos(theta), torch.sin(theta)
    # the output at p' samples the input at p = R(-theta) (p' - t), in normalised coordinates (x right, y down)
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # (B, 2, 2) = R(-theta)
    t = torch.stack([torch.zeros_like(cos), 2 * shift_y.float() / H], -1)  # (B, 2)
    matrix = torch.cat([inverse, -(inverse @ t.unsqueeze(-1))], -1)  # (B, 2, 3)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class MNISTTransform(SequenceTask):
    """MNIST digits (grey levels in [0, 1]) and transformations drawn uniformly, one per step; the target
    of each step is its input frame transformed. Official (default): the digit at the centre of a canvas
    of `canvas` pixels, then `chain` transformations one after another from OFFICIAL_TRANSFORMS; frame t
    is the input of step t and frame t + 1 its target (the true frame is always the input). Each step:
    x (B, T, canvas^2 + 4), the image (one slot) then the one-hot transformation (a slot of its own:
    input_groups (canvas^2, 4); condition="key": a condition of the image slot's key instead); y (B, T,
    canvas^2). quarter_shift: one step on 28 x 28 from TRANSFORMS, the one-hot as a condition read by the
    rule choice only, as before. Metrics: bce, binary
    cross-entropy summed over the pixels, mean per frame; rule_purity over the transformation x rule counts."""

    kind = "transform"
    metric = "bce"
    bench_setting = "test"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        train, _ = load_mnist(data_dir, "train")
        test, _ = load_mnist(data_dir, "test")
        if len(train) < config.train_size or len(test) < config.eval_samples:
            raise DataError(f"MNIST in {data_dir} has {len(train)} training and {len(test)} test images, fewer "
                               "than --train_size and --eval_samples ask for: lower them or fix --data_dir")
        self.images = {"train": train[:config.train_size].float() / 255, "test": test[:config.eval_samples].float() / 255}
        self.official = config.transforms == "official"
        self.names = OFFICIAL_TRANSFORMS if self.official else TRANSFORMS
        n, side = len(self.names), (config.canvas if self.official else 28)
        self.side, self.steps = side, (config.chain if self.official else 1)
        if self.official:
            as_slot = config.condition == "slot"
            self.spec = {"kind": self.kind, "input_size": side * side + n, "output_size": side * side,
                         "input_groups": (side * side, n) if as_slot else (side * side,),
                         "condition_size": 0 if as_slot else n, "image_size": side}
        else:
            self.spec = {"kind": self.kind, "input_size": 784 + n, "output_size": 784, "input_groups": (784,),
                         "condition_size": n}
        self.eval_settings = {"test": {"split": "test"}}
        self.eval_cursor = 0

    def transform(self, images, which):
        """images (B, side, side), which (B,) indices into the task's transformations -> (B, side, side)."""
        if self.official:
            angle = torch.tensor([60.0, -60.0, 0.0, 0.0])[which]  # rotate_right, rotate_left, up, down
            shift = torch.tensor([0.0, 0.0, -0.2, 0.2])[which] * self.side
            return affine_images(images.unsqueeze(1), angle, shift).squeeze(1)
        s = self.config.shift
        padded = F.pad(images, (s, s, s, s))
        every = torch.stack([torch.rot90(images, 1, (1, 2)), torch.rot90(images, -1, (1, 2)),
                             padded[:, 2 * s:, s:-s], padded[:, :-2 * s, s:-s],  # up, down
                             padded[:, s:-s, 2 * s:], padded[:, s:-s, :-2 * s]])  # left, right
        return every[which, torch.arange(len(images))]

    def train_batch(self, batch_size, generator):
        return self.make_batch(batch_size, generator, "train")

    def eval_batch(self, setting, batch_size, generator):
        """The test digits in order (train.py asks for consecutive chunks), each with random transformations."""
        start = self.eval_cursor % self.config.eval_samples
        self.eval_cursor = start + batch_size
        index = torch.arange(start, start + batch_size) % self.config.eval_samples
        return self.make_batch(batch_size, generator, "test", index)

    def make_batch(self, batch_size, generator, split, index=None):
        pool = self.images[split]
        if index is None:
            index = torch.randint(0, len(pool), (batch_size,), generator=generator)
        T, n, side = self.steps, len(self.names), self.side
        which = torch.randint(0, n, (batch_size, T), generator=generator)
        frame = pool[index]
        if self.official:  # the digit at the centre of the canvas
            pad = (side - 28) // 2
            frame = F.pad(frame, (pad, side - 28 - pad, pad, side - 28 - pad))
        frames = [frame]
        for t in range(T):
            frames.append(self.transform(frames[-1], which[:, t]))
        frames = torch.stack(frames, 1).reshape(batch_size, T + 1, side * side)
        x = torch.cat([frames[:, :T], F.one_hot(which, n).float()], -1)
        return {"x": x, "y": frames[:, 1:], "mask": torch.ones(batch_size, T), "op": which}

    def loss(self, logits, batch):
        return F.binary_cross_entropy_with_logits(logits.float(), batch["y"])

    def metrics(self, logits, batch, internals):
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["y"], reduction="sum").item()
        result = {"bce": bce, "count": batch["y"].shape[0] * batch["y"].shape[1]}  # per frame
        if "rules" in internals:
            result["op_rule_counts"] = op_rule_counts(batch["op"], internals["rules"], len(self.names))
        return result

    def finish_metrics(self, totals, count):
        return rule_metrics(totals, count)

    def figure_panels(self, logits, batch, internals, count=6):
        """Input, target and prediction of the first step for the first test digits, side by side; the chosen
        rule of each as a row of grey levels (rule / (rules - 1)); the transformation x rule counts."""
        side = self.side
        row = lambda images: torch.cat([F.pad(im.reshape(side, side), (0, 2)) for im in images[:count]], 1)
        labels = ("R60", "L60", "UP", "DOWN") if self.official else ("L90", "R90", "UP", "DOWN", "LEFT", "RIGHT")
        names = " ".join(labels[int(t)] for t in batch["op"][:count, 0])
        panels = [(f"input ({names})", row(batch["x"][:, 0, :side * side])), ("target", row(batch["y"][:, 0])),
                  ("prediction", row(torch.sigmoid(logits[:, 0].float())))]
        if "rules" in internals:
            rules = internals["rules"][:count, 0, 0].float()
            used = int(internals["rules"].max()) + 1
            panels.append((f"rule ({' '.join(str(int(r)) for r in rules)})",
                           (rules / max(used - 1, 1)).repeat_interleave(side + 2).unsqueeze(0)))
            counts = op_rule_counts(batch["op"], internals["rules"], len(self.names))[:, :used]
            share = counts / counts.sum(1, keepdim=True).clamp(min=1)  # rows: transformations; big cells to read
            panels.append((f"transformation ({' '.join(labels)}, rows) x rule (columns)",
                           share.repeat_interleave(side // 4, 0).repeat_interleave(side // 4, 1)))
        return panels


# ----------------------------------------------------------------------------------------------
# Learning Independent Causal Mechanisms (Parascandolo et al. 2018, arXiv:1712.00961), section 4: MNIST
# digits under ten mechanisms, the canonical and the transformed halves unpaired

MECHANISMS = ("up_left", "up", "up_right", "left", "right", "down_left", "down", "down_right", "invert", "noise")
MECHANISM_LABELS = ("UL", "U", "UR", "L", "R", "DL", "D", "DR", "INV", "NOISE")  # for figures


@dataclass
class MNISTMechanismsConfig:
    shift: int = 4  # pixels per translation (paper: 4, in the 8 directions; zeros come in)
    noise_std: float = 0.5  # additive Gaussian noise of variance 0.25, then clamped to [0, 1]
    train_size: int = 60000  # MNIST training images used: half canonical (X), half transformed (X')
    eval_samples: int = 500  # test digits, each under every mechanism (10 x as many test images)
    evaluator_iters: int = 1000  # steps of training the evaluator classifier on X (batch 64, Adam 1e-3)

    def __post_init__(self):
        _check_positive(self, "shift", "train_size", "eval_samples", "evaluator_iters")
        if self.shift >= 28 or self.train_size < 2 or self.train_size > 60000 or self.eval_samples > 10000:
            raise ValueError("need shift < 28, 2 <= train_size <= 60000 and eval_samples <= 10000")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be at least 0, got {self.noise_std}")


def apply_mechanisms(images, which, shift, noise_std, generator):
    """images (N, 1, H, W) in [0, 1], which (N,) indices into MECHANISMS -> the transformed images: a shift
    by `shift` pixels (zeros come in; up_left moves the content up and left), the contrast inversion 1 - x,
    or x + N(0, noise_std^2) clamped to [0, 1]."""
    s = shift
    padded = F.pad(images, (s, s, s, s))
    H, W = images.shape[-2:]
    shifted = {(dy, dx): padded[..., s - dy * s: s - dy * s + H, s - dx * s: s - dx * s + W]  # content moves by (dy, dx) * s
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}
    noise = torch.randn(images.shape, generator=generator) * noise_std
    every = torch.stack([shifted[(-1, -1)], shifted[(-1, 0)], shifted[(-1, 1)], shifted[(0, -1)], shifted[(0, 1)],
                         shifted[(1, -1)], shifted[(1, 0)], shifted[(1, 1)], 1 - images, (images + noise).clamp(0, 1)])
    return every[which, torch.arange(len(images))]


class DigitClassifier(torch.nn.Module):
    """The evaluator of Figure 6 (a CNN MNIST classifier): two strided 3 x 3 convolutions and two linear layers."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, images):
        return self.net(images)


class MNISTMechanisms:
    """Unpaired images for learning independent mechanisms. MNIST's training images (the first train_size)
    are split by a fixed permutation into a canonical half X and a transformed half X'; each image of X'
    gets one mechanism drawn uniformly from MECHANISMS (and, for noise, its noise), once. A training batch:
    x, images of X' (B, 1, 28, 28), and real, as many images of X drawn independently. Test: the first
    eval_samples test digits, each under every mechanism in MECHANISMS order.

    The evaluator of Figure 6 is a classifier (DigitClassifier) trained on X with its labels, which the
    model never sees, for evaluator_iters steps from a fixed seed, on first use: so every run and seed
    is scored by the same classifier. Metrics, as fractions: acc_transformed (the classifier on the test
    images as transformed), acc_inverted (on the winning expert's output), acc_original (on the
    untransformed digits: the evaluator's own accuracy); from the mechanism x expert counts of winners:
    owned, the mechanisms whose main expert (the one winning most of their images) wins a majority of
    them and is the main expert of no other mechanism; purity, the mean share of a mechanism's images its
    main expert wins; and per mechanism its main expert, its share and acc_inverted."""

    kind = "unpaired"
    bench_setting = "test"
    model_inputs = ("real",)

    def __init__(self, config, data_dir=None):
        self.config = c = config
        train, train_labels = load_mnist(data_dir, "train")
        test, test_labels = load_mnist(data_dir, "test")
        if len(train) < c.train_size or len(test) < c.eval_samples:
            raise DataError(f"MNIST in {data_dir} has {len(train)} training and {len(test)} test images, fewer "
                            "than --train_size and --eval_samples ask for: lower them or fix --data_dir")
        generator = torch.Generator().manual_seed(0)  # the split, the mechanisms of X' and their noise: fixed
        order = torch.randperm(c.train_size, generator=generator)
        canonical, transformed = order[: c.train_size // 2], order[c.train_size // 2:]
        as_float = lambda images: images.float().unsqueeze(1) / 255  # (N, 1, 28, 28) in [0, 1]
        self.canonical, self.canonical_labels = as_float(train[canonical]), train_labels[canonical]
        self.mechanism = torch.randint(0, len(MECHANISMS), (len(transformed),), generator=generator)
        self.transformed = apply_mechanisms(as_float(train[transformed]), self.mechanism, c.shift, c.noise_std, generator)
        self.test_images, self.test_labels = as_float(test[: c.eval_samples]), test_labels[: c.eval_samples]
        self.spec = {"kind": self.kind, "image_size": 28, "in_channels": 1}
        self.eval_settings = {"test": {}}
        self.eval_cursor = 0
        self.evaluator = None

    def train_batch(self, batch_size, generator):
        pick = torch.randint(0, len(self.transformed), (batch_size,), generator=generator)
        real = torch.randint(0, len(self.canonical), (batch_size,), generator=generator)
        return {"x": self.transformed[pick], "real": self.canonical[real], "mechanism": self.mechanism[pick]}

    def eval_count(self, setting):
        return self.config.eval_samples * len(MECHANISMS)

    def eval_batch(self, setting, batch_size, generator):
        """Test image i is digit i // 10 under mechanism i % 10; train.py asks for consecutive chunks."""
        start = self.eval_cursor % self.eval_count(setting)
        self.eval_cursor = start + batch_size
        index = torch.arange(start, start + batch_size) % self.eval_count(setting)
        digit, which = index // len(MECHANISMS), index % len(MECHANISMS)
        original = self.test_images[digit]
        x = apply_mechanisms(original, which, self.config.shift, self.config.noise_std, generator)
        # real: digits of P beside them (the model reads real only in training; bench.py times training on this)
        return {"x": x, "original": original, "real": original, "label": self.test_labels[digit], "mechanism": which}

    def classifier(self):
        """The evaluator, trained on first use (fixed seed; the training stream is left as it was)."""
        if self.evaluator is None:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():  # train.py evaluates under no_grad
                torch.manual_seed(0)
                model = DigitClassifier()
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                generator = torch.Generator().manual_seed(0)
                for _ in range(self.config.evaluator_iters):
                    pick = torch.randint(0, len(self.canonical), (64,), generator=generator)
                    loss = F.cross_entropy(model(self.canonical[pick]), self.canonical_labels[pick])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            self.evaluator = model.eval()
        return self.evaluator

    @torch.no_grad()
    def metrics(self, outputs, batch, internals):
        classifier, labels = self.classifier(), batch["label"].cpu()
        right = lambda images: classifier(images.float().cpu()).argmax(1) == labels
        mechanism, inverted = batch["mechanism"].cpu(), right(outputs)
        result = {"acc_transformed": right(batch["x"]).sum().item(), "acc_inverted": inverted.sum().item(),
                  "acc_original": right(batch["original"]).sum().item(), "count": len(labels),
                  "mechanism_right": torch.zeros(len(MECHANISMS)).index_add_(0, mechanism, inverted.float()),
                  "mechanism_count": torch.bincount(mechanism, minlength=len(MECHANISMS)).float()}
        if "winner" in internals:
            winner = internals["winner"].cpu()
            experts = internals["scores"].shape[1]
            result["win_counts"] = torch.zeros(len(MECHANISMS), experts).index_put_(
                (mechanism, winner), torch.ones(len(winner)), accumulate=True)
        return result

    def finish_metrics(self, totals, count):
        result = {k: totals[k] / count for k in ("acc_transformed", "acc_inverted", "acc_original")}
        per_mechanism = totals["mechanism_right"] / totals["mechanism_count"].clamp(min=1)
        if "win_counts" in totals:
            result.update(mechanism_ownership(totals["win_counts"]))
        for m, name in enumerate(MECHANISMS):
            result[f"acc_inverted_{name}"] = float(per_mechanism[m])
        return result

    def figure_panels(self, outputs, batch, internals):
        """Figure 8's layout on MNIST: one test digit under each mechanism (columns); the rows: the
        transformed input, each expert's output on it, the winner's output, the original."""
        n = len(MECHANISMS)
        if len(batch["x"]) < n:
            return []
        grey = lambda images: _image_row([im.float().expand(3, -1, -1) for im in images[:n]])
        winners = internals["winner"][:n].tolist() if "winner" in internals else []
        panels = [("input: " + " ".join(MECHANISM_LABELS), grey(batch["x"]))]
        if "expert_outputs" in internals:
            panels += [(f"expert {j}", grey(internals["expert_outputs"][:n, j]))
                       for j in range(internals["expert_outputs"].shape[1])]
        panels += [("winner: " + " ".join(str(w) for w in winners), grey(outputs)), ("original", grey(batch["original"]))]
        return panels


def mechanism_ownership(counts):
    """counts (mechanisms, experts) of the winning expert -> owned, purity and per mechanism its main expert
    and that expert's share (see MNISTMechanisms)."""
    totals = counts.sum(1).clamp(min=1)
    main, wins = counts.argmax(1), counts.max(1).values
    share = wins / totals
    owned = [bool(share[m] > 0.5) and int((main == main[m]).sum()) == 1 for m in range(len(counts))]
    result = {"owned": float(sum(owned)), "purity": float(share.mean())}
    for m, name in enumerate(MECHANISMS[: len(counts)]):
        result[f"expert_{name}"] = float(main[m])
        result[f"share_{name}"] = float(share[m])
    return result


# ----------------------------------------------------------------------------------------------
# CIFAR-10 from its python tarball: downloaded once, md5-checked, read offline afterwards

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # the value published with the tarball (and in torchvision)
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_cifar10(data_dir=None, split="train", md5=None):
    """CIFAR-10's images (N, 32, 32, 3) uint8 (RGB) and labels (N,) int64, split 'train' (50,000) or 'test'
    (10,000), read from cifar-10-python.tar.gz in data_dir (default ~/.cache/nanosystem2/cifar10),
    downloaded from CIFAR10_URL with its md5 checked when missing. Each batch in the tarball is a
    pickled dict: b'data' (n, 3072) uint8, the red, green and blue 32 x 32 planes; b'labels', n ints."""
    folder = data_dir or os.path.join(DEFAULT_DATA_DIR, "cifar10")
    path = os.path.join(folder, os.path.basename(CIFAR10_URL))
    md5 = md5 or CIFAR10_MD5
    download(CIFAR10_URL, path, md5, "md5")  # checks the md5 of a file already there too
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for name in CIFAR10_BATCHES[split]:
                with archive.extractfile(f"cifar-10-batches-py/{name}") as f:
                    batch = pickle.load(f, encoding="bytes")  # a checksum-verified file
                images.append(torch.frombuffer(bytearray(batch[b"data"]), dtype=torch.uint8).view(-1, 3, 32, 32))
                labels.append(torch.tensor(batch[b"labels"], dtype=torch.long))
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError, tarfile.TarError) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 python tarball ({e}): delete it and fetch it again")
    images, labels = torch.cat(images), torch.cat(labels)
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels: delete it and fetch it again")
    return images.permute(0, 2, 3, 1).contiguous(), labels


def resize_nearest(images, size):
    """uint8 images (N, H, W, C) -> (N, size, size, C) by nearest neighbour at pixel centres (torch's
    'nearest-exact', as binarise_and_resize), by indexing: the bytes are kept as they are."""
    rows = ((torch.arange(size) + 0.5) * images.shape[1] / size).long()
    cols = ((torch.arange(size) + 0.5) * images.shape[2] / size).long()
    return images[:, rows][:, :, cols]


# ----------------------------------------------------------------------------------------------
# BRIMs paper (Mittal et al. 2020, arXiv:2006.16981), Table 2: sequential CIFAR-10 at unseen resolutions

@dataclass
class SeqCIFARConfig:
    resolution: int = 16  # Table 2: trained at 16 x 16
    eval_resolutions: tuple = (19, 24, 32)  # Table 2: tested at 19, 24, 32 (and 16)
    val_size: int = 10000  # 40k / 10k train / validation split of the 50k training images
    train_size: int = 0  # use only this many of the 40k training images (0 = all)
    eval_samples: int = 10000  # test images per resolution (the first ones of the test set)
    val_samples: int = 10000  # validation images used to select the checkpoint

    def __post_init__(self):
        _check_positive(self, "resolution", "val_size", "eval_samples", "val_samples")
        if self.val_size >= 50000 or self.train_size < 0 or self.val_samples > self.val_size:
            raise ValueError("need val_size < 50000, train_size >= 0 and val_samples <= val_size")
        if min(self.eval_resolutions, default=1) < 1 or self.eval_samples > 10000:
            raise ValueError("eval_resolutions must be positive and eval_samples at most 10000")


class SeqCIFAR(SeqMNIST):
    """CIFAR-10 images read one pixel per step in row-major order (R * R steps), each step the pixel's
    three RGB bytes (0..255, as float values of the integer codes: spec input_vocab 256 asks the model
    to embed each channel's byte), classified from the last step. Trained at `resolution` (nearest
    neighbour from 32 x 32); the validation split selects the checkpoint; the test set is read at every
    resolution for the final report. Metrics: acc@R (test, %) and val_acc@R, as seqmnist."""

    def __init__(self, config, data_dir=None, md5=None):
        SequenceTask.__init__(self, config)
        c = config
        self.spec = {"kind": self.kind, "input_size": 3, "input_vocab": 256, "output_size": 10}
        images, labels = load_cifar10(data_dir, "train", md5)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # a fixed split
        val, train = order[: c.val_size], order[c.val_size:]
        train = train[: c.train_size] if c.train_size else train
        self.train_images, self.train_labels = resize_nearest(images[train], c.resolution), labels[train]
        self.val_images = resize_nearest(images[val[: c.val_samples]], c.resolution)
        self.val_labels = labels[val[: c.val_samples]]
        test_images, self.test_labels = load_cifar10(data_dir, "test", md5)
        test_images, self.test_labels = test_images[: c.eval_samples], self.test_labels[: c.eval_samples]
        resolutions = sorted({c.resolution, *c.eval_resolutions})
        self.test_images = {r: resize_nearest(test_images, r) for r in resolutions}
        self.eval_settings = {f"val{c.resolution}": {}, **{str(r): {} for r in resolutions}}
        self.selection_settings = (f"val{c.resolution}",)
        self.selection_metric = f"val_acc@{c.resolution}"
        self.bench_setting = str(c.resolution)
        self.eval_cursor = {}

    def figure_panels(self, logits, batch, internals, index=0):
        """The image's brightness, then each module's activity over it, as seqmnist."""
        grey = {**batch, "x": batch["x"].mean(-1, keepdim=True) / 255}
        return super().figure_panels(logits, grey, internals, index)


# ----------------------------------------------------------------------------------------------
# Neural Interpreters (Rahaman et al. 2021), an MNIST-only stand-in for the paper's multi-task digits
# (MNIST, SVHN, MNIST-M): datasets derived from MNIST, each with its own CLS token in the model

DIGIT_DOMAINS = ("mnist", "inverted", "rotated")  # the digits as they are; 1 - x; a quarter turn anticlockwise


@dataclass
class DigitsConfig:
    domain: str = "mnist"  # the dataset trained and tested on: one of DIGIT_DOMAINS
    train_size: int = 60000  # training images used, the first ones of MNIST's 60k (transfer: 600-6,000)
    eval_samples: int = 10000  # test images, the first ones of MNIST's 10k

    def __post_init__(self):
        _check_positive(self, "train_size", "eval_samples")
        if self.domain not in DIGIT_DOMAINS:
            raise ValueError(f"domain must be one of {', '.join(DIGIT_DOMAINS)}, got {self.domain!r}")
        if self.train_size > 60000 or self.eval_samples > 10000:
            raise ValueError("need train_size <= 60000 and eval_samples <= 10000")


class Digits:
    """Digit classification, an MNIST-only stand-in for the Neural Interpreter's digits tasks. x: images
    (B, 1, 28, 28) in [0, 1] of one domain of DIGIT_DOMAINS; domain (B,) its index (the model's CLS token);
    y (B,) the class. Metrics: acc (%), and for the Neural Interpreter usage_u, the mean compatibility of
    function u over tokens and iterations (the share of the work each function does, domain by domain)."""

    kind = "classify"
    model_inputs = ("domain",)
    bench_setting = "test"

    def __init__(self, config, data_dir=None):
        self.config = config
        train_images, train_labels = load_mnist(data_dir, "train")
        test_images, test_labels = load_mnist(data_dir, "test")
        if len(train_images) < config.train_size or len(test_images) < config.eval_samples:
            raise DataError(f"MNIST in {data_dir} has {len(train_images)} training and {len(test_images)} test images, "
                            "fewer than --train_size and --eval_samples ask for: lower them or fix --data_dir")
        self.index = DIGIT_DOMAINS.index(config.domain)
        self.data = {"train": (self.in_domain(train_images[:config.train_size]), train_labels[:config.train_size]),
                     "test": (self.in_domain(test_images[:config.eval_samples]), test_labels[:config.eval_samples])}
        self.spec = {"kind": self.kind, "image_size": 28, "in_channels": 1, "output_size": 10,
                     "num_domains": len(DIGIT_DOMAINS)}
        self.eval_settings = {"test": {}}
        self.eval_cursor = 0

    def in_domain(self, images):
        """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], as the configured domain draws them."""
        x = images.float().unsqueeze(1) / 255
        if self.config.domain == "inverted":
            return 1 - x
        if self.config.domain == "rotated":
            return torch.rot90(x, 1, (2, 3))
        return x

    def batch_of(self, split, index):
        images, labels = self.data[split]
        return {"x": images[index], "y": labels[index], "domain": torch.full((len(index),), self.index)}

    def train_batch(self, batch_size, generator):
        return self.batch_of("train", torch.randint(0, len(self.data["train"][1]), (batch_size,), generator=generator))

    def eval_batch(self, setting, batch_size, generator):
        """The test images in order (train.py asks for consecutive chunks)."""
        start = self.eval_cursor % self.config.eval_samples
        self.eval_cursor = start + batch_size
        return self.batch_of("test", torch.arange(start, start + batch_size) % self.config.eval_samples)

    def loss(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["y"])

    def metrics(self, logits, batch, internals):
        result = {"acc": 100.0 * (logits.argmax(-1) == batch["y"]).float().sum().item(), "count": len(batch["y"])}
        if "compatibility" in internals:  # (B, L, U, N): per sample the mean over iterations and tokens
            usage = internals["compatibility"].float().mean((1, 3)).sum(0)
            result.update({f"usage_{u}": value for u, value in enumerate(usage.tolist())})
        return result

    def figure_panels(self, logits, batch, internals, index=0):
        """The image, then one row per iteration: each function's compatibility with every patch, laid out
        where the patch sits, in red over the digit in grey (full red = the largest compatibility of the
        figure, given in the label): which parts of the digit each function reads."""
        image = batch["x"][index].float().expand(3, -1, -1)
        panels = [(f"input ({DIGIT_DOMAINS[int(batch['domain'][index])]}, class {int(batch['y'][index])})",
                   _image_row([image]))]
        if "compatibility" in internals:
            C = internals["compatibility"][index].float()  # (L, U, N): token 0 is the CLS token
            L, U, N = C.shape
            grid = math.isqrt(N - 1)
            up = image.shape[-1] // grid
            top = C[:, :, 1:].max().clamp(min=1e-6)
            digit = 0.45 * image[0]
            for t in range(L):
                maps = C[t, :, 1:].reshape(U, grid, grid).repeat_interleave(up, 1).repeat_interleave(up, 2) / top
                cls = " ".join(f"{v:.2f}" for v in C[t, :, 0].tolist())
                panels.append((f"iteration {t + 1}, functions 0-{U - 1}, red = compatibility (full: {top:.2f}; cls {cls})",
                               _image_row([torch.stack([torch.maximum(m, digit), digit, digit]) for m in maps])))
        return panels


# ----------------------------------------------------------------------------------------------

TASKS = {  # name -> (config class, task class)
    "copy": (CopyConfig, Copy),
    "repeat_copy": (RepeatCopyConfig, RepeatCopy),
    "associative_recall": (AssociativeRecallConfig, AssociativeRecall),
    "parity": (ParityConfig, Parity),
    "addition": (AdditionConfig, Addition),
    "babi": (BabiConfig, Babi),
    "algo_copy": (AlgorithmicConfig, AlgoCopy),
    "algo_reverse": (AlgorithmicConfig, AlgoReverse),
    "algo_addition": (AlgorithmicConfig, AlgoAddition),
    "sprites": (SpritesConfig, Sprites),
    "sprites_sets": (SpritesConfig, SpritesSets),
    "copy_delay": (CopyDelayConfig, CopyDelay),
    "seqmnist": (SeqMNISTConfig, SeqMNIST),
    "arithmetic": (ArithmeticConfig, Arithmetic),
    "mnist_transform": (MNISTTransformConfig, MNISTTransform),
    "seqcifar": (SeqCIFARConfig, SeqCIFAR),
    "mnist_mechanisms": (MNISTMechanismsConfig, MNISTMechanisms),
    "digits": (DigitsConfig, Digits),
}
