"""A trained network, loaded from a train.py workdir (a checkpoint) or from a model.h5 alone."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import jax
import numpy as np

from model import judge, keras_h5
from model import networks as nets
from model.checkpoints import Checkpoints
from model.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Trained:
    network: nets.Network
    image_size: tuple[int, int]
    variables: dict
    description: str  # what was loaded, for reports
    workdir: Workdir | None  # the training run it came from, when known (its metrics.jsonl)
    layout: str  # of the sequences it was trained on: "cells", "free" or "mixed"
    label_smoothing: float  # of its training: its probabilities' ceiling (0.0 where unknown)
    preset: str = "default"  # whose recipe it was trained with

    def digest(self) -> str:
        """sha256 of its weights (names, shapes and bytes): the same model, the same digest."""
        hashed = hashlib.sha256()
        for path, array in jax.tree_util.tree_flatten_with_path(self.variables)[0]:
            array = np.ascontiguousarray(array, np.float32)
            hashed.update(f"{jax.tree_util.keystr(path)}{array.shape}".encode())
            hashed.update(array.tobytes())
        return hashed.hexdigest()

    @property
    def reads(self) -> str:
        """The layout of the images it is made for: "cells" for a cell-layout model, else "free"
        (a mixed model reads both; written numbers are what it is for)."""
        return "cells" if self.layout == "cells" else "free"


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def recorded_network(workdir: Workdir, config: dict, variables: dict | None) -> nets.Network:
    """The network `workdir`'s config.json records, whatever its preset holds today. A workdir written
    before networks were recorded gets today's preset, but only if `variables` (its checkpoint's) fit it;
    recorded or not, the network must fit `variables` when they are given."""
    recorded = "layers" in config
    if recorded:
        try:
            layers = nets.layers_from_json(config["layers"])
            network = nets.Network(layers=layers, positions=config["max_digits"], members=config["ensemble"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{workdir.config_file} is damaged (its network cannot be read)") from None
    else:
        network = nets.build(nets.get_preset(config["preset"]), config["max_digits"])
    if variables is None:
        return network
    image_size = tuple(config["image_size"])
    expected = nets.variables_structure(network, image_size)
    saved = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if nets.variable_shapes(saved) != nets.variable_shapes({"batch_stats": {}, **expected}):
        if recorded:
            raise ValueError(
                f"{workdir}'s checkpoint does not fit the network its {workdir.config_file.name} records "
                "(the file was altered); use its model.h5, or train it again with --no-resume"
            )
        raise ValueError(
            f"{workdir} does not record its network and its checkpoint does not fit today's {config['preset']} "
            "preset; use its model.h5 (which records its network), or train it again with --no-resume"
        )
    return network


# Which checkpoint of a workdir eval.py and predict.py read (their --checkpoint).
CHECKPOINT_CHOICES = ("latest", "best")
CHECKPOINT_HELP = (
    "with --workdir: latest = the newest checkpoint, which once training is done holds the final weights, "
    "the same as the workdir's model.h5 (default); best = the one with the highest validation sequence accuracy"
)


def from_workdir(path: Path, checkpoint: str = "latest") -> Trained:
    """The workdir's checkpoint: "latest" (at the end of a run, the weights in its model.h5) or "best"
    (highest validation sequence accuracy).

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
    network = recorded_network(workdir, config, variables)
    layout = config["layout"]
    description = f"{path} step {step} ({config['preset']}, {layout} layout)"
    if workdir.start_model.is_file():  # a run on a user's numbers: read with its start and judge
        start = judged_start(workdir)
        if dataclasses.replace(start.network, members=1, judged=False) != network:
            raise ValueError(f"{workdir.start_model} does not hold the network {path} trained; train it again "
                             "with --no-resume")  # fmt: skip
        network, variables = judge.with_tuned(start.network, start.variables, variables)
        description = f"{path} step {step} ({config['preset']}, {layout} layout, judged)"
    smoothing = float(config.get("label_smoothing", 0.0))
    return Trained(
        network, tuple(config["image_size"]), variables, description, workdir, layout, smoothing, config["preset"]
    )


def judged_start(workdir: Workdir) -> keras_h5.ModelFile:
    """A fine-tuning run's start.h5: the model it started from and its judge of the hand (model/judge.py)."""
    try:
        return keras_h5.read(workdir.start_model)
    except keras_h5.ModelFileError as error:
        raise keras_h5.ModelFileError(f"{error}; it holds the start of {workdir}'s fine-tuning and its judge: "
                                      "train it again with --no-resume") from None  # fmt: skip


def from_weights(path: Path) -> Trained:
    """A model.h5 written by train.py: the network is rebuilt from the file."""
    model = keras_h5.read(path)
    workdir = Workdir(path.parent)
    run = workdir if workdir.holds_a_run() else None
    smoothing = model.label_smoothing
    if smoothing is None:  # a file written before it was recorded: the run beside it knows
        try:
            smoothing = float(run.read_config().get("label_smoothing", 0.0)) if run else 0.0
        except (OSError, TypeError, ValueError):  # a damaged config.json does not stop the model being read
            smoothing = 0.0
    step = keras_h5.recorded_step(path)
    judged = ", judged" if model.network.judged else ""
    description = f"{path}{'' if step is None else f' step {step}'} ({model.preset}, {model.layout} layout{judged})"
    return Trained(
        model.network, model.image_size, model.variables, description, run, model.layout, smoothing, model.preset
    )


def load(path: Path) -> Trained:
    """A model.h5, or a workdir's latest checkpoint (a folder)."""
    path = Path(path)
    return from_workdir(path) if path.is_dir() else from_weights(path)
