"""Numbers written on demo.py's page with pointer strokes, in headless Chromium: what the page reads.

Each number is written as a hand writes it on a pad: every digit a letterform of strokes (two families
of shapes, `LETTERFORMS`), the number its own size and slant, each digit its own size, each point a
little off its ideal place, written with the mouse, a pen or a finger, fast (few points: corners) or
slow (many: curves). The spacings, by the gap between neighbouring digits' boxes (of a digit's width):

    apart       0.25–0.6
    close       0–0.12
    touching    −0.15–0: the strokes meet or cross a little

Used by tests/test_demo.py (the letterforms, `write`, `answer`); run alone it measures a model the way
the page meets it (the last line is JSON; needs Debian's chromium and chromium-driver, and selenium):

    python tests/page.py --weights runs/default/model.h5 [--count 200]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACINGS = {"apart": (0.25, 0.6), "close": (0.0, 0.12), "touching": (-0.15, 0.0)}
KINDS = ("mouse", "pen", "touch")


def _ellipse(cx, cy, rx, ry, start=-90.0, turn=360.0, points=20):
    angles = [math.radians(start + turn * i / points) for i in range(points + 1)]
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


# Digits as a hand writes them with a pen: strokes of points in the digit's box, x 0–1 across its width
# (0.6 of its height), y 0–1 down. Two families: the plainest shapes, and another hand's.
LETTERFORMS = (
    {
        "0": [_ellipse(0.5, 0.5, 0.42, 0.5)],
        "1": [[(0.3, 0.18), (0.55, 0.0), (0.55, 1.0)]],
        "2": [_ellipse(0.5, 0.28, 0.38, 0.28, -170, 200, 10) + [(0.45, 0.7), (0.08, 1.0), (0.95, 1.0)]],
        "3": [_ellipse(0.45, 0.25, 0.38, 0.25, -150, 240, 10) + _ellipse(0.45, 0.74, 0.42, 0.26, -90, 240, 12)],
        "4": [[(0.62, 0.0), (0.05, 0.66), (0.95, 0.66)], [(0.68, 0.3), (0.68, 1.0)]],
        "5": [[(0.9, 0.0), (0.22, 0.0), (0.15, 0.45), *_ellipse(0.48, 0.68, 0.4, 0.32, -130, 260, 12)]],
        "6": [[(0.75, 0.0), (0.35, 0.3), *_ellipse(0.5, 0.7, 0.38, 0.3, 180, 360, 16)]],
        "7": [[(0.05, 0.0), (0.95, 0.0), (0.4, 1.0)]],
        "8": [_ellipse(0.5, 0.26, 0.32, 0.26, 90, -360, 14) + _ellipse(0.5, 0.76, 0.4, 0.24, -90, 360, 14)],
        "9": [_ellipse(0.5, 0.28, 0.38, 0.28, 0, -360, 16) + [(0.88, 0.28), (0.82, 1.0)]],
    },
    {
        "0": [_ellipse(0.5, 0.5, 0.38, 0.5, -60, 370, 22)],
        "1": [[(0.5, 0.0), (0.5, 1.0)]],
        "2": [[(0.1, 0.2), *_ellipse(0.5, 0.3, 0.4, 0.3, -160, 190, 10)[1:], (0.1, 1.0), (0.95, 0.95)]],
        "3": [[(0.1, 0.0), (0.9, 0.0), (0.45, 0.4), *_ellipse(0.45, 0.7, 0.45, 0.3, -90, 250, 12)]],
        "4": [[(0.45, 0.0), (0.1, 0.6), (0.95, 0.6)], [(0.75, 0.2), (0.72, 1.0)]],
        "5": [[(0.85, 0.0), (0.2, 0.0)], [(0.2, 0.0), (0.2, 0.42), *_ellipse(0.5, 0.68, 0.4, 0.3, -120, 250, 12)]],
        "6": [[(0.8, 0.05), *_ellipse(0.55, 0.6, 0.45, 0.6, -60, -120, 8)[1:], *_ellipse(0.5, 0.72, 0.35, 0.28, 180)]],
        "7": [[(0.05, 0.05), (0.95, 0.0), (0.55, 0.5), (0.4, 1.0)], [(0.3, 0.5), (0.8, 0.5)]],
        "8": [_ellipse(0.5, 0.27, 0.35, 0.27, -30, -360, 14) + _ellipse(0.5, 0.74, 0.42, 0.26, -90, 360, 14)],
        "9": [_ellipse(0.45, 0.28, 0.38, 0.28, 10, -370, 16) + [(0.82, 0.6), (0.6, 1.0)]],
    },
)
STROKES = LETTERFORMS[0]


def _dense(stroke: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """A stroke's points with points between, about `step` of the digit's height apart (a slow hand)."""
    out = [stroke[0]]
    for (x0, y0), (x1, y1) in zip(stroke, stroke[1:], strict=False):
        pieces = max(1, math.ceil(math.hypot((x1 - x0) * 0.6, y1 - y0) / step))
        out += [(x0 + (x1 - x0) * k / pieces, y0 + (y1 - y0) * k / pieces) for k in range(1, pieces + 1)]
    return out


def layout(
    number: str, rng: np.random.Generator | None, gap: tuple[float, float], families: tuple[dict, ...] = LETTERFORMS
) -> list[list[tuple[float, float]]]:
    """The strokes of `number` in the number's own box: x in digit heights from its left, y 0–1 down. Without
    `rng`, the first family's shapes, upright, the gap's lower end; with it, each number its own hand (of one
    of `families`)."""
    strokes, x = [], 0.0
    family = families[0] if rng is None else families[int(rng.integers(len(families)))]
    slant = 0.0 if rng is None else rng.uniform(-0.1, 0.3)  # x shifts by slant · (1 − y): tops lean right
    step = None if rng is None else rng.choice([0.25, 0.08, 0.03])  # fast, medium, slow
    for digit in number:
        size = 1.0 if rng is None else rng.uniform(0.88, 1.1)
        width = 0.6 * size * (0.4 if digit == "1" and family is LETTERFORMS[1] else 1.0)
        for stroke in family[digit]:
            points = stroke
            if rng is not None:  # the hand's own shape: each of the letterform's points a little off, then
                points = [(px + rng.normal(0, 0.02), py + rng.normal(0, 0.02)) for px, py in points]
                points = _dense(points, step)  # as many points between as its speed gives
            top = (1 - size) / 2
            strokes.append([(x + px * width + slant * (1 - (top + py * size)), top + py * size) for px, py in points])
        x += width * (1 + (gap[0] if rng is None else rng.uniform(*gap)))
    return strokes


def write(page, number: str, kind: str = "mouse", gap: float = 0.35, rng: np.random.Generator | None = None,
          spacing: tuple[float, float] | None = None, height: float = 0.65) -> int:  # fmt: skip
    """Writes `number` on the pad with pointer strokes of `kind` (mouse, pen or touch): digits `height` of
    the pad's height, `gap` of a digit's width apart (negative: they overlap) — or, with `rng`, each number
    its own hand with a gap drawn from `spacing`. Returns how many strokes."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    pad = page.find_element(By.ID, "pad")
    box = pad.rect
    strokes = layout(number, rng, spacing or (gap, gap))
    extent = max(x for stroke in strokes for x, _ in stroke)
    size = min(box["height"] * height, box["width"] * 0.85 / max(extent, 0.6))
    left = (box["width"] - extent * size) / 2 if rng is not None else box["width"] * 0.1
    top = (box["height"] - size) / 2
    pointer = PointerInput(kind, kind)
    for stroke in strokes:
        # Offsets from the pad's centre, as WebDriver moves to an element.
        points = [(left + x * size - box["width"] / 2, top + y * size - box["height"] / 2) for x, y in stroke]
        actions = ActionBuilder(page, mouse=pointer, duration=0)
        actions.pointer_action.move_to(pad, round(points[0][0]), round(points[0][1])).pointer_down()
        for x, y in points[1:]:
            actions.pointer_action.move_to(pad, round(x), round(y))
        actions.pointer_action.pointer_up()
        actions.perform()
    return len(strokes)


