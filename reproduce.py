"""
Every result in the README, one command away: named recipes run over seeds, written to results/.

    python reproduce.py --list                        # every recipe: its claim, seeds, CPU minutes per seed
    python reproduce.py ntm_copy                      # run what is missing, write results/ntm_copy.json, print its row
    python reproduce.py rims_seqmnist --data_root DIR --jobs 2      # DIR/mnist, DIR/babi: the datasets' folders
    python reproduce.py ntm_copy --seeds 0 --threads 2              # one seed, two torch threads
    python reproduce.py act_parity64 --seeds 1 --points tau=1e-2    # one point of a grid, one seed
    python reproduce.py --table                       # rewrite the README's results table from results/*.json

A recipe is a claim of a paper (its table or figure) and the train.py settings that test it: model,
task, flags, seeds (3 unless the recipe says why), the paper's number to print beside ours, the
metrics that make up its row and the targets every seed must meet for the claim to count as
reproduced. A grid recipe (e.g. the ACT time-penalty sweep) runs each of its points with every seed.

Each run is `python train.py ... --seed S --out_dir out/reproduce/<recipe>[/<point>]/s<S>` in its own
process with OMP_NUM_THREADS=--threads (default 1: at most two runs on a 2-core machine, each on one
core). A run whose metrics.json exists is finished and not run again; one with a checkpoint but no
metrics.json was interrupted and continues with --resume; a run folder whose train.py arguments
(argv.json) differ from the recipe's now is refused with one line. results/<recipe>.json is the lasting
record: a run it holds that was made with the recipe's settings now is kept and not run again when its
folder is gone (a fresh checkout), and runs of other seeds or points (--seeds, --points) are added to it. results/<recipe>.json holds the recipe, the
exact command of its first run (the --data_root folder written as DATA_ROOT: it is this machine's),
each run's final metrics and wall time (for a run resumed after an interruption, at least the training
time its checkpoint carried across the attempts, and `resumed`), the mean and standard error over seeds of every numeric
metric, and the torch version, machine and git commit they came from.
--table renders the README's table between its marker comments (and each docs page's per-seed tables
between `<!-- runs:NAME -->` markers) from those files alone, so no number there is typed by hand.
"""

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Recipe:
    claim: str  # one line, with the paper's table or figure
    model: str
    task: str
    flags: dict = field(default_factory=dict)  # train.py flags beyond the preset: {"max_iters": 2000, "act": False}
    seeds: tuple = (0, 1, 2)
    paper: str = ""  # the paper's number(s), printed beside ours
    metrics: tuple = ()  # the metric keys that make up the row
    targets: tuple = ()  # (metric, "<" or ">", value): every seed must meet every one for "yes"
    points: dict = None  # a grid: point name -> flags added to (and overriding) flags; "model" may change
    target_points: tuple = ()  # the points the targets bind (default: all); the others are baselines
    figure: tuple = ()  # a grid: metrics drawn as bars per point (mean, +- s.e.) in results/<name>.png
    data: str = ""  # the dataset folder under --data_root this recipe reads (babi, mnist), if any
    doc: str = ""  # the docs page that discusses it
    note: str = ""  # why fewer seeds, what the row is (baseline, old protocol)


# Copying trained at delay 20, tested at 20, 80, 200 (RIMs, its ablation and the LSTM): 10,000 steps, screened in
# docs/rims.md
COPY_DELAY20_PROTOCOL = dict(delay=20, eval_delays=(20, 80, 200), max_iters=10000, eval_interval=1000, log_interval=50)
# the paper's delays: trained at 50, tested at 50, 100 and 200; the same 10,000 steps (a step costs ~1.7x)
COPY_DELAY50_PROTOCOL = dict(COPY_DELAY20_PROTOCOL, delay=50, eval_delays=(50, 100, 200))

# Sequential MNIST at CPU scale: 4,000 steps of 32 images (2.7 epochs of the 48k training images; the presets run
# 300), Adam 1e-3 as the official scripts (the presets' 3e-3 made the LSTM unstable: docs/rims.md), validation on
# 1,000 images every 500 steps selects the checkpoint; a BRIMs step (two layers) costs about four RIMs steps, so
# BRIMs get 2,000 steps (still over ~45 minutes a seed)
PARITY64_PROTOCOL = dict(max_iters=200000, eval_interval=5000, stop_when="err@64<2")
# bAbI as the UT authors fed it (story first, pooled readout: data.py's default) at universal_transformer_tiny's
# size, no dropout, 6,000 steps of 32 with cosine decay (19 en-10k epochs; screened on task 2 in
# docs/universal_transformer.md); en-10k has no task 3 training file here
BABI_TINY_PROTOCOL = dict(split="en-10k", d_model=128, d_ff=512, num_heads=4, dropout=0.0, max_iters=6000,
                          eval_interval=2000, decay_lr=True)
BABI10K_TASKS = (1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 20, 16, 17, 19)
BABI_MODELS = (("ut_act", {}), ("ut", dict(act=False)), ("transformer", dict(model="transformer")))
BABI10K_PAPER = "UT+ACT 0.21 % (0 failed), UT 0.23 %, Transformer 15.2 % (10 failed), over 20 tasks"
SEQMNIST_PROTOCOL = dict(max_iters=4000, lr=1e-3, eval_interval=500, log_interval=50)
BRIMS_SEQMNIST_PROTOCOL = dict(max_iters=2000, lr=1e-3, eval_interval=500, log_interval=50)

# NPS on MNIST as first set up, which the results of nps_mnist_transform and lstm_mnist_transform measured: the
# task's quarter_shift transformations and the presets of that time (the model's defaults for everything else)
QUARTER_NPS = dict(transforms="quarter_shift", num_rules=6, slot_size=128, rule_size=32, key_size=32, encoder_hidden=256,
                   rule_hidden=256, slot_norm=False, slot_keys="shared", scale_scores=False, rule_input="pair",
                   residual=True, context_tau=0.0, max_iters=2000, batch_size=64, lr=1e-3, decay_lr=True)
QUARTER_LSTM = dict(transforms="quarter_shift", max_iters=2000, batch_size=64)

# Transfer on the digits stand-in: from the MNIST runs of the same seed to inverted digits, 500 steps of 64
TRANSFER = dict(domain="inverted", max_iters=500, batch_size=64, lr=1e-3, eval_interval=500, log_interval=50)

