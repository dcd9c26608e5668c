"""A user's image (a file, or an array) → the layout the model reads.

The rule (docs/commands.md, "predict.py"):
1. A file (a path, its bytes, or an open binary file) is read with Pillow, EXIF rotation applied,
   to grayscale (colour ink and paper by their brightness); transparent areas count as white; one
   under MIN_SIDE or over MAX_PIXELS is refused; a photo over ANALYSIS_PIXELS is reduced by a
   whole factor (the number ends up 28 pixels high: more detail is never used). An array is taken
   as grayscale (RGB averaged; floats in [0, 1] scaled to 0–255).
2. Dark ink on lighter paper is inverted, so digits are white on black as in MNIST
   (`pipeline.framing.white_on_black`: what stands out of the local paper decides; for ink too dense
   to tell so, a bold pen or a close crop, what the border mostly shows is the paper).
3. For a model that reads written numbers (trained on the free or mixed layout) the image is
   framed by `pipeline.framing`: the page normalised (the paper estimated locally and taken
   away, so uneven light, shadows, tinted paper and grain do not become ink), its ink box scaled
   to 20 px high (or to the canvas's width) and placed 4 px from the left of a black 28 × 28·K
   canvas — the rule the free layout frames its sequences by. Nothing is cut into pieces.
4. For a model of the cell layout, an image of exactly the model's input size, or of the native
   28 × 28·K, is taken as it is (an image `pipeline.export` wrote reads back unchanged). Any other
   has its page normalised the same way and is split into digits at the columns without ink; digit i goes
   into cell i of a black 28 × 28·K canvas the way MNIST made its digits (fitted into 20×20,
   aspect kept, centre of mass at the cell's centre), the cells after the last digit stay blank.
   If there are more pieces than cells (touching digits are one piece; broken strokes, specks are
   several), the ink is instead scaled as a whole to 28 px high (with MNIST's margin) — or to
   28·K wide if it would be wider — and placed at the left.
5. The canvas is resized to the model's input when that differs (the seed preset's 64×64), with
   the pipeline's own bilinear resize.
"""

from __future__ import annotations

import io
import reprlib
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import framing
from pipeline.sequences import TILE, resize

MIN_SIDE = 8  # pixels each way: less cannot hold a digit (MNIST's are 20 px high)
MAX_PIXELS = 40_000_000  # refused before decoding: a 20000×20000 header must not allocate 400 MB
ANALYSIS_PIXELS = 2_000_000  # a larger photo is reduced to about this (a 12-megapixel one by 3 each way)


class ImageFileError(ValueError):
    """An image file that cannot be read; the message is one sentence naming the file."""


def _too_small(name: str, width: int, height: int) -> str:
    return f"{name} is {width}x{height} pixels, too small to hold a digit (at least {MIN_SIDE} pixels each way)"


# What the library reads: a file's path, its bytes (an upload), an open binary file, or pixels.
Source = str | Path | bytes | BinaryIO | np.ndarray


