"""The framing rule: how a written number, of any size and anywhere in its image, becomes the
network's input. One rule for both sides: the free layout frames its sequences with it, and a
user's image file is framed with it, so a photo and a training sequence meet the network alike.

0. The page (a user's image only; a training sequence is already white ink on black):
   a. the ink's polarity: dark ink on light paper is inverted, so ink is white on black as in
      MNIST (`white_on_black`). What stands out of the local paper decides; where the ink is dense
      (a bold pen, a close crop: ink over a quarter of the image, so the local paper is as often
      ink) the paper is what the image's border mostly shows, and dark ink when that is even;
   b. the paper is estimated locally, by a grey opening with a window six strokes wide (half the
      short side where the ink is dense): what is narrower is ink, and light from one side, a
      shadow, grey or tinted paper stay paper (the strokes' width is measured first); the ink is
      what stands out of the paper, divided by the paper's brightness (light that falls unevenly
      dims ink and paper alike); grain below a few standard deviations of the paper's noise (of
      the pixels that are not ink) is dropped; the strongest ink becomes 255 (`ink`).
1. The ink: pixels brighter than INK_LEVEL (of 255, white digits on black at full contrast). Its
   bounding box is the number's extent — specks and smudges away from the number's main strokes
   left out (`ink_box`).
2. The box is scaled, aspect kept, to INK_HEIGHT pixels high (MNIST's 20-pixel digit box), or
   less if it would then be wider than the canvas leaves room for (MARGIN on either side). Strokes
   that would then be thinner than MIN_STROKE (a pencil's, a pointer's) are widened to it first.
3. It is placed MARGIN pixels from the canvas's left edge, centred vertically, on a black canvas
   28 pixels high (MNIST's) and as wide as the sequences are (28 · max_digits).

`placement` is the rule (box → scale and position); `frame` applies it to an image's pixels.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import tensorflow as tf

CANVAS_HEIGHT = 28
INK_HEIGHT = 20
MARGIN = 4
INK_LEVEL = 64
MIN_STROKE = 2.5  # pixels, framed: about MNIST's thinnest strokes (5 % of its digits' are thinner)

# The page (step 0)
_GRID = 16  # the paper is estimated on a grid of about this many cells across the image's short side
_PAPER_PERCENTILE = 25  # of the pixels around a point: the paper, unless ink covers over 3/4 of them
_STROKES_PER_WINDOW = 6  # the paper under the ink: what is narrower than this many strokes is ink
_CLEARLY = 1.1  # polarity: what stands out of the local paper decides when it is this much stronger
_NOISE_FLOOR = 3.0  # ink must stand this many of the paper's noise standard deviations above it
_PEAK_SHARE = 0.002  # the strongest ink: the value this share of the ink pixels reaches (not one hot pixel)
# Step 1: a component of ink belongs to the number when it has this share of the largest one's area,
# or lies beside those (a dot, a broken stroke's end, a stroke's tip just above INK_LEVEL)
_MAIN_SHARE = 0.15


def placement(ink_height, ink_width, canvas_width: int):
    """The rule, steps 2–3: an ink box of (height, width) pixels → (scale, top, left) of the framed
    box on a canvas of `canvas_width`. Takes and returns TF tensors (or numbers), batched alike."""
    ink_height = tf.maximum(tf.cast(ink_height, tf.float32), 1.0)
    ink_width = tf.maximum(tf.cast(ink_width, tf.float32), 1.0)
    scale = tf.minimum(INK_HEIGHT / ink_height, (canvas_width - 2 * MARGIN) / ink_width)
    top = (CANVAS_HEIGHT - scale * ink_height) / 2
    return scale, top, tf.fill(tf.shape(scale), float(MARGIN))


# --- step 0: the page ----------------------------------------------------------------------------


def _paper(pixels: np.ndarray, percentiles: list[float]) -> list[np.ndarray]:
    """Local low percentiles of float32 [h, w]: each pixel's percentile of the pixels within about the
    short side around it, smooth and at full size (one array per percentile).

    Computed on a coarse grid (percentiles of blocks, then of a window of blocks) and interpolated
    back bilinearly: the paper changes slowly, and a 12-megapixel photo costs milliseconds."""
    height, width = pixels.shape
    block = max(1, min(height, width) // _GRID)
    rows, columns = -(-height // block), -(-width // block)
    padded = np.pad(pixels, ((0, rows * block - height), (0, columns * block - width)), mode="edge")
    blocks = padded.reshape(rows, block, columns, block).transpose(0, 2, 1, 3).reshape(rows, columns, -1)
    window = max(3, min(rows, columns) | 1)
    coarse = np.percentile(blocks, percentiles, axis=-1)
    up_rows, up_columns = _interpolation(height, rows, block), _interpolation(width, columns, block)
    papers = []
    for grid, percentile in zip(coarse, percentiles, strict=True):
        grid = ndi.percentile_filter(grid, percentile, size=window, mode="nearest")
        grid = ndi.uniform_filter(grid, size=3, mode="nearest")  # no steps from one cell to the next
        papers.append((up_rows @ grid @ up_columns.T).astype(np.float32))
    return papers


def _interpolation(size: int, cells: int, block: int) -> np.ndarray:
    """[size, cells]: linear interpolation from cell centres (i + 0.5)·block to pixel centres."""
    position = np.clip((np.arange(size) + 0.5) / block - 0.5, 0, cells - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, cells - 1)
    weights = np.zeros((size, cells))
    weights[np.arange(size), below] += 1 - (position - below)
    weights[np.arange(size), above] += position - below
    return weights


def _strongest(values: np.ndarray) -> float:
    """The strongest ink in a map of it: reached by _PEAK_SHARE of its ink pixels, at least 5."""
    candidates = values[values > 0]
    if candidates.size == 0:
        return 0.0
    rank = max(5, int(_PEAK_SHARE * candidates.size))
    return float(np.partition(candidates, -min(rank, candidates.size))[-min(rank, candidates.size)])


def white_on_black(gray: np.ndarray) -> np.ndarray:
    """uint8 [h, w] of either polarity → white ink on black (step 0a): inverted when what stands out
    of the local paper is clearly darker than it, not lighter. Where neither stands out clearly — ink
    covering a quarter of the image or more (a bold pen, a close crop), so that the local paper is
    ink as often as paper — the paper is what the image's border mostly shows, and dark ink when
    even that is undecided (as people mostly write)."""
    if min(gray.shape) < 2 or gray.min() == gray.max():
        return gray
    bright, dark = _standing_out(gray.astype(np.float32))
    if dark > _CLEARLY * bright:
        return 255 - gray
    if bright > _CLEARLY * dark:
        return gray
    darker = gray < _two_levels(gray)
    ring = max(1, min(gray.shape) // 40)
    border = [darker[:ring], darker[-ring:], darker[:, :ring], darker[:, -ring:]]
    return gray if np.concatenate([side.ravel() for side in border]).mean() > 0.5 else 255 - gray


def _standing_out(pixels: np.ndarray) -> tuple[float, float]:
    """How strongly float32 [h, w] stands out of its local paper: brighter, and darker."""
    low, high = _paper(pixels, [_PAPER_PERCENTILE, 100 - _PAPER_PERCENTILE])
    bright = _strongest(ndi.uniform_filter(pixels - low, 3))  # a little smoothing: one noisy pixel does not decide
    return bright, _strongest(ndi.uniform_filter(high - pixels, 3))


def _two_levels(gray: np.ndarray) -> int:
    """Otsu's threshold of uint8 [h, w]: the level that splits its pixels into the two most distinct classes."""
    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    below = np.cumsum(counts)
    mass = np.cumsum(counts * np.arange(256))
    total, total_mass = below[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * below - total * mass) ** 2 / (below * (total - below))
    return int(np.nanargmax(np.where(below < total, between, np.nan))) + 1


