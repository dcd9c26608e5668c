"""A writer nobody here trained on: numbers in a hand of its own, as a labelled folder.

`--hand narrow` (the default; the figures were made with it): letterforms unlike MNIST's (`NARROW`) — a
narrow slashed 0, a 1 with a long flag and a foot, a 2 as a crossed Z, a flat-topped 3, an open 4, an
angular 5, a 6 with a straight back, a 7 crossed, an 8 as an hourglass, a 9 with a hooked tail — condensed
and leaning back, written with a round pen (stroke 7–11 % of the digit's height), neighbours from 12 %
overlapping to 8 % of a digit's width apart. `--hand marker` (made as a check; it then took part in
choosing the splices' spacing): page.py's second letterforms, upright and wide, a felt-tip marker
(15–20 %), neighbours overlapping by 5–30 %. `--hand forward` (made after that choice, for nothing but
checking it): page.py's first letterforms leaning forward, a pen 10–14 %, neighbours from 20 %
overlapping to 5 % apart. Each number its own size and slant, each point a little off (`page.layout`),
dark ink on white paper, 1–5 digits. Used by tests/test_folders.py (a folder to fine-tune on) and, run
alone, to make the folders of the "your own numbers" figures in docs/results.md:

    python tests/writer.py DIR [--count 50] [--seed 0] [--hand narrow|marker|forward]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from page import LETTERFORMS, _ellipse, layout  # noqa: E402

NARROW = {
    "0": [_ellipse(0.5, 0.5, 0.3, 0.5), [(0.9, 0.05), (0.1, 0.95)]],
    "1": [[(0.0, 0.45), (0.6, 0.0), (0.6, 1.0)], [(0.3, 1.0), (0.9, 1.0)]],
    "2": [[(0.05, 0.0), (0.95, 0.0), (0.05, 1.0), (0.95, 1.0)], [(0.25, 0.5), (0.75, 0.5)]],
    "3": [[(0.1, 0.0), (0.9, 0.0), (0.45, 0.4), *_ellipse(0.45, 0.7, 0.45, 0.3, -90, 250, 12)]],
    "4": [[(0.1, 0.0), (0.1, 0.55), (0.95, 0.55)], [(0.7, 0.0), (0.7, 1.0)]],
    "5": [[(0.9, 0.0), (0.2, 0.0), (0.2, 0.45), (0.8, 0.45), (0.9, 0.75), (0.7, 1.0), (0.1, 0.95)]],
    "6": [[(0.2, 0.0), (0.15, 0.95), *_ellipse(0.5, 0.72, 0.35, 0.26, 180, -360, 14)]],
    "7": [[(0.0, 0.2), (0.05, 0.0), (0.95, 0.0), (0.45, 1.0)], [(0.25, 0.5), (0.85, 0.5)]],
    "8": [[(0.15, 0.0), (0.85, 0.0), (0.15, 1.0), (0.85, 1.0), (0.15, 0.0)]],
    "9": [_ellipse(0.5, 0.28, 0.38, 0.28, 0, -360, 16) + [(0.88, 0.28), (0.8, 1.0), (0.35, 0.85)]],
}


@dataclasses.dataclass(frozen=True)
class Hand:
    letterforms: tuple[dict, ...]
    gap: tuple[float, float]  # of a digit's width, between neighbours
    condensed: float  # of page.layout's widths
    back_slant: float  # tops this much of the height further left
    pen: tuple[float, float]  # the stroke, of the digit's height


HANDS = {
    # narrow, leaning back, close or touching, with a fine pen: the hand the figures were made with
    "narrow": Hand((NARROW,), gap=(-0.12, 0.08), condensed=0.75, back_slant=0.35, pen=(0.07, 0.11)),
    # page.py's second family of letterforms, upright and wide, overlapping, with a felt-tip marker
    "marker": Hand((LETTERFORMS[1],), gap=(-0.3, -0.05), condensed=1.1, back_slant=0.0, pen=(0.15, 0.2)),
    # page.py's first letterforms leaning forward, close, a medium pen: made after every choice, a check only
    "forward": Hand((LETTERFORMS[0],), gap=(-0.2, 0.05), condensed=0.9, back_slant=-0.3, pen=(0.1, 0.14)),
}
_SUPERSAMPLE = 4  # drawn this much larger, then reduced: smooth edges


def number_image(number: str, rng: np.random.Generator, hand: Hand = HANDS["narrow"]) -> np.ndarray:
    """`number` in the hand: uint8 [h, w], dark ink on white."""
    # The letters condensed (or widened), and shifted against the lean page.layout gives
    strokes = layout(number, rng, hand.gap, hand.letterforms)
    strokes = [[(hand.condensed * x - hand.back_slant * (1 - y), y) for x, y in stroke] for stroke in strokes]
    left = min(x for stroke in strokes for x, _ in stroke)
    strokes = [[(x - left, y) for x, y in stroke] for stroke in strokes]
    height = float(rng.uniform(40, 90))  # pixels, a digit's height
    pen = height * rng.uniform(*hand.pen)
    margin = pen + rng.uniform(4, 16)
    extent = max(x for stroke in strokes for x, _ in stroke)
    scale = _SUPERSAMPLE
    size = (round((extent * height + 2 * margin) * scale), round((height + 2 * margin) * scale))
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    ink = int(rng.integers(0, 60))
    for stroke in strokes:
        points = [((margin + x * height) * scale, (margin + y * height) * scale) for x, y in stroke]
        draw.line(points, fill=ink, width=round(pen * scale), joint="curve")
        for x, y in (points[0], points[-1]):  # round ends
            r = pen * scale / 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    reduced = image.resize((size[0] // scale, size[1] // scale), Image.Resampling.LANCZOS)
    return np.asarray(reduced)


def write_folder(
    folder: Path, count: int, seed: int = 0, max_digits: int = 5, hand: str = "narrow"
) -> list[tuple[str, str]]:
    """`count` numbers of 1..max_digits digits in `hand` (of HANDS), as PNGs and labels.csv in `folder`:
    (file, digits)."""
    rng = np.random.default_rng([seed, 36])
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        number = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(1, max_digits + 1))))
        name = f"number_{n:04d}.png"
        Image.fromarray(number_image(number, rng, HANDS[hand])).save(folder / name)
        rows.append((name, number))
    with open(folder / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "digits"])
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the PNGs and labels.csv go")
    parser.add_argument("--count", type=int, default=50, help="numbers (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the numbers (default: 0)")
    parser.add_argument("--max-digits", type=int, default=5, help="longest number (default: 5)")
    parser.add_argument("--hand", choices=list(HANDS), default="narrow", help="whose hand (default: narrow)")
    args = parser.parse_args()
    rows = write_folder(args.folder, args.count, args.seed, args.max_digits, args.hand)
    print(f"wrote {len(rows)} numbers and labels.csv in {args.folder}")


if __name__ == "__main__":
    main()
