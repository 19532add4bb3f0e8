"""
Train any model here on any task it fits, evaluate it where the paper does, draw what it learned.

    python train.py --model ntm --task copy            # the NTM copy result, a few minutes on a CPU
    python train.py --model lstm --task copy           # the LSTM baseline on the same task
    python train.py --model ntm --task copy -h         # every flag of the model, task and training
    python train.py --model ntm --task copy --resume   # continue from out/ntm_copy/ckpt.pt
    python train.py --model ntm --task copy --eval_only
    python train.py --model universal_transformer --task babi --data_dir DIR   # bAbI task 1, 10K
    torchrun --standalone --nproc_per_node 2 train.py --model ntm --task copy   # data parallel

Writes to --out_dir (default out/<model>_<task>): ckpt.pt, log.jsonl (training loss every
--log_interval steps and every evaluation), metrics.json (the final evaluation, flat
'<metric>@<setting>' keys plus 'iter' and 'seconds') and figures as PNG files.

Precedence of settings: dataclass defaults < PRESETS[(model, task)] < command-line flags.
On --resume and --eval_only the model and task configs come from the checkpoint.
"""

import argparse
import inspect
import io
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from collections import namedtuple
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

from data import TASKS, DataError
from act import ACT, ACTConfig
from lstm import LSTM, LSTMConfig
from nps import NPS, NPSConfig
from ntm import NTM, NTMConfig
from rims import RIMs, RIMsConfig
from slot_attention import SlotAttention, SlotAttentionConfig
from universal_transformer import TransformerConfig, UniversalTransformer, UTConfig
from brims import BRIMs, BRIMsConfig
from lim import LIM, LIMConfig
from neural_interpreter import NeuralInterpreter, NIConfig
from vit import ViT, ViTConfig

# name -> (config class, model class, task kinds it fits, compile on the CPU). Adding a model is one row here.
# The last column: torch.compile is the default on CUDA for every model and on the CPU for those whose compiled
# training step bench.py measured faster there (python bench.py --modes eager,compiled; README, Speed). ACT is
# off: its number of steps varies with pondering, so training recompiles (1,000 steps of 16-element parity:
# 14 s eager, 57 s compiled); so do the Transformer and the UT, whose string lengths vary (algo_reverse: 300
# steps in 71 s eager, 250 in 19 minutes compiled); NPS is slower compiled; the LSTM is one fused nn.LSTM call.
# LIM is off until its training is tested compiled (its identity and adversarial phases are two different graphs);
# bench.py measured its adversarial step 1.22x faster compiled. The Neural Interpreter's step is 1.61x faster
# compiled (digits, batch 64; the ViT baseline's 1.10x, not worth its compile).
ModelEntry = namedtuple("ModelEntry", "config model kinds cpu_compile")
MODELS = {
    "ntm": ModelEntry(NTMConfig, NTM, ("sequence",), True),
    "lstm": ModelEntry(LSTMConfig, LSTM, ("sequence", "autoregressive", "transform", "seq2seq"), False),
    "act": ModelEntry(ACTConfig, ACT, ("sequence",), False),
    "universal_transformer": ModelEntry(UTConfig, UniversalTransformer, ("story", "seq2seq"), False),
    "transformer": ModelEntry(TransformerConfig, UniversalTransformer, ("story", "seq2seq"), False),  # universal=False
    "slot_attention": ModelEntry(SlotAttentionConfig, SlotAttention, ("image",), True),
    "rims": ModelEntry(RIMsConfig, RIMs, ("sequence",), True),
    "nps": ModelEntry(NPSConfig, NPS, ("autoregressive", "transform"), False),
    "brims": ModelEntry(BRIMsConfig, BRIMs, ("sequence",), True),
    "lim": ModelEntry(LIMConfig, LIM, ("unpaired",), False),
    "neural_interpreter": ModelEntry(NIConfig, NeuralInterpreter, ("classify",), True),
    "vit": ModelEntry(ViTConfig, ViT, ("classify",), False),
}

# Model fields that model_config_for takes from task.spec (never flags): the data decides them
# (sizes, integer-code vocabularies, for NPS which input channels form a slot, condition the
# rules or are fed back, and whether outputs need a decoder).
SIZED_BY_TASK = ("input_size", "output_size", "vocab_size", "sentence_length", "question_position_mask", "image_size",
                 "in_channels", "input_vocab", "input_groups", "condition_size", "feedback_size", "decoder", "num_domains")

# Of those, the ones a flag may set where the task's spec leaves them out: input_vocab is set by tasks of
# byte inputs (seqcifar); for MNIST's binary pixel the preset embeds it (2) and --input_vocab 0 feeds it as is.
FLAGGABLE = ("input_vocab",)

