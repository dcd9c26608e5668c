"""Shared fixtures: the real MNIST, from $MNIST_DIR or ../shared/mnist beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


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
