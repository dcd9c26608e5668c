"""The framing rule: how a written number, of any size and anywhere in its image, becomes the
network's input. One rule for both sides: the free layout frames its sequences with it, and a
user's image file is framed with it, so a photo and a training sequence meet the network alike.

1. The ink: pixels brighter than INK_LEVEL (of 255, white digits on black at full contrast). Its
   bounding box is the number's extent.
2. The box is scaled, aspect kept, to INK_HEIGHT pixels high (MNIST's 20-pixel digit box), or
   less if it would then be wider than the canvas leaves room for (MARGIN on either side).
3. It is placed MARGIN pixels from the canvas's left edge, centred vertically, on a black canvas
   28 pixels high (MNIST's) and as wide as the sequences are (28 · max_digits).

`placement` is the rule (box → scale and position); `frame` applies it to an image's pixels.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

CANVAS_HEIGHT = 28
INK_HEIGHT = 20
MARGIN = 4
INK_LEVEL = 64


def placement(ink_height, ink_width, canvas_width: int):
    """The rule, steps 2–3: an ink box of (height, width) pixels → (scale, top, left) of the framed
    box on a canvas of `canvas_width`. Takes and returns TF tensors (or numbers), batched alike."""
    ink_height = tf.maximum(tf.cast(ink_height, tf.float32), 1.0)
    ink_width = tf.maximum(tf.cast(ink_width, tf.float32), 1.0)
    scale = tf.minimum(INK_HEIGHT / ink_height, (canvas_width - 2 * MARGIN) / ink_width)
    top = (CANVAS_HEIGHT - scale * ink_height) / 2
    return scale, top, tf.fill(tf.shape(scale), float(MARGIN))


def ink_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the pixels brighter than INK_LEVEL (step 1); None without ink."""
    ink = pixels > INK_LEVEL
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(columns[0]), int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)


def stretch(gray: np.ndarray) -> np.ndarray:
    """White-on-black pixels of any contrast (grey ink, light paper) → float32 at full contrast: the
    border's median (the paper) becomes 0 and the brightest pixel 255. Without ink, all zero."""
    pixels = gray.astype(np.float32)
    background = float(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
    if pixels.max() - background < 16:  # no ink to speak of
        return np.zeros_like(pixels)
    return np.clip((pixels - background) * (255.0 / (pixels.max() - background)), 0, 255)


def frame(gray: np.ndarray, canvas_width: int) -> np.ndarray:
    """White-on-black uint8 [h, w] of any size and contrast → the framed uint8 [28, canvas_width].

    The pixels are resampled by TensorFlow's scale-and-translate with an antialiasing triangle
    filter, so a large photo shrinks without aliasing; an image without ink frames to black.
    """
    pixels = stretch(gray)
    box = ink_box(pixels)
    canvas = np.zeros((CANVAS_HEIGHT, canvas_width), np.uint8)
    if box is None:
        return canvas
    top, left, height, width = box
    scale, new_top, new_left = (float(v) for v in placement(height, width, canvas_width))
    framed = tf.raw_ops.ScaleAndTranslate(
        images=tf.constant(pixels[None, :, :, None]),
        size=tf.constant([CANVAS_HEIGHT, canvas_width], tf.int32),
        scale=tf.constant([scale, scale], tf.float32),
        translation=tf.constant([new_top - top * scale, new_left - left * scale], tf.float32),
        kernel_type="triangle",
        antialias=True,
    )
    return np.clip(np.round(framed.numpy()[0, :, :, 0]), 0, 255).astype(np.uint8)