# The settings (training, model or task fields) that reproduce each result; flags override them.
PRESETS = {
    ("ntm", "copy"): dict(max_iters=5000, batch_size=32, lr=1e-3),
    ("lstm", "copy"): dict(max_iters=5000, batch_size=32, lr=1e-3),
    # NTM paper, section 4.2: a public port converges after 30-40k updates; 20k here (docs/ntm.md)
    ("ntm", "repeat_copy"): dict(max_iters=20000, batch_size=32, lr=1e-3, eval_interval=2500, log_interval=50),
    ("ntm", "associative_recall"): dict(max_iters=5000, batch_size=32, lr=1e-3),
    ("act", "parity"): dict(max_iters=50000, batch_size=128, lr=1e-3, eval_interval=2500, log_interval=50),
    # ACT paper, section 3.3: one LSTM layer of 512 cells, batch 32, at most M = 20 ponder steps
    ("act", "addition"): dict(cell="lstm", hidden_size=512, max_steps=20, max_iters=2500, batch_size=32,
                              lr=1e-3, eval_interval=500, log_interval=50),
    # RIMs paper, Table 1 (copying): k_T = 6, k_A = 4, sized down for a CPU (see README)
    ("rims", "copy_delay"): dict(hidden_size=120, input_key_size=32, input_value_size=32, comm_key_size=16,
                                 comm_value_size=16, max_iters=2000, batch_size=32, lr=3e-3, grad_clip=1.0,
                                 eval_interval=250, log_interval=25),
    ("lstm", "copy_delay"): dict(hidden_size=120, num_layers=1, forget_bias=1.0, max_iters=2000, batch_size=32, lr=3e-3,
                                 grad_clip=1.0, eval_interval=250, log_interval=25),
    # RIMs paper, Table 1 (sequential MNIST): k_T = 6, k_A = 4 at hidden 600 for 100 epochs; this preset is
    # a CPU-sized version (hidden 120, 300 steps of 32 images); the paper's command is in the README
    ("rims", "seqmnist"): dict(hidden_size=120, input_key_size=32, input_value_size=32, comm_key_size=16,
                               comm_value_size=16, input_vocab=2, embed_size=120, max_iters=300, batch_size=32, lr=3e-3, grad_clip=1.0,
                               eval_interval=100, log_interval=10, val_samples=1000, eval_samples=1000),
    # BRIMs paper, Table 1: two layers of RIMs; the RIMs CPU-scale protocol above, each layer the size of
    # that RIMs model (6 modules, 4 active, hidden 120). The binary pixel is embedded by a 2-entry lookup table
    # of the layer's size, as the official code does (see brims.py and the README)
    ("brims", "seqmnist"): dict(num_layers=2, num_modules=(6,), num_active=(4,), hidden_size=(120,), input_key_size=32,
                                input_value_size=32, comm_key_size=16, comm_value_size=16, input_vocab=2,
                                embed_size=120, max_iters=300, batch_size=32, lr=3e-3, grad_clip=1.0,
                                eval_interval=100, log_interval=10, val_samples=1000, eval_samples=1000),
    # BRIMs paper, Table 2 (sequential CIFAR-10 at 16 x 16): the model's defaults (two layers of 6 modules, 4 active,
    # hidden 600), 100 epochs of the 40k training images at batch 64, Adam 7e-4 and clip 1 as the official scripts.
    # Not run on our CPU (see README)
    ("brims", "seqcifar"): dict(max_iters=62500, batch_size=64, lr=7e-4, grad_clip=1.0, eval_interval=625, log_interval=50),
    ("lstm", "seqmnist"): dict(hidden_size=120, num_layers=1, forget_bias=1.0, max_iters=300, batch_size=32, lr=3e-3, grad_clip=1.0,
                               eval_interval=100, log_interval=10, val_samples=1000, eval_samples=1000),
    ("lstm", "addition"): dict(hidden_size=512, num_layers=1, max_iters=10000, batch_size=32, lr=1e-3,
                               eval_interval=1000, log_interval=50),
    # UT paper, bAbI, scaled to a CPU: one bAbI task of en-10k, a small model, a few minutes
    **{(m, "babi"): dict(d_model=64, d_ff=128, num_heads=4, dropout=0.1, max_iters=1500, batch_size=32, lr=1e-3,
                         eval_interval=500, log_interval=50) for m in ("universal_transformer", "transformer")},
    # UT paper, algorithmic tasks on a CPU: a small encoder-decoder, 8,000 steps (README for the paper-scale command);
    # addition strings hold at least 'a+b'
    **{(m, t): dict(d_model=64, d_ff=128, num_heads=4, dropout=0.0, max_iters=8000, batch_size=32, lr=1e-3,
                    decay_lr=True, eval_interval=4000, log_interval=50, min_len=3 if t == "algo_addition" else 1)
       for m in ("universal_transformer", "transformer") for t in ("algo_copy", "algo_reverse", "algo_addition")},
    # the sequence-to-sequence LSTM baseline of the same tasks: 2 layers of 128, the same budget
    **{("lstm", t): dict(hidden_size=128, num_layers=2, max_iters=8000, batch_size=32, lr=1e-3, decay_lr=True,
                         eval_interval=4000, log_interval=50, min_len=3 if t == "algo_addition" else 1)
       for t in ("algo_copy", "algo_reverse", "algo_addition")},
    # CPU scale (docs/slot_attention.md): 32 x 32 sprites, the encoder downsampling once, the decoder broadcast at
    # 8 x 8 (16 channels), pixels in [0, 1] (the official code: [-1, 1]; no seed bound in our screens), batch 16;
    # the paper's Adam 4e-4 with a warm-up of 1,000 steps (paper: 10,000; with 1e-3 after 250 most seeds' slots
    # collapsed onto one another) and halving every 4,000 (paper: 100,000), for a CPU budget. Paper scale: docs.
    ("slot_attention", "sprites"): dict(num_slots=6, encoder_stride_layers=1, decoder_init_size=8, decoder_channels=16,
                                        signed=False, max_iters=4000, batch_size=16, lr=4e-4, warmup_iters=1000,
                                        lr_half_life=4000, eval_interval=250, log_interval=50),
    # set prediction on the same scenes and pixels as object discovery; the encoder downsamples once (no decoder)
    ("slot_attention", "sprites_sets"): dict(num_slots=6, encoder_stride_layers=1, signed=False, max_iters=2500,
                                             batch_size=32, lr=4e-4, warmup_iters=200, lr_half_life=2500,
                                             eval_interval=250, log_interval=50),
    # NPS paper, arithmetic, official synthetic/runner.sh: 3 rules, rule embeddings of 32, slots of 64,
    # batch 50 sequences of 20 steps; Adam 1e-3 with a cosine decay instead of 1e-4 for 100 epochs (CPU budget)
    ("nps", "arithmetic"): dict(max_iters=3000, batch_size=50, lr=1e-3, decay_lr=True, grad_clip=1.0,
                                eval_interval=1000, log_interval=50),
    # NPS paper, MNIST transformations, official MNIST/run.sh: 4 rules with embeddings of 6, slots of 100, the
    # image and the transformation as two slots (LayerNormed, a key projection each), scores / sqrt(32), stage 2
    # Gumbel tau 0.5, the rule's output the only path to the conv decoder; batches of 50 chains of 4. CPU budget:
    # 3,000 steps, 10k digits, a 40 x 40 canvas (official: 100 epochs of 1,200, 64 x 64), and Adam 1e-3 where the
    # official code has 1e-4: in 300-step screens 1e-4 kept one rule for everything in every seed (docs/nps.md)
    ("nps", "mnist_transform"): dict(num_rules=4, slot_size=100, rule_size=6, key_size=32, rule_hidden=128,
                                     encoder_hidden=64, slot_norm=True, slot_keys="per_slot", scale_scores=True,
                                     rule_input="context", residual=False, context_tau=0.5, max_iters=3000,
                                     batch_size=50, lr=1e-3, grad_clip=1.0, eval_interval=500, log_interval=50),
    ("lstm", "mnist_transform"): dict(hidden_size=256, num_layers=1, max_iters=3000, batch_size=50, lr=1e-3,
                                      decay_lr=True, grad_clip=1.0, eval_interval=500, log_interval=50),
    # LIM paper, section 4 (MNIST), CPU scale: experts of four 3 x 3 layers of 16 channels without batch norm (paper:
    # five of 32 with it; with it our screens learned slower, docs/lim.md), a discriminator of 16, 16, 32, 32 channels
    # and a hidden layer of 256 (paper: 1024); batch 32, Adam 1e-3 as the public code; 200 test digits per mechanism
    ("lim", "mnist_mechanisms"): dict(expert_layers=4, expert_channels=16, expert_batch_norm=False,
                                      disc_channels=(16, 16, 32, 32), disc_hidden=256, identity_iters=150,
                                      max_iters=2500, batch_size=32, lr=1e-3, eval_interval=250, log_interval=50,
                                      eval_samples=200),
    ("lstm", "arithmetic"): dict(hidden_size=64, num_layers=1, max_iters=3000, batch_size=50, lr=1e-3,
                                 decay_lr=True, grad_clip=1.0, eval_interval=1000, log_interval=50),
    # Neural Interpreters on the MNIST stand-in, CPU scale (docs/neural_interpreter.md): 28 x 28 in patches of 7
    # (16 tokens and a CLS token), width 64, types of 16, 5 functions, 4 iterations, 2 heads of 16; Adam 1e-3, batch 64.
    # The ViT baseline: about as many parameters (2 layers of width 64, MLP 64: 55k against 56k)
    ("neural_interpreter", "digits"): dict(patch_size=7, width=64, code_size=64, type_size=16, num_functions=5,
                                           num_iterations=4, num_heads=2, head_size=16, max_iters=3000, batch_size=64,
                                           lr=1e-3, decay_lr=True, eval_interval=500, log_interval=50,
                                           eval_samples=2000),
    ("vit", "digits"): dict(patch_size=7, width=64, depth=2, num_heads=2, mlp_size=64, max_iters=3000, batch_size=64,
                            lr=1e-3, decay_lr=True, eval_interval=500, log_interval=50, eval_samples=2000),
}


