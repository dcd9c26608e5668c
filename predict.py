"""Reads the digits in image files: `python predict.py IMAGE... [--weights model.h5] [--probs]`.

Prints one line per image, `path: digits` (blanks dropped). Each file is converted to the
model's input by the rule in pipeline/images.py (grayscale; dark-on-light inverted; cropped to
the ink with MNIST's margin, scaled to 28 px high, placed left on a 28 × 28·K canvas). A file that
cannot be read gets one line on stderr; the others are still read; the exit status is then 1.
"""

from __future__ import annotations

# isort: off
import os
import signal

signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # Ctrl-C while the libraries load: no traceback
import pipeline  # noqa: F401  (first: configures TensorFlow's logging and threads before it loads)

# isort: on
import sys
from pathlib import Path

import numpy as np

from model import networks as nets
from model import trained
from model.metrics import BLANK
from pipeline import flags
from pipeline.images import ImageFileError, model_input

PROG = "predict.py"
DEFAULT_WEIGHTS = Path("runs/default/model.h5")  # what `python train.py` writes


def digits(probabilities: np.ndarray) -> str:
    """[K, 11] → the predicted digits, blanks dropped."""
    return "".join(str(c) for c in probabilities.argmax(-1) if c != BLANK)


def probability_table(probabilities: np.ndarray) -> str:
    header = "           " + " ".join(f"{name:>5}" for name in [*map(str, range(BLANK)), "blank"])
    rows = [f"  pos {k + 1}:  " + " ".join(f"{p:5.3f}" for p in position) for k, position in enumerate(probabilities)]
    return "\n".join([header, *rows])


def main() -> None:
    parser = flags.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG/JPEG/… files")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help=f"a model.h5 written by train.py (default: {DEFAULT_WEIGHTS})")
    source.add_argument("--workdir", type=Path, help="a train.py workdir: its checkpoint (see --checkpoint)")
    parser.add_argument(
        "--checkpoint", choices=trained.CHECKPOINT_CHOICES, default="latest", help=trained.CHECKPOINT_HELP
    )
    parser.add_argument("--probs", action="store_true", help="also print each position's 11 probabilities")
    args = parser.parse_args()

    if args.workdir:
        model = trained.from_workdir(args.workdir, args.checkpoint)
    else:
        weights = args.weights or DEFAULT_WEIGHTS
        if args.weights is None and not weights.exists():
            raise ValueError(f"no model at {weights}: train one (python train.py) or pass --weights FILE")
        model = trained.from_weights(weights)
    failures = 0
    for path in args.images:
        try:
            image = model_input(path, model.image_shape, model.network.positions)
        except ImageFileError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
            failures += 1
            continue
        probabilities = nets.probabilities(model.network, model.variables, image[None, :, :, None])[0]
        print(f"{path}: {digits(probabilities) or '(no digits)'}", flush=True)
        if args.probs:
            print(probability_table(probabilities), flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    flags.run(main, PROG)
    sys.exit(0)
