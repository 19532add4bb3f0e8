"""bAbI read from its text format (a tiny fixture, written here), fetched and verified; the
algorithmic tasks of the UT paper by hand; both trained end to end through train.py."""

import hashlib
import io
import json
import os
import tarfile

import pytest
import torch

import data
from data import (AlgoAddition, AlgoCopy, AlgoReverse, AlgorithmicConfig, Babi, BabiConfig, DataError, download,
                  parse_babi)
from train import UserError, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
3 Sandra went to the bathroom.
4 Mary went to the garden.
5 Where is Mary? \tgarden\t4
"""
TEST = """1 John moved to the kitchen.
2 Where is John? \tkitchen\t1
3 Mary went to the office.
4 Where is Mary? \toffice\t3
"""
PATH_FINDING = """1 The kitchen is north of the hallway.
2 The garden is west of the kitchen.
3 How do you go from the hallway to the garden?\tn,w\t1 2
"""


def write_babi(root, split="en-10k", tasks=((1, TRAIN, TEST),)):
    for number, train, test in tasks:
        name = data.BABI_NAMES[number]
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for part, text in (("train", train), ("test", test)):
            with open(os.path.join(root, split, f"qa{number}_{name}_{part}.txt"), "w") as f:
                f.write(text)
    return str(root)


def test_the_parser_reads_stories_questions_answers_and_supporting_facts_exactly(tmp_path):
    path = tmp_path / "qa1.txt"
    path.write_text(TRAIN)
    samples = parse_babi(path)
    assert len(samples) == 4
    assert samples[0] == {"facts": [["mary", "moved", "to", "the", "bathroom"], ["john", "went", "to", "the", "hallway"]],
                          "question": ["where", "is", "mary"], "answer": "bathroom", "supporting": [0]}
    # the story goes on after a question; earlier questions are not facts
    assert samples[1]["facts"][2:] == [["daniel", "went", "back", "to", "the", "hallway"], ["sandra", "moved", "to", "the", "garden"]]
    assert samples[1]["supporting"] == [2] and samples[1]["answer"] == "hallway"
    # line numbers restart: a new story; line 4 is the third fact of the story
    assert samples[2]["facts"] == [["sandra", "travelled", "to", "the", "office"]]
    assert samples[3]["supporting"] == [2] and len(samples[3]["facts"]) == 3
    path.write_text(PATH_FINDING)
    (sample,) = parse_babi(path)
    assert sample["answer"] == "n,w" and sample["supporting"] == [0, 1]


def test_the_question_first_layout_puts_the_question_at_row_0_and_reads_the_answer_there(tmp_path):
    task = Babi(BabiConfig(tasks=(1,), layout="question_first"), data_dir=write_babi(tmp_path))
    train_words = {"mary", "moved", "to", "the", "bathroom", "john", "went", "hallway", "where", "is", "daniel", "back",
                   "sandra", "garden", "travelled", "office"}
    assert set(task.vocab) == train_words and min(task.vocab.values()) == 2  # 0 padding, 1 unknown
    assert "kitchen" not in task.vocab  # a test-only word
    assert task.answers == {"bathroom": 0, "garden": 1, "hallway": 2, "office": 3}
    assert task.spec == {"kind": "story", "vocab_size": 18, "output_size": 4, "sentence_length": 6,
                         "question_position_mask": False}
    (batch,) = task.eval_data(8, None)["qa1"]
    x, mask, y = batch["x"], batch["padding_mask"], batch["y"]
    assert x.shape == (2, 3, 6) and mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch["question_rows"].tolist() == [[True, False, False], [True, False, False]]
    ids = lambda words: [task.vocab.get(w, 1) for w in words] + [0] * (6 - len(words))
    assert x[0].tolist() == [ids(["where", "is", "john"]), ids(["john", "moved", "to", "the", "kitchen"]), [0] * 6]
    assert x[1, 2].tolist() == ids(["mary", "went", "to", "the", "office"])
    assert x[0, 1, 4] == 1  # 'kitchen' is unknown
    assert y.tolist() == [-100, 3]  # 'kitchen' was never an answer in training: always wrong
    logits = torch.zeros(2, 3, 4)
    logits[:, 0, 3] = 1.0  # answers 'office' to both
    assert task.metrics(logits, batch, {}) == {"err": 100.0, "count": 2}
    assert task.summary({"err@qa1": 50.0}) == {"mean_err": 50.0, "failed": 1}


def test_the_authors_layout_puts_the_story_first_the_question_last_and_pools_the_answer_over_rows(tmp_path):
    task = Babi(BabiConfig(tasks=(1,)), data_dir=write_babi(tmp_path))
    assert task.config.layout == "story_first" and task.config.max_facts == 130
    assert task.spec["question_position_mask"] is True
    (batch,) = task.eval_data(8, None)["qa1"]
    x, mask = batch["x"], batch["padding_mask"]
    ids = lambda words: [task.vocab.get(w, 1) for w in words] + [0] * (6 - len(words))
    assert x[0].tolist() == [ids(["john", "moved", "to", "the", "kitchen"]), ids(["where", "is", "john"]), [0] * 6]
    assert x[1].tolist() == [ids(["john", "moved", "to", "the", "kitchen"]), ids(["mary", "went", "to", "the", "office"]),
                             ids(["where", "is", "mary"])]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch["question_rows"].tolist() == [[False, True, False], [False, False, True]]  # the last real row
    logits = torch.zeros(2, 3, 4)
    logits[1, :, 3] = torch.tensor([3.0, 0.0, 0.0])  # the mean over sample 1's three rows: class 3, 'office'
    logits[0, 2, 2] = 100.0  # a padding row never counts
    logits[0, :2, 0] = 1.0
    assert task.readout(logits, batch).argmax(-1).tolist() == [0, 3]
    assert torch.allclose(task.readout(logits, batch)[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert task.metrics(logits, batch, {}) == {"err": 100.0, "count": 2}  # summed: sample 0 (never right) is wrong


def test_the_ut_embeds_the_question_row_under_its_own_positional_mask():
    from universal_transformer import UniversalTransformer, UTConfig
    torch.manual_seed(0)
    model = UniversalTransformer(UTConfig(vocab_size=10, output_size=3, sentence_length=4, d_model=8, num_heads=2,
                                          question_position_mask=True))
    x = torch.randint(1, 10, (1, 3, 4))
    question = torch.tensor([[False, False, True]])
    with torch.no_grad():
        model.question_position_mask.mul_(2.0)
    rows = model.embed(x, question)
    words = model.embedding(x)
    assert torch.allclose(rows[0, :2], (words[0, :2] * model.word_position_mask).sum(-2))
    assert torch.allclose(rows[0, 2], (words[0, 2] * model.question_position_mask).sum(-2))
    assert torch.allclose(rows[0, 2], 2 * (words[0, 2] * model.word_position_mask).sum(-2))
    shared = UniversalTransformer(UTConfig(vocab_size=10, output_size=3, sentence_length=4, d_model=8, num_heads=2))
    assert not hasattr(shared, "question_position_mask")  # the default: one mask for every row (old checkpoints load)


def test_max_facts_keeps_the_last_facts_of_a_story(tmp_path):
    task = Babi(BabiConfig(tasks=(1,), max_facts=1), data_dir=write_babi(tmp_path))
    assert task.train_data["x"].shape[1] == 2 and task.train_data["lengths"].max() == 2
    assert task.train_data["x"][0, 0, 0] == task.vocab["john"]  # the story's second, last fact, then the question


def test_a_missing_file_names_data_dir_in_one_line(tmp_path):
    root = write_babi(tmp_path)
    with pytest.raises(DataError, match=r"missing .*qa2_two-supporting-facts_train.txt: --data_dir must hold"):
        Babi(BabiConfig(tasks=(1, 2)), data_dir=root)
    with pytest.raises(UserError, match="missing .*--data_dir") as error:
        main(["--model", "universal_transformer", "--task", "babi", "--tasks", "2", "--data_dir", root,
              "--out_dir", str(tmp_path / "out")])
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "out")


def make_tarball(tmp_path, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    path = tmp_path / "babi.tar.gz"
    path.write_bytes(buffer.getvalue())
    return path, hashlib.sha256(buffer.getvalue()).hexdigest()


def test_first_use_downloads_verifies_and_unpacks_the_tarball(tmp_path, monkeypatch):
    prefix = "tasks_1-20_v1-2/"
    tarball, digest = make_tarball(tmp_path, {prefix + "en/qa1_single-supporting-fact_train.txt": TRAIN,
                                              prefix + "en/qa1_single-supporting-fact_test.txt": TEST,
                                              prefix + "hn/ignored.txt": "x"})
    monkeypatch.setattr(data, "BABI_URL", tarball.as_uri())
    monkeypatch.setattr(data, "BABI_SHA256", digest)
    root = tmp_path / "cache"
    task = Babi(BabiConfig(tasks=(1,), split="en"), data_dir=str(root))
    assert len(task.train_data["y"]) == 4 and sorted(os.listdir(root)) == ["en", "tasks_1-20_v1-2.tar.gz"]
    Babi(BabiConfig(tasks=(1,), split="en"), data_dir=str(root))  # offline from now on
    monkeypatch.setattr(data, "BABI_SHA256", "0" * 64)  # a corrupt download leaves nothing behind
    with pytest.raises(DataError, match="has sha256 .* expected 0000"):
        Babi(BabiConfig(tasks=(1,), split="en"), data_dir=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "tasks_1-20_v1-2.tar.gz")
    assert not os.path.exists(tmp_path / "other" / "tasks_1-20_v1-2.tar.gz.part")
    with pytest.raises(DataError, match="does not have sha256"):  # a cached archive that changed
        download(tarball.as_uri(), str(root / "tasks_1-20_v1-2.tar.gz"), "0" * 64)


def test_a_failed_download_says_which_folder_was_missing_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BABI_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(DataError, match=r"no en-10k/ folder in .*cache \(--data_dir\) .*could not download"):
        Babi(BabiConfig(), data_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # no folder is left behind when nothing could be fetched


def test_an_archive_with_unsafe_paths_is_refused(tmp_path, monkeypatch):
    tarball, digest = make_tarball(tmp_path, {"tasks_1-20_v1-2/en/../../escape.txt": "x"})
    monkeypatch.setattr(data, "BABI_URL", tarball.as_uri())
    monkeypatch.setattr(data, "BABI_SHA256", digest)
    with pytest.raises(DataError, match="unsafe path"):
        Babi(BabiConfig(tasks=(1,), split="en"), data_dir=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "escape.txt")


def test_the_paper_command_trains_and_reports_per_task_error_mean_and_failed(tmp_path):
    root = write_babi(tmp_path / "babi")
    out = str(tmp_path / "out")
    result = main(["--model", "universal_transformer", "--task", "babi", "--data_dir", root, "--out_dir", out,
                   "--max_iters", "10", "--eval_interval", "10", "--d_model", "16", "--d_ff", "16", "--batch_size", "4",
                   "--max_steps", "3"])
    assert set(result["metrics"]) == {"err@qa1", "ponder@qa1", "steps@qa1", "one_step@qa1", "mean_err", "failed", "iter",
                                      "seconds", "compile_seconds"}
    assert 1 <= result["metrics"]["steps@qa1"] <= 3 and result["metrics"]["ponder@qa1"] >= result["metrics"]["steps@qa1"]
    assert os.path.exists(os.path.join(out, "outputs_qa1.png"))  # ponder per fact and the question's attention
    result = main(["--model", "transformer", "--task", "babi", "--data_dir", root, "--out_dir", str(tmp_path / "t"),
                   "--max_iters", "3", "--d_model", "16", "--d_ff", "16", "--batch_size", "4", "--no-figures"])
    assert set(result["metrics"]) == {"err@qa1", "mean_err", "failed", "iter", "seconds", "compile_seconds"}
    assert result["model"].config.universal is False and len(result["model"].blocks) == 6  # the baseline's layers


# ----------------------------------------------------------------------------------------------
# Algorithmic tasks (UT paper: Copy, Reverse, Addition)

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_copy_and_reverse_targets_by_hand():
    batch = AlgoCopy(AlgorithmicConfig()).make_batch(3, gen(), length=7, offset=False)
    assert torch.equal(batch["y"], batch["x"] - 1) and batch["mask"].sum() == 21 and (batch["position_offset"] == 0).all()
    batch = AlgoReverse(AlgorithmicConfig()).make_batch(3, gen(), length=7, offset=False)
    assert torch.equal(batch["y"], (batch["x"] - 1).flip(1))


def test_addition_writes_the_sum_least_significant_digit_first_under_the_scored_mask():
    batch = AlgoAddition(AlgorithmicConfig(min_len=3)).make_batch(64, gen(), length=12, offset=False)
    U = batch["y"].shape[1]
    widths = set()
    for x, y, mask in zip(batch["x"].tolist(), batch["y"].tolist(), batch["mask"].tolist()):
        text = "".join("+" if t == 11 else str(t - 1) for t in x)
        a, b = text.split("+")  # each least significant digit first
        width = max(len(a), len(b)) + 1
        widths.add(width)
        assert mask == [1.0] * width + [0.0] * (U - width)
        assert "".join(map(str, y[:width])) == str(int(a[::-1]) + int(b[::-1])).zfill(width)[::-1]
        assert y[width:] == [0] * (U - width)
    assert U == max(widths) and len(widths) > 3  # outputs of several lengths, padded to the longest


def test_addition_by_hand():
    """'47+805' least significant first is 74 + 508 = 582, written 2,8,5,0 in 4 digits."""
    task = AlgoAddition(AlgorithmicConfig(min_len=3))
    digits = torch.tensor([[4, 7, 0, 8, 0, 5]])  # position 2 becomes '+'
    x, y, mask = task.encode(digits, _generator_with_plus_at(2))
    assert x.tolist() == [[5, 8, 11, 9, 1, 6]]
    assert y.tolist() == [[2, 8, 5, 0]] and mask.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def _generator_with_plus_at(position, length=6):
    """A generator whose next draw of '+' (encode's first draw) lands at position."""
    for seed in range(1000):
        probe = torch.randint(1, length - 1, (1, 1), generator=torch.Generator().manual_seed(seed))
        if probe.item() == position:
            return torch.Generator().manual_seed(seed)
    raise AssertionError("no seed found")


def test_training_offsets_let_short_strings_visit_long_positions():
    task = AlgoCopy(AlgorithmicConfig())
    g = gen(1)
    batches = [task.train_batch(16, g) for _ in range(50)]
    assert all(b["x"].shape[1] <= 40 for b in batches)
    ends = torch.cat([b["position_offset"] + b["x"].shape[1] for b in batches])
    assert ends.max() <= 400 and ends.max() > 300  # positions up to the test length are seen
    assert list(task.eval_settings) == ["40", "400", "1-400"]


def test_char_and_sequence_accuracy_by_hand():
    task = AlgoCopy(AlgorithmicConfig())
    batch = task.make_batch(2, gen(), length=4, offset=False)
    logits = torch.nn.functional.one_hot(batch["y"], 10).float()
    logits[0, 1] = logits[0, 1].roll(1)  # one wrong digit in sequence 0
    totals = task.metrics(logits, batch, {})
    assert totals == {"char_acc": 0.75 + 1.0, "seq_acc": 1.0, "count": 2, "right_chars": 7.0, "scored_chars": 8.0}
    count = totals.pop("count")
    assert task.finish_metrics(totals, count) == {"char_acc": 0.875, "seq_acc": 0.5, "token_char_acc": 0.875}


def test_the_1_to_400_setting_draws_lengths_in_range_pads_them_and_weighs_accuracy_by_token():
    task = AlgoReverse(AlgorithmicConfig())
    assert task.eval_settings["1-400"] == {"length": 400, "offset": False, "shortest": 1}
    batch = task.eval_batch("1-400", 64, gen(3))
    lengths = batch["padding_mask"].sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 400 and len(set(lengths.tolist())) > 50
    assert batch["x"].shape[1] == lengths.max() and torch.equal(batch["mask"].sum(1), lengths.float())
    for b in range(64):
        n = int(lengths[b])
        assert torch.equal(batch["y"][b, :n], (batch["x"][b, :n] - 1).flip(0)) and (batch["x"][b, n:] == 0).all()
    # two strings of lengths 1 and 3: the long one all right, the short one wrong
    short = {"x": torch.tensor([[4, 0, 0], [2, 3, 4]]), "y": torch.tensor([[3, 0, 0], [3, 2, 1]]),
             "mask": torch.tensor([[1.0, 0, 0], [1, 1, 1]]), "padding_mask": torch.tensor([[1, 0, 0], [1, 1, 1]]).bool()}
    logits = torch.nn.functional.one_hot(short["y"], 10).float()
    logits[0, 0] = logits[0, 0].roll(1)
    totals = task.metrics(logits, short, {})
    result = task.finish_metrics(totals, totals.pop("count"))
    assert result == {"char_acc": 0.5, "seq_acc": 0.5, "token_char_acc": 0.75}  # 3 of 4 digits; 1 of 2 strings
    addition = AlgoAddition(AlgorithmicConfig(min_len=3, eval_ranges=("1-9",)))
    assert addition.eval_settings["1-9"]["shortest"] == 3  # 'a+b' needs 3
    assert addition.eval_batch("1-9", 32, gen()) ["padding_mask"].sum(1).min() >= 3
    with pytest.raises(ValueError, match="eval_ranges"):
        AlgorithmicConfig(eval_ranges=("400-1",))


def test_halting_statistics_report_one_step_as_rho_2_and_n_1():
    from data import halting_sums
    internals = {"steps": torch.tensor([[1, 2, 0]]), "ponder_cost": torch.tensor([[2.0, 2.5, 0.0]])}
    sums = halting_sums(internals, torch.tensor([[True, True, False]]))
    assert sums == {"ponder": 2.25, "steps": 1.5, "one_step": 50.0}
    assert halting_sums({"steps": torch.ones(1, 3)}, torch.ones(1, 3)) == {}  # no ACT: nothing to report


def test_a_short_training_run_lowers_the_loss_on_reverse(tmp_path):
    out = str(tmp_path / "rev")
    result = main(["--model", "universal_transformer", "--task", "algo_reverse", "--out_dir", out, "--max_len", "6",
                   "--eval_lengths", "6", "--eval_ranges", "1-6", "--eval_samples", "32", "--d_model", "32", "--d_ff", "64", "--max_steps", "4",
                   "--max_iters", "150", "--eval_interval", "150", "--log_interval", "10", "--lr", "3e-3"])
    with open(os.path.join(out, "log.jsonl")) as f:
        curve = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert sum(curve[-3:]) / 3 < 0.6 * curve[0]  # from chance (ln 10 = 2.3) well down
    per_setting = {"char_acc", "token_char_acc", "seq_acc", "ponder", "steps", "one_step", "decoder_ponder",
                   "decoder_steps", "decoder_one_step"}
    assert set(result["metrics"]) == {f"{m}@{s}" for m in per_setting for s in ("6", "1-6")} | {"iter", "seconds", "compile_seconds"}
    metrics = result["metrics"]
    assert 1 <= metrics["steps@1-6"] <= 4 and metrics["ponder@1-6"] >= metrics["steps@1-6"] and 0 <= metrics["one_step@6"] <= 100
    assert os.path.exists(os.path.join(out, "outputs_6.png"))


def test_the_seq2seq_lstm_trains_on_reverse_through_train_py(tmp_path):
    """The LSTM takes the tokens and y; the position offsets it has no use for are not passed to it."""
    out = str(tmp_path / "lstm")
    result = main(["--model", "lstm", "--task", "algo_reverse", "--out_dir", out, "--max_len", "5", "--eval_lengths", "5",
                   "--eval_ranges", "1-5", "--eval_samples", "16", "--hidden_size", "32", "--max_iters", "20", "--eval_interval", "20"])
    assert result["model"].config.decoder and result["model"].config.vocab_size == 12
    assert set(result["metrics"]) == {f"{m}@{s}" for m in ("char_acc", "token_char_acc", "seq_acc") for s in ("5", "1-5")} | {
        "iter", "seconds", "compile_seconds"}
    with pytest.raises(UserError, match="does not fit"):
        main(["--model", "ntm", "--task", "algo_copy", "--out_dir", str(tmp_path / "ntm")])


def test_bench_times_the_universal_transformer_and_the_transformer():
    from bench import time_training
    for model in ("universal_transformer", "transformer"):
        row = time_training(model, "algo_copy", 2, "cpu", False, warmup=0, runs=1, steps=1)
        assert row["model"] == model and row["setting"] == "40" and row["ms_per_step"] > 0


def test_addition_shorter_than_a_plus_b_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="pass --min_len 3 or more"):
        main(["--model", "universal_transformer", "--task", "algo_addition", "--min_len", "1",
              "--out_dir", str(tmp_path / "add")])
    assert not os.path.exists(tmp_path / "add")
