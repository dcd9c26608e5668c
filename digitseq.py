"""Read the digits in images with a trained model: the library predict.py runs.

    from digitseq import Reader

    reader = Reader.load("runs/default/model.h5")      # or a train.py workdir
    for reading in reader.read(["photo.jpg", pixels]):  # paths, or image arrays
        print(reading.digits, reading.probabilities.shape)  # '4711', (5, 11)

Each image becomes the model's input by the rule in `pipeline.images` (framed, for a model of
written numbers; cut into cells, for a model of the cell layout), and the images go through the
network in batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (first: configures TensorFlow's logging and threads before it loads)
from model import networks as nets
from model import trained
from model.metrics import BLANK
from pipeline.images import ImageFileError, model_input

__all__ = ["ImageFileError", "Reader", "Reading"]


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the model reads in one image."""

    digits: str  # the predicted digits, left to right, blanks dropped ('' when it sees none)
    probabilities: np.ndarray  # [positions, 11]: each position's probabilities of 0–9 and blank


class Reader:
    """A trained model and the way it reads images."""

    def __init__(self, model: trained.Trained):
        self.model = model

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "latest") -> Reader:
        """From a model.h5, or from a train.py workdir (its `checkpoint`: latest or best)."""
        path = Path(path)
        return cls(trained.from_workdir(path, checkpoint) if path.is_dir() else trained.from_weights(path))

    def prepare(self, image: str | Path | np.ndarray) -> np.ndarray:
        """An image file or array → the model's input, uint8 [H, W]. Raises ImageFileError (one sentence)."""
        model = self.model
        return model_input(image, model.image_size, model.network.positions, model.reads)

    def read_prepared(self, inputs: Sequence[np.ndarray]) -> list[Reading]:
        """Inputs from `prepare` → what the model reads in each, in order."""
        if not inputs:
            return []
        probabilities = nets.read_in_batches(self.model.network, self.model.variables, np.stack(inputs)[..., None])
        return [Reading(digits(p), p) for p in probabilities]

    def read(self, images: Iterable[str | Path | np.ndarray]) -> list[Reading]:
        """Image files (paths) or arrays → what the model reads in each, in order."""
        return self.read_prepared([self.prepare(image) for image in images])


def digits(probabilities: np.ndarray) -> str:
    """[K, 11] → the predicted digits, blanks dropped."""
    return "".join(str(c) for c in probabilities.argmax(-1) if c != BLANK)