@dataclass
class TrainConfig:
    max_iters: int = 5000  # optimizer steps
    batch_size: int = 32  # per process
    lr: float = 1e-3  # Adam
    decay_lr: bool = False  # cosine decay from lr to lr/10 over max_iters
    warmup_iters: int = 0  # linear warm-up of the learning rate from 0 over this many steps
    lr_half_life: int = 0  # exponential decay: lr * 0.5 ** (iter / lr_half_life) (0 = off)
    grad_clip: float = 10.0  # clip the global gradient norm (0 = off)
    seed: int = 0
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    out_dir: str = ""  # default out/<model>_<task>
    data_dir: str = ""  # where real datasets are cached or read offline
    eval_interval: int = 500  # evaluate and checkpoint every this many steps
    log_interval: int = 10  # write the training loss to log.jsonl every this many steps
    compile: bool = None  # torch.compile; default: on for CUDA, on the CPU where MODELS marks it faster, off on MPS
    figures: bool = True  # draw PNG figures after the final evaluation
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    init_from: str = ""  # start from the weights of this checkpoint (transfer); configs still come from presets and flags
    eval_only: bool = False  # evaluate <out_dir>/ckpt.pt and exit
    stop_when: str = ""  # stop at the first evaluation where this holds, METRIC<VALUE or METRIC>VALUE (e.g. err@64<2)

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "eval_interval", "log_interval", "warmup_iters", "lr_half_life"):
            if getattr(self, name) < (1 if name in ("batch_size", "eval_interval", "log_interval") else 0):
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.grad_clip < 0:
            raise ValueError(f"--lr must be > 0 and --grad_clip >= 0, got {self.lr}, {self.grad_clip}")
        if self.stop_when:
            parse_stop_rule(self.stop_when)


def parse_stop_rule(text):
    """'err@64<2' -> ('err@64', '<', 2.0); a ValueError naming the form otherwise."""
    for op in ("<", ">"):
        name, sep, value = text.partition(op)
        if sep and name.strip():
            try:
                return name.strip(), op, float(value)
            except ValueError:
                break
    raise ValueError(f"--stop_when must read METRIC<VALUE or METRIC>VALUE (e.g. err@64<2), got {text!r}")


