"""Handwritten numbers as a user's files: digits composed as ink on paper, written as PNGs or JPEGs.

Its own composer, not the pipeline's free layout (a client does not write numbers the way the
training data is made): each digit resized by Pillow to its own size, set on its own baseline,
spaced by a style's gaps, darkened onto paper. The styles, by the gap between neighbouring
digits' ink:

    spaced        3–12 px
    tight         0–3 px, sizes ± 15 %, baselines ± 3 px
    touching      overlapping by 0–15 % of the narrower digit's width: strokes meet
    overlapping   15–35 % of the narrower one's width: strokes cross
    paper         tight, grey ink on light paper, twice the size, blurred
    photo         tight, photographed: blue or black ink on white, grey or tinted paper, three times
                  the size with wide margins, turned by up to 5°, soft focus, lit from one side
                  (and half of them under a shadow's edge), grain, a JPEG of quality 60
    marker        tight, a felt-tip marker: four times the size, strokes widened to 15–22 % of the
                  number's height with hard edges, near-black on white, cropped close (0–8 px)
    pencil        tight, a hard pencil: three times the size, strokes thinned to their ridges,
                  faint grey (50–110 levels below the paper) and grainy, on slightly grainy paper
    uci           spaced, of other writers' digits: scikit-learn's 1,797 UCI digits (43 writers,
                  scanned at 8×8) enlarged to MNIST's 20-pixel box: soft and thick
    uci-touching  the same, touching

The MNIST styles use MNIST *test* digits. Used by tests/test_predict.py; run alone it measures a
model the way a user meets it, each style through predict.py end to end (the last line is JSON;
the UCI styles need scikit-learn):

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
import scipy.ndimage as ndi
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("spaced", "tight", "touching", "overlapping", "paper", "photo", "uci", "uci-touching", "marker", "pencil")
_GAPS = {"uci": "spaced", "uci-touching": "touching"}  # other writers' digits, spaced as these styles


def _ink_columns(digit: np.ndarray) -> tuple[int, int]:
    columns = np.flatnonzero((digit > 64).any(axis=0))
    return int(columns[0]), int(columns[-1]) + 1


def compose(digits: list[np.ndarray], style: str, rng: np.random.Generator) -> np.ndarray:
    """Digits (white on black, 28×28, as MNIST's) → one number as a user's scan: uint8, dark ink on light
    paper ([h, w]; a photo: RGB [h, w, 3])."""
    style = _GAPS.get(style, style)
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
            elif style in ("tight", "paper", "photo", "marker", "pencil"):
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
    if style == "photo":
        return photograph(canvas, rng)
    if style in PENS:
        return PENS[style](canvas, rng)
    if style != "paper":
        return 255 - canvas
    ink, paper = rng.uniform(40, 110), rng.uniform(200, 240)
    picture = Image.fromarray(np.round(paper - (paper - ink) * canvas / 255.0).astype(np.uint8))
    picture = picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.BICUBIC)
    return np.asarray(picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))))


def photograph(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white-on-black number → RGB uint8: a phone's photo of it written on paper."""
    a = Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.Resampling.BICUBIC)
    margins = rng.integers(20, 90, size=4)  # left, top, right, bottom
    padded = Image.new("L", (a.width + margins[0] + margins[2], a.height + margins[1] + margins[3]))
    padded.paste(a, (int(margins[0]), int(margins[1])))
    a = padded.rotate(rng.uniform(-5, 5), Image.Resampling.BICUBIC, expand=True)
    alpha = np.asarray(a, np.float32)[..., None] / 255.0
    inks = ([25, 40, 150], [20, 20, 30], [40, 60, 120])  # blue, black, blue-black
    papers = ([240, 240, 235], [205, 205, 200], [240, 228, 190], [215, 230, 240], [240, 215, 220])  # white, grey, tints
    ink = np.array(inks[rng.integers(len(inks))], np.float32)
    paper = np.array(papers[rng.integers(len(papers))], np.float32)
    picture = paper * (1 - alpha) + ink * alpha
    soft = ImageFilter.GaussianBlur(rng.uniform(1, 2.5))
    picture = np.asarray(Image.fromarray(picture.astype(np.uint8)).filter(soft))
    height, width = picture.shape[:2]
    rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    along = rows * np.sin(angle) + columns * np.cos(angle)
    along = (along - along.min()) / max(np.ptp(along), 1e-6)
    dim = rng.uniform(0.35, 0.7)
    light = dim + (1 - dim) * along  # light from one side
    if rng.random() < 0.5:  # a shadow's soft edge across the page
        cut = rng.uniform(0.3, 0.7)
        edge = rng.uniform(0.02, 0.08)
        shade = 1 / (1 + np.exp(-(rows * np.cos(angle) - columns * np.sin(angle) - cut + 0.5) / edge))
        light = light * (1 - rng.uniform(0.25, 0.45) * shade)
    picture = picture * light[..., None] + rng.normal(0, rng.uniform(3, 9), picture.shape)
    return np.clip(np.round(picture), 0, 255).astype(np.uint8)


