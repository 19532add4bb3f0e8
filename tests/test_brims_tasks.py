"""The BRIMs paper's tasks: sequential CIFAR-10 from the python tarball (a tiny fixture in the same
pickle format, written here) and the noise experiment on a trained sequential-MNIST checkpoint."""

import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile

import pytest
import torch

import data
from data import DataError, SeqCIFAR, SeqCIFARConfig, load_cifar10, resize_nearest
from train import UserError, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from brims_noise import main as noise_experiment, noisy  # noqa: E402


def cifar_images(n, offset):
    """n images (n, 32, 32, 3): image i has red = row, green = column, blue = i + offset."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    images = torch.stack([rows, rows.T, torch.zeros(32, 32, dtype=torch.long)], dim=-1).expand(n, 32, 32, 3).clone()
    images[..., 2] = (torch.arange(n) + offset).view(n, 1, 1)
    return images.to(torch.uint8)


def write_cifar(folder, per_batch=4, n_test=6):
    """A fake cifar-10-python.tar.gz: five training batches of per_batch images and a test batch.
    Returns its md5."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as archive:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for index, name in enumerate(names):
            n = n_test if name == "test_batch" else per_batch
            images = cifar_images(n, 10 * index)
            planes = images.permute(0, 3, 1, 2).reshape(n, 3072)  # red plane, green plane, blue plane
            # as the real files: b'data' a numpy uint8 array (n, 3072), b'labels' a list of ints
            payload = pickle.dumps({b"data": planes.numpy(), b"labels": [(i + index) % 10 for i in range(n)],
                                    b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_cifar_tarball_is_read_as_rgb_images_and_labels(tmp_path):
    md5 = write_cifar(str(tmp_path))
    images, labels = load_cifar10(str(tmp_path), "train", md5)
    assert images.shape == (20, 32, 32, 3) and images.dtype == torch.uint8 and labels.tolist()[:5] == [0, 1, 2, 3, 1]
    assert images[5, 7, 3].tolist() == [7, 3, 11]  # second batch, image 1: red = row, green = column, blue = 10 + 1
    test_images, test_labels = load_cifar10(str(tmp_path), "test", md5)
    assert test_images.shape == (6, 32, 32, 3) and test_labels.tolist() == [5, 6, 7, 8, 9, 0]


def test_a_cifar_tarball_with_the_wrong_md5_or_missing_offline_is_a_one_line_error(tmp_path, monkeypatch):
    write_cifar(str(tmp_path))
    with pytest.raises(DataError, match="wrong md5") as error:
        load_cifar10(str(tmp_path), "train")  # the fixture is not the real tarball
    assert "--data_dir" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setattr(data.urllib.request, "urlretrieve", lambda url, path: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match="--data_dir"):
        load_cifar10(str(tmp_path / "empty"), "train")
    assert not (tmp_path / "empty").exists()  # nothing half-written, not even the folder
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"<html>moved</html>")
    with pytest.raises(DataError, match="not a readable CIFAR-10"):
        load_cifar10(str(tmp_path / "bad"), "train", hashlib.md5(b"<html>moved</html>").hexdigest())


def test_a_missing_tarball_is_downloaded_from_the_official_url_and_checked(tmp_path, monkeypatch):
    md5 = write_cifar(str(tmp_path / "mirror"))
    fetched = []

    def fake_urlretrieve(url, path):  # no network in tests
        fetched.append(url)
        with open(path, "wb") as f:
            f.write((tmp_path / "mirror" / "cifar-10-python.tar.gz").read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlretrieve", fake_urlretrieve)
    images, _ = load_cifar10(str(tmp_path / "cache"), "test", md5)
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"] and len(images) == 6
    assert data.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_nearest_resizing_keeps_the_bytes_and_samples_pixel_centres():
    images = cifar_images(1, 0)
    for size in (16, 19, 24, 32):
        resized = resize_nearest(images, size)
        centres = ((torch.arange(size) + 0.5) * 32 / size).long()
        assert resized.shape == (1, size, size, 3) and resized.dtype == torch.uint8
        assert torch.equal(resized[0, :, 0, 0], centres.to(torch.uint8))  # red = source row
        reference = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="nearest-exact")
        assert torch.equal(resized.permute(0, 3, 1, 2).float(), reference)


def test_seqcifar_reads_rgb_bytes_row_by_row_and_asks_for_an_embedding(tmp_path):
    md5 = write_cifar(str(tmp_path))
    task = SeqCIFAR(SeqCIFARConfig(val_size=4, val_samples=4, eval_samples=6), data_dir=str(tmp_path), md5=md5)
    assert task.spec == {"kind": "sequence", "input_size": 3, "input_vocab": 256, "output_size": 10}
    assert set(task.eval_settings) == {"val16", "16", "19", "24", "32"} and len(task.train_labels) == 16
    batch = task.eval_batch("32", 6, torch.Generator())
    assert batch["x"].shape == (6, 1024, 3) and batch["x"].dtype == torch.float32
    assert batch["x"][2, 32 * 5 + 9].tolist() == [5.0, 9.0, 52.0]  # row 5, column 9 of test image 2
    assert batch["mask"][:, -1].eq(1).all() and batch["mask"][:, :-1].eq(0).all()
    assert task.train_batch(3, torch.Generator().manual_seed(0))["x"].shape == (3, 256, 3)


def test_brims_trains_on_seqcifar_and_the_lstm_is_refused(tmp_path, monkeypatch):
    md5 = write_cifar(str(tmp_path / "cifar"))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    flags = ["--task", "seqcifar", "--data_dir", str(tmp_path / "cifar"), "--resolution", "4", "--eval_resolutions", "5",
             "--val_size", "4", "--val_samples", "4", "--eval_samples", "6", "--batch_size", "4", "--max_iters", "2",
             "--eval_interval", "2", "--hidden_size", "12", "--num_modules", "3", "--num_active", "2",
             "--input_value_size", "8", "--embed_size", "8"]
    metrics = main(["--model", "brims", "--out_dir", str(tmp_path / "brims"), *flags])["metrics"]
    assert set(metrics) == {"val_acc@4", "acc@4", "acc@5", "iter", "seconds", "compile_seconds", "selected_iter"}
    assert os.path.exists(tmp_path / "brims" / "outputs_5.png")
    with pytest.raises(UserError, match="cannot embed"):
        main(["--model", "lstm", "--out_dir", str(tmp_path / "lstm"), *flags[:-8]])
    assert not (tmp_path / "lstm").exists()


# ----------------------------------------------------------------------------------------------
# The noise experiment (paper Figure 2) on a tiny sequential-MNIST checkpoint

def write_mnist(folder, n_train=12, n_test=6):
    """A fake MNIST, gzipped IDX files: image i is 255 in its top-left (i % 28 + 1)^2 corner."""
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i in range(n):
            images[i, : i % 28 + 1, : i % 28 + 1] = 255
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8) % 10)):
            header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
            with open(os.path.join(folder, f"{prefix}-{kind}"), "wb") as f:
                f.write(header + bytes(array.flatten().tolist()))


