"""Reads the digits in image files: `python predict.py IMAGE... [--weights model.h5] [--probs]`.

Prints one line per image, `path: digits` (blanks dropped). Each file becomes the model's input
by the rule in pipeline/images.py: a model of written numbers (trained on the free or mixed
layout) reads the image framed as its training sequences were; a model of the cell layout reads
it cut into cells at the columns without ink. The images go through the network in batches
(`digitseq.Reader`, the library this command runs). A file that cannot be read gets one line on
stderr; the others are still read; the exit status is then 1.
"""

from __future__ import annotations

import startup  # noqa: F401  (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import sys
from pathlib import Path

import numpy as np

from digitseq import ImageFileError, Reader
from model import trained
from model.metrics import BLANK
from pipeline import flags

PROG = "predict.py"
DEFAULT_WEIGHTS = Path("runs/default/model.h5")  # what `python train.py` writes


def probability_table(probabilities: np.ndarray) -> str:
    header = "           " + " ".join(f"{name:>5}" for name in [*map(str, range(BLANK)), "blank"])
    rows = [f"  pos {k + 1}:  " + " ".join(f"{p:5.3f}" for p in position) for k, position in enumerate(probabilities)]
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None) -> int | None:
    parser = flags.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG/JPEG/… files")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help=f"a model.h5 written by train.py (default: {DEFAULT_WEIGHTS})")
    source.add_argument("--workdir", type=Path, help="a train.py workdir: its checkpoint (see --checkpoint)")
    parser.add_argument(
        "--checkpoint", choices=trained.CHECKPOINT_CHOICES, default="latest", help=trained.CHECKPOINT_HELP
    )
    parser.add_argument("--probs", action="store_true", help="also print each position's 11 probabilities")
    args = parser.parse_args(argv)

    if args.workdir:
        reader = Reader(trained.from_workdir(args.workdir, args.checkpoint))
    else:
        weights = args.weights or DEFAULT_WEIGHTS
        if args.weights is None and not weights.exists():
            raise ValueError(f"no model at {weights}: train one (python train.py) or pass --weights FILE")
        reader = Reader(trained.from_weights(weights))
    paths, inputs = [], []
    for path in args.images:
        try:
            inputs.append(reader.prepare(path))
            paths.append(path)
        except ImageFileError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
    for path, reading in zip(paths, reader.read_prepared(inputs), strict=True):
        print(f"{path}: {reading.digits or '(no digits)'}", flush=True)
        if args.probs:
            print(probability_table(reading.probabilities), flush=True)
    if len(paths) < len(args.images):
        return 1
    return 0


if __name__ == "__main__":
    flags.exit_with(main, PROG)
