"""The free layout: digits as people write them, then framed by the framing rule.

Each digit of a sequence gets its own size (SIZE_SPREAD either way of its MNIST size), its own
baseline (BASELINE_SHIFT pixels up or down) and its own gap to its left neighbour: from
overlapping (strokes crossing, by up to MAX_OVERLAP of the narrower digit's width) through
touching to wide (GAP_RANGE, in units of the two digits' mean height). The number's ink box is
then framed by `pipeline.framing.placement`, and every digit is resampled once, straight into
its framed place (bilinear), and composited with max, as ink on paper. The k-th digit from the
left is label position k, as in the cell layout.

Drawing a batch's geometry is a few numbers per digit (`geometry`); the pixels take two passes
of gathers: each digit's rows resampled to the canvas's 28 rows (`resample_rows`), then each
canvas column taken from the (at most two) digits whose pixels reach it (`resample_columns`):
left edges increase with the position, neighbours overlap by less than half of either, and a
digit's pixels keep SEPARATION from those of the digit two before it, so no column sees three.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline import framing

TILE = 28
SIZE_SPREAD = 0.15  # each digit drawn at 0.85–1.15 × its MNIST size
BASELINE_SHIFT = 3.0  # pixels (MNIST scale) each way
GAP_RANGE = (-0.25, 0.6)  # gap to the left neighbour ÷ the two digits' mean height
MAX_OVERLAP = 0.4  # of the narrower digit's width (below one half: see the module's note)
SEPARATION = 4.0  # pixels (MNIST scale) at least between a digit's pixels and those of the digit two before
FRAME_JITTER = (0.05, 1.0)  # augmentation: the frame's scale ± 5 %, its position ± 1 px
UNIFORMS_PER_DIGIT = 3  # size, baseline, gap
UNIFORMS_PER_FRAME = 3  # scale, top, left (augmentation)


def ink_boxes(tiles: np.ndarray) -> np.ndarray:
    """[N, 28, 28] uint8 digits → [N, 6] float32 per digit: top, left, height and width of its ink
    (pixels brighter than the framing rule's INK_LEVEL), and the first and one-past-the-last
    column of any of its pixels at all (its reach). A tile without ink gets zeros."""
    ink = tiles > framing.INK_LEVEL
    rows, columns = ink.any(axis=2), ink.any(axis=1)
    top, left = rows.argmax(axis=1), columns.argmax(axis=1)
    height = TILE - top - rows[:, ::-1].argmax(axis=1)
    width = TILE - left - columns[:, ::-1].argmax(axis=1)
    lit = (tiles > 0).any(axis=1)
    reach_left, reach_right = lit.argmax(axis=1), TILE - lit[:, ::-1].argmax(axis=1)
    boxes = np.stack([top, left, height, width, reach_left, reach_right], axis=1)
    return np.where(rows.any(axis=1)[:, None], boxes, 0).astype(np.float32)


def geometry(
    boxes: tf.Tensor,
    length: tf.Tensor,
    uniforms: tf.Tensor,
    canvas_width: int,
    frame_uniforms: tf.Tensor | None,
    tilt: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Where each digit of a free-layout sequence goes on the framed canvas.

    boxes [b, K, 6] (`ink_boxes` of the digits), length [b], uniforms [b, K, 3] in [0, 1);
    frame_uniforms [b, 3] jitter the frame (augmentation) or None; tilt [b] turns the baseline the
    digits stand on by that many radians (a distortion: `pipeline.distort`), or None. Returns scale,
    top and left [b, K] of each digit's ink box on the canvas; digits after the length lie past its
    right edge.
    """
    positions = boxes.shape[1]
    valid = tf.range(positions)[None, :] < length[:, None]
    size = 1.0 + SIZE_SPREAD * (2.0 * uniforms[..., 0] - 1.0)
    height, width = boxes[..., 2] * size, boxes[..., 3] * size
    bottom = BASELINE_SHIFT * (2.0 * uniforms[..., 1] - 1.0)
    low, high = GAP_RANGE
    gap = (low + (high - low) * uniforms[..., 2]) * (height + tf.roll(height, 1, axis=1)) / 2
    gap = tf.maximum(gap, -MAX_OVERLAP * tf.minimum(width, tf.roll(width, 1, axis=1)))
    reach_before = (boxes[..., 1] - boxes[..., 4]) * size  # from a digit's pixels' first column to its ink's
    reach_after = (boxes[..., 5] - boxes[..., 1]) * size  # from its ink's first column past its pixels' last
    lefts = [tf.zeros_like(width[:, 0])]  # the first digit's ink starts at 0
    for k in range(1, positions):
        left = lefts[k - 1] + width[:, k - 1] + gap[:, k]
        if k >= 2:  # clear of the digit before its left neighbour (see the module's note)
            left = tf.maximum(left, lefts[k - 2] + reach_after[:, k - 2] + SEPARATION + reach_before[:, k])
        lefts.append(left)
    left = tf.stack(lefts, axis=1)
    if tilt is not None:
        bottom += tf.tan(tilt)[:, None] * (left + width / 2)
    top = bottom - height

    far = tf.float32.max
    ink_right = tf.reduce_max(tf.where(valid, left + width, -far), axis=1)
    ink_top = tf.reduce_min(tf.where(valid, top, far), axis=1)
    ink_bottom = tf.reduce_max(tf.where(valid, bottom, -far), axis=1)
    frame_scale, frame_top, frame_left = framing.placement(ink_bottom - ink_top, ink_right, canvas_width)
    if frame_uniforms is not None:
        scale_jitter, shift_jitter = FRAME_JITTER
        frame_scale *= 1.0 + scale_jitter * (2.0 * frame_uniforms[:, 0] - 1.0)
        frame_top += shift_jitter * (2.0 * frame_uniforms[:, 1] - 1.0)
        frame_left += shift_jitter * (2.0 * frame_uniforms[:, 2] - 1.0)
    scale = frame_scale[:, None] * size
    placed_top = frame_top[:, None] + frame_scale[:, None] * (top - ink_top[:, None])
    placed_left = tf.where(valid, frame_left[:, None] + frame_scale[:, None] * left, float(canvas_width + TILE))
    return scale, placed_top, placed_left


def cell_geometry(
    boxes: tf.Tensor, length: tf.Tensor, shifts: tf.Tensor | None, canvas_width: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The cell layout as `geometry` says it: digit k unscaled in cell k, shifted by `shifts`
    [b, K, 2] (dx, dy) or not; rendered, it is the cell layout's image."""
    positions = boxes.shape[1]
    valid = tf.range(positions)[None, :] < length[:, None]
    dx, dy = (0.0, 0.0) if shifts is None else tf.unstack(tf.cast(shifts, tf.float32), axis=-1)
    cell = tf.range(positions, dtype=tf.float32)[None, :] * TILE
    left = tf.where(valid, cell + boxes[..., 1] + dx, float(canvas_width + TILE))
    return tf.ones_like(left), boxes[..., 0] + dy, left


def resample_rows(
    rows: tf.Tensor, zero_row: int, tiles: tf.Tensor, boxes: tf.Tensor, scale: tf.Tensor, top: tf.Tensor
) -> tf.Tensor:
    """Pass 1: each digit's tile resampled along its rows to the canvas's 28 rows → uint8
    [b, K, 28 canvas rows, 28 tile columns].

    rows: the pool's 28-pixel rows packed as seven int32 each, row r of tile t at t·28 + r, and an
    all-zero row at `zero_row`; tiles [b, K]: each digit's tile; boxes [b, K, 6], scale and top
    [b, K] as `geometry` gives them.
    """
    positions = tiles.shape[1]
    canvas_row = tf.range(TILE, dtype=tf.float32)[None, None, :] + 0.5
    source = boxes[..., 0:1] + (canvas_row - top[..., None]) / scale[..., None] - 0.5  # [b, K, 28]
    above = tf.floor(source)
    weight = (source - above)[..., None]

    def tile_rows(row: tf.Tensor) -> tf.Tensor:
        inside = (row >= 0) & (row < TILE)
        index = tf.where(inside, tiles[..., None] * TILE + tf.cast(row, tf.int32), zero_row)
        pixels = tf.reshape(tf.bitcast(tf.gather(rows, index), tf.uint8), [-1, positions, TILE, TILE])
        return tf.cast(pixels, tf.float32)

    upper, lower = tile_rows(above), tile_rows(above + 1)
    return tf.cast(tf.round(upper + (lower - upper) * weight), tf.uint8)


def pack_columns(resampled: tf.Tensor) -> tf.Tensor:
    """Pass 1's output → its columns as rows of seven int32 (28 uint8), digit k of example i's column c
    at (i·K + k)·28 + c, and an all-zero row last: pass 2 then gathers a quarter of the elements.

    (A function of its own: fused with pass 1, XLA gathers every element of the transpose alone.)"""
    columns = tf.bitcast(tf.reshape(tf.transpose(resampled, [0, 1, 3, 2]), [-1, TILE // 4, 4]), tf.int32)
    return tf.concat([columns, tf.zeros([1, TILE // 4], tf.int32)], axis=0)


def resample_columns(
    columns: tf.Tensor, boxes: tf.Tensor, scale: tf.Tensor, left: tf.Tensor, canvas_width: int
) -> tf.Tensor:
    """Pass 2: each canvas column from the two digits that can reach it, resampled along the columns
    and composited with max → the image, uint8 [b, 28, canvas_width, 1]."""
    batch, positions = tf.shape(left)[0], left.shape[1]
    zero_column = tf.shape(columns)[0] - 1
    x = tf.range(canvas_width, dtype=tf.float32)[None, :]  # [1, W]
    start = left - (boxes[..., 1] - boxes[..., 4]) * scale - 1.0  # a digit's first column that its pixels reach
    started = tf.reduce_sum(tf.cast(start[:, None, :] <= x[..., None], tf.int32), axis=2)  # [b, W]
    latest = tf.maximum(started - 1, 0)
    pictures = []
    for digit in (latest, latest - 1):  # the digit begun last at this column, and the one before it
        exists = digit >= 0
        digit = tf.maximum(digit, 0)
        digit_scale = tf.gather(scale, digit, batch_dims=1)
        digit_left = tf.gather(left, digit, batch_dims=1)
        box_left = tf.gather(boxes[..., 1], digit, batch_dims=1)
        source = box_left + (x + 0.5 - digit_left) / digit_scale - 0.5  # [b, W]
        before = tf.floor(source)
        weight = (source - before)[..., None]
        first = (tf.range(batch)[:, None] * positions + digit) * TILE

        def tile_column(column: tf.Tensor, first=first, exists=exists) -> tf.Tensor:
            inside = exists & (column >= 0) & (column < TILE)
            words = tf.gather(columns, tf.where(inside, first + tf.cast(column, tf.int32), zero_column))
            return tf.cast(tf.reshape(tf.bitcast(words, tf.uint8), [batch, canvas_width, TILE]), tf.float32)

        a, b = tile_column(before), tile_column(before + 1)
        pictures.append(a + (b - a) * weight)  # [b, W, 28]
    image = tf.cast(tf.clip_by_value(tf.round(tf.maximum(*pictures)), 0, 255), tf.uint8)  # [b, W, 28]
    return tf.transpose(image, [0, 2, 1])[..., None]
