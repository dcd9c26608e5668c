"""Shared fixtures: the real MNIST, from $MNIST_DIR or ../shared/mnist beside the project."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_folder(tmp_path_factory) -> Path:
    """This run's temporary folder that every pytest-xdist worker sees (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> None:
    """One JAX compilation cache for every command the tests run: the same networks compile once."""
    shared = shared_folder(tmp_path_factory)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(shared / "jax_cache"))


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    from pipeline.mnist import MNIST_FILES

    folder = os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared" / "mnist")
    missing = [name for name in MNIST_FILES if not (Path(folder) / name).is_file()]
    if missing:
        pytest.fail(f"the tests need the four MNIST files; {folder} lacks {', '.join(missing)} (set MNIST_DIR)")
    os.environ["MNIST_DIR"] = folder  # seen by pipeline.mnist and by the commands the tests run
    return folder


@pytest.fixture(scope="session")
def pools(mnist_dir):
    from pipeline.mnist import SPLITS, load_pool

    return {split: load_pool(split) for split in SPLITS}


def tiles(images: np.ndarray, max_digits: int) -> np.ndarray:
    """[N, 28, 28·K(, 1)] stitched images → [N, K, 28, 28] cells."""
    images = images.reshape(len(images), 28, max_digits, 28)
    return images.transpose(0, 2, 1, 3)


def command(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python ARGS...` in the project root, as a user runs it."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, mnist_dir) -> Path:
    """The default preset trained briefly (250 steps of 64, Adam 1e-3, augmented) on sequences of 1–2 digits:
    it reads them well (≈97 % of sequences), so eval and predict have a real model to test. Checkpoints
    at steps 200 and 250."""
    shared = shared_folder(tmp_path_factory)  # trained once for all workers
    workdir = shared / "trained" / "run"
    with open(shared / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait here until it is trained
        if not (workdir / "model.h5").is_file():
            shutil.rmtree(workdir.parent, ignore_errors=True)  # what a failed attempt left
            result = command(
                "train.py", "--workdir", str(workdir), "--max-digits", "2", "--batch-size", "64", "--max-steps",
                "250", "--learning-rate", "1e-3", "--schedule", "constant", "--augment", "--val-examples", "500",
                "--checkpoint-every", "200",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
    return workdir