def test_noise_experiment_writes_attention_per_noise_level_and_the_figure(tmp_path):
    folder = str(tmp_path / "mnist")
    write_mnist(folder)
    out = str(tmp_path / "brims")
    main(["--model", "brims", "--task", "seqmnist", "--data_dir", folder, "--resolution", "4", "--eval_resolutions", "6",
          "--val_size", "4", "--val_samples", "4", "--eval_samples", "6", "--batch_size", "4", "--max_iters", "1",
          "--hidden_size", "12", "--num_modules", "3", "--num_active", "2", "--input_value_size", "8", "--no-figures",
          "--out_dir", out])
    results = noise_experiment(["--out_dir", out, "--data_dir", folder, "--counts", "0,5,36"])
    with open(os.path.join(out, "noise.json")) as f:
        assert json.load(f) == results
    for k in (0, 5, 36):
        parts = [results[f"attn_{name}@{k}"] for name in ("input", "null", "topdown")]
        assert abs(sum(parts) - 1) < 1e-4 and min(parts) > 0  # the first layer's three rows share its attention
        assert 0 <= results[f"acc@{k}"] <= 100
    assert results["resolution"] == 6 and results["samples"] == 6
    assert open(os.path.join(out, "noise.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="no checkpoint"):
        noise_experiment(["--out_dir", str(tmp_path / "none"), "--data_dir", folder])
    with pytest.raises(UserError, match="36 pixels"):
        noise_experiment(["--out_dir", out, "--data_dir", folder, "--counts", "40"])


def test_noisy_pixels_are_random_bits_at_nested_positions():
    x = torch.zeros(3, 50, 1)
    few, many = (noisy(x, k, torch.Generator().manual_seed(0)) for k in (5, 20))
    assert set(many.unique().tolist()) <= {0.0, 1.0} and torch.equal(x, torch.zeros(3, 50, 1))
    positions = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    untouched = positions[:, 20:]
    assert torch.equal(many.gather(1, untouched.unsqueeze(-1)), torch.zeros(3, 30, 1))
    assert torch.equal(few.gather(1, positions[:, 5:].unsqueeze(-1)), torch.zeros(3, 45, 1))  # k = 5: the first 5
    assert 0 < few.sum() <= 15 and many.sum() > few.sum()


def test_bench_sets_per_layer_values_separated_by_slashes():
    from bench import model_values
    values = model_values("brims", "seqmnist", {"hidden_size": "120/60", "num_layers": "2", "communication": "false"})
    assert values["hidden_size"] == (120, 60) and values["num_layers"] == 2 and values["communication"] is False
    assert values["num_modules"] == (6,)  # the preset's