# The recipes. Each row of the README's results table is one of these.
RECIPES = {
    # ---- Neural Turing Machine (Graves et al. 2014)
    "ntm_copy": Recipe(
        "NTM copies sequences longer than any it was trained on (lengths 1-20; NTM section 4.1, Figs. 3-6)",
        "ntm", "copy", paper="'very few mistakes' up to 50, a few more at 120 (Fig. 4)",
        metrics=("bit_err@20", "bit_err@30", "bit_err@50", "bit_err@120"),
        targets=(("bit_err@20", "<", 0.1), ("bit_err@30", "<", 0.25), ("bit_err@50", "<", 1.0)), doc="docs/ntm.md"),
    "ntm_copy_last": Recipe(
        "the same NTM copy runs, reporting the last step instead of the validation-selected checkpoint",
        "ntm", "copy", flags=dict(validation=False), paper="'very few mistakes' up to 50, a few more at 120 (Fig. 4)",
        metrics=("bit_err@20", "bit_err@30", "bit_err@50", "bit_err@120"),
        targets=(("bit_err@20", "<", 0.1), ("bit_err@30", "<", 0.25), ("bit_err@50", "<", 1.0)), doc="docs/ntm.md",
        note="shows the late collapse that validation selection guards against"),
    "lstm_copy": Recipe(
        "the LSTM baseline fails beyond its training lengths on copy (NTM Fig. 5)", "lstm", "copy",
        paper="learns 20 almost perfectly, 'clearly fails' beyond (Fig. 5)",
        metrics=("bit_err@10", "bit_err@20", "bit_err@50"), targets=(("bit_err@20", "<", 1.0), ("bit_err@50", ">", 20.0)),
        doc="docs/ntm.md", note="baseline: reproduced means it copies 20 and fails at 50 (a coin flip per bit: 200)"),
    "ntm_associative_recall": Recipe(
        "NTM associative recall generalises to longer item lists (2-6 items in training; NTM section 4.3, Fig. 12)",
        "ntm", "associative_recall", paper="generalises to 12-15 items (Fig. 12)",
        metrics=("bit_err@6", "bit_err@10", "bit_err@15", "bit_err@20"),
        targets=(("bit_err@10", "<", 1.0), ("bit_err@15", "<", 1.0)), doc="docs/ntm.md"),
    "ntm_repeat_copy": Recipe(
        "NTM repeat copy generalises to longer sequences and more repeats (NTM section 4.2, Fig. 9)",
        "ntm", "repeat_copy", paper="copies 10x20 and 20x10 (Fig. 9)",
        metrics=("bit_err@10x10", "bit_err@10x20", "bit_err@20x10"),
        targets=(("bit_err@10x10", "<", 1.0), ("bit_err@10x20", "<", 10.0)), doc="docs/ntm.md"),
    # ---- Adaptive Computation Time (Graves 2016)
    "act_parity16_tau_sweep": Recipe(
        "ACT solves parity for every time penalty tau <= 1e-2, the plain RNN does not (ACT Fig. 4; 16-element "
        "vectors, 10,000 steps: CPU scale)", "act", "parity", flags=dict(input_size=16, max_iters=10000),
        points={"tau=1e-1": dict(time_penalty=0.1), "tau=1e-2": dict(time_penalty=0.01),
                "tau=1e-3": dict(time_penalty=0.001), "tau=1e-4": dict(time_penalty=0.0001), "rnn": dict(act=False)},
        paper="under 5 % error for every tau <= 3e-2 (64 elements); the RNN fails",
        metrics=("err@16", "ponder@16"), targets=(("err@16", "<", 6.0),),
        target_points=("tau=1e-2", "tau=1e-3", "tau=1e-4"), figure=("err@16", "ponder@16"), doc="docs/act.md",
        note="the targets bind tau <= 1e-2; the paper has tau = 1e-1 and the RNN fail"),
    "act_parity64": Recipe(
        "ACT solves 64-element parity (ACT section 3.1, Fig. 4, the paper's setting), trained until under 2 % error "
        "or 200,000 steps", "act", "parity", flags=PARITY64_PROTOCOL,
        points={"tau=1e-3": dict(time_penalty=0.001), "tau=1e-2": dict(time_penalty=0.01),
                "tau=1e-1": dict(time_penalty=0.1)},
        paper="under 5 % for tau <= 3e-2; Fojo et al.: 2 % after 55k (tau 1e-3) and 53k steps (1e-2)",
        metrics=("err@64", "ponder@64", "iter"), targets=(("err@64", "<", 5.0),),
        target_points=("tau=1e-3", "tau=1e-2"), doc="docs/act.md",
        note="iter is the step of the first evaluation under 2 %, or 200,000; the targets bind tau <= 1e-2, "
             "the paper has tau = 1e-1 fail"),
    "rnn_parity64": Recipe(
        "the plain RNN (ACT's net without ACT, one update per input) on 64-element parity, the same budget",
        "act", "parity", flags=dict(PARITY64_PROTOCOL, act=False), seeds=(0,),
        paper="fails (Fig. 4)", metrics=("err@64", "iter"), doc="docs/act.md", note="baseline: one seed"),
    "act_addition": Recipe(
        "ACT learns multi-number addition (ACT section 3.3, Fig. 12)", "act", "addition",
        paper="'perfectly solved' for every tau", metrics=("seq_err@5x5", "ponder@5x5"),
        targets=(("seq_err@5x5", "<", 5.0),), doc="docs/act.md"),
    "lstm_addition": Recipe(
        "the LSTM without ACT on addition (ACT Fig. 12's baseline)", "lstm", "addition",
        paper="its best tau-free error is far above ACT's", metrics=("seq_err@5x5",), doc="docs/act.md",
        note="baseline"),
    "act_addition_small": Recipe(
        "ACT against the LSTM on a smaller addition problem (3 numbers of at most 2 digits, 128 cells, "
        "20,000 steps)", "act", "addition",
        flags=dict(max_numbers=3, max_digits=2, hidden_size=128, max_iters=20000, lr=3e-3, decay_lr=True,
                   eval_interval=1000),
        points={"act": dict(time_penalty=0.01), "lstm": dict(model="lstm")}, paper="ACT solves addition (Fig. 12)",
        metrics=("seq_err@3x2", "ponder@3x2"), targets=(("seq_err@3x2", "<", 10.0),), target_points=("act",), doc="docs/act.md",
        note="a CPU-sized problem; the targets bind ACT"),
    # ---- Universal Transformer (Dehghani et al. 2018)
    "ut_babi_qa1": Recipe(
        "the UT with halting solves bAbI task 1 (en-10k) in minutes on a CPU (UT Table 1)",
        "universal_transformer", "babi", paper="0.0 % on task 1; mean 0.21 % over 20 tasks",
        metrics=("err@qa1", "ponder@qa1"), targets=(("err@qa1", "<", 1.0),), data="babi",
        doc="docs/universal_transformer.md"),
    "ut_babi10k_tasks": Recipe(
        "UT (halting, 8 steps) against the Transformer on bAbI en-10k single tasks (UT Table 1), 2,000 steps",
        "universal_transformer", "babi", flags=dict(split="en-10k", max_iters=2000, eval_interval=1000, decay_lr=True),
        points={f"{name}/qa{t}": dict(tasks=(t,), **extra) for t in (1, 2, 6, 16, 17, 19)
                for name, extra in BABI_MODELS},
        seeds=(0,), paper=BABI10K_PAPER,
        metrics=("mean_err",), targets=(("mean_err", "<", 5.0),), data="babi", doc="docs/universal_transformer.md",
        note="one seed per cell: 18 runs"),
    "ut_babi10k_tiny": Recipe(
        "UT (8 steps, and halting) against the Transformer on bAbI en-10k single tasks (UT Table 1), the authors' "
        "tiny size (d 128, FFN 512, 4 heads, no dropout), 6,000 steps", "universal_transformer", "babi",
        flags=BABI_TINY_PROTOCOL,
        points={f"{name}/qa{t}": dict(tasks=(t,), **extra) for name, extra in BABI_MODELS for t in BABI10K_TASKS},
        seeds=(0,), paper=BABI10K_PAPER,
        metrics=("mean_err",), targets=(("mean_err", "<", 5.0),),
        target_points=tuple(f"{name}/qa{t}" for name in ("ut", "ut_act") for t in BABI10K_TASKS[:16]),
        data="babi", doc="docs/universal_transformer.md",
        note="one seed per cell; the targets bind the UTs on every task but 16, 17 and 19 (hard for every public "
             "port: reported as they come)"),
    "ut_babi1k_tasks": Recipe(
        "UT against the Transformer on bAbI en (1K) single tasks (UT Table 1), 2,000 steps",
        "universal_transformer", "babi", flags=dict(split="en", max_iters=2000, eval_interval=1000, decay_lr=True),
        points={f"{name}/qa{t}": dict(tasks=(t,), **extra) for t in (1, 2, 3, 6, 16, 17, 19)
                for name, extra in BABI_MODELS},
        seeds=(0,), paper="UT+ACT 4.55 % (3 failed), UT 5.31 % (5), Transformer 21.8 % (5), over 20 tasks",
        metrics=("mean_err",), targets=(("mean_err", "<", 5.0),), data="babi", doc="docs/universal_transformer.md",
        note="one seed per cell: 21 runs"),
    "ut_babi1k_joint": Recipe(
        "one UT trained on all 20 bAbI en tasks at once (UT Table 1, joint)", "universal_transformer", "babi",
        flags=dict(split="en", tasks=tuple(range(1, 21)), max_iters=1500, eval_interval=1500, decay_lr=True),
        seeds=(0,), paper="7.78 % mean error, 5 of 20 failed", metrics=("mean_err", "failed"),
        targets=(("mean_err", "<", 10.0),), data="babi", doc="docs/universal_transformer.md",
        note="one seed: 10 minutes of CPU"),
    **{f"ut_{task}": Recipe(
        f"the UT generalises from length 40 to 400 on {task[5:]} better than the Transformer (UT paper, "
        "algorithmic tasks)", "universal_transformer", f"algo_{task[5:]}",
        points={"ut_act": {}, "ut": dict(act=False), "transformer": dict(model="transformer"), "lstm": dict(model="lstm")},
        seeds=(0,), paper=paper,
        metrics=("token_char_acc@1-400", "seq_acc@1-400", "char_acc@40", "char_acc@400", "steps@1-400"),
        targets=(("token_char_acc@1-400", ">", target),), target_points=("ut_act", "ut"),
        doc="docs/universal_transformer.md",
        note="one seed per model; the targets bind the two UTs at lengths 1..400, the paper's test set") for task, paper, target in (
            ("algo_copy", "char accuracy UT .91, Transformer .53 (lengths 1..400)", 0.85),
            ("algo_reverse", "char accuracy UT .96, Transformer .13 (lengths 1..400)", 0.9),
            ("algo_addition", "char accuracy UT .34, Transformer .07 (lengths 1..400)", 0.3))},
    # ---- Slot Attention (Locatello et al. 2020)
    "slot_attention_sprites": Recipe(
        "slots bind objects without labels (Slot Attention section 4.1, Table 1, Fig. 2; our 32 x 32 sprites)",
        "slot_attention", "sprites", paper="FG-ARI 91.3 on Multi-dSprites",
        metrics=("fg_ari@test", "mbo@test", "grid_fg_ari@test", "grid_mbo@test", "mse@test"),
        targets=(("fg_ari@test", ">", 85.0), ("mbo@test", ">", 31.0)), doc="docs/slot_attention.md"),
    "slot_attention_sprites_fullres": Recipe(
        "the same with the paper's Multi-dSprites encoder and decoder at full resolution, Adam 1e-3 after 250 warm-up "
        "steps (screened first; two seeds)", "slot_attention", "sprites",
        flags=dict(encoder_stride_layers=0, decoder_init_size=0, decoder_channels=32, max_iters=2000, lr=1e-3,
                   warmup_iters=250),
        seeds=(0, 1), paper="FG-ARI 91.3 on Multi-dSprites",
        metrics=("fg_ari@test", "mbo@test", "grid_fg_ari@test", "grid_mbo@test", "mse@test"),
        targets=(("fg_ari@test", ">", 85.0), ("mbo@test", ">", 31.0)), doc="docs/slot_attention.md",
        note="two seeds: the third was stopped for the recipe above"),
    "slot_attention_sets": Recipe(
        "slots predict the set of objects (Slot Attention section 4.2, Table 2; our sprites)", "slot_attention",
        "sprites_sets", paper="AP@inf 94.3, AP@1 86.7 (CLEVR10)",
        metrics=("ap@inf@test", "ap@1@test"), targets=(("ap@inf@test", ">", 60.0), ("ap@1@test", ">", 30.0)),
        doc="docs/slot_attention.md"),
    # ---- Recurrent Independent Mechanisms (Goyal et al. 2019)
    "rims_copy_delay20": Recipe(
        "RIMs trained on copying with delay 20 still copy at delay 200 (RIMs Table 1, trained at a CPU-sized delay)",
        "rims", "copy_delay", flags=COPY_DELAY20_PROTOCOL,
        paper="CE 0.00 at the training delay (50) and at 200", metrics=("acc@20", "acc@80", "acc@200", "drop@200"),
        targets=(("acc@20", ">", 90.0), ("drop@200", "<", 5.0)), doc="docs/rims.md"),
    "rims_copy_delay20_null_blank": Recipe(
        "the same RIMs with the blank fed as the zero vector, i.e. as the null input (an ablation)", "rims",
        "copy_delay", flags=dict(COPY_DELAY20_PROTOCOL, null_blank=True),
        paper="(the official code embeds every token)", metrics=("acc@20", "acc@80", "acc@200", "drop@200"),
        doc="docs/rims.md", note="baseline, an ablation: every module ties at 0.5 on a blank, so modules 4-5 never update there"),
    "lstm_copy_delay20": Recipe(
        "the LSTM of the same size trained at delay 20 degrades at 200 (RIMs Table 1's baseline)", "lstm",
        "copy_delay", flags=COPY_DELAY20_PROTOCOL,
        paper="CE 0.00 at 50, 4.32 at 200", metrics=("acc@20", "acc@80", "acc@200", "drop@200"),
        targets=(("drop@200", ">", 30.0),), doc="docs/rims.md",
        note="baseline: reproduced means it loses at least 30 points from delay 20 to 200"),
    "rims_copy_delay": Recipe(
        "RIMs trained on copying with delay 50 still copy at delay 200 (RIMs Table 1, the paper's delays)", "rims",
        "copy_delay", flags=COPY_DELAY50_PROTOCOL, paper="CE 0.00 at 50 and at 200",
        metrics=("acc@50", "acc@100", "acc@200", "drop@200", "ce@200"),
        targets=(("acc@50", ">", 90.0), ("drop@200", "<", 5.0)), doc="docs/rims.md"),
    "lstm_copy_delay": Recipe(
        "the LSTM of the same size trained at delay 50 degrades at 200 (RIMs Table 1's baseline)", "lstm",
        "copy_delay", flags=COPY_DELAY50_PROTOCOL, paper="CE 0.00 at 50, 4.32 at 200",
        metrics=("acc@50", "acc@100", "acc@200", "drop@200", "ce@200"),
        targets=(("drop@200", ">", 30.0),), doc="docs/rims.md",
        note="baseline: reproduced means it loses at least 30 points from delay 50 to 200"),
    "rims_seqmnist": Recipe(
        "RIMs trained on 14 x 14 sequential MNIST keep more accuracy at 16, 19, 24 than an LSTM (RIMs Table 1)",
        "rims", "seqmnist", flags=SEQMNIST_PROTOCOL, paper="acc 90.0 / 73.4 / 38.1 at 16 / 19 / 24",
        metrics=("val_acc@14", "acc@14", "acc@16", "acc@19", "acc@24"), targets=(("val_acc@14", ">", 85.0),),
        data="mnist", doc="docs/rims.md", note="its mean at 19 and 24 is compared with lstm_seqmnist's in docs/rims.md"),
    "rims_seqmnist_pixel": Recipe(
        "the same RIMs with the binary pixel fed as is, so a background pixel is the null input (an ablation)",
        "rims", "seqmnist", flags=dict(SEQMNIST_PROTOCOL, input_vocab=0), paper="(the official code embeds the input)",
        metrics=("val_acc@14", "acc@14", "acc@16", "acc@19", "acc@24"), data="mnist", doc="docs/rims.md",
        note="baseline, an ablation: modules 0-3 win every tie on background pixels"),
    "lstm_seqmnist": Recipe(
        "the LSTM on the same sequential MNIST protocol (RIMs Table 1's baseline)", "lstm", "seqmnist",
        flags=SEQMNIST_PROTOCOL, paper="acc 86.8 / 42.3 / 25.2 at 16 / 19 / 24",
        metrics=("val_acc@14", "acc@14", "acc@16", "acc@19", "acc@24"), targets=(("val_acc@14", ">", 85.0),),
        data="mnist", doc="docs/rims.md", note="baseline: it must learn 14 x 14 for the comparison to mean anything"),
    "lstm_seqmnist_16k": Recipe(
        "the same LSTM trained four times as long (16,000 steps, 10.7 epochs): is its loss beyond 14 x 14 a matter "
        "of training?", "lstm", "seqmnist", flags=dict(SEQMNIST_PROTOCOL, max_iters=16000, eval_interval=2000),
        paper="acc 86.8 / 42.3 / 25.2 at 16 / 19 / 24",
        metrics=("val_acc@14", "acc@14", "acc@16", "acc@19", "acc@24"), targets=(("val_acc@14", ">", 85.0),),
        data="mnist", doc="docs/rims.md", note="baseline: RIMs' 4,000-step runs are compared with it in docs/rims.md"),
    # ---- BRIMs (Mittal et al. 2020)
    "brims_seqmnist": Recipe(
        "BRIMs keep more accuracy than RIMs at 19 and 24 on sequential MNIST (BRIMs Table 1)", "brims", "seqmnist",
        flags=BRIMS_SEQMNIST_PROTOCOL, paper="acc 88.6 / 74.2 / 51.4 at 16 / 19 / 24",
        metrics=("val_acc@14", "acc@14", "acc@16", "acc@19", "acc@24"), targets=(("val_acc@14", ">", 85.0),),
        data="mnist", doc="docs/brims.md", note="its acc@24 is compared with rims_seqmnist's in docs/brims.md"),
    "brims_seqmnist_pixel": Recipe(
        "BRIMs with the binary pixel fed as is (no embedding), the same protocol (BRIMs Table 1)", "brims",
        "seqmnist", flags=dict(BRIMS_SEQMNIST_PROTOCOL, input_vocab=0),
        paper="acc 88.6 / 74.2 / 51.4 at 16 / 19 / 24 (embedded pixel)",
        metrics=("val_acc@14", "acc@14", "acc@19", "acc@24"), data="mnist", doc="docs/brims.md",
        note="baseline, an ablation: a background pixel equals the null row"),
    "brims1_seqmnist": Recipe(
        "one BRIMs layer (pixel as is) on the same protocol: is the second layer what holds it back?", "brims",
        "seqmnist", flags=dict(BRIMS_SEQMNIST_PROTOCOL, input_vocab=0, num_layers=1), paper="",
        metrics=("val_acc@14", "acc@14", "acc@19", "acc@24"), data="mnist", doc="docs/brims.md",
        note="baseline: a diagnostic variant"),
    # ---- Learning Independent Causal Mechanisms (Parascandolo et al. 2018)
    "lim_mnist": Recipe(
        "competing experts each learn to invert one of ten mechanisms of MNIST, unsupervised (LIM, Figure 6)",
        "lim", "mnist_mechanisms", paper="the classifier's accuracy on the inverted digits 'quickly approaching the "
        "optimum' (Fig. 6); one expert per mechanism",
        metrics=("acc_transformed@test", "acc_inverted@test", "acc_original@test", "owned@test", "purity@test"),
        targets=(("acc_inverted@test", ">", 0.93), ("owned@test", ">", 8.5)), data="mnist", doc="docs/lim.md"),
    # ---- Neural Interpreters (Rahaman et al. 2021): an MNIST-only stand-in for the paper's multi-task digits
    "ni_digits": Recipe(
        "a Neural Interpreter classifies digits on par with a ViT of its size (NI section 4.1; MNIST-only stand-in "
        "for MNIST, SVHN, MNIST-M)", "neural_interpreter", "digits",
        paper="on par with a ViT with fewer parameters (multi-task digits)",
        metrics=("acc@test", "usage_0@test", "usage_1@test", "usage_2@test", "usage_3@test", "usage_4@test"),
        targets=(("acc@test", ">", 97.0),), data="mnist", doc="docs/neural_interpreter.md"),
    "vit_digits": Recipe(
        "the ViT of about the same size on the same digits (NI's baseline)", "vit", "digits",
        metrics=("acc@test",), data="mnist", doc="docs/neural_interpreter.md", note="baseline"),
    "ni_digits_long": Recipe(
        "the same Neural Interpreter trained 8,000 steps (about 20 minutes a seed on one core)", "neural_interpreter",
        "digits", flags=dict(max_iters=8000), paper="on par with a ViT with fewer parameters (multi-task digits)",
        metrics=("acc@test", "usage_0@test", "usage_1@test", "usage_2@test", "usage_3@test", "usage_4@test"),
        targets=(("acc@test", ">", 97.0),), data="mnist", doc="docs/neural_interpreter.md"),
    "vit_digits_long": Recipe(
        "the ViT baseline trained the same 8,000 steps", "vit", "digits", flags=dict(max_iters=8000),
        metrics=("acc@test",), data="mnist", doc="docs/neural_interpreter.md", note="baseline"),
    "ni_transfer": Recipe(
        "trained on MNIST, a Neural Interpreter learns a new domain (inverted digits; rotated) from 1-10 % of its data "
        "by new CLS tokens and codes alone (NI section 4.2, stand-in)", "neural_interpreter", "digits",
        flags=dict(TRANSFER, init_from="{out_root}/ni_digits/s{seed}/ckpt.pt"),
        points={"cls_1pct": dict(train_only="cls", train_size=600), "cls_codes_1pct": dict(train_only="cls_codes", train_size=600),
                "cls_codes_10pct": dict(train_only="cls_codes", train_size=6000),
                "cls_codes_10pct_rotated": dict(train_only="cls_codes", train_size=6000, domain="rotated")},
        paper="sample-efficient transfer from new codes / CLS tokens only",
        metrics=("acc@test", "usage_0@test", "usage_1@test", "usage_2@test", "usage_3@test", "usage_4@test"),
        targets=(("acc@test", ">", 90.0),), target_points=("cls_codes_10pct",), data="mnist",
        doc="docs/neural_interpreter.md", note="needs ni_digits' runs first; compared with vit_transfer point by point"),
    "vit_transfer": Recipe(
        "the ViT of vit_digits, its head fine-tuned on the same 1-10 % of inverted (or rotated) digits (NI's transfer baseline)",
        "vit", "digits", flags=dict(TRANSFER, init_from="{out_root}/vit_digits/s{seed}/ckpt.pt", train_only="head"),
        points={"head_1pct": dict(train_size=600), "head_10pct": dict(train_size=6000),
                "head_10pct_rotated": dict(train_size=6000, domain="rotated")}, metrics=("acc@test",),
        data="mnist", doc="docs/neural_interpreter.md", note="baseline; needs vit_digits' runs first"),
    # ---- Neural Production Systems (Goyal, Didolkar et al. 2021)
    "nps_arithmetic": Recipe(
        "NPS gives each operation a rule of its own and extrapolates to longer sequences (NPS, official synthetic task)",
        "nps", "arithmetic", paper="mse@20 5e-4, mse@50 1.8e-3 (official code)",
        metrics=("mse@20", "mse@50", "rule_purity@20"),
        targets=(("rule_purity@20", ">", 0.99), ("mse@20", "<", 5e-4)), doc="docs/nps.md"),
    "nps_arithmetic_parallel": Recipe(
        "NPS in parallel mode (every slot picks its own rule at once) on the same arithmetic task", "nps",
        "arithmetic", flags=dict(mode="parallel", readout_slot=0), paper="mse@20 5e-4 (official code, sequential)",
        metrics=("mse@20", "mse@50", "rule_purity@20"), targets=(("rule_purity@20", ">", 0.99), ("mse@20", "<", 5e-4)),
        doc="docs/nps.md", note="reported either way: the paper's arithmetic result is sequential"),
    "nps_arithmetic_parallel_6k": Recipe(
        "NPS in parallel mode trained twice as long (6,000 steps) on the same arithmetic task", "nps",
        "arithmetic", flags=dict(mode="parallel", readout_slot=0, max_iters=6000),
        paper="mse@20 5e-4, mse@50 1.8e-3 (official code, sequential)",
        metrics=("mse@20", "mse@50", "rule_purity@20"), targets=(("rule_purity@20", ">", 0.99), ("mse@20", "<", 5e-4)),
        doc="docs/nps.md"),
    "nps_arithmetic_parallel_select": Recipe(
        "NPS in parallel mode, 6,000 steps, reporting the checkpoint lowest on validation sequences (as the "
        "official code keeps its best-evaluating model)", "nps", "arithmetic",
        flags=dict(mode="parallel", readout_slot=0, max_iters=6000, validation=True, eval_interval=250),
        paper="mse@20 5e-4, mse@50 1.8e-3 (official code, sequential)",
        metrics=("mse@20", "mse@50", "rule_purity@20"),
        targets=(("rule_purity@20", ">", 0.99), ("mse@20", "<", 5e-4)), doc="docs/nps.md"),
    "nps_arithmetic_rules4_select": Recipe(
        "NPS (sequential, the paper's form) with a fourth rule spare, 6,000 steps, the checkpoint lowest on "
        "validation sequences", "nps", "arithmetic",
        flags=dict(num_rules=4, max_iters=6000, validation=True, eval_interval=250),
        paper="mse@20 5e-4, mse@50 1.8e-3 (official code)", metrics=("mse@20", "mse@50", "rule_purity@20"),
        targets=(("rule_purity@20", ">", 0.99), ("mse@20", "<", 5e-4)), doc="docs/nps.md"),
    "lstm_arithmetic": Recipe(
        "the LSTM on the same arithmetic sequences (NPS's baseline)", "lstm", "arithmetic",
        paper="", metrics=("mse@20", "mse@50"), doc="docs/nps.md", note="baseline"),
    "nps_mnist_official": Recipe(
        "NPS rules each take one MNIST transformation, set up as the official code (NPS, MNIST: rotations by "
        "+-60 degrees, translations up and down, chains of 4)", "nps", "mnist_transform",
        paper="rules separate the transformations after a few epochs", metrics=("bce@test", "rule_purity@test"),
        targets=(("rule_purity@test", ">", 0.9),), data="mnist", doc="docs/nps.md"),
    "lstm_mnist_official": Recipe(
        "the LSTM on the same official MNIST transformations (NPS's baseline)", "lstm", "mnist_transform",
        metrics=("bce@test",), data="mnist", doc="docs/nps.md", note="baseline"),
    # the earlier setup: six exact transformations on 28 x 28, the transformation as a condition of one slot
    "nps_mnist_transform": Recipe(
        "NPS rules each take one MNIST transformation (quarter turns and 4-px shifts, one slot and a condition)",
        "nps", "mnist_transform", flags=QUARTER_NPS, paper="rules separate the transformations after a few epochs",
        metrics=("bce@test", "rule_purity@test"), targets=(("rule_purity@test", ">", 0.9),), data="mnist",
        doc="docs/nps.md", note="the earlier setup, kept beside the official one"),
    "lstm_mnist_transform": Recipe(
        "the LSTM on the same quarter-turn and shift transformations (NPS's baseline)", "lstm", "mnist_transform",
        flags=QUARTER_LSTM, metrics=("bce@test",), data="mnist", doc="docs/nps.md", note="baseline"),
}


