"""The RIMs paper's tasks: copying over a delay, and sequential MNIST from IDX files (tiny fixtures
written here; the real files are never needed by the tests)."""

import gzip
import hashlib
import json
import math
import os
import struct
import sys

import pytest
import torch

import data
from data import (CopyDelay, CopyDelayConfig, DataError, SeqMNIST, SeqMNISTConfig,
                  binarise_and_resize, dataset_file, load_mnist, read_idx)
from train import UserError, main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from rims_delay import main as delay_experiment  # noqa: E402


# ----------------------------------------------------------------------------------------------
# copy_delay

def test_copy_delay_layout_delimiter_and_targets():
    task = CopyDelay(CopyDelayConfig(length=3, delay=5, num_symbols=4))
    batch = task.make_batch(2, torch.Generator().manual_seed(0), delay=5)
    x = batch["x"]  # (B, 3 + 5 + 3, blank + 4 symbols + delimiter): one-hot over every token
    assert x.shape == (2, 11, 6) and set(x.sum(-1).flatten().tolist()) == {1.0}
    tokens = x.argmax(-1)
    symbols = tokens[:, :3]
    assert ((symbols >= 1) & (symbols <= 4)).all()
    assert (tokens[:, 3:7] == 0).all()  # T - 1 = 4 blanks
    assert (tokens[:, 7] == 5).all()  # the delimiter, at length + T - 1
    assert (tokens[:, 8:] == 0).all()  # blanks while recalling
    assert torch.equal(batch["y"][:, 8:], symbols) and (batch["y"][:, :8] == 0).all()
    assert torch.equal(batch["mask"], torch.tensor([[0.0] * 8 + [1.0] * 3] * 2))
    assert task.eval_batch("200", 1, torch.Generator())["x"].shape[1] == 3 + 200 + 3


def test_with_null_blank_the_blank_is_the_zero_vector_and_the_rest_is_unchanged():
    config = dict(length=3, delay=5, num_symbols=4)
    embedded = CopyDelay(CopyDelayConfig(**config)).make_batch(2, torch.Generator().manual_seed(0), delay=5)
    task = CopyDelay(CopyDelayConfig(**config, null_blank=True))
    null = task.make_batch(2, torch.Generator().manual_seed(0), delay=5)
    assert task.spec["input_size"] == 5 and torch.equal(null["x"], embedded["x"][..., 1:])
    assert (null["x"][embedded["x"][..., 0] == 1] == 0).all()  # every blank step reads nothing
    assert torch.equal(null["y"], embedded["y"])


