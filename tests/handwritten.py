"""Handwritten numbers as a user's files: MNIST test digits composed as ink on paper, written as PNGs.

Its own composer, not the pipeline's free layout (a client does not write numbers the way the
training data is made): each digit resized by Pillow to its own size, set on its own baseline,
spaced by a style's gaps, darkened onto paper. The styles, by the gap between neighbouring
digits' ink:

    spaced       3–12 px
    tight        0–3 px, sizes ± 15 %, baselines ± 3 px
    touching     overlapping by 0–15 % of the narrower digit's width: strokes meet
    overlapping  15–35 % of the narrower one's width: strokes cross
    paper        tight, grey ink on light paper, twice the size, blurred

Used by tests/test_predict.py; run alone it measures a model the way a user meets it, each style
through predict.py end to end (the last line is JSON):

    python tests/handwritten.py --weights runs/default/model.h5 [--count 400] [--max-digits 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("spaced", "tight", "touching", "overlapping", "paper")


def _ink_columns(digit: np.ndarray) -> tuple[int, int]:
    columns = np.flatnonzero((digit > 64).any(axis=0))
    return int(columns[0]), int(columns[-1]) + 1


def compose(digits: list[np.ndarray], style: str, rng: np.random.Generator) -> np.ndarray:
    """MNIST digits (white on black, 28×28) → one number as a user's scan: uint8, dark ink on light paper."""
    sized = style != "spaced"
    placed = []  # (image, top, left) with left the ink's first column
    x = 0.0
    previous_width = None
    for digit in digits:
        scale = rng.uniform(0.85, 1.15) if sized else 1.0
        size = max(8, round(28 * scale))
        image = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
        first, last = _ink_columns(image)
        width = last - first
        if previous_width is not None:
            narrower = min(width, previous_width)
            if style == "spaced":
                gap = rng.uniform(3, 12)
            elif style in ("tight", "paper"):
                gap = rng.uniform(0, 3)
            elif style == "touching":
                gap = -rng.uniform(0.0, 0.15) * narrower
            else:
                gap = -rng.uniform(0.15, 0.35) * narrower
            x += gap
        baseline = rng.uniform(-3, 3) if sized else 0.0
        top = 14 + baseline - size / 2
        placed.append((image, top, x - first))
        x += width
        previous_width = width
    margin = 12
    rows = [round(top) for _, top, _ in placed]
    columns = [round(left) for _, _, left in placed]
    row0, column0 = min(rows) - margin, min(columns) - margin
    height = max(r + image.shape[0] for r, (image, _, _) in zip(rows, placed, strict=True)) - row0 + margin
    width = max(c + image.shape[1] for c, (image, _, _) in zip(columns, placed, strict=True)) - column0 + margin
    canvas = np.zeros((height, width), np.uint8)
    for (image, _, _), row, column in zip(placed, rows, columns, strict=True):
        window = canvas[row - row0 : row - row0 + image.shape[0], column - column0 : column - column0 + image.shape[1]]
        np.maximum(window, image, out=window)
    if style != "paper":
        return 255 - canvas
    ink, paper = rng.uniform(40, 110), rng.uniform(200, 240)
    picture = Image.fromarray(np.round(paper - (paper - ink) * canvas / 255.0).astype(np.uint8))
    picture = picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.BICUBIC)
    return np.asarray(picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))))


def write_numbers(folder: Path, style: str, count: int, max_digits: int, seed: int = 0) -> list[tuple[Path, str]]:
    """`count` numbers of 1..max_digits MNIST test digits in `style` as PNGs in `folder`: (path, digits)."""
    from pipeline.mnist import load_pool

    pool = load_pool("test")
    rng = np.random.default_rng([seed, STYLES.index(style)])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(count):
        picks = rng.integers(0, len(pool), size=int(rng.integers(1, max_digits + 1)))
        pixels = compose([pool.images[i] for i in picks], style, rng)
        path = folder / f"{style}_{n:04d}.png"
        Image.fromarray(pixels).save(path)
        written.append((path, "".join(str(pool.labels[i]) for i in picks)))
    return written


def predicted(stdout: str) -> dict[str, str]:
    """predict.py's output → {path: digits}."""
    lines = [line.rsplit(": ", 1) for line in stdout.splitlines() if ": " in line and not line.startswith(" ")]
    return {path: "" if digits == "(no digits)" else digits for path, digits in lines}


def read_right(numbers: list[tuple[Path, str]], *model: str) -> float:
    """The share of `numbers` predict.py (run as a user runs it, with `model`'s flags) reads right."""
    command = [sys.executable, "predict.py", *(str(path) for path, _ in numbers), *model]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"predict.py failed: {result.stderr.strip()}")
    got = predicted(result.stdout)
    return sum(got.get(str(path)) == digits for path, digits in numbers) / len(numbers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="a model.h5")
    model.add_argument("--workdir", help="a train.py workdir")
    parser.add_argument("--count", type=int, default=400, help="numbers per style (default: 400)")
    parser.add_argument("--max-digits", type=int, default=5, help="longest number (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the numbers (default: 0)")
    args = parser.parse_args()
    flags = ["--weights", args.weights] if args.weights else ["--workdir", args.workdir]
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for style in STYLES:
            numbers = write_numbers(Path(folder) / style, style, args.count, args.max_digits, args.seed)
            figures[style] = read_right(numbers, *flags)
            print(f"{style:12s} {figures[style]:7.1%} of {args.count}", flush=True)
    print(json.dumps({"model": args.weights or args.workdir, "count": args.count, "read_right": figures}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