class HarnessError(Exception):
    """A mistake in what was asked for: one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Commands, runs, results

def flag_args(flags):
    """{'max_iters': 10, 'act': False, 'tasks': (1, 2)} -> ['--max_iters', '10', '--no-act', '--tasks', '1,2']."""
    args = []
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is False:
            args.append(f"--no-{name}")
        elif isinstance(value, (tuple, list)):
            args += [f"--{name}", ",".join(map(str, value))]
        else:
            args += [f"--{name}", str(value)]
    return args


def runs_of(name, recipe, seeds, out_root, data_root):
    """[(point or None, seed, run_dir, argv of train.py)] for every point and seed of the recipe."""
    runs = []
    for point, extra in (recipe.points or {None: {}}).items():
        flags = {**recipe.flags, **extra}
        model = flags.pop("model", recipe.model)
        for seed in seeds:
            run_dir = os.path.join(out_root, name, *([point] if point else []), f"s{seed}")
            # a flag may name another recipe's run of the same seed: "{out_root}/ni_digits/s{seed}/ckpt.pt"
            seeded = {k: v.format(out_root=out_root, seed=seed) if isinstance(v, str) else v for k, v in flags.items()}
            argv = ["--model", model, "--task", recipe.task, *flag_args(seeded), "--seed", str(seed), "--out_dir", run_dir]
            if recipe.data and data_root:
                argv += ["--data_dir", os.path.join(data_root, recipe.data)]
            runs.append((point, seed, run_dir, argv))
    return runs


def training_settings(argv):
    """train.py's arguments without the folders (--out_dir, --data_dir): what a run's numbers depend on."""
    argv, kept = list(argv), []
    while argv:
        flag = argv.pop(0)
        if flag in ("--out_dir", "--data_dir") and argv:
            argv.pop(0)
        else:
            kept.append(flag)
    return kept


def run_one(run_dir, argv, threads):
    """Train (or resume) one run in its own process, unless it has finished; record its wall time.
    A run folder made with other train.py arguments (the recipe changed since) is refused, not reused."""
    argv_path, settings = os.path.join(run_dir, "argv.json"), training_settings(argv)
    if os.path.exists(argv_path):
        with open(argv_path) as f:
            before = json.load(f)
        if before != settings:
            raise HarnessError(f"{run_dir} was run with other settings (python train.py {shlex.join(before)}): "
                               "move it away or delete it, then run the recipe again")
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        return
    resume = os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    command = [sys.executable, os.path.join(ROOT, "train.py"), *argv, *(["--resume"] if resume else [])]
    os.makedirs(run_dir, exist_ok=True)
    with open(argv_path, "w") as f:
        json.dump(settings, f)
    log_path = os.path.join(run_dir, "train.log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    sys.stdout.write(f"{'resume' if resume else 'run'}: python train.py {shlex.join(argv)}\n")  # one write: jobs share stdout
    sys.stdout.flush()
    commit, t0 = git_commit(), time.time()
    with open(log_path, "a") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-1:]
        raise HarnessError(f"python train.py {shlex.join(argv)} failed (exit {proc.returncode}): "
                           f"{tail[0] if tail else ''} (log: {log_path})")
    # the attempt that finished: an interrupted attempt's wall time is lost (it never gets here), so a
    # resumed run is recorded with at least its training time, which the checkpoint carries across attempts
    with open(os.path.join(run_dir, "wall_seconds.json"), "w") as f:
        json.dump({"wall_seconds": round(wall, 1), "threads": threads, "commit": commit,
                   "load_average": round(os.getloadavg()[0], 1), "resumed": resume}, f)


def mean_and_stderr(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var / len(values))


def summarise(records):
    """Mean and standard error over the records of every numeric metric they all have."""
    keys = [k for k, v in records[0]["metrics"].items()
            if isinstance(v, (int, float)) and all(k in r["metrics"] for r in records)]
    stats = {k: mean_and_stderr([r["metrics"][k] for r in records]) for k in keys}
    stats["wall_seconds"] = mean_and_stderr([r["wall_seconds"] for r in records])
    return ({k: round(m, 6) for k, (m, _) in stats.items()}, {k: round(s, 6) for k, (_, s) in stats.items()})


def machine(threads, jobs):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_run": threads, "parallel_runs": jobs, "gpu": gpu,
            "platform": platform.platform()}


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def canonical(value):
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True)  # tuples and lists alike


def recorded(name, results_dir):
    """{(point, seed): record} of the runs results/<name>.json holds that were made with the recipe's training
    settings now (model, task, flags and the point's flags). Such a run is not trained again when its folder
    is gone: a fresh checkout has results/ but not out/."""
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        ran, runs = old["recipe"], old["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HarnessError(f"{path} is not a results file reproduce.py wrote: restore it with git checkout, "
                           "or delete it to rerun the recipe")
    now = asdict(RECIPES[name])
    if any(canonical(now[k]) != canonical(ran.get(k)) for k in ("model", "task", "flags")):
        return {}
    points_now, points_then = now["points"] or {}, ran.get("points") or {}
    return {(r.get("point"), r["seed"]): r for r in runs
            if (r.get("point") is None and not points_now) or (r.get("point") in points_now and r["point"] in points_then
                                          and canonical(points_now[r["point"]]) == canonical(points_then[r["point"]]))}


def reproduce(name, seeds=None, jobs=1, threads=1, out_root="out/reproduce", results_dir="results", data_root="",
              points=None):
    """Run what is missing of one recipe (only `points` of a grid, if given), then write results/<name>.json
    with these runs and every other run it already recorded with the same settings; returns that object."""
    recipe = RECIPES[name]
    seeds = tuple(seeds if seeds is not None else recipe.seeds)
    if points is not None:
        unknown = [p for p in points if p not in (recipe.points or {})]
        if unknown:
            raise HarnessError(f"{name} has no point {', '.join(unknown)}: its points are "
                               f"{', '.join(recipe.points or {}) or 'none (it is not a grid)'}")
    kept = recorded(name, results_dir)
    runs = [run for run in runs_of(name, recipe, seeds, out_root, data_root) if points is None or run[0] in points]
    todo = [run for run in runs if (run[0], run[1]) not in kept or os.path.exists(run[2])]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run_one, run_dir, argv, threads) for _, _, run_dir, argv in todo]:
            future.result()
    kept = recorded(name, results_dir)  # again: another command may have recorded runs of this recipe meanwhile
    fresh = {}
    for point, seed, run_dir, argv in todo:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            metrics = json.load(f)
        wall_path = os.path.join(run_dir, "wall_seconds.json")  # written by run_one; absent for runs made by hand
        harness = json.load(open(wall_path)) if os.path.exists(wall_path) else {}
        fresh[point, seed] = {**({"point": point} if point else {}), "seed": seed, "metrics": metrics,
                              "wall_seconds": max(harness.get("wall_seconds", 0), metrics.get("seconds", 0)),
                              **{k: harness[k] for k in ("commit", "load_average", "resumed") if harness.get(k)}}
    order = list(recipe.points or {None: {}})
    records = [r for _, r in sorted({**kept, **fresh}.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))]
    seeds = tuple(sorted({r["seed"] for r in records}))
    command = "python train.py " + shlex.join(runs_of(name, recipe, seeds[:1], out_root, data_root)[0][3])
    if recipe.data and data_root:  # where this machine keeps the datasets is no part of the recipe
        command = command.replace(shlex.quote(os.path.join(data_root, recipe.data)), f"DATA_ROOT/{recipe.data}")
    result = {"recipe": {"name": name, **asdict(recipe), "seeds": list(seeds)}, "command": command, "runs": records}
    if recipe.points:
        groups = {p: [r for r in records if r["point"] == p] for p in recipe.points}
        groups = {p: rs for p, rs in groups.items() if rs}  # a point not run yet has no row
        summaries = {p: summarise(rs) for p, rs in groups.items()}
        result["mean"] = {p: s[0] for p, s in summaries.items()}
        result["stderr"] = {p: s[1] for p, s in summaries.items()}
    else:
        result["mean"], result["stderr"] = summarise(records)
    result.update(torch=torch.__version__, machine=machine(threads, jobs), commit=git_commit(),
                  date=time.strftime("%Y-%m-%d"))
    os.makedirs(results_dir, exist_ok=True)
    if recipe.points and recipe.figure:
        draw_bars(os.path.join(results_dir, f"{name}.png"), result, recipe.figure)
    path = os.path.join(results_dir, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def bar_panel(title, labels, stats, height=120, bar=34, gap=16):
    """One bar chart as a uint8 image: a bar per (mean, stderr) with a whisker of +-stderr,
    the value above it and its label below. The y axis starts at 0."""
    from train import text_image
    top = max(m + s for m, s in stats) or 1.0
    width = gap + len(stats) * (bar + gap)
    plot = torch.full((height, width, 3), 255, dtype=torch.uint8)
    plot[-1, :] = 0  # x axis
    scale = (height - 4) / top
    for i, (m, s) in enumerate(stats):
        x0 = gap + i * (bar + gap)
        h = max(1, round(m * scale))
        plot[height - h:, x0:x0 + bar] = torch.tensor([70, 110, 190], dtype=torch.uint8)
        lo, hi = round((m - s) * scale), round((m + s) * scale)
        mid = x0 + bar // 2
        plot[max(0, height - 1 - hi):height - lo, mid] = 0  # whisker
        for y in (lo, hi):
            plot[max(0, min(height - 1, height - 1 - y)), mid - 4:mid + 5] = 0
    values = torch.cat([text_image(f"{m:.3g}", width=bar + gap) for m, _ in stats], dim=1)
    names = torch.cat([text_image(label, width=bar + gap) for label in labels], dim=1)

    def pad(img):  # shift right by half a gap so each text sits under its bar, then fill to width
        grey = lambda w: torch.full((img.shape[0], w, 3), 96, dtype=torch.uint8)
        return torch.cat([grey(gap // 2), img, grey(width)], dim=1)[:, :width]

    return torch.cat([text_image(title, width=width), pad(values), plot, pad(names)], dim=0)


def draw_bars(path, result, metrics):
    """A grid recipe's figure: for each metric, a bar per point (mean over seeds, +- standard error)."""
    from train import write_png
    points = list(result["mean"])
    labels = [p.split("=")[-1] for p in points]
    panels = [bar_panel(metric, labels, [(result["mean"][p][metric], result["stderr"][p][metric]) for p in points])
              for metric in metrics]
    gap = torch.full((panels[0].shape[0], 8, 3), 96, dtype=torch.uint8)  # the panels share one height
    write_png(path, torch.cat([x for panel in panels for x in (panel, gap)][:-1], dim=1))


# ----------------------------------------------------------------------------------------------
# Rows and tables, from the results files alone

def fmt(value, digits=3):
    """A number to `digits` significant digits (2e-04 style below 0.01), whole numbers from 100 up."""
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return f"{value:.{min(digits, 2)}g}"
    return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:.0f}"