class UserError(Exception):
    """A mistake in what was asked for: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Command line: every dataclass field is a flag.

class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # no abbreviations: --mode (NPS) must not be read as --model
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see python train.py --model M --task T -h)")


def parse_tuple(text, like):
    kind = type(like[0]) if like else str
    try:
        return tuple(kind(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")


def add_fields(parser, title, config_cls, skip=(), defaults=None):
    group = parser.add_argument_group(title)
    for f in fields(config_cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        help_text = f"(default: {default})"
        if f.type is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif f.type is tuple:
            group.add_argument(f"--{f.name}", type=lambda s, d=f.default: parse_tuple(s, d),
                               default=argparse.SUPPRESS, help=help_text + ", comma-separated")
        else:
            group.add_argument(f"--{f.name}", type=f.type, default=argparse.SUPPRESS, help=help_text)


def build_config(config_cls, values, what):
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad {what} setting: {e}")


def parse_args(argv):
    """Returns (model_name, task_name, explicit flags as a dict)."""
    pre = Parser(add_help=False)
    pre.add_argument("--model", default="ntm")
    pre.add_argument("--task", default="copy")
    known, _ = pre.parse_known_args(argv)
    if known.model not in MODELS:
        raise UserError(f"unknown model {known.model!r}: choose one of {', '.join(MODELS)}")
    if known.task not in TASKS:
        raise UserError(f"unknown task {known.task!r}: choose one of {', '.join(TASKS)}")
    model_cfg, task_cfg = MODELS[known.model][0], TASKS[known.task][0]
    parser = Parser(description="Train a model on a task. Flags default as shown.",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="ntm", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--task", default="copy", help=f"one of {', '.join(TASKS)}")
    preset = PRESETS.get((known.model, known.task))
    add_fields(parser, "training", TrainConfig, defaults=preset)
    add_fields(parser, f"model ({known.model})", model_cfg, skip=tuple(k for k in SIZED_BY_TASK if k not in FLAGGABLE),
               defaults=preset)
    add_fields(parser, f"task ({known.task})", task_cfg, defaults=preset)
    args = vars(parser.parse_args(argv))
    return args.pop("model"), args.pop("task"), args


def model_config_for(model_name, task, values):
    """The model's config, sized for the task: every SIZED_BY_TASK entry of task.spec the config has."""
    names = {f.name for f in fields(MODELS[model_name][0])}
    if task.spec.get("input_vocab") and "input_vocab" not in names:
        fitting = [m for m, (cfg, *_) in MODELS.items() if "input_vocab" in {f.name for f in fields(cfg)}]
        raise UserError(f"--model {model_name} cannot embed this task's integer inputs (input_vocab "
                        f"{task.spec['input_vocab']}): use {', '.join(fitting)}")
    sizes = {k: task.spec[k] for k in SIZED_BY_TASK if k in task.spec and k in names}
    clash = [k for k in FLAGGABLE if k in sizes and k in values and values[k] != sizes[k]]
    if clash:
        raise UserError(f"--{clash[0]} is set by this task ({sizes[clash[0]]}): drop the flag")
    return build_config(MODELS[model_name][0], {**values, **sizes}, "model")


def split_flags(flags, config_cls):
    names = {f.name for f in fields(config_cls)}
    return {k: v for k, v in flags.items() if k in names}


# ----------------------------------------------------------------------------------------------
# Pictures: a PNG writer of our own (zlib + struct) and heat maps stacked into panels.