def _enlarged(canvas: np.ndarray, factor: int) -> np.ndarray:
    size = (canvas.shape[1] * factor, canvas.shape[0] * factor)
    image = Image.fromarray(canvas).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 255.0


def _stroke_width(shape: np.ndarray) -> float:
    """The mean width of a binary image's strokes: a stroke of width s and length l has area s·l, edge 2·l."""
    edge = np.count_nonzero(shape & ~ndi.binary_erosion(shape))
    return 2 * np.count_nonzero(shape) / max(edge, 1)


def marker(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white-on-black number → uint8 grey: written with a felt-tip marker, cropped close."""
    shape = _enlarged(canvas, 4) > 0.45
    rows = np.flatnonzero(shape.any(axis=1))
    target = rng.uniform(0.15, 0.22) * (rows[-1] - rows[0] + 1)
    radius = max(0.0, (target - _stroke_width(shape)) / 2)
    alpha = ndi.gaussian_filter((ndi.distance_transform_edt(~shape) <= radius).astype(np.float32), 0.8)
    rows, columns = np.flatnonzero((alpha > 0.5).any(axis=1)), np.flatnonzero((alpha > 0.5).any(axis=0))
    margin = int(rng.integers(0, 9))
    alpha = np.pad(alpha, margin)[rows[0] : rows[-1] + 1 + 2 * margin, columns[0] : columns[-1] + 1 + 2 * margin]
    paper, ink = rng.uniform(225, 250), rng.uniform(10, 50)
    picture = paper - (paper - ink) * alpha + rng.normal(0, 2, alpha.shape)
    return np.clip(np.round(picture), 0, 255).astype(np.uint8)


def pencil(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white-on-black number → uint8 grey: written with a hard pencil, faint, thin and grainy."""
    big = _enlarged(np.pad(canvas, 8), 3)
    core = (big >= 0.8 * ndi.maximum_filter(big, 7)) & (big > 0.35)  # the strokes' ridges: a thin line
    alpha = ndi.gaussian_filter(core.astype(np.float32), 0.7)
    alpha *= np.clip(0.6 + 0.4 * rng.standard_normal(alpha.shape), 0.0, 1.0)  # graphite on paper's tooth
    paper = rng.uniform(225, 248)
    picture = paper - rng.uniform(50, 110) * alpha + rng.normal(0, rng.uniform(1.5, 4), alpha.shape)
    return np.clip(np.round(picture), 0, 255).astype(np.uint8)


PENS = {"marker": marker, "pencil": pencil}


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI digits (8×8, 0–16) as MNIST-like tiles: uint8 [1797, 28, 28] white on black, the
    digit enlarged (bicubic) to 20×20 in the middle; and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the UCI styles need scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    tiles = np.zeros((len(digits.images), 28, 28), np.uint8)
    for tile, image in zip(tiles, digits.images, strict=True):
        small = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8))
        tile[4:24, 4:24] = np.asarray(small.resize((20, 20), Image.Resampling.BICUBIC))
    return tiles, digits.target.astype(np.int32)