def meets(metrics, targets):
    return [(metrics[k] < v if op == "<" else metrics[k] > v) for k, op, v in targets if k in metrics]


def verdict(recipe, result):
    """yes: every run meets every target; partly: some runs meet every target; no: none does; baseline:
    a comparison model without targets."""
    targets = [tuple(t) for t in recipe["targets"]]
    if not targets:
        return "baseline"
    bound = recipe.get("target_points") or ()
    runs = [r for r in result["runs"] if not bound or r.get("point") in bound]
    checks = [meets(r["metrics"], targets) for r in runs]
    if all(c and all(c) for c in checks):
        return "yes"
    return "partly" if any(c and all(c) for c in checks) else "no"


def ours(recipe, result):
    """'key mean ± s.e.' for the row's metrics; for a grid, one entry per point."""
    n = len(result["recipe"]["seeds"])

    def cell(mean, err, keys, n=n):
        return ", ".join(f"{k} {fmt(mean[k])}" + (f" ± {fmt(err[k], 2)}" if n > 1 else "") for k in keys if k in mean)

    seeds = lambda count, each="": f" ({count} seed{'s' if count > 1 else ''}{each})"
    if recipe.get("points"):
        ran = [p for p in recipe["points"] if p in result["mean"]]  # a point added since has none: the row is stale
        counts = {p: sum(r.get("point") == p for r in result["runs"]) for p in ran}  # points may differ in seeds run
        same = len(set(counts.values())) == 1
        if ran and all("/" in p for p in ran):  # "model/task" grids: one entry per model, its tasks inside
            key, groups = recipe["metrics"][0], {}
            for p in ran:
                model, task = p.split("/", 1)
                groups.setdefault(model, []).append(f"{task} {fmt(result['mean'][p][key])}"
                                                    + ("" if same else seeds(counts[p])))
            text = "; ".join(f"{model}: {key} " + ", ".join(tasks) for model, tasks in groups.items())
        else:
            text = "; ".join(f"{p}: {cell(result['mean'][p], result['stderr'][p], recipe['metrics'][:1], counts[p])}"
                             + ("" if same else seeds(counts[p])) for p in ran)
        return text + (seeds(counts[ran[0]], " each" if len(ran) > 1 else "") if ran and same else "")
    return cell(result["mean"], result["stderr"], recipe["metrics"]) + seeds(n)