def write_png(path, rgb):
    """rgb: uint8 tensor (H, W, 3)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(row.flatten().tolist()) for row in rgb)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    atomic_write(path, png)


COLORS = torch.tensor([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]],
                      dtype=torch.float32)  # dark blue (0) -> yellow (1)


def heatmap(values, cell):
    """values (rows, cols) in [0, 1] -> uint8 image with cell x cell pixels per value."""
    v = values.float().clamp(0, 1) * (len(COLORS) - 1)
    low = v.floor().long().clamp(max=len(COLORS) - 2)
    frac = (v - low).unsqueeze(-1)
    rgb = COLORS[low] * (1 - frac) + COLORS[low + 1] * frac
    return rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1).round().to(torch.uint8)


# A 3 x 5 pixel font for panel labels: each glyph is its five rows of three pixels.
FONT = dict(item.split(":") for item in """
A:010101111101101 B:110101110101110 C:011100100100011 D:110101101101110 E:111100110100111
F:111100110100100 G:011100101101011 H:101101111101101 I:111010010010111 J:001001001101010
K:101101110101101 L:100100100100111 M:101111111101101 N:110101101101101 O:010101101101010
P:110101110100100 Q:010101101110011 R:110101110101101 S:011100010001110 T:111010010010010
U:101101101101111 V:101101101101010 W:101101111111101 X:101101010101101 Y:101101010010010
Z:111001010100111 0:111101101101111 1:010110010010111 2:110001010100111 3:110001010001110
4:101101111001001 5:111100110001110 6:011100111101111 7:111001010010010 8:111101111101111
9:111101111001110 _:000000000000111 -:000000111000000 .:000000000000010 =:000111000111000
(:001010010010001 ):100010010010100 @:010101111100011 /:001001010100100 +:000010111010000
""".split())


def text_image(text, scale=2, width=None):
    """White capitals on grey: (7 * scale, width, 3) uint8."""
    glyphs = [torch.tensor([int(b) for b in FONT.get(ch, "0" * 15)]).view(5, 3) for ch in text.upper()]
    spaced = [torch.cat([g, torch.zeros(5, 1, dtype=torch.long)], dim=1) for g in glyphs] or [torch.zeros(5, 1, dtype=torch.long)]
    bitmap = torch.nn.functional.pad(torch.cat(spaced, dim=1), (1, 0, 1, 1))  # (7, 4 * len + 1)
    pixels = bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    image = torch.where(pixels.bool().unsqueeze(-1), torch.tensor(255), torch.tensor(96)).to(torch.uint8).expand(-1, -1, 3)
    width = width or image.shape[1]
    pad = torch.full((image.shape[0], max(0, width - image.shape[1]), 3), 96, dtype=torch.uint8)
    return torch.cat([image, pad], dim=1)[:, :width]


def line_chart(xs, series, width=300, height=180, pad=8, top=1.0, bands=()):
    """Lines over xs on a fixed y range [0, top] (grid lines at quarters), x from 0 to max(xs): uint8 (H, W, 3).
    series: (ys, rgb) pairs, values clipped to the range; bands: (lows, highs, rgb) pairs filled first, lighter."""
    plot = torch.full((height, width, 3), 255, dtype=torch.uint8)
    to_x = lambda v: pad + round(v / (max(xs) or 1) * (width - 2 * pad - 1))
    to_y = lambda v: height - 1 - pad - round(min(max(v / top, 0.0), 1.0) * (height - 2 * pad - 1))
    for level in (0.25, 0.5, 0.75, 1.0):
        plot[to_y(level * top), pad:width - pad] = 215
    for lows, highs, color in bands:
        light = (255 - (255 - torch.tensor(color, dtype=torch.float32)) * 0.3).to(torch.uint8)
        columns = [(to_x(x), to_y(high), to_y(low)) for x, low, high in zip(xs, lows, highs)]
        for (x0, t0, b0), (x1, t1, b1) in zip(columns, columns[1:]):
            for x in range(x0, x1 + 1):
                f = (x - x0) / max(x1 - x0, 1)
                plot[round(t0 + (t1 - t0) * f):round(b0 + (b1 - b0) * f) + 1, x] = light
    for ys, color in series:
        color = torch.tensor(color, dtype=torch.uint8)
        points = [(to_x(x), to_y(y)) for x, y in zip(xs, ys)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for i in range(steps + 1):
                y, x = round(y0 + (y1 - y0) * i / steps), round(x0 + (x1 - x0) * i / steps)
                plot[y - 1:y + 1, x] = color
        if len(points) <= 40:  # mark the points of a sparse series
            for x, y in points:
                plot[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = color
    plot[-1, :] = 0
    plot[:, 0] = 0
    return plot


def draw_panels(path, panels, max_width=1200, max_height=1600):
    """panels: list of (label, tensor in [0, 1]) drawn top to bottom, each under its label: a 2-D
    tensor as a heat map, an (H, W, 3) tensor as an RGB image."""
    cols = max(p.shape[1] for _, p in panels)
    rows = sum(p.shape[0] + 2 for _, p in panels)
    cell = max(2, min(16, max_width // max(cols, 1), max_height // rows))

    def render(p):
        if p.dim() == 2:
            return heatmap(p, cell)
        rgb = (p.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)

    images = [render(p) for _, p in panels]
    width = max(img.shape[1] for img in images + [text_image(label) for label, _ in panels])
    stack = []
    for (label, _), img in zip(panels, images):
        pad = torch.full((img.shape[0], width - img.shape[1], 3), 96, dtype=torch.uint8)
        stack += [text_image(label, width=width), torch.cat([img, pad], dim=1)]
    write_png(path, torch.cat(stack, dim=0))


def internal_panels(internals, index=0):
    """Model internals over time as (features, time) maps; weightings cropped to the rows used."""
    panels = []
    for name, value in internals.items():
        v = value[index].float()  # (T, ...)
        v = v.reshape(v.shape[0], -1).T  # (features, T)
        if name.endswith("weights"):  # memory is circular: show the shortest arc of rows used
            used = (v.max(dim=1).values > 0.01).nonzero().flatten()
            if len(used):
                gaps = torch.diff(used, append=used[:1] + len(v))  # distance to the next used row
                start = int(used[(int(gaps.argmax()) + 1) % len(used)])
                v = torch.roll(v, -start, dims=0)[: len(v) - int(gaps.max()) + 1]
        elif v.min() < 0:  # signed vectors: map [-m, m] to [0, 1]
            v = v / (2 * v.abs().max().clamp(min=1e-8)) + 0.5
        else:  # counts and costs: map [0, max] to [0, 1]
            v = v / v.max().clamp(min=1e-8)
        panels.append((name, v))
    return panels


# ----------------------------------------------------------------------------------------------
# Files: written whole or not at all.

def atomic_write(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def check_out_dir(out_dir):
    """Refuse, before any work, an --out_dir that is a file, lies under a file or cannot be written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file, not a folder: pass a folder path")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--out_dir {out_dir} lies under the file {existing}: pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir} cannot be written ({existing} is not writable): pass another folder")


def load_checkpoint(path, model_name, task_name):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first (without --resume/--eval_only) or pass the right --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        found = (ckpt["model_name"], ckpt["task_name"])
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint (corrupt or not ours): delete it and train again, or pass another --out_dir")
    if found[0] != model_name or (task_name is not None and found[1] != task_name):  # task None: any task
        raise UserError(f"{path} holds --model {found[0]} --task {found[1]}, not --model {model_name} "
                        f"--task {task_name or found[1]}: pass those flags or another --out_dir")
    return ckpt


# ----------------------------------------------------------------------------------------------

