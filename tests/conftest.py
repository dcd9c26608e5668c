"""Shared fixtures: the real MNIST, from $MNIST_DIR or ../shared/mnist beside the project."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests' one tiny recipe: train.py in seconds. Sequences of one digit, a fixed set of 256 (8 steps of
# 32 an epoch), 2 epochs, 100 validation sequences; MNIST's own digits (the distortions have tests of their own).
TINY = ["--max-digits", "1", "--train-examples", "256", "--batch-size", "32", "--val-examples", "100", "--epochs", "2",
        "--distortions", "none"]  # fmt: skip
TINY_EPOCH = 8  # steps


def shared_folder(tmp_path_factory) -> Path:
    """This run's temporary folder that every pytest-xdist worker sees (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pytest_unconfigure(config) -> None:
    """As it closes, pytest collects garbage five times (for exceptions raised in finalisers). With TensorFlow's
    and JAX's objects about, each full collection takes ~0.3 s, over a second on a slowed machine, and
    pytest-xdist's worker that is not done 5 s after its last test is sent SIGINT (execnet), which interrupts
    whatever runs then (JAX's collection callback). So: one collection here, its survivors frozen out of the
    next ones."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> None:
    """One JAX compilation cache for the tests and every command they run, in this process or another: the
    same networks compile once. Every compilation is kept, however quick (JAX keeps those over 1 s)."""
    import jax

    shared = shared_folder(tmp_path_factory)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(shared / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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


def steps_saved(workdir: Path) -> list[int]:
    """The steps a workdir holds checkpoints of."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def weights(path: Path) -> dict[str, np.ndarray]:
    """A model.h5's weights by their names in the file."""
    import h5py

    out = {}
    with h5py.File(path) as f:
        f["model_weights"].visititems(lambda name, obj: out.update({name: obj[()]}) if hasattr(obj, "shape") else None)
    return out


def only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def tiles(images: np.ndarray, max_digits: int) -> np.ndarray:
    """[N, 28, 28·K(, 1)] stitched images → [N, K, 28, 28] cells."""
    images = images.reshape(len(images), 28, max_digits, 28)
    return images.transpose(0, 2, 1, 3)


def command(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS...` in the project root, a process of its own, as a user types it."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run(*args: str) -> subprocess.CompletedProcess:
    """What `command(*args)` does, in this process: the command's main(argv), through the same
    pipeline.flags.run a user's run goes through, with stdout and stderr captured down to the file
    descriptors (C++ and orbax write there). For tests about what a command does, not about its process."""
    from pipeline import flags

    script, *argv = args
    name = argv.pop(0) if script == "-m" else script.removesuffix(".py")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(name)
    prog = getattr(module, "PROG", script if script != "-m" else name)
    cwd = os.getcwd()
    with _captured() as output:
        os.chdir(ROOT)  # relative paths mean what they mean to a user in the project root
        try:
            status = flags.run(module.main, prog, argv)
        finally:
            os.chdir(cwd)
    return subprocess.CompletedProcess(list(args), status, output["stdout"], output["stderr"])


@contextlib.contextmanager
def _captured() -> Iterator[dict[str, str]]:
    """Python's sys.stdout/sys.stderr and file descriptors 1 and 2 into two files; what they hold is put in
    the dict yielded ("stdout", "stderr") on leaving."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err
        output: dict[str, str] = {}
        try:
            yield output
        finally:
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            out.seek(0)
            err.seek(0)
            output.update(stdout=out.read(), stderr=err.read())


# The models the tests read with, each trained once for all workers: briefly, on sequences of 1–2 digits,
# Adam 1e-3, enough to read them well (a test of what a model says needs a model that reads).
BRIEF = ["--max-digits", "2", "--learning-rate", "1e-3", "--schedule", "constant", "--val-examples", "500"]


def trained_once(tmp_path_factory, name: str, *flags: str) -> Path:
    """The workdir of `train.py BRIEF FLAGS`, trained by the first worker that asks; the others wait for it.
    What the run printed is kept beside the workdir (stdout.txt)."""
    shared = shared_folder(tmp_path_factory)
    workdir = shared / name / "run"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait here until it is trained
        if not (workdir / "model.h5").is_file():
            shutil.rmtree(workdir.parent, ignore_errors=True)  # what a failed attempt left
            result = run("train.py", "--workdir", str(workdir), *BRIEF, *flags)
            assert result.returncode == 0, result.stderr
            (workdir.parent / "stdout.txt").write_text(result.stdout)
    return workdir


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, mnist_dir) -> Path:
    """The default preset, 250 steps of 64, augmented: it reads ≈97 % of 1–2-digit sequences, so eval and
    predict have a real model to test. Checkpoints at steps 200 and 250."""
    return trained_once(tmp_path_factory, "trained", "--batch-size", "64", "--max-steps", "250", "--augment",
                        "--checkpoint-every", "200")  # fmt: skip


@pytest.fixture(scope="session")
def seed_model(tmp_path_factory, mnist_dir) -> Path:
    """The 64×64 seed preset, 130 steps of 32 at Adam 2e-3: ~88 % of 1–2-digit test sequences."""
    return trained_once(tmp_path_factory, "trained_seed", "--preset", "seed", "--batch-size", "32", "--max-steps",
                        "130", "--learning-rate", "2e-3") / "model.h5"  # fmt: skip