def cpu_minutes(result):
    walls = [r["wall_seconds"] for r in result["runs"]]
    return sum(walls) / len(walls) / 60


def load_results(results_dir):
    found = {}
    for name in RECIPES:
        path = os.path.join(results_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                found[name] = json.load(f)
    return found


def current(name, result):
    """The recipe as defined now (claim, paper, metrics, targets), and whether the results file was made
    with other training settings (then its row is marked stale)."""
    rec = {"name": name, **json.loads(json.dumps(asdict(RECIPES[name]))), "seeds": result["recipe"]["seeds"]}
    ran = result["recipe"]
    stale = any(json.dumps(rec[k], sort_keys=True) != json.dumps(ran.get(k), sort_keys=True)
                for k in ("model", "task", "flags", "points"))
    return rec, stale


def row(name, result):
    """A recipe's row of the results table, from its results file."""
    rec, stale = current(name, result)
    mark = " (stale: the recipe's settings changed since; rerun it)" if stale else ""
    planned, got = len(RECIPES[name].seeds), len({r["seed"] for r in result["runs"]})
    done = verdict(rec, result) + (f" ({got} of {planned} seeds)" if got < planned else "")
    points = RECIPES[name].points or {}
    ran = sum(p in result["mean"] for p in points)
    if ran < len(points):  # a grid run in part: the verdict covers only the points that ran
        done += f" ({ran} of {len(points)} points)"
    return (f"| {rec['claim']} | {rec['paper']} | {ours(rec, result)}{mark} | {done} "
            f"| `{name}` | {cpu_minutes(result):.1f} |")


def table(results_dir="results"):
    """The README's results table: a row per recipe, measured ones from their results file."""
    results = load_results(results_dir)
    lines = ["| claim | paper | ours (mean ± s.e. over seeds) | reproduced | recipe | CPU min per run |",
             "|---|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        if name in results:
            lines.append(row(name, results[name]))
        else:
            lines.append(f"| {recipe.claim} | {recipe.paper} | not yet run by the harness | | `{name}` | |")
    return "\n".join(lines)


def runs_table(result):
    """Per-seed (and per-point) table of a recipe's row metrics, for its docs page."""
    rec = result["recipe"]
    step = "selected_iter" if any("selected_iter" in r["metrics"] for r in result["runs"]) else "iter"
    keys = [k for k in rec["metrics"] if k != step] + [step]  # the step reported: the last one, or the one validation selected
    grid = bool(rec.get("points"))
    head = (["point"] if grid else []) + ["seed"] + keys + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        cells = ([r["point"]] if grid else []) + [str(r["seed"])]
        cells += [fmt(r["metrics"][k]) if k in r["metrics"] else "" for k in keys] + [f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n`{result['command']}` (and the other seeds{' and points' if grid else ''}); torch "
                 f"{result['torch']}, {result['machine']['cpu']}, {result['machine']['threads_per_run']} thread(s) "
                 f"per run, {result['machine']['parallel_runs']} run(s) at a time, commit {str(result['commit'])[:12]}, "
                 f"{result['date']}.")
    return "\n".join(lines)


def replace_between(text, begin, end, body):
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body + "\n" + text[b:]


def speed_table(bench_path):
    """The README's speed table, from bench.py's JSON lines: eager and compiled side by side."""
    rows = {}
    with open(bench_path) as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault((r["model"], r["task"], r["batch"]), {})["compiled" if r["compile"] else "eager"] = r
    lines = ["| model | task | batch | eager ms/step | compiled ms/step | speed-up | eager seq/s | compiled seq/s "
             "| compile s | threads |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, task, batch), modes in rows.items():
        e, c = modes.get("eager"), modes.get("compiled")
        speed = f"{e['ms_per_step'] / c['ms_per_step']:.2f}x" if e and c else ""
        lines.append(f"| {model} | {task} | {batch} | {e['ms_per_step'] if e else ''} | {c['ms_per_step'] if c else ''} "
                     f"| {speed} | {e['seq_per_s'] if e else ''} | {c['seq_per_s'] if c else ''} "
                     f"| {c['compile_seconds'] if c else ''} | {(e or c)['threads']} |")
    return "\n".join(lines)


def write_tables(readme="README.md", results_dir="results", docs_dir="docs"):
    """Rewrite the generated blocks: the README's results (and speed) table, the docs' per-run tables."""
    with open(readme) as f:
        text = f.read()
    if "<!-- results:begin -->" not in text or "<!-- results:end -->" not in text:
        raise HarnessError(f"{readme} has no <!-- results:begin --> / <!-- results:end --> markers")
    new = replace_between(text, "<!-- results:begin -->", "<!-- results:end -->", table(results_dir))
    bench = os.path.join(results_dir, "bench.jsonl")
    if "<!-- speed:begin -->" in new and os.path.exists(bench):
        new = replace_between(new, "<!-- speed:begin -->", "<!-- speed:end -->", speed_table(bench))
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    results = load_results(results_dir)
    for page in sorted(os.listdir(docs_dir)) if os.path.isdir(docs_dir) else []:
        if not page.endswith(".md"):
            continue
        path = os.path.join(docs_dir, page)
        with open(path) as f:
            text = f.read()
        new = text
        for name in RECIPES:
            begin, end = f"<!-- runs:{name} -->", f"<!-- /runs:{name} -->"
            if begin in new and end in new:
                body = runs_table(results[name]) if name in results else (
                    f"Not yet run by the harness: `python reproduce.py {name}`. The earlier measurements below are the record.")
                if name in results and current(name, results[name])[1]:
                    body = (f"**Stale:** these runs were made with other settings than the recipe's now; "
                            f"`python reproduce.py {name}` reruns it.\n\n" + body)
                new = replace_between(new, begin, end, body)
        if new != text:
            with open(path, "w") as f:
                f.write(new)


def list_recipes(results_dir="results"):
    results = load_results(results_dir)
    for name, recipe in RECIPES.items():
        runs = len(recipe.points or {None: 0}) * len(recipe.seeds)
        minutes = f"{cpu_minutes(results[name]):.1f} CPU min per run (measured)" if name in results else "not run yet"
        targets = ", ".join(f"{k} {op} {v:g}" for k, op, v in recipe.targets) or "none (a baseline)"
        bound = f" (points {', '.join(recipe.target_points)})" if recipe.target_points else ""
        print(f"{name:<26} {recipe.model} on {recipe.task}, {runs} run{'s' if runs > 1 else ''}, {minutes}\n"
              f"{'':<26} {recipe.claim}" + (f" [{recipe.note}]" if recipe.note else "") + "\n"
              f"{'':<26} targets, every run: {targets}{bound}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="recipes to run (python reproduce.py --list)")
    parser.add_argument("--list", action="store_true", help="print every recipe with its claim and CPU minutes")
    parser.add_argument("--table", action="store_true", help="rewrite the README's results table from results/")
    parser.add_argument("--seeds", default="", help="comma-separated, instead of the recipe's")
    parser.add_argument("--points", default="", help="comma-separated points of a grid recipe to run, instead of all")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--data_root", default="", help="a folder holding babi/ and mnist/ (default: train.py's cache)")
    parser.add_argument("--out_root", default="out/reproduce", help="where the runs write")
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--docs_dir", default="docs")
    args = parser.parse_args(argv)
    try:
        if args.list:
            list_recipes(args.results_dir)
            return
        unknown = [n for n in args.names if n not in RECIPES]
        if unknown:
            raise HarnessError(f"unknown recipe {', '.join(unknown)}: python reproduce.py --list shows them")
        if not args.names and not args.table:
            raise HarnessError("name a recipe, or pass --list or --table")
        if args.jobs < 1 or args.threads < 1:
            raise HarnessError("--jobs and --threads must be at least 1")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s] or None
        except ValueError:
            raise HarnessError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}")
        points = [p for p in args.points.split(",") if p] or None
        if points and len(args.names) != 1:
            raise HarnessError("--points names points of one recipe: name exactly one")
        for name in args.names:
            print(row(name, reproduce(name, seeds, args.jobs, args.threads, args.out_root, args.results_dir,
                                      args.data_root, points)))
        if args.table:
            write_tables(args.readme, args.results_dir, args.docs_dir)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
