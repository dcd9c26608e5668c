"""A trained network, loaded from a train.py workdir (a checkpoint) or from a model.h5 alone."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from model import keras_h5
from model import networks as nets
from model.checkpoints import Checkpoints
from model.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Trained:
    network: nets.Network
    image_shape: tuple[int, int]
    variables: dict
    description: str  # what was loaded, for reports
    workdir: Workdir | None  # the training run it came from, when known (its metrics.jsonl)


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def from_workdir(path: Path, checkpoint: str = "best") -> Trained:
    """The workdir's checkpoint: "best" (highest validation sequence accuracy) or "latest".

    A damaged checkpoint is skipped, with a note, for the newest intact one.
    """
    workdir = Workdir(path)
    config = workdir.read_config()
    checkpoints = Checkpoints(workdir.checkpoints)
    prefer = checkpoints.best_step() if checkpoint == "best" else None
    found = checkpoints.restore_good(prefer=prefer, note=_note)
    if found is None:
        raise ValueError(f"{path} has no checkpoint yet; train first (python train.py --workdir {path})")
    step, state = found
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    network = nets.build(nets.get_preset(config["preset"]), config["max_digits"])
    description = f"{path} step {step} ({config['preset']})"
    return Trained(network, tuple(config["image_size"]), variables, description, workdir)


def from_weights(path: Path) -> Trained:
    """A model.h5 written by train.py: the network is rebuilt from the file."""
    network, image_shape, variables, preset = keras_h5.read(path)
    workdir = Workdir(path.parent)
    return Trained(network, image_shape, variables, f"{path} ({preset})", workdir if workdir.holds_a_run() else None)
