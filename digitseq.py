"""Read the digits in images with a trained model: the library predict.py runs.

    from digitseq import Reader

    reader = Reader.load("runs/default/model.h5")      # or a train.py workdir
    for reading in reader.read(["photo.jpg", upload_bytes, open("scan.png", "rb"), pixels]):
        print(reading.digits, f"{reading.confidence:.0%}", reading.probabilities.shape)  # '4711' 97% (5, 11)

Each image (a path, the file's bytes, an open binary file, or an array) becomes the model's
input by the rule in `pipeline.images` (framed, for a model of written numbers; cut into cells,
for a model of the cell layout), and the images go through the network in batches.
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
from pipeline.images import ImageFileError, Source, model_input

__all__ = ["ImageFileError", "Reader", "Reading"]


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the model reads in one image."""

    digits: str  # the predicted digits, left to right, blanks dropped ('' when it sees none)
    probabilities: np.ndarray  # [positions, 11]: each position's probabilities of 0–9 and blank
    confidence: float  # how likely `digits` is right, 0–1 (`confidence`; docs/demo.md measures it)
    calibrated: np.ndarray  # [positions, 11]: the probabilities on the confidence's scale (`calibrated`)
    image: np.ndarray  # the picture the network was given: uint8 [height, width], white ink on black
    where: np.ndarray | None  # [positions, width]: where each position looked, weights over the image's
    # columns summing to 1 (the reader's, `Attend`); None for a network without it (the seed preset)


class Reader:
    """A trained model and the way it reads images."""

    def __init__(self, model: trained.Trained):
        self.model = model

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "latest") -> Reader:
        """From a model.h5, or from a train.py workdir (its `checkpoint`: latest or best)."""
        path = Path(path)
        return cls(trained.from_workdir(path, checkpoint) if path.is_dir() else trained.from_weights(path))

    def prepare(self, image: Source) -> np.ndarray:
        """An image (a path, bytes, a binary file or an array) → the model's input, uint8 [H, W].
        Raises ImageFileError (one sentence)."""
        model = self.model
        return model_input(image, model.image_size, model.network.positions, model.reads)

    def read_prepared(self, inputs: Sequence[np.ndarray]) -> list[Reading]:
        """Inputs from `prepare` → what the model reads in each, in order."""
        if not inputs:
            return []
        model, images = self.model, np.stack(inputs)
        looked = nets.where_looked(model.network, model.variables, images[..., None])
        if looked is None:
            probabilities, where = nets.read_in_batches(model.network, model.variables, images[..., None]), None
        else:
            probabilities, where = looked[0], over_columns(looked[1], images.shape[2])
        return [
            Reading(
                digits(p),
                p,
                confidence(p, model.label_smoothing),
                calibrated(p, model.label_smoothing),
                image,
                None if where is None else where[i],
            )
            for i, (p, image) in enumerate(zip(probabilities, images, strict=True))
        ]

    def read(self, images: Iterable[Source]) -> list[Reading]:
        """Images (paths, bytes, binary files or arrays) → what the model reads in each, in order."""
        return self.read_prepared([self.prepare(image) for image in images])


def digits(probabilities: np.ndarray) -> str:
    """[K, 11] → the predicted digits, blanks dropped."""
    return "".join(str(c) for c in probabilities.argmax(-1) if c != BLANK)


def calibrated(probabilities: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
    """[K, 11] → the same with the training's label smoothing ε undone: a network taught targets of
    1 − ε + ε/11 learns to top out there (and never to go below ε/11), so p ↦ (p − ε/11) / (1 − ε),
    within [0, 1]."""
    p = probabilities.astype(np.float64)
    return np.clip((p - label_smoothing / nets.NUM_CLASSES) / (1.0 - label_smoothing), 0.0, 1.0)


def confidence(probabilities: np.ndarray, label_smoothing: float = 0.0) -> float:
    """[K, 11] → how likely the reading is right: each position's top probability, `calibrated`,
    multiplied over the positions (each must be right)."""
    return float(np.prod(calibrated(probabilities, label_smoothing).max(-1)))


def over_columns(weights: np.ndarray, width: int) -> np.ndarray:
    """[..., columns] weights over the network's feature columns → [..., width] over the image's pixel
    columns (each feature column spread over the pixels it stands for), summing to 1."""
    pixels = weights[..., np.arange(width) * weights.shape[-1] // width]
    return pixels / pixels.sum(-1, keepdims=True)