def write_numbers(folder: Path, style: str, count: int, max_digits: int, seed: int = 0) -> list[tuple[Path, str]]:
    """`count` numbers of 1..max_digits digits (MNIST test digits; UCI digits for the uci styles) in
    `style` as image files in `folder`: (path, digits)."""
    if style.startswith("uci"):
        images, labels = uci_digits()
    else:
        from pipeline.mnist import load_pool

        pool = load_pool("test")
        images, labels = pool.images, pool.labels
    rng = np.random.default_rng([seed, STYLES.index(style)])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(count):
        picks = rng.integers(0, len(images), size=int(rng.integers(1, max_digits + 1)))
        pixels = compose([images[i] for i in picks], style, rng)
        if style == "photo":
            path = folder / f"{style}_{n:04d}.jpg"
            Image.fromarray(pixels).save(path, quality=60)
        else:
            path = folder / f"{style}_{n:04d}.png"
            Image.fromarray(pixels).save(path)
        written.append((path, "".join(str(labels[i]) for i in picks)))
    return written


def predicted(stdout: str) -> dict[str, str]:
    """predict.py's output → {path: digits}."""
    lines = [line.rsplit(": ", 1) for line in stdout.splitlines() if ": " in line and not line.startswith(" ")]
    return {path: "" if digits == "(no digits)" else digits for path, digits in lines}


def read(numbers: list[tuple[Path, str]], *model: str) -> dict[str, str]:
    """What predict.py (run as a user runs it, with `model`'s flags) reads in each of `numbers`: {path: digits}."""
    command = [sys.executable, "predict.py", *(str(path) for path, _ in numbers), *model]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"predict.py failed: {result.stderr.strip()}")
    return predicted(result.stdout)


def read_right(numbers: list[tuple[Path, str]], *model: str) -> float:
    """The share of `numbers` predict.py (run as a user runs it, with `model`'s flags) reads right."""
    got = read(numbers, *model)
    return sum(got.get(str(path)) == digits for path, digits in numbers) / len(numbers)


def measuring_parser(description: str, count: int, per: str) -> argparse.ArgumentParser:
    """The flags of a script that measures a model on numbers it makes: the model, how many numbers `per`
    set, how long, which."""
    parser = argparse.ArgumentParser(description=description)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="a model.h5")
    model.add_argument("--workdir", help="a train.py workdir")
    parser.add_argument("--count", type=int, default=count, help=f"numbers per {per} (default: {count})")
    parser.add_argument("--max-digits", type=int, default=5, help="longest number (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the numbers (default: 0)")
    return parser


def main() -> None:
    parser = measuring_parser(__doc__.split("\n\n")[0], 400, "style")
    parser.add_argument(
        "--styles", default=",".join(STYLES), help=f"comma-separated, of {', '.join(STYLES)} (default: all)"
    )
    args = parser.parse_args()
    styles = [style for style in args.styles.split(",") if style]
    unknown = [style for style in styles if style not in STYLES]
    if unknown:
        parser.error(f"unknown style {unknown[0]!r}: choose from {', '.join(STYLES)}")
    flags = ["--weights", args.weights] if args.weights else ["--workdir", args.workdir]
    with tempfile.TemporaryDirectory() as folder:
        numbers = {style: write_numbers(Path(folder) / style, style, args.count, args.max_digits, args.seed)
                   for style in styles}  # fmt: skip
        got = read([number for style in styles for number in numbers[style]], *flags)  # one predict.py run
    figures = {}
    for style in styles:
        figures[style] = sum(got.get(str(path)) == digits for path, digits in numbers[style]) / args.count
        print(f"{style:13s} {figures[style]:7.1%} of {args.count}", flush=True)
    print(json.dumps({"model": args.weights or args.workdir, "count": args.count, "read_right": figures}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