def ink(gray: np.ndarray) -> np.ndarray:
    """White-on-black uint8 [h, w] → float32 [h, w]: the ink alone (step 0b), the paper 0 and the
    strongest ink 255. Without ink to speak of, all zero."""
    pixels = gray.astype(np.float32)
    if min(pixels.shape) < 2:
        return np.zeros_like(pixels)
    # The paper: a grey opening (the darkest within a window, then the brightest of those) removes
    # every stroke narrower than the window and keeps what is wider — a ramp of light, a shadow —
    # exactly. The window is a few strokes wide: wider, and the corner of a shadow is taken for ink;
    # narrower, and where strokes meet is taken for paper. The strokes' width is measured on a
    # first opening, a little smoothing first: grain does not set the paper's level.
    # Dense ink (a bold pen, a close crop: the ink does not stand out clearly of the local paper) has
    # strokes too wide to measure so; the window is then half the short side, as wide as it goes.
    smooth = ndi.uniform_filter(pixels, 3)
    short = min(pixels.shape)
    bright, dark = _standing_out(pixels)
    dense = not bright > _CLEARLY * dark
    window = max(3, short // 2 if dense else short // 8)
    paper = ndi.maximum_filter(ndi.minimum_filter(smooth, window), window)
    rough = smooth - paper
    strokes = rough > max(16.0, 0.3 * _strongest(rough))
    area = np.count_nonzero(strokes)
    if area and not dense:
        window = int(np.clip(_STROKES_PER_WINDOW * stroke_width(strokes), 3, short // 2))
        paper = ndi.maximum_filter(ndi.minimum_filter(smooth, window), window)
    light = np.maximum(255.0 - paper, 32.0)  # how bright the paper is lit (dark paper: ink shows less)
    contrast = (pixels - paper) * (255.0 / light)
    # The paper's level and grain: of every pixel (most are paper), or where the ink is dense of the
    # pixels that are not ink
    paper_pixels = contrast if not dense else contrast[contrast < 0.5 * _strongest(contrast)]
    if paper_pixels.size == 0:
        paper_pixels = contrast.ravel()
    typical = np.median(paper_pixels)
    noise = 1.4826 * np.median(np.abs(paper_pixels - typical))  # the grain, as a standard deviation
    contrast -= typical + _NOISE_FLOOR * noise
    peak = _strongest(contrast)
    if peak < 16:  # no ink to speak of
        return np.zeros_like(pixels)
    return np.clip(contrast * (255.0 / peak), 0, 255)


# --- step 1: the number's ink box -----------------------------------------------------------------


def ink_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the number's ink, pixels brighter than INK_LEVEL (step 1): its
    main strokes and what lies beside them, not specks away from it. None without ink."""
    labels, count = ndi.label(pixels > INK_LEVEL, structure=np.ones((3, 3)))
    if count == 0:
        return None
    areas = np.bincount(labels.ravel())[1:]
    boxes = ndi.find_objects(labels)
    main = areas >= _MAIN_SHARE * areas.max()
    top = min(b[0].start for b, m in zip(boxes, main, strict=True) if m)
    bottom = max(b[0].stop for b, m in zip(boxes, main, strict=True) if m)
    left = min(b[1].start for b, m in zip(boxes, main, strict=True) if m)
    right = max(b[1].stop for b, m in zip(boxes, main, strict=True) if m)
    reach = bottom - top
    keep = main.copy()
    for i, (rows, columns) in enumerate(boxes):
        row, column = (rows.start + rows.stop) / 2, (columns.start + columns.stop) / 2
        beside = top - reach / 4 <= row <= bottom + reach / 4 and left - reach / 2 <= column <= right + reach / 2
        keep[i] |= beside
    kept = [b for b, k in zip(boxes, keep, strict=True) if k]
    top, bottom = min(b[0].start for b in kept), max(b[0].stop for b in kept)
    left, right = min(b[1].start for b in kept), max(b[1].stop for b in kept)
    return top, left, bottom - top, right - left


def stroke_width(strokes: np.ndarray) -> float:
    """The mean width in pixels of the strokes of a bool [h, w]: a stroke of width s and length l has area
    s·l and 2·l pixels on its edge."""
    edge = np.count_nonzero(strokes & ~ndi.binary_erosion(strokes))
    return 2 * np.count_nonzero(strokes) / max(edge, 1)


def _widened(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Ink float32 [h, w] whose strokes, scaled by `scale`, would be narrower than MIN_STROKE pixels (a
    pencil's line, a pointer's, a fine pen's) → its strokes widened to that by a grey dilation with a disc,
    so that framed they are as wide as MNIST's thinnest and do not fade in the resampling."""
    strokes = pixels > INK_LEVEL
    if not strokes.any():
        return pixels
    radius = (MIN_STROKE / scale - stroke_width(strokes)) / 2
    if radius < 0.5:
        return pixels
    reach = int(np.ceil(radius))
    rows, columns = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    return ndi.grey_dilation(pixels, footprint=rows**2 + columns**2 <= radius**2 + 0.5)


def frame(gray: np.ndarray, canvas_width: int) -> np.ndarray:
    """White-on-black uint8 [h, w] of any size, contrast and lighting → the framed uint8 [28, canvas_width].

    The ink outside its box (and a margin of a fifth of its height) is dropped; strokes that would frame
    thinner than MIN_STROKE are widened to it; the rest is resampled by TensorFlow's scale-and-translate
    with an antialiasing triangle filter, so a large photo shrinks without aliasing. An image without
    ink frames to black.
    """
    pixels = ink(gray)
    box = ink_box(pixels)
    canvas = np.zeros((CANVAS_HEIGHT, canvas_width), np.uint8)
    if box is None:
        return canvas
    return place(pixels, box, canvas_width)


def place(pixels: np.ndarray, box: tuple[int, int, int, int], canvas_width: int) -> np.ndarray:
    """Ink uint8 or float [h, w] and its box (top, left, height, width) → the framed uint8 [28, canvas_width]
    (steps 2–3 of `frame`, the page already clean)."""
    top, left, height, width = box
    margin = max(3, height // 5)
    # Only the box and its margin are kept (the rest is dropped): cropped to them, the origin moved
    row, column = max(0, top - margin), max(0, left - margin)
    pixels = pixels[row : top + height + margin, column : left + width + margin]
    top, left = top - row, left - column
    scale, new_top, new_left = (float(v) for v in placement(height, width, canvas_width))
    pixels = _widened(pixels, scale)
    framed = tf.raw_ops.ScaleAndTranslate(
        images=tf.constant(pixels[None, :, :, None].astype(np.float32)),
        size=tf.constant([CANVAS_HEIGHT, canvas_width], tf.int32),
        scale=tf.constant([scale, scale], tf.float32),
        translation=tf.constant([new_top - top * scale, new_left - left * scale], tf.float32),
        kernel_type="triangle",
        antialias=True,
    )
    return np.clip(np.round(framed.numpy()[0, :, :, 0]), 0, 255).astype(np.uint8)
