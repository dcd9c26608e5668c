"""MNIST through tensorflow-datasets, split into three disjoint pools of digits.

`train` sequences come from MNIST train[:55000], `validation` from train[55000:] and `test` only
from MNIST test, so neither model selection nor the test figures ever see a training digit.
With internet TFDS downloads MNIST as usual; offline, a folder with the four original files is
handed to TFDS as its `manual_dir` and TFDS verifies their checksums. Either way the prepared
data lives in TFDS's data dir and is prepared once, by one process at a time (a file lock).
A preparation that was cut off (its `incomplete.*` folder, or a version folder without TFDS's
dataset_info.json) is removed and done again; prepared files that fail to read (truncated,
damaged) are prepared again once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

import pipeline  # noqa: F401  (hides accelerators from TensorFlow before TFDS touches it)

SPLITS = {"train": "train[:55000]", "validation": "train[55000:]", "test": "test"}
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's chatter; what matters is said below
tfds.disable_progress_bar()  # dozens of lines on a pipe, even before a checksum error


class MnistError(RuntimeError):
    """MNIST cannot be had; the message says why and what to do, in one sentence."""


@dataclasses.dataclass(frozen=True, eq=False)
class DigitPool:
    """The digits one kind of sequence is drawn from: `images` uint8 [N, 28, 28], `labels` int32 [N];
    `folder`: where what is made from them is kept (TFDS's prepared folder), or None."""

    split: str
    images: np.ndarray
    labels: np.ndarray
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _missing_files(mnist_dir: Path) -> list[str]:
    return [name for name in MNIST_FILES if not (mnist_dir / name).is_file()]


def _offline_hint() -> str:
    return (
        f"put the four original MNIST files ({', '.join(MNIST_FILES)}) in a folder and pass it "
        "with --mnist-dir DIR or the MNIST_DIR environment variable"
    )


def _can_reach_download_host(timeout_s: float = 5.0) -> bool:
    # TFDS retries a failing download for minutes; a quick look first gives a quick answer.
    host = urllib.parse.urlparse(_DOWNLOAD_URL).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder):
    """Holds a lock beside the dataset's folder: processes sharing a data dir prepare it one at a time."""
    folder = Path(builder.data_dir).parent  # <data_dir>/mnist
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".digitseq-prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_half_written(builder: tfds.core.DatasetBuilder) -> None:
    """Removes what an interrupted preparation left (only called under the lock, before preparing)."""
    version = Path(builder.data_dir)
    leftovers = list(version.parent.glob(f"incomplete.*_{version.name}"))
    if version.is_dir():  # not prepared, yet there: written only in part
        leftovers.append(version)
    for path in leftovers:
        print(f"Removing {path}, left by an interrupted preparation of MNIST", file=sys.stderr)
        shutil.rmtree(path)