def answer(page, state: str = "read", strokes: int | None = None) -> dict:
    """What the page shows once the newest request is answered — when `strokes` is given, the answer
    for that many strokes on the pad (the browser may still be handling the last ones WebDriver sent)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(page) -> bool:  # and, once read, read with every stroke on the pad (not an earlier answer)
        body = page.find_element(By.TAG_NAME, "body")
        if body.get_attribute("data-state") != state:
            return False
        on_pad = page.execute_script("return strokes.length") if strokes is None else strokes
        return state != "read" or body.get_attribute("data-strokes") == str(on_pad)

    WebDriverWait(page, 30).until(shown)
    return page.execute_script("""
        const seen = document.getElementById("seen"), pixels = seen.getContext("2d")
            .getImageData(0, 0, seen.width, seen.height).data;
        let tinted = 0;  // the picture is grey: colour is the overlay of where the positions looked
        for (let i = 0; i < pixels.length; i += 4)
            if (Math.abs(pixels[i] - pixels[i + 1]) + Math.abs(pixels[i + 1] - pixels[i + 2]) > 30) tinted++;
        return {number: document.getElementById("number").textContent,
                sureness: document.getElementById("sureness-text").textContent,
                message: document.getElementById("message").textContent,
                rows: [...document.querySelectorAll("#positions tr")].map(row =>
                    [...row.querySelectorAll(".candidate")].map(c => c.textContent)),
                tinted: tinted};
    """)


def clear(page) -> None:
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "clear").click()


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator:
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver), quit on leaving. Its
    temporary files (a profile, a singleton socket that a quit Chromium leaves behind) go in a folder of
    its own, removed with it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    # (a Chromium process still exiting after quit may hold a file there: never an error of the test's)
    with tempfile.TemporaryDirectory(prefix="digitseq-chromium-", ignore_cleanup_errors=True) as folder:
        service = Service(shutil.which("chromedriver"), env=dict(os.environ, TMPDIR=folder))
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_script_timeout(30)
            yield driver
        finally:
            driver.quit()


def numbers(count: int, max_digits: int, seed: int, spacing: str) -> list[tuple[str, str, np.random.Generator]]:
    """`count` numbers of 1..max_digits digits for `spacing`: (digits, pointer kind, the hand's rng)."""
    rng = np.random.default_rng([seed, list(SPACINGS).index(spacing)])
    out = []
    for _ in range(count):
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(1, max_digits + 1))))
        out.append((digits, KINDS[int(rng.integers(len(KINDS)))], np.random.default_rng(rng.integers(2**32))))
    return out


