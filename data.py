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

import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
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

    def eval_count(self, setting):
        """How many test samples the setting has."""
        return self.config.eval_samples

    def metric_key(self, metric, setting):
        """The name metrics.json gives a metric measured on a setting."""
        return f"{metric}@{setting}"

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
# RIMs paper (Goyal et al. 2019, arXiv:1909.10893), section 4.1 and Table 1: copying over a delay

@dataclass
class CopyDelayConfig:
    num_symbols: int = 8  # symbols 1..8 (0 is the blank, num_symbols + 1 the delimiter)
    length: int = 10  # symbols to remember and reproduce
    delay: int = 50  # T, Table 1: trained with T = 50
    eval_delays: tuple = (50, 200)  # Table 1: tested with T = 200
    eval_samples: int = 512  # test sequences per delay

    def __post_init__(self):
        _check_positive(self, "num_symbols", "length", "delay", "eval_samples")
        if not self.eval_delays or min(self.eval_delays) < 1:
            raise ValueError(f"eval_delays must be positive, got {self.eval_delays}")


class CopyDelay(SequenceTask):
    """Tokens: `length` symbols drawn uniformly from 1..num_symbols, then T - 1 blanks (0), the
    delimiter (num_symbols + 1), then `length` blanks during which the symbols must be reproduced
    in order: length + T + length steps. Inputs are one-hot over the symbols and the delimiter (the
    model's input maps embed them); a blank is no input, a zero vector. Targets are token ids over
    the whole vocabulary, the blank everywhere but the recall positions.
    Only the `length` recall positions are scored: averaged over all positions, a model that
    always answers blank would look almost perfect. Metrics: ce, the mean cross-entropy (nats)
    per recall position, and acc, the % of recalled symbols right."""

    metric = "acc"

    def __init__(self, config, data_dir=None):
        super().__init__(config)
        self.vocab = config.num_symbols + 2
        self.spec = {"kind": self.kind, "input_size": self.vocab - 1, "output_size": self.vocab}
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
        x = F.one_hot(tokens, self.vocab)[..., 1:].float()  # the blank (token 0) is all zeros
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

    def figure_panels(self, logits, batch, internals, index=0):
        """Input tokens over time, then target and output distributions over the recall positions."""
        keep = batch["mask"][index] > 0
        target = F.one_hot(batch["y"][index][keep], self.vocab).float().T
        return [("input tokens", batch["x"][index].T), ("target", target),
                ("output", torch.softmax(logits[index].float(), -1)[keep].T)]


# ----------------------------------------------------------------------------------------------
# MNIST from its four IDX files: downloaded once, checksum-verified, read offline afterwards

class DatasetError(Exception):
    """A dataset file is missing, corrupt or cannot be fetched: one line that says what to do."""


DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanosystem2")
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # the mirror torchvision reads
MNIST_FILES = {  # name -> md5 of the gzipped file (the values in torchvision's mnist.py)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, path, md5):
    """Fetch url to path (atomically: a part file renamed once whole), checking its md5."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = f"{path}.part"
    try:
        urllib.request.urlretrieve(url, part)
    except Exception as e:
        if os.path.exists(part):
            os.remove(part)
        raise DatasetError(f"could not download {url} ({e}): put the file in {os.path.dirname(path)} "
                           "yourself and pass that folder as --data_dir")
    if md5_of(part) != md5:
        os.remove(part)
        raise DatasetError(f"{url} arrived with the wrong md5: try again, or put the file in "
                           f"{os.path.dirname(path)} yourself and pass that folder as --data_dir")
    os.replace(part, path)


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
        raise DatasetError(f"{path} is not a readable IDX file ({e}): delete it and fetch it again")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*shape)


def dataset_file(data_dir, name, md5, url):
    """The path of `name` (or `name`.gz) in data_dir; the gzipped file is downloaded from url if neither
    is there. A gzipped file must have the md5 given; a raw one is checked by its IDX header."""
    raw, packed = os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")
    if os.path.exists(packed):
        if md5_of(packed) != md5:
            raise DatasetError(f"{packed} has the wrong md5 (corrupt or another file): delete it to "
                               f"download it again, or fix --data_dir")
        return packed
    if os.path.exists(raw):
        return raw
    download(url + name + ".gz", packed, md5)
    return packed


def load_mnist(data_dir=None, split="train"):
    """MNIST's images (N, 28, 28) uint8 and labels (N,) int64, split 'train' (60,000) or 'test'
    (10,000), from the IDX files in data_dir (default ~/.cache/nanosystem2/mnist); a missing file
    is downloaded from MNIST_URL and its md5 checked."""
    folder = data_dir or os.path.join(DEFAULT_DATA_DIR, "mnist")
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = (read_idx(dataset_file(folder, f"{prefix}-{kind}", MNIST_FILES[f"{prefix}-{kind}"], MNIST_URL))
                      for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise DatasetError(f"the MNIST {split} files in {folder} do not match (images {tuple(images.shape)}, "
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
    if os.path.exists(path):
        if md5_of(path) != md5:
            raise DatasetError(f"{path} has the wrong md5 (corrupt or another file): delete it to download "
                               "it again, or fix --data_dir")
    else:
        download(CIFAR10_URL, path, md5)
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for name in CIFAR10_BATCHES[split]:
                with archive.extractfile(f"cifar-10-batches-py/{name}") as f:
                    batch = pickle.load(f, encoding="bytes")  # a checksum-verified file
                images.append(torch.frombuffer(bytearray(batch[b"data"]), dtype=torch.uint8).view(-1, 3, 32, 32))
                labels.append(torch.tensor(batch[b"labels"], dtype=torch.long))
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError, tarfile.TarError) as e:
        raise DatasetError(f"{path} is not a readable CIFAR-10 python tarball ({e}): delete it and fetch it again")
    images, labels = torch.cat(images), torch.cat(labels)
    if len(images) != len(labels):
        raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels: delete it and fetch it again")
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

TASKS = {  # name -> (config class, task class)
    "copy": (CopyConfig, Copy),
    "repeat_copy": (RepeatCopyConfig, RepeatCopy),
    "associative_recall": (AssociativeRecallConfig, AssociativeRecall),
    "parity": (ParityConfig, Parity),
    "addition": (AdditionConfig, Addition),
    "copy_delay": (CopyDelayConfig, CopyDelay),
    "seqmnist": (SeqMNISTConfig, SeqMNIST),
    "seqcifar": (SeqCIFARConfig, SeqCIFAR),
}