def _opened(source: str | Path | bytes | BinaryIO) -> tuple[str, BinaryIO]:
    """A file's name for messages, and the file to decode. Refuses what holds nothing to decode."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageFileError("the file is empty (0 bytes)")
        return "the file", io.BytesIO(source)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        name = str(name) if isinstance(name, str) else "the file"
        data = source.read()  # whole: Pillow needs to seek, and a socket or pipe cannot
        if not isinstance(data, bytes):
            raise ImageFileError(f"{name} is opened as text; open it in binary mode ('rb')")
        if not data:
            raise ImageFileError(f"{name} is empty (0 bytes)")
        return name, io.BytesIO(data)
    path = Path(source)
    if not path.exists():
        raise ImageFileError(f"{path} does not exist")
    if path.is_dir():
        raise ImageFileError(f"{path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageFileError(f"{path} is empty (0 bytes)")
    return str(path), path.open("rb")


def _image_file(source: object) -> str | Path | bytes | BinaryIO:
    """`source` when it can hold an image file; anything else (None, a number, a list, a dict) refused in
    one sentence that names it."""
    if isinstance(source, (str, Path, bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return source
    shown = reprlib.repr(source)
    hint = " (a list of pixel rows: np.asarray(rows))" if isinstance(source, (list, tuple)) else ""
    raise ImageFileError(
        f"{shown} ({type(source).__name__}) is not an image: give a file's path, its bytes, an open binary file "
        f"or a numpy array of pixels{hint}"
    )


def read_gray(source: str | Path | bytes | BinaryIO) -> np.ndarray:
    """The image file's pixels (a path, bytes or a binary file) as uint8 [h, w], grayscale, white
    digits on black (steps 1–2)."""
    try:
        path, file = _opened(source)
    except PermissionError:
        raise ImageFileError(f"{source} cannot be read: permission denied") from None
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (a large image, a corrupt EXIF block) are not the user's business: the
            # size is checked below, and the pixels are what count.
            warnings.simplefilter("ignore")
            with file, Image.open(file) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if min(width, height) < MIN_SIDE:
                    raise ImageFileError(_too_small(path, width, height))
                if width * height > MAX_PIXELS:
                    raise ImageFileError(
                        f"{path} is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixels "
                        "read here; scale it down first"
                    )
                image = ImageOps.exif_transpose(image)
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    white = Image.new("RGBA", image.size, "white")
                    image = Image.alpha_composite(white, image.convert("RGBA"))
                if image.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float: scale, do not clip
                    pixels = np.asarray(image, np.float64)
                    pixels = pixels * (255.0 / max(pixels.max(), 1e-9))
                    gray = np.clip(pixels, 0, 255).astype(np.uint8)
                else:
                    gray = np.asarray(image.convert("L"))
                factor = int((width * height / ANALYSIS_PIXELS) ** 0.5)
                if factor > 1:
                    gray = np.asarray(Image.fromarray(gray).reduce(factor))
    except Image.DecompressionBombError:
        raise ImageFileError(f"{path} is too large to decode safely; scale it down first") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, …)") from None
    except PermissionError:
        raise ImageFileError(f"{path} cannot be read: permission denied") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageFileError):
            raise
        raise ImageFileError(f"{path} is damaged or truncated ({error})") from None
    return framing.white_on_black(gray)


def gray_array(array: np.ndarray) -> np.ndarray:
    """An image array — uint8 0–255 or float 0–1, [h, w], [h, w, 1] or [h, w, 3|4] — as uint8 [h, w],
    grayscale, white digits on black (steps 1–2)."""
    pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
        pixels = pixels[..., :3].mean(axis=-1) if pixels.shape[-1] >= 3 else pixels[..., 0]
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ImageFileError(f"an image array must be [height, width] or [height, width, channels], not {array.shape}")
    if min(pixels.shape) < MIN_SIDE:
        raise ImageFileError(_too_small("the image array", pixels.shape[1], pixels.shape[0]))
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ImageFileError("an image array holds NaN or infinite values")
        scale = 255.0 if pixels.max() <= 1.0 else 1.0
        pixels = pixels * scale
    elif not np.issubdtype(pixels.dtype, np.integer) and pixels.dtype != bool:
        raise ImageFileError(f"an image array must hold numbers, not {pixels.dtype}")
    return framing.white_on_black(np.clip(np.round(pixels.astype(np.float64)), 0, 255).astype(np.uint8))


def native_layout(gray: np.ndarray, max_digits: int) -> np.ndarray:
    """White-on-black uint8 [h, w] of any size → [28, 28·max_digits] in the cell layout (step 4)."""
    canvas = np.zeros((TILE, TILE * max_digits), np.uint8)
    pixels = framing.ink(gray)
    if not pixels.any():  # no ink to speak of: an empty sequence
        return canvas
    ink_columns = np.flatnonzero((pixels > framing.INK_LEVEL).any(axis=0))
    # Digits are runs of ink columns with empty columns between them.
    runs = np.split(ink_columns, np.flatnonzero(np.diff(ink_columns) > 1) + 1)
    if len(runs) <= max_digits:
        for cell, run in enumerate(runs):
            canvas[:, cell * TILE : (cell + 1) * TILE] = _mnist_cell(pixels[:, run[0] : run[-1] + 1])
        return canvas
    # More pieces than cells (broken strokes, noise): the whole ink, scaled as one.
    rows = np.flatnonzero((pixels > framing.INK_LEVEL).any(axis=1))
    box = np.pad(pixels[rows[0] : rows[-1] + 1, ink_columns[0] : ink_columns[-1] + 1], round(4 / 20 * len(rows)))
    scale = min(TILE / box.shape[0], TILE * max_digits / box.shape[1])
    scaled = _fit(box, scale)
    top = (TILE - scaled.shape[0]) // 2
    canvas[top : top + scaled.shape[0], : scaled.shape[1]] = scaled
    return canvas


def _fit(pixels: np.ndarray, scale: float) -> np.ndarray:
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))  # (w, h) for Pillow
    return np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS))


def _mnist_cell(column: np.ndarray) -> np.ndarray:
    """One digit's columns → a 28×28 cell the way MNIST made its digits: the ink fitted into a
    20×20 box (aspect kept), placed so its centre of mass is the cell's centre."""
    rows = np.flatnonzero((column > framing.INK_LEVEL).any(axis=1))
    ink = column[rows[0] : rows[-1] + 1]
    digit = _fit(ink, framing.INK_HEIGHT / max(ink.shape)).astype(np.float32)
    digit = digit * (255.0 / max(digit.max(), 1.0))
    height, width = digit.shape
    mass = digit.sum()
    centre_y = (digit.sum(axis=1) @ np.arange(height)) / mass
    centre_x = (digit.sum(axis=0) @ np.arange(width)) / mass
    top = int(np.clip(round(TILE / 2 - 0.5 - centre_y), 0, TILE - height))
    left = int(np.clip(round(TILE / 2 - 0.5 - centre_x), 0, TILE - width))
    cell = np.zeros((TILE, TILE), np.uint8)
    cell[top : top + height, left : left + width] = np.round(digit).astype(np.uint8)
    return cell


def native(gray: np.ndarray, max_digits: int, layout: str = "cells") -> np.ndarray:
    """White-on-black uint8 [h, w] → the native [28, 28·max_digits] canvas of a model of `layout` ("cells" or
    "free"): framed by the framing rule (free), or laid into cells (step 3 or 4)."""
    if layout == "free":
        return framing.frame(gray, TILE * max_digits)
    return gray if gray.shape == (TILE, TILE * max_digits) else native_layout(gray, max_digits)


def sized(canvas: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A native canvas uint8 [28, 28·K] at the model's input size (step 5)."""
    if canvas.shape == tuple(image_size):
        return canvas
    return resize(tf.constant(canvas[None, :, :, None]), image_size).numpy()[0, :, :, 0]


def model_input(image: Source, image_size: tuple[int, int], max_digits: int, layout: str = "cells") -> np.ndarray:
    """An image file (a path, its bytes or the open file) or array as a model of `layout` ("cells" or
    "free") reads it: uint8 [height, width] (steps 1–5)."""
    gray = gray_array(image) if isinstance(image, np.ndarray) else read_gray(_image_file(image))
    if layout != "free" and gray.shape == tuple(image_size):  # a cell model's own input: as it is
        return gray
    return sized(native(gray, max_digits, layout), image_size)
