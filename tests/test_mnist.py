"""MNIST through TFDS: offline preparation and the clear errors when it cannot be had."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from pipeline import mnist
from pipeline.mnist import MNIST_FILES, MnistError, prepare


@pytest.fixture
def fresh_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    return str(tmp_path / "tfds")


def test_pools_are_the_three_disjoint_mnist_splits(pools):
    assert {split: len(pool) for split, pool in pools.items()} == {"train": 55000, "validation": 5000, "test": 10000}
    for pool in pools.values():
        assert pool.images.shape[1:] == (28, 28) and pool.images.dtype.name == "uint8"
        assert set(pool.labels.tolist()) == set(range(10))


def test_folder_missing_files_names_them_and_the_flags(tmp_path, fresh_data_dir, mnist_dir):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(f"{mnist_dir}/{MNIST_FILES[1]}", folder)
    with pytest.raises(MnistError) as error:
        prepare(fresh_data_dir, str(folder))
    message = str(error.value)
    for name in (MNIST_FILES[0], MNIST_FILES[2], MNIST_FILES[3], "--mnist-dir", "MNIST_DIR"):
        assert name in message
    assert "\n" not in message


def test_folder_that_does_not_exist_is_named(tmp_path, fresh_data_dir):
    with pytest.raises(MnistError, match="does not exist"):
        prepare(fresh_data_dir, str(tmp_path / "nowhere"))


def test_no_data_and_no_network_says_what_to_do(fresh_data_dir, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setattr(mnist, "_can_reach_download_host", lambda: False)  # as offline as this machine
    with pytest.raises(MnistError, match="cannot be downloaded.*--mnist-dir DIR or the MNIST_DIR"):
        prepare(fresh_data_dir, None)


def test_corrupted_file_fails_its_checksum_by_name(tmp_path, fresh_data_dir, mnist_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(mnist_dir, folder)
    victim = folder / "t10k-labels-idx1-ubyte.gz"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(MnistError, match="t10k-labels-idx1-ubyte.gz .* failed its checksum"):
        prepare(fresh_data_dir, str(folder))
    # As a command: the preparation's one line, then the error's; no progress bars between them.
    export = [sys.executable, "-m", "pipeline.export", "--out", str(tmp_path / "x.npz"), "--data-dir", fresh_data_dir]
    result = subprocess.run([*export, "--mnist-dir", str(folder)], cwd=ROOT, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert lines[0].startswith("Preparing MNIST") and "failed its checksum" in lines[1]


def test_command_line_error_is_one_line_without_traceback(tmp_path, fresh_data_dir):
    out = tmp_path / "kept.npz"
    out.write_bytes(b"an earlier export")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            "--out",
            str(out),
            "--data-dir",
            fresh_data_dir,
            "--mnist-dir",
            str(tmp_path / "nowhere"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert out.read_bytes() == b"an earlier export"


@pytest.mark.slow
def test_damaged_or_half_written_data_is_prepared_again(tmp_path, pools, capfd):
    # A copy of the prepared MNIST with its train records cut in half, as a full disk or a killed copy leaves them.
    version = tmp_path / "tfds" / "mnist" / "3.0.1"
    shutil.copytree(prepare().data_dir, version)
    records = version / "mnist-train.tfrecord-00000-of-00001"
    records.write_bytes(records.read_bytes()[: records.stat().st_size // 2])
    pool = mnist.load_pool("train", str(tmp_path / "tfds"))
    assert np.array_equal(pool.images, pools["train"].images)
    assert "cannot be read" in capfd.readouterr().err

    # A preparation killed half-way: TFDS's incomplete folder, and a version folder without dataset_info.json.
    shutil.copytree(version, version.parent / "incomplete.ABC123_3.0.1")
    (version / "dataset_info.json").unlink()
    pool = mnist.load_pool("test", str(tmp_path / "tfds"))
    assert np.array_equal(pool.labels, pools["test"].labels)
    assert sorted(p.name for p in version.parent.iterdir()) == [".digitseq-prepare.lock", "3.0.1"]
    assert "left by an interrupted preparation" in capfd.readouterr().err


@pytest.mark.slow
def test_decoded_pools_are_kept_beside_the_records_and_made_again_when_stale_or_damaged(tmp_path, pools):
    version = tmp_path / "tfds" / "mnist" / "3.0.1"
    shutil.copytree(prepare().data_dir, version)
    kept = version / mnist.POOLS_FILE
    kept.unlink(missing_ok=True)
    load = functools.partial(mnist.load_pool.__wrapped__, data_dir=str(tmp_path / "tfds"))  # past the process's cache

    assert np.array_equal(load("test").labels, pools["test"].labels) and kept.is_file()
    # Read back from the kept file: what it holds is what a command gets.
    with np.load(kept) as f:
        arrays = dict(f)
    arrays["test_labels"] = (arrays["test_labels"] + 1) % 10
    np.savez(kept, **arrays)
    assert np.array_equal(load("test").labels, (pools["test"].labels + 1) % 10)
    # Damaged (cut short, as a full disk leaves it): decoded from the records again, and kept whole.
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])
    assert np.array_equal(load("test").labels, pools["test"].labels)
    assert np.array_equal(load("train").images, pools["train"].images)
    # Records changed since (prepared again): decoded again.
    np.savez(kept, **arrays)
    records = version / "mnist-test.tfrecord-00000-of-00001"
    os.utime(records, ns=(records.stat().st_atime_ns, records.stat().st_mtime_ns + 10**9))
    assert np.array_equal(load("test").labels, pools["test"].labels)
    assert not list(version.glob(".*partial"))