def prepare(data_dir: str | None = None, mnist_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS `mnist` builder, preparing it first if its data dir lacks it.

    `data_dir` defaults to TFDS_DATA_DIR, then TFDS's default; `mnist_dir` to MNIST_DIR.
    """
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    mnist_dir = mnist_dir or os.environ.get("MNIST_DIR") or None
    builder = tfds.builder("mnist", data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _preparing(builder):
        builder = tfds.builder("mnist", data_dir=data_dir)
        if builder.is_prepared():  # another process prepared it while this one waited
            return builder
        _remove_half_written(builder)
        return _download_and_prepare(builder, mnist_dir)


def _download_and_prepare(builder: tfds.core.DatasetBuilder, mnist_dir: str | None) -> tfds.core.DatasetBuilder:
    where = builder.data_dir
    if mnist_dir is not None:
        folder = Path(mnist_dir).expanduser()
        if not folder.is_dir():
            raise MnistError(
                f"MNIST is not prepared in {where} and the MNIST folder {folder} does not exist: "
                + _offline_hint()
                + "."
            )
        missing = _missing_files(folder)
        if missing:
            raise MnistError(
                f"MNIST is not prepared in {where} and {folder} lacks {', '.join(missing)}: " + _offline_hint() + "."
            )
        config = tfds.download.DownloadConfig(manual_dir=str(folder))
    else:
        if not _can_reach_download_host():
            raise MnistError(
                f"MNIST is not prepared in {where} and cannot be downloaded (no network): " + _offline_hint() + "."
            )
        config = tfds.download.DownloadConfig()
    print(f"Preparing MNIST in {where} (once) from {mnist_dir or 'the internet'}", file=sys.stderr)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as error:
        name = next((n for n in MNIST_FILES if n in str(error)), "an MNIST file")
        source = f"in {mnist_dir}" if mnist_dir else "as downloaded"
        raise MnistError(
            f"MNIST file {name} {source} failed its checksum (it is not the original file): "
            "replace it with the original and run again."
        ) from None
    except OSError as error:
        raise MnistError(f"MNIST could not be prepared in {where} ({error}): " + _offline_hint() + ".") from None
    return builder


@functools.lru_cache(maxsize=6)
def load_pool(split: str, data_dir: str | None = None, mnist_dir: str | None = None) -> DigitPool:
    """One pool of digits (`train`, `validation` or `test`) as NumPy arrays, once per process.

    Decoding MNIST's records takes seconds; the three pools are kept decoded in TFDS's prepared folder
    (POOLS_FILE), read back in milliseconds while the records they came from are unchanged."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    builder = prepare(data_dir, mnist_dir)
    arrays = _kept_pools(builder, split)
    if arrays is None:
        decoded = {}
        for name in SPLITS:
            builder, decoded[name] = _decode(builder, name, data_dir, mnist_dir)
        _keep_pools(builder, decoded)
        arrays = decoded[split]
    images, labels = arrays
    images.setflags(write=False)
    labels.setflags(write=False)
    return DigitPool(split=split, images=images, labels=labels, folder=Path(builder.data_dir))


def _decode(
    builder: tfds.core.DatasetBuilder, split: str, data_dir: str | None, mnist_dir: str | None
) -> tuple[tfds.core.DatasetBuilder, tuple[np.ndarray, np.ndarray]]:
    """The split's (images, labels) from TFDS's records; records that fail to read are prepared again, once."""
    try:
        data = _read(builder, split)
    except tf.errors.OpError as error:  # e.g. a truncated record: prepare again, once
        where = builder.data_dir
        reason = (error.message or type(error).__name__).strip().splitlines()[0][:200]
        print(f"MNIST in {where} cannot be read ({reason}); preparing it again", file=sys.stderr)
        with _preparing(builder):
            shutil.rmtree(where, ignore_errors=True)
        builder = prepare(data_dir, mnist_dir)
        data = _read(builder, split)
    images = np.ascontiguousarray(data["image"][..., 0], dtype=np.uint8)
    return builder, (images, data["label"].astype(np.int32))


def _read(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    return tfds.as_numpy(builder.as_dataset(split=SPLITS[split], batch_size=-1, shuffle_files=False))


# The decoded pools, in TFDS's prepared version folder: a new preparation removes them with the records.
POOLS_FILE = "digitseq-pools.npz"


def _records(builder: tfds.core.DatasetBuilder) -> str:
    """What the pools were decoded from: the prepared files' names, sizes and modification times (not this
    project's own files: the pools, and the distorted versions `pipeline.distort` keeps beside them)."""
    folder = Path(builder.data_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("digitseq-", ".")))
    return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def _kept_pools(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The split's decoded (images, labels) from POOLS_FILE; None when it is missing, damaged (zip checks
    each array's CRC-32 as it reads it) or decoded from other records than those there now."""
    try:
        with np.load(Path(builder.data_dir) / POOLS_FILE) as kept:
            if str(kept["records"]) != _records(builder):
                return None
            images, labels = kept[f"{split}_images"], kept[f"{split}_labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.dtype != np.int32:
        return None
    if len(labels) != len(images):
        return None
    return images, labels


def _keep_pools(builder: tfds.core.DatasetBuilder, pools: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Writes POOLS_FILE, under the preparation lock, whole or not at all (a partial file renamed); a data
    dir that cannot take it (read-only, full) goes without."""
    folder = Path(builder.data_dir)
    arrays = {f"{split}_images": images for split, (images, _) in pools.items()}
    arrays |= {f"{split}_labels": labels for split, (_, labels) in pools.items()}
    partial = folder / f".{POOLS_FILE}.partial"
    with _preparing(builder):
        if _kept_pools(builder, "test") is not None:  # another process kept them meanwhile
            return
        try:
            with open(partial, "wb") as file:
                np.savez(file, records=np.array(_records(builder)), **arrays)
            os.replace(partial, folder / POOLS_FILE)
        except OSError:
            partial.unlink(missing_ok=True)