def read_right(page, count: int, max_digits: int, seed: int, spacing: str) -> tuple[float, list[tuple[str, str]]]:
    """The share of `count` numbers written with `spacing` that the page reads right, and the misread."""
    wrong = []
    for digits, kind, hand in numbers(count, max_digits, seed, spacing):
        clear(page)
        shown = answer(page, strokes=write(page, digits, kind, rng=hand, spacing=SPACINGS[spacing]))
        if shown["number"] != digits:
            wrong.append((digits, shown["number"]))
    return 1 - len(wrong) / count, wrong


def main() -> None:
    from handwritten import measuring_parser

    parser = measuring_parser(__doc__.split("\n\n")[0], 200, "spacing")
    parser.add_argument("--shots", help="a folder: a screenshot of the page for the first number of each spacing")
    args = parser.parse_args()

    import demo
    from digitseq import Reader

    server = demo.serve(Reader.load(args.weights or args.workdir), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    figures = {}
    try:
        with chromium() as page:
            page.get(demo.address(server))
            for spacing in SPACINGS:
                if args.shots:
                    digits, kind, hand = numbers(1, args.max_digits, args.seed, spacing)[0]
                    clear(page)
                    answer(page, strokes=write(page, digits, kind, rng=hand, spacing=SPACINGS[spacing]))
                    Path(args.shots).mkdir(parents=True, exist_ok=True)
                    page.save_screenshot(str(Path(args.shots) / f"page-{spacing}.png"))
                figures[spacing], wrong = read_right(page, args.count, args.max_digits, args.seed, spacing)
                print(f"{spacing:9s} {figures[spacing]:7.1%} of {args.count}  misread: {wrong[:8]}", flush=True)
    finally:
        server.shutdown()
    print(json.dumps({"model": args.weights or args.workdir, "count": args.count, "read_right": figures}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
