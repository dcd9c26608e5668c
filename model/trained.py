"""A trained network, loaded from a train.py workdir (a checkpoint) or from a model.h5 alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model import keras_h5
from model import networks as nets
from model.checkpoints import Checkpoints


@dataclasses.dataclass(frozen=True)
class Trained:
    network: nets.Network
    image_shape: tuple[int, int]
    variables: dict
    description: str  # what was loaded, for reports
    workdir: Path | None  # the training run it came from, when known (its metrics.jsonl)


def from_workdir(workdir: Path, checkpoint: str = "best") -> Trained:
    """The workdir's checkpoint: "best" (highest validation sequence accuracy) or "latest"."""
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{workdir} is not a training workdir (no config.json); pass a folder train.py wrote")
    config = json.loads(config_file.read_text())
    checkpoints = Checkpoints(workdir / "checkpoints")
    step = checkpoints.best_step() if checkpoint == "best" else None
    step = step if step is not None else checkpoints.latest_step()
    if step is None:
        raise ValueError(f"{workdir} has no checkpoint yet; train first (python train.py --workdir {workdir})")
    network = nets.build(nets.get_preset(config["preset"]), config["max_digits"])
    description = f"{workdir} step {step} ({config['preset']})"
    return Trained(network, tuple(config["image_size"]), checkpoints.restore_variables(step), description, workdir)


def from_weights(path: Path) -> Trained:
    """A model.h5 written by train.py: the network is rebuilt from the file."""
    network, image_shape, variables, preset = keras_h5.read(path)
    workdir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
    return Trained(network, image_shape, variables, f"{path} ({preset})", workdir)
