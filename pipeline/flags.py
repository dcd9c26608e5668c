"""Command-line flags shared by every script that reads MNIST or builds sequences."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.mnist import MnistError
from pipeline.sequences import LAYOUTS, SequenceConfig, parse_image_size


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line: what is wrong, and where the usage is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # '-inf' and '-nan' are a value to check (and refuse in words), not an unknown flag.
        self._negative_number_matcher = re.compile(r"^-(\d+|\d*\.\d+|inf(inity)?|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _image_size(text: str) -> tuple[int, int] | None:
    try:
        return parse_image_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number above 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction above 0 and at most 1 (e.g. 0.5), not {text!r}")
    return value


def env_int(name: str) -> int | None:
    """A whole number from the environment variable `name` (None if unset or not one)."""
    value = os.environ.get(name)
    return int(value) if value and value.strip().isdigit() else None


def whole_number(text: str) -> int:
    """argparse type: a whole number ≥ 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(text)


def distortion_names(text: str) -> tuple[str, ...]:
    """argparse type: 'thickness,blur' → ('thickness', 'blur'); 'all' → every distortion; 'none' → ()."""
    from pipeline.distort import DISTORTIONS

    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return DISTORTIONS
    if names in (["none"], []):
        return ()
    unknown = [name for name in names if name not in DISTORTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown distortion {unknown[0]!r}: name some of {', '.join(DISTORTIONS)}, or all, or none"
        )
    return tuple(name for name in DISTORTIONS if name in names)


def positive_minutes(text: str) -> float:
    """argparse type: a positive, finite number of minutes."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < math.inf:
        hint = " (leave it out for no budget)" if value > 0 else ""
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, not {text!r}{hint}")
    return value


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MNIST")
    group.add_argument(
        "--data-dir",
        help="TFDS data dir where MNIST is prepared once (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    )
    group.add_argument(
        "--mnist-dir",
        help="offline: a folder with the four original MNIST .gz files, handed to TFDS as its "
        "manual_dir (default: $MNIST_DIR; without either, TFDS downloads MNIST)",
    )


LAYOUT_HELP = (
    "how the sequences look: cells (digit k in the k-th 28x28 cell, as MNIST centred it), free (numbers as "
    "people write them: each digit its own size, baseline and gap, overlapping to wide, framed as predict.py "
    "frames a photo) or mixed (a quarter cells, the rest free)"
)


def distortions_help(
    default: str, what: str = "the digits as other pens, hands and paper would have written them"
) -> str:
    """--distortions' help: `what` they do, the names to choose from, the `default`."""
    from pipeline.distort import DISTORTIONS

    return (
        f"{what}: a comma-separated list of {', '.join(DISTORTIONS)}; or all, or none (see pipeline/distort.py) "
        f"{default}"
    )


def add_sequence_flags(
    parser: argparse.ArgumentParser,
    layout_default: str = "(default: cells)",
    with_layout: bool = True,
    distortions_default: str = "(default: none)",
) -> None:
    group = parser.add_argument_group("sequences")
    if with_layout:
        group.add_argument("--layout", choices=LAYOUTS, default="cells", help=f"{LAYOUT_HELP} {layout_default}")
    group.add_argument(
        "--distortions", type=distortion_names, default=(), metavar="NAMES",
        help=distortions_help(distortions_default),
    )  # fmt: skip
    group.add_argument(
        "--max-digits", type=positive_int, default=5, help="longest sequence and number of positions (default: 5)"
    )
    group.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        metavar="HxW",
        help="resize images to HxW, bilinear (e.g. 64x64, the notebook's input); default 'native': 28 x 28*max_digits",
    )


def sequence_config(args: argparse.Namespace, augment: bool = False) -> SequenceConfig:
    layout = getattr(args, "layout", "cells")
    return SequenceConfig(args.max_digits, args.image_size, augment, layout, args.distortions)


def run(main: Callable[[list[str] | None], int | None], prog: str, argv: list[str] | None = None) -> int:
    """Runs a command's `main(argv)` and returns its exit status: what main returns (None: 0), or 2 with
    one line on stderr for a user's mistake. The same in-process (tests, benchmarks) as in `exit_with`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, handled below
    try:
        return main(argv) or 0
    except SystemExit as stop:  # argparse: --help (0) or a refused flag (2)
        return stop.code if isinstance(stop.code, int) else 1
    except (MnistError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as error:  # a folder asked for where a file stands
        print(f"{prog}: error: cannot make the folder {error.filename}: a file stands in its path; "
              "pick another path", file=sys.stderr)  # fmt: skip
        return 2
    except OSError as error:  # the filesystem said no: disk full, permission denied, …
        where = f": {error.filename}" if error.filename else ""
        print(f"{prog}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def exit_with(main: Callable[[list[str] | None], int | None], prog: str) -> NoReturn:
    """A command's last line: runs it on sys.argv and exits with its status. A command that stops with
    a failure has said why in one line; what threads winding down (orbax's, C++) still write to stderr
    is dropped."""
    status = run(main, prog)
    if status:
        quiet_stderr()
    sys.exit(status)


def quiet_stderr() -> None:
    """Sends whatever is still written to stderr to /dev/null, for good: for a process about to exit."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (kept open until exit)