def autodetect_device(requested):
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = requested.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise UserError(f"unknown --device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise UserError(f"--device {requested} is not available on this machine: use --device auto or cpu")
    return requested


def autocast_for(device_type):
    """bf16 autocast on CUDA where supported; eager fp32 elsewhere."""
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


def compile_for_training(model):
    """Recurrent models loop over time in Python: compile their one-step function, not the
    unrolled loop. Returns the module to train (parameters and state dict stay the model's).
    The model itself stays eager for evaluation (see eager_step), which runs other batch shapes."""
    if hasattr(model, "step"):
        model.step = torch.compile(model.step)
        return model
    return torch.compile(model)


def undo_compile(model):
    """Give a recurrent model its own step back, after compile_for_training (a compiled whole model is a
    wrapper: the model itself was never changed)."""
    model.__dict__.pop("step", None)


@contextmanager
def eager_step(model):
    """Run a recurrent model with its own step while the training loop holds a compiled one: a
    compiled step would recompile (tens of seconds on a CPU) for each new evaluation batch shape."""
    compiled = model.__dict__.pop("step", None)
    try:
        yield model
    finally:
        if compiled is not None:
            model.step = compiled


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(task, batch, model):
    """The keyword tensors beside x that the task hands the model and the model's forward takes
    (e.g. a padding mask; an LSTM has no use for the algorithmic tasks' position offsets)."""
    takes = inspect.signature(model.forward).parameters
    return {k: batch[k] for k in getattr(task, "model_inputs", ()) if k in takes and k in batch}


def objective(task, logits, internals, batch):
    """The loss to train on: the task's score of the outputs, except for a model that plays a game of its own
    (LIM: experts against a discriminator), which returns its objective as internals["loss"]."""
    return internals["loss"] if "loss" in internals else task.loss(logits, batch)


def fixed_eval_data(task, chunk):
    """The evaluation batches, {setting: [batches of at most chunk samples]}: generated from the fixed
    seed 1234, the same for every run and every training seed, or the task's own test files."""
    generator = torch.Generator().manual_seed(1234)
    if hasattr(task, "eval_data"):  # e.g. bAbI: every question of the test files, in order
        return task.eval_data(chunk, generator)
    count = getattr(task, "eval_count", lambda setting: task.config.eval_samples)
    return {s: [task.eval_batch(s, min(chunk, count(s) - i), generator) for i in range(0, count(s), chunk)]
            for s in task.eval_settings}


@torch.no_grad()
def evaluate(model, task, eval_data, device, autocast):
    """Mean of the task's metrics over each evaluation setting -> {'<metric>@<setting>': value}."""
    model.eval()
    results = {}
    with eager_step(model):
        for setting, batches in eval_data.items():
            totals = {}
            for batch in batches:
                batch = to_device(batch, device)
                with autocast:
                    logits, internals = model(batch["x"], **model_inputs(task, batch, model))
                for key, value in task.metrics(logits, batch, internals).items():
                    totals[key] = totals.get(key, 0) + value
            count = totals.pop("count")
            name = getattr(task, "metric_key", lambda metric, setting: f"{metric}@{setting}")
            finish = getattr(task, "finish_metrics", lambda totals, count: {k: v / count for k, v in totals.items()})
            results.update({name(key, setting): value for key, value in finish(totals, count).items()})
    if hasattr(task, "summary"):  # metrics over every setting, e.g. bAbI's mean error
        results.update(task.summary(results))
    model.train()
    return results


def draw_figures(model, task, eval_data, out_dir, device, autocast):
    """For each evaluation setting: the task's panels (target vs output, NTM paper Fig. 4/5; images
    and slots, Slot Attention Fig. 2), and for sequence tasks the model's internals over time for
    one sequence (NTM Fig. 6) where it has any."""
    model.eval()
    with eager_step(model):
        for setting, batches in eval_data.items():
            batch = to_device(batches[0], device)
            with torch.no_grad(), autocast:
                logits, internals = model(batch["x"], return_internals=True, **model_inputs(task, batch, model))
            internals = {k: v.cpu() for k, v in internals.items()}
            panels = task.figure_panels(logits.cpu(), to_device(batch, "cpu"), internals)
            if panels:
                draw_panels(os.path.join(out_dir, f"outputs_{setting}.png"), panels)
            if internals and task.spec["kind"] == "sequence" and batch["x"].shape[1] > 1:  # internals over time
                inputs = [("input", batch["x"][0].float().cpu().T)]
                outputs = [("output", torch.sigmoid(logits[0].float()).cpu().T)]
                draw_panels(os.path.join(out_dir, f"internals_{setting}.png"),
                            inputs + internal_panels(internals) + outputs)
    model.train()


def main(argv=None):
    model_name, task_name, flags = parse_args(sys.argv[1:] if argv is None else argv)
    model_cls_cfg, model_cls, kinds, cpu_compile = MODELS[model_name]
    task_cls_cfg, task_cls = TASKS[task_name]
    preset = PRESETS.get((model_name, task_name), {})
    train_values = {**split_flags(preset, TrainConfig), **split_flags(flags, TrainConfig)}
    cfg = build_config(TrainConfig, train_values, "training")
    out_dir = cfg.out_dir or os.path.join("out", f"{model_name}_{task_name}")
    check_out_dir(out_dir)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # distributed data parallel under torchrun, as nanoGPT does
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    device = autodetect_device(cfg.device)
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    device_type = device.split(":")[0]
    if device_type == "cpu":  # subnormal floats to zero: LIM's experts make them on MNIST's black backgrounds,
        torch.set_flush_denormal(True)  # where they made a training step 2.5x slower (docs/lim.md)

    # configs: from the checkpoint when continuing, else from presets and flags
    ckpt = load_checkpoint(ckpt_path, model_name, task_name) if (cfg.resume or cfg.eval_only) else None
    task_values = ckpt["task_config"] if ckpt else split_flags(preset, task_cls_cfg)
    task_cfg = build_config(task_cls_cfg, {**task_values, **split_flags(flags, task_cls_cfg)}, "task")
    try:
        task = task_cls(task_cfg, data_dir=cfg.data_dir or None)
    except DataError as e:
        raise UserError(str(e))
    except ValueError as e:
        raise UserError(f"bad task setting: {e}")
    if task.spec["kind"] not in kinds:
        fitting = [m for m, (_, _, k, _) in MODELS.items() if task.spec["kind"] in k]
        raise UserError(f"--model {model_name} does not fit --task {task_name} ({task.spec['kind']} data): "
                        f"use one of {', '.join(fitting)}")
    if ckpt:
        model_flags = split_flags(flags, model_cls_cfg)
        clash = {k: v for k, v in model_flags.items()
                 if k not in SIZED_BY_TASK and ckpt["model_config"].get(k) != v}
        if clash:
            raise UserError(f"{', '.join('--' + k for k in clash)} differ from the checkpoint in {out_dir}: "
                            "drop them or pass another --out_dir")
        model_cfg = build_config(model_cls_cfg, ckpt["model_config"], "model")
    else:
        model_values = {**split_flags(preset, model_cls_cfg), **split_flags(flags, model_cls_cfg)}
        model_cfg = model_config_for(model_name, task, model_values)
    if hasattr(task, "check_model"):  # a task that needs something of the model (e.g. enough slots)
        try:
            task.check_model(model_cfg)
        except ValueError as e:
            raise UserError(f"--model {model_name} does not fit --task {task_name}: {e}")

    torch.manual_seed(cfg.seed)
    model = model_cls(model_cfg).to(device)
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"{ckpt_path} does not match the {model_name} model: delete it or pass another --out_dir")
    elif cfg.init_from:  # transfer: another run's weights, this run's configs
        if not os.path.isfile(cfg.init_from):
            raise UserError(f"--init_from {cfg.init_from}: no such checkpoint; pass a run's ckpt.pt")
        start = load_checkpoint(cfg.init_from, model_name, None)
        try:
            model.load_state_dict(start["model"])
        except RuntimeError:
            raise UserError(f"--init_from {cfg.init_from} holds a {model_name} of other sizes than this run's: "
                            "pass the same model flags as its run")
    autocast = autocast_for(device_type)

    # evaluation data: fixed seeds, the same for every run and every training seed
    eval_data = fixed_eval_data(task, cfg.batch_size * 8)
    # tasks with a validation split (e.g. seqmnist) evaluate only it during training, keep the
    # checkpoint that scores best on it and report every setting (the test sets) for that one
    selection = getattr(task, "selection_metric", None)
    sign = -1.0 if getattr(task, "selection_minimise", False) else 1.0  # best["value"] holds sign * metric
    periodic_settings = getattr(task, "selection_settings", None) or tuple(eval_data)
    best = {"value": -math.inf, "iter": 0, "model": None}

    raw_model = model  # saved and evaluated; a compiled / DDP-wrapped one may train

    def evaluation(at_iter, train_seconds, settings=None):
        data = {s: eval_data[s] for s in (settings or eval_data)}
        return {**evaluate(raw_model, task, data, device, autocast), "iter": at_iter,
                "seconds": round(train_seconds, 1), "compile_seconds": round(compile_seconds, 1)}

    def final_evaluation():
        """Every setting, on the selected checkpoint where the task selects one."""
        if selection and best["model"] is not None:
            raw_model.load_state_dict(best["model"])
            return {**evaluation(iter_num, seconds), "selected_iter": best["iter"]}
        return evaluation(iter_num, seconds)

    def write_results(metrics):
        atomic_write(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2))
        if cfg.figures:
            draw_figures(raw_model, task, eval_data, out_dir, device, autocast)

    if ckpt and ckpt.get("best"):
        best = ckpt["best"]
    if cfg.eval_only:
        metrics = None
        if master:
            # seconds: the training time, as after training
            iter_num, seconds, compile_seconds = ckpt["iter"], ckpt["seconds"], ckpt.get("compile_seconds", 0.0)
            metrics = final_evaluation()
            write_results(metrics)
            print(json.dumps(metrics))
        return {"metrics": metrics, "model": model}

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)  # transfer freezes some
    data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    iter_num, seconds, compile_seconds = 0, 0.0, 0.0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, seconds, compile_seconds = ckpt["iter"], ckpt["seconds"], ckpt.get("compile_seconds", 0.0)
        data_gen.set_state(ckpt["rng"]["data"][rank] if rank < len(ckpt["rng"]["data"]) else ckpt["rng"]["data"][0])
        torch.set_rng_state(ckpt["rng"]["torch"])

    # torch.compile: on CUDA always, on the CPU where MODELS says it is faster, never on MPS (eager fp32)
    compiling = cfg.compile if cfg.compile is not None else (
        device_type == "cuda" or (device_type == "cpu" and cpu_compile))

    def training_module(compiled):
        trained = compile_for_training(raw_model) if compiled else raw_model
        if ddp:
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[device] if device_type == "cuda" else None)
        return trained

    model = training_module(compiling)

    created_out_dir = not os.path.isdir(out_dir)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if not ckpt:
            atomic_write(os.path.join(out_dir, "log.jsonl"), "")
    log_path = os.path.join(out_dir, "log.jsonl")

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint():
        rng_data = [data_gen.get_state()]
        if ddp:  # every rank's data stream, so a resumed run continues each of them
            gathered = [torch.empty_like(rng_data[0]) for _ in range(world)]
            torch.distributed.all_gather_object(gathered, rng_data[0])
            rng_data = gathered
        if master:
            buffer = io.BytesIO()
            torch.save({
                "model_name": model_name, "task_name": task_name, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "model_config": asdict(model_cfg),
                "task_config": asdict(task_cfg), "train_config": asdict(cfg), "iter": iter_num,
                "seconds": seconds, "compile_seconds": compile_seconds,
                "rng": {"data": rng_data, "torch": torch.get_rng_state()},
                "best": best if selection else None}, buffer)
            atomic_write(ckpt_path, buffer.getvalue())

    def forward_backward(batch):
        with autocast:
            logits, internals = model(batch["x"], **model_inputs(task, batch, raw_model))
        loss = objective(task, logits, internals, batch)
        if hasattr(raw_model, "ponder_loss"):  # ACT: + tau * ponder cost, with its gradient
            loss = loss + raw_model.ponder_loss(internals)
        if not torch.isfinite(loss):
            last = f"the last good checkpoint is kept in {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written"
            raise UserError(f"loss became {loss.item()} at step {iter_num + 1}; {last}: lower --lr or --grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    metrics, compiled_once = {}, False
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master, dynamic_ncols=True,
               desc=f"{model_name} {task_name}")
    t_last, seqs_since = time.time(), 0
    stop_rule = parse_stop_rule(cfg.stop_when) if cfg.stop_when else None
    while iter_num < cfg.max_iters:
        t0 = time.time()
        if cfg.decay_lr or cfg.warmup_iters or cfg.lr_half_life:
            lr = cfg.lr
            if cfg.decay_lr:
                progress = iter_num / max(cfg.max_iters, 1)
                lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            if cfg.lr_half_life:  # Slot Attention, Appendix E.1: halve every 100k steps
                lr *= 0.5 ** (iter_num / cfg.lr_half_life)
            if iter_num < cfg.warmup_iters:  # Slot Attention, Appendix E.1: linear warm-up
                lr *= (iter_num + 1) / cfg.warmup_iters
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = to_device(task.train_batch(cfg.batch_size, data_gen), device)
        first_compiled = compiling and not compiled_once
        if first_compiled:  # this step compiles; if compiling fails, training goes on eager
            compiled_once = True
            try:
                loss = forward_backward(batch)
            except UserError:
                raise
            except Exception as e:
                if master:
                    reason = (str(e).strip().splitlines() or [""])[0][:200]
                    bar.write(f"warning: torch.compile failed ({type(e).__name__}: {reason}); training goes on "
                              "in eager mode (--no-compile skips compiling)", file=sys.stderr)
                undo_compile(raw_model)
                compiling, model = False, training_module(False)
                loss = forward_backward(batch)
        else:
            loss = forward_backward(batch)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        iter_num += 1
        if first_compiled:  # reported as compile_seconds, not as training time
            compile_seconds += time.time() - t0
        else:
            seconds += time.time() - t0
        seqs_since += cfg.batch_size * world
        if master and iter_num % cfg.log_interval == 0:
            loss_value = loss.item()
            log({"iter": iter_num, "loss": loss_value})
            rate = seqs_since / (time.time() - t_last)
            bar.set_postfix(loss=f"{loss_value:.4f}", seq_per_s=f"{rate:.0f}")
            t_last, seqs_since = time.time(), 0
        bar.update(1)
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            stop = torch.zeros(1)
            if master:
                metrics = evaluation(iter_num, seconds, periodic_settings)
                log(metrics)
                if selection and (sign * metrics[selection] > best["value"] or
                                  sign < 0 and sign * metrics[selection] == best["value"]):  # ties: the later
                    best = {"value": sign * metrics[selection], "iter": iter_num,
                            "model": {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}}
                bar.write(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                if stop_rule:
                    name, op, value = stop_rule
                    if name not in metrics:  # found out at the first evaluation: leave nothing of this run behind
                        if created_out_dir:
                            shutil.rmtree(out_dir, ignore_errors=True)
                        raise UserError(f"--stop_when names {name!r}, which this run does not measure: pick one of "
                                        f"{', '.join(k for k in metrics if k not in ('iter', 'seconds', 'compile_seconds'))}")
                    stop[0] = float(metrics[name] < value if op == "<" else metrics[name] > value)
            if ddp:  # every rank stops with rank 0
                stop_device = stop.to(device)
                torch.distributed.broadcast(stop_device, 0)
                stop = stop_device.cpu()
            checkpoint()
            if stop.item():
                if master:
                    bar.write(f"stopping at step {iter_num}: {cfg.stop_when} holds")
                break
    bar.close()

    if master:
        if selection or not metrics:  # select, or nothing left to train (--resume at max_iters)
            metrics = final_evaluation()
        write_results(metrics)
        scores = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k not in ("iter", "seconds", "compile_seconds"))
        compiled_note = f" (+ {compile_seconds:.0f} s compiling)" if compile_seconds else ""
        print(f"{model_name} on {task_name}: {scores} after {iter_num} steps in {seconds:.0f} s of training"
              f"{compiled_note}.\n"
              f"Files in {out_dir}: {', '.join(sorted(os.listdir(out_dir)))}")
    if ddp:  # leave together: no rank tears down the group while rank 0 is still writing
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"metrics": metrics if master else None, "model": raw_model}


def check_png_out(path):
    """The --out of a figure script: a .png in a folder that exists, else one UserError line."""
    if not path.endswith(".png") or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--out {path} must be a .png file in a folder that exists")


def run_command(main):
    """Run a command-line main(): a UserError is one line on stderr and exit status 2 (train.py and the
    experiments/ scripts)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_command(main)