def test_copy_delay_scores_only_the_recall_positions():
    task = CopyDelay(CopyDelayConfig(length=2, delay=3, num_symbols=4))
    batch = task.make_batch(4, torch.Generator().manual_seed(1), delay=3)
    perfect = torch.nn.functional.one_hot(batch["y"], 6).float() * 50
    metrics = task.metrics(perfect, batch, {})
    assert metrics["acc"] == 400.0 and metrics["count"] == 4 and metrics["ce"] < 1e-6
    blank_everywhere = torch.zeros(4, 7, 6)
    blank_everywhere[..., 0] = 50.0  # right on the 5 blank steps, wrong on both recall steps
    assert task.metrics(blank_everywhere, batch, {})["acc"] == 0.0
    uniform = torch.zeros(4, 7, 6)
    assert math.isclose(task.loss(uniform, batch).item(), math.log(6), rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# IDX files, fixtures built here

def idx_bytes(array):
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + bytes(array.flatten().tolist())


def write_mnist(folder, n_train=12, n_test=6, gz=False):
    """A fake MNIST of n images: image i is all 255 in its top-left (i % 28) x (i % 28) corner."""
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i in range(n):
            images[i, : i % 28 + 1, : i % 28 + 1] = 255
        labels = torch.arange(n, dtype=torch.uint8) % 10
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            path = os.path.join(folder, f"{prefix}-{kind}")
            payload = idx_bytes(array)
            with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
                f.write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_reads_raw_and_gzipped_files(tmp_path, gz):
    array = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    path = str(tmp_path / ("a.idx.gz" if gz else "a.idx"))
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(idx_bytes(array))
    assert torch.equal(read_idx(path), array)


def test_a_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(torch.zeros(4, 28, 28, dtype=torch.uint8))[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(path))
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not a readable IDX file"):
        read_idx(str(path))


def test_a_gzipped_file_with_the_wrong_md5_is_refused_and_the_right_one_accepted(tmp_path, monkeypatch):
    write_mnist(str(tmp_path), gz=True)
    name = "train-labels-idx1-ubyte"
    with pytest.raises(DataError, match="wrong md5"):
        dataset_file(str(tmp_path), name, data.MNIST_FILES[name], data.MNIST_URL)
    real_md5 = hashlib.md5((tmp_path / (name + ".gz")).read_bytes()).hexdigest()
    assert dataset_file(str(tmp_path), name, real_md5, data.MNIST_URL).endswith(".gz")


def test_a_missing_file_is_downloaded_and_checked_or_named_in_a_one_line_error(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    write_mnist(str(source), gz=True)
    name = "t10k-labels-idx1-ubyte"
    good_md5 = hashlib.md5((source / (name + ".gz")).read_bytes()).hexdigest()
    fetched = []

    def fake_urlretrieve(url, path):  # no network in tests: the "mirror" is a folder
        fetched.append(url)
        with open(path, "wb") as f:
            f.write((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlretrieve", fake_urlretrieve)
    cache = tmp_path / "cache"
    path = dataset_file(str(cache), name, good_md5, "https://example.org/mnist/")
    assert fetched == ["https://example.org/mnist/" + name + ".gz"] and os.path.exists(path)
    with pytest.raises(DataError, match="wrong md5"):  # a download that does not match is not kept
        dataset_file(str(tmp_path / "cache2"), name, "0" * 32, "https://example.org/mnist/")
    assert not (tmp_path / "cache2").exists()  # not kept, nor the folder made for it

    def offline(url, path):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match="--data_dir") as error:
        dataset_file(str(tmp_path / "empty"), name, good_md5, "https://example.org/mnist/")
    assert "\n" not in str(error.value)


def test_binarise_and_resize_with_nearest_neighbour_by_hand():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, :, :14] = 200  # left half on
    image[0, :, 14:] = 100  # right half below the threshold (0.5 * 255)
    for size in (14, 16, 19, 24):
        resized = binarise_and_resize(image, size)
        assert resized.shape == (1, size, size)
        columns = (torch.arange(size) + 0.5) * 28 / size  # nearest-exact samples pixel centres
        assert torch.equal(resized[0, 0], (columns < 14).float())
        assert set(resized.unique().tolist()) <= {0.0, 1.0}


def test_seqmnist_reads_pixels_in_row_major_order_and_classifies_at_the_last_step(tmp_path):
    write_mnist(str(tmp_path))
    task = SeqMNIST(SeqMNISTConfig(resolution=14, eval_resolutions=(16,), val_size=4, val_samples=4, eval_samples=6),
                    data_dir=str(tmp_path))
    assert len(task.train_labels) == 8 and len(task.val_labels) == 4
    assert set(task.eval_settings) == {"val14", "14", "16"}
    batch = task.eval_batch("16", 6, torch.Generator())
    assert batch["x"].shape == (6, 256, 1) and torch.equal(batch["y"], torch.arange(6))
    image = binarise_and_resize(load_mnist(str(tmp_path), "test")[0][3:4], 16)[0]
    assert torch.equal(batch["x"][3, :, 0], image.flatten())  # row by row
    assert batch["mask"][:, -1].eq(1).all() and batch["mask"][:, :-1].eq(0).all()
    logits = torch.zeros(6, 256, 10)
    logits[torch.arange(6), -1, torch.arange(6)] = 1.0  # right at the last step only
    assert task.metrics(logits, batch, {}) == {"acc": 600.0, "count": 6}
    assert task.metric_key("acc", "val14") == "val_acc@14" and task.metric_key("acc", "16") == "acc@16"


def test_rims_and_lstm_train_on_seqmnist_and_report_the_selected_checkpoint_on_test(tmp_path):
    folder = str(tmp_path / "mnist")
    write_mnist(folder)
    flags = ["--task", "seqmnist", "--data_dir", folder, "--resolution", "4", "--eval_resolutions", "5",
             "--val_size", "4", "--val_samples", "4", "--eval_samples", "6", "--batch_size", "4",
             "--max_iters", "4", "--eval_interval", "2", "--hidden_size", "12"]
    result = main(["--model", "rims", "--out_dir", str(tmp_path / "rims"), *flags, "--input_value_size", "8"])
    metrics = result["metrics"]
    assert set(metrics) == {"val_acc@4", "acc@4", "acc@5", "iter", "seconds", "compile_seconds", "selected_iter"}
    assert metrics["selected_iter"] in (2, 4) and metrics["iter"] == 4
    with open(tmp_path / "rims" / "log.jsonl") as f:
        evaluations = [r for r in map(json.loads, f) if "loss" not in r]
    assert [set(r) - {"iter", "seconds", "compile_seconds"} for r in evaluations] == [{"val_acc@4"}] * 2  # no test during training
    assert os.path.exists(tmp_path / "rims" / "outputs_5.png")
    again = main(["--model", "rims", "--out_dir", str(tmp_path / "rims"), *flags, "--eval_only"])["metrics"]
    assert again == {**metrics, "seconds": again["seconds"]}
    lstm = main(["--model", "lstm", "--num_layers", "1", "--out_dir", str(tmp_path / "lstm"), *flags, "--no-figures"])
    assert set(lstm["metrics"]) == set(metrics)


def test_missing_or_corrupt_mnist_is_a_one_line_user_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlretrieve", lambda url, path: (_ for _ in ()).throw(OSError("offline")))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--data_dir"):
        main(["--model", "rims", "--task", "seqmnist", "--data_dir", str(tmp_path / "nothing"), "--out_dir", str(out)])
    folder = tmp_path / "bad"
    write_mnist(str(folder))
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(UserError, match="not a readable IDX file"):
        main(["--model", "rims", "--task", "seqmnist", "--data_dir", str(folder), "--out_dir", str(out),
              "--val_size", "4", "--val_samples", "4", "--eval_samples", "6"])
    assert not out.exists()


def test_rims_learns_a_short_copy_delay(tmp_path):
    out = str(tmp_path / "copy")
    result = main(["--model", "rims", "--task", "copy_delay", "--out_dir", out, "--length", "2", "--delay", "3",
                   "--eval_delays", "3,6", "--num_symbols", "3", "--eval_samples", "64", "--hidden_size", "24",
                   "--input_value_size", "16", "--batch_size", "16", "--lr", "1e-2", "--max_iters", "120",
                   "--eval_interval", "120", "--log_interval", "10", "--no-figures"])
    with open(os.path.join(out, "log.jsonl")) as f:
        curve = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert curve[0] > 0.9  # chance: ln 3 = 1.10 over the 3 symbols
    assert sum(curve[-3:]) / 3 < 0.5 * curve[0]
    metrics = result["metrics"]
    assert set(metrics) == {"ce@3", "acc@3", "ce@6", "acc@6", "drop@6", "iter", "seconds", "compile_seconds"}
    assert metrics["drop@6"] == pytest.approx(metrics["acc@3"] - metrics["acc@6"])  # points lost at the longer delay
    assert result["metrics"]["acc@3"] > 60  # chance: 33 %


def test_rims_delay_reports_which_modules_sleep_through_the_delay(tmp_path, capsys):
    """With the blank fed as the zero vector every module ties at 0.5 on it, so modules 0-3 update on
    every delay step and modules 4-5 on none: they are frozen through the delay in every sequence."""
    out = str(tmp_path / "null")
    main(["--model", "rims", "--task", "copy_delay", "--out_dir", out, "--length", "2", "--delay", "4",
          "--eval_delays", "4,9", "--num_symbols", "3", "--eval_samples", "8", "--hidden_size", "24",
          "--input_value_size", "8", "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2",
          "--null_blank", "--no-figures"])
    results = delay_experiment(["--out_dir", out, "--samples", "10", "--batch_size", "4"])
    for delay in (4, 9):
        assert [results[f"active@{delay}/m{k}"] for k in range(6)] == [1.0] * 4 + [0.0] * 2
        assert [results[f"frozen@{delay}/m{k}"] for k in range(6)] == [0.0] * 4 + [1.0] * 2
        assert 0 <= results[f"acc@{delay}"] <= 100
    assert json.loads(open(os.path.join(out, "delay.json")).read()) == results
    with pytest.raises(UserError, match="--delays"):
        delay_experiment(["--out_dir", out, "--delays", "x"])
