"""Distortions: the same digits as other pens, other hands and other paper would have written them.

Per digit, drawn into the pool itself: a pool that is distorted holds VARIANTS versions of every
digit — the first as MNIST has it, the others each distorted its own way — and a sequence's digit
is one of them, chosen by a hash like every other choice in the pipeline (so batch n stays a pure
function of (seed, n), and choosing costs nothing per batch). The versions are made once, when a
process first builds sequences of that pool (`pool_versions`), the same for every seed, and kept
beside MNIST's decoded pools for the processes after it. Each distorted version gets, in this order:

    thickness  the pen: strokes thinner (half a step of grey erosion by a 3×3 cross) or thicker
               (grey dilation: up to a 3×3 cross, then up to a diamond of radius 2 — strokes up
               to 4 px wider)
    pen        another pen altogether, for half the versions: the digit's skeleton (its strokes
               thinned to one pixel, Zhang and Suen's thinning) drawn again at one width end to
               end with hard edges, from a hairline (1 px) to a felt-tip marker (PEN_WIDTH: a
               fifth of the digit's 20-px height) — as a ballpoint, a marker or a pointer on a
               page draws, not as MNIST's scanned strokes look
    blur       a soft scan or focus: a binomial filter of σ up to 1.4 px, after which the
               strongest ink is full white again (as the framing rule makes a photo's)
    contrast   ink that fades at its edges or saturates: levels up to 0.25 become black, levels
               from 0.65 up white
    slant      the hand: a shear of up to ±0.3 (about ±17°)
    rotation   up to ±5° (and, per sequence, the free layout sets the digits on a baseline
               turned by up to ±5°: `pipeline.free.geometry`)
    elastic    a hand's wobble: every pixel moved smoothly, by up to ±1.5 px (a grid of random
               displacements 7 px apart, interpolated)

The digit turns and shears about the centre of its ink box. Its new ink box is what the free
layout places and frames, so a thick-pen number is framed as the framing rule frames a photo of
it. One more distortion acts per sequence, on the finished image (`grain`):

    noise      grain: noise of up to 16 grey levels (standard deviation)

XLA fuses a stencil into its consumer and computes it again for every tap, so each stage is an
XLA function of its own (`Distorter`): stencils read materialised arrays, and numbers of one
digit (its box, a cosine) are computed once, not once per pixel. The geometry is one bilinear
resampling: one gather per pixel, of its packed 2×2 neighbourhood.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline import framing, hashing
from pipeline.hashing import below, hash_words, uniform

DISTORTIONS = ("thickness", "pen", "blur", "contrast", "slant", "rotation", "elastic", "noise")
PER_DIGIT = DISTORTIONS[:-1]  # drawn into the pool's versions of each digit; noise acts per sequence
VARIANTS = 4  # versions of each digit: MNIST's own and three distorted ones
THICKNESS = (-0.5, 2.0)  # erosion below 0, dilation above (1: a 3×3 cross; 2: a diamond of radius 2)
PEN_SHARE = 0.5  # of the distorted versions, redrawn by another pen (the rest keep MNIST's strokes)
PEN_WIDTH = (1.0, 4.0)  # pixels, of a digit 20 px high: a hairline to a felt-tip marker
_THINNING_PASSES = 4  # Zhang–Suen passes: 97 % of MNIST's digits are thin by then (the rest keep a 2-px core)
BLUR = 2.0  # 0: none, 1: σ = 1 px (5 taps), 2: σ = √2 px (9 taps)
CONTRAST = (0.25, 0.35)  # levels up to this much become black; from 1 less this much, white
SLANT = 0.3
ROTATION = math.radians(5)
ELASTIC = 1.5  # pixels
ELASTIC_SPACING = 7  # pixels between the random displacements
NOISE = 16.0  # grey levels

_SALT = 11  # keeps these random numbers apart from the layout's (pipeline.sequences' salts are 1–10)
_UNIFORMS = 9  # one each: thickness, blur, contrast (2), slant, rotation, noise, pen (2)
_NOISE_UNIFORM = 6  # (the pen's came later: the others keep their numbers)
_NOISE_ROWS = 4096  # rows of a fixed noise texture; each image row takes one, at random
_CHUNK = 2048  # digits distorted per XLA call


def _neighbours(x: tf.Tensor, radius: int):
    """A function (dy, dx) → x [b, H, W] read (dy, dx) pixels away, zeros beyond the edge. (x is padded
    once and every neighbour is a slice of it: a pad per neighbour stops XLA from vectorising.)"""
    height, width = x.shape[1], x.shape[2]
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius]])
    return lambda dy, dx: padded[:, radius + dy : radius + dy + height, radius + dx : radius + dx + width]


# The pixels of a diamond of radius 2 that a 3×3 cross lacks
_DIAMOND_RIM = ((-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1))


def _binomial(x: tf.Tensor, taps: int, axis: int) -> tf.Tensor:
    """A binomial filter of `taps` taps along rows (axis 1) or columns (axis 2), zeros beyond the edge."""
    neighbour = _neighbours(x, taps // 2)
    out = 0.0
    for k in range(taps):
        offset = k - taps // 2
        out += math.comb(taps - 1, k) / 2 ** (taps - 1) * (neighbour(offset, 0) if axis == 1 else neighbour(0, offset))
    return out


def _levels(values: list[tf.Tensor], amount: tf.Tensor) -> tf.Tensor:
    """Piecewise-linear between values[0] (amount 0), values[1] (amount 1), …; amount [b]."""
    amount = amount[:, None, None]
    out = values[0]
    for i in range(1, len(values)):
        out += (values[i] - values[i - 1]) * tf.clip_by_value(amount - (i - 1), 0.0, 1.0)
    return out


def _interpolation(size: int, points: int) -> np.ndarray:
    """[size, points]: linear interpolation of `points` values spread evenly over `size` pixels."""
    position = (np.arange(size) + 0.5) * (points - 1) / size
    first = np.minimum(np.floor(position).astype(int), points - 2)
    weights = np.zeros((size, points), np.float32)
    weights[np.arange(size), first] = 1 - (position - first)
    weights[np.arange(size), first + 1] = position - first
    return weights


@functools.lru_cache(maxsize=2)
def pool_versions(pool, distortions: tuple[str, ...]) -> np.ndarray:
    """A digit pool's VARIANTS versions of every digit (`Distorter.variants`), the same for every seed of a
    run (batch n stays a function of (seed, n): the versions are constants). Made once per process, and
    kept in the pool's folder when it has one (beside the decoded pools) for the processes after it:
    making the training pool's takes seconds, reading them back under one."""
    if pool.folder is None:
        return Distorter(distortions).variants(pool.images)
    name = _versions_name(pool.images, distortions)
    kept = _kept_versions(pool.folder / name, pool.images.shape)
    if kept is not None:
        return np.concatenate([pool.images[None], kept])
    versions = Distorter(distortions).variants(pool.images)
    _keep_versions(pool.folder, name, versions[1:])
    return versions


def _versions_name(images: np.ndarray, distortions: tuple[str, ...]) -> str:
    """digitseq-versions-DIGITS-DISTORTIONS-CODE.npz: digests of the digits, of the distortions, and of the
    code that draws them (with TensorFlow's version) — a change to any is made anew."""
    code = hashlib.sha256(tf.__version__.encode())
    for module in (__file__, framing.__file__, hashing.__file__):
        code.update(Path(module).read_bytes())
    digits = np.ascontiguousarray(images)  # hashed in place (a pool's are already), not copied to bytes
    digests = (hashlib.sha256(what).hexdigest()[:12] for what in (digits, repr(distortions).encode()))
    return f"digitseq-versions-{'-'.join(digests)}-{code.hexdigest()[:12]}.npz"


def _kept_versions(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The distorted versions kept in `path`; None when missing or damaged (zip checks each CRC-32)."""
    try:
        with np.load(path) as kept:
            versions = kept["versions"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if versions.dtype != np.uint8 or versions.shape != (VARIANTS - 1, *shape):
        return None
    return versions


def _keep_versions(folder: Path, name: str, versions: np.ndarray) -> None:
    """Writes them whole or not at all (a partial file of this process renamed), and removes the versions of
    the same digits and distortions made by other code; a folder that cannot take them (read-only, full)
    goes without."""
    partial = folder / f".{name}.{os.getpid()}.partial"
    try:
        for left in folder.glob(f".{name}.*.partial"):  # a killed process's
            left.unlink(missing_ok=True)
        with open(partial, "wb") as file:
            np.savez_compressed(file, versions=versions)  # 40 % of the size; read back in under a second
        os.replace(partial, folder / name)
        for old in folder.glob(f"{name.rsplit('-', 1)[0]}-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
    except OSError:
        partial.unlink(missing_ok=True)


class Distorter:
    """The named distortions (of DISTORTIONS)."""

    def __init__(self, distortions: tuple[str, ...]):
        self.distortions = distortions

    def variants(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """Digits uint8 [N, H, W] → uint8 [VARIANTS, N, H, W]: each digit as it is, then VARIANTS - 1
        versions of it, each with its own pen and hand (the per-digit distortions named), a function
        of (seed, version, digit)."""
        count = len(images)
        per_digit = [name for name in self.distortions if name in PER_DIGIT]
        if not per_digit or count == 0:
            return np.broadcast_to(images, (VARIANTS, *images.shape))
        source = tf.constant(images)

        def distort(start: tf.Tensor) -> tf.Tensor:
            index = tf.range(start, tf.minimum(start + _CHUNK, count * (VARIANTS - 1)))
            digit, version = index % count, 1 + index // count
            return self(tf.gather(source, digit), hash_words(seed, _SALT, version, digit))

        starts = tf.data.Dataset.range(0, count * (VARIANTS - 1), _CHUNK)
        threads = os.cpu_count() or 1  # (TF's own pools are kept at one thread: pipeline/__init__.py)
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.autotune.enabled = False  # a few dozen chunks: too few for AUTOTUNE to find the cores
        made = starts.map(distort, num_parallel_calls=threads, deterministic=True).prefetch(threads)
        made = made.with_options(options)
        distorted = np.concatenate([chunk.numpy() for chunk in made]).reshape(VARIANTS - 1, *images.shape)
        return np.concatenate([images[None], distorted])

    def __call__(self, images: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """Digits uint8 [b, H, W] and their keys [b] → each distorted by its own key, uint8 [b, H, W]."""
        u = self.uniforms(keys)
        x = self.pen(images, u)
        if "pen" in self.distortions:
            skeleton = tf.cast(images > 127, tf.float32)
            for _ in range(_THINNING_PASSES):
                skeleton = self.thinning_step(self.thinning_step(skeleton, 0), 1)
            x = self.redraw(x, skeleton, u)
        if "blur" in self.distortions:
            x = self.blur_columns(x, *self.blur_rows(x), u)
        mapping = self.mapping(x, u)
        index, weight_x, weight_y = self.coordinates(mapping, *self.elastic(x, keys))
        flat = tf.reshape(self.neighbourhoods(x), [-1])  # outside XLA: free (inside, a slow copy)
        return self.resampled(self.gather(flat, index), weight_x, weight_y)

    @tf.function(jit_compile=True, autograph=False)
    def uniforms(self, keys: tf.Tensor) -> tf.Tensor:
        return uniform(hash_words(keys[:, None], _SALT, tf.range(_UNIFORMS)))

    @tf.function(jit_compile=True, autograph=False)
    def pen(self, images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        """uint8 [b, H, W] → float32 [b, H, W] in [0, 1], strokes thinner or thicker (and the contrast
        changed here when there is no blur)."""
        x = tf.cast(images, tf.float32) / 255.0
        if "thickness" in self.distortions:
            low, high = THICKNESS
            amount = low + (high - low) * u[:, 0]
            neighbour = _neighbours(x, 2)
            cross = [neighbour(dy, dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
            once = tf.reduce_max(tf.stack([x, *cross]), axis=0)  # a 3×3 cross
            twice = tf.reduce_max(tf.stack([once] + [neighbour(dy, dx) for dy, dx in _DIAMOND_RIM]), axis=0)
            thinner = _levels([x, tf.reduce_min(tf.stack([x, *cross]), axis=0)], -amount)
            x = tf.where((amount < 0)[:, None, None], thinner, _levels([x, once, twice], amount))
        if "contrast" in self.distortions and "blur" not in self.distortions and "pen" not in self.distortions:
            x = _contrast(x, u)
        return x

    @tf.function(jit_compile=True, autograph=False)
    def thinning_step(self, skeleton: tf.Tensor, step: int) -> tf.Tensor:
        """One step of Zhang and Suen's thinning of float32 {0, 1} [b, H, W]: the stroke pixels on one
        side (step 0: south and east; 1: north and west) whose removal keeps the strokes connected."""
        n = _neighbours(skeleton, 1)
        p = [n(-1, 0), n(-1, 1), n(0, 1), n(1, 1), n(1, 0), n(1, -1), n(0, -1), n(-1, -1)]  # clockwise from north
        count = tf.add_n(p)
        turns = tf.add_n([(1 - p[i]) * p[(i + 1) % 8] for i in range(8)])  # 0 → 1 around the ring
        north, east, south, west = p[0], p[2], p[4], p[6]
        if step == 0:
            spare = (north * east * south == 0) & (east * south * west == 0)
        else:
            spare = (north * east * west == 0) & (north * south * west == 0)
        removed = (skeleton > 0) & (count >= 2) & (count <= 6) & (turns == 1) & spare
        return tf.where(removed, 0.0, skeleton)

    @tf.function(jit_compile=True, autograph=False)
    def redraw(self, x: tf.Tensor, skeleton: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        """PEN_SHARE of the digits x [b, H, W] drawn again along their skeleton [b, H, W] with a round pen
        of their own width, antialiased over one pixel (and the contrast changed here when there is no blur)."""
        width = PEN_WIDTH[0] + (PEN_WIDTH[1] - PEN_WIDTH[0]) * u[:, 8]
        reach = math.ceil(PEN_WIDTH[1] / 2)
        neighbour = _neighbours(skeleton, reach)
        half = width[:, None, None] / 2 + 0.5
        redrawn = tf.zeros_like(skeleton)
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                distance = math.hypot(dy, dx)
                if distance <= reach + 0.5:  # each pixel covered by its nearest skeleton pixel's disc
                    redrawn = tf.maximum(redrawn, neighbour(dy, dx) * tf.clip_by_value(half - distance, 0.0, 1.0))
        x = tf.where((u[:, 7] < PEN_SHARE)[:, None, None], redrawn, x)
        return _contrast(x, u) if "contrast" in self.distortions and "blur" not in self.distortions else x

    @tf.function(jit_compile=True, autograph=False)
    def blur_rows(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return _binomial(x, 5, axis=2), _binomial(x, 9, axis=2)

    @tf.function(jit_compile=True, autograph=False)
    def blur_columns(self, x: tf.Tensor, rows5: tf.Tensor, rows9: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        """Blurred by its own amount (and the contrast changed): the two blurs' rows pass → the image."""
        x = _levels([x, _binomial(rows5, 5, axis=1), _binomial(rows9, 9, axis=1)], BLUR * u[:, 1])
        peak = tf.reduce_max(x, axis=[1, 2], keepdims=True)
        x = tf.where(peak > 0, x / tf.maximum(peak, 1e-6), 0.0)
        return _contrast(x, u) if "contrast" in self.distortions else x

    @tf.function(jit_compile=True, autograph=False)
    def mapping(self, x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        """Per digit, the map from an output pixel o to where it comes from: [b, 6] (A₀₀ A₀₁ A₁₀ A₁₁ c₀ c₁;
        source = c + A (o - c) + A · wobble(o), points as (x, y)), A undoing a shear (x += slant · y)
        and a rotation about c, the centre of the digit's ink box."""
        zero = tf.zeros_like(u[:, 0])
        slant = SLANT * (2 * u[:, 4] - 1) if "slant" in self.distortions else zero
        angle = ROTATION * (2 * u[:, 5] - 1) if "rotation" in self.distortions else zero
        ink = x > framing.INK_LEVEL / 255
        top, bottom = _extent(tf.reduce_any(ink, axis=2))
        left, right = _extent(tf.reduce_any(ink, axis=1))
        # Forward M = rotation · shear = [[cos, cos·slant − sin], [sin, sin·slant + cos]], det M = 1.
        cos, sin = tf.cos(angle), tf.sin(angle)
        m00, m01, m10, m11 = cos, cos * slant - sin, sin, sin * slant + cos
        return tf.stack([m11, -m01, -m10, m00, (left + right) / 2, (top + bottom) / 2], axis=1)

    @tf.function(jit_compile=True, autograph=False)
    def elastic(self, x: tf.Tensor, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The wobble of images like x [b, H, W]: displacements along x and y [b, H, W], up to ±ELASTIC,
        smooth (zero without it)."""
        height, width = x.shape[1], x.shape[2]
        if "elastic" not in self.distortions:
            zero = tf.zeros_like(x)
            return zero, zero
        rows, columns = height // ELASTIC_SPACING + 2, width // ELASTIC_SPACING + 2
        along_rows = tf.constant(_interpolation(height, rows))
        along_columns = tf.constant(_interpolation(width, columns))
        fields = []
        for component in (0, 1):
            grid = hash_words(keys[:, None, None], _SALT + 1 + component, tf.range(rows)[:, None], tf.range(columns))
            grid = ELASTIC * (2 * uniform(grid) - 1)
            fields.append(tf.einsum("hr,brc,wc->bhw", along_rows, grid, along_columns))
        return fields[0], fields[1]

    @tf.function(jit_compile=True, autograph=False)
    def coordinates(self, mapping: tf.Tensor, wobble_x: tf.Tensor, wobble_y: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Each output pixel's source → the index of its 2×2 neighbourhood in `neighbourhoods` flattened
        (int32 [b, H, W]) and the bilinear weights along x and y ([b, H, W] each)."""
        height, width = wobble_x.shape[1], wobble_x.shape[2]
        a00, a01, a10, a11, cx, cy = (mapping[:, i][:, None, None] for i in range(6))
        dx = tf.range(width, dtype=tf.float32)[None, None, :] + 0.5 - cx + wobble_x
        dy = tf.range(height, dtype=tf.float32)[None, :, None] + 0.5 - cy + wobble_y
        source_x = cx + a00 * dx + a01 * dy - 0.5
        source_y = cy + a10 * dx + a11 * dy - 0.5
        column, row = tf.floor(source_x), tf.floor(source_y)
        weight_x, weight_y = source_x - column, source_y - row
        # The neighbourhoods' image is padded by one pixel (black) on every side.
        column = tf.clip_by_value(tf.cast(column, tf.int32) + 1, 0, width + 1)
        row = tf.clip_by_value(tf.cast(row, tf.int32) + 1, 0, height + 1)
        example = tf.range(tf.shape(mapping)[0])[:, None, None] * ((height + 2) * (width + 2))
        return example + row * (width + 2) + column, weight_x, weight_y

    @tf.function(jit_compile=True, autograph=False)
    def neighbourhoods(self, x: tf.Tensor) -> tf.Tensor:
        """float32 [b, H, W] in [0, 1] → int32 [b, H + 2, W + 2]: each pixel of the image padded by one
        (black) with its right, lower and lower-right neighbours, a byte each."""
        p = tf.cast(tf.round(tf.pad(x, [[0, 0], [1, 2], [1, 2]]) * 255.0), tf.uint8)
        packed = tf.stack([p[:, :-1, :-1], p[:, :-1, 1:], p[:, 1:, :-1], p[:, 1:, 1:]], axis=-1)
        return tf.bitcast(packed, tf.int32)  # (little-endian: the first byte is the lowest)

    @tf.function(jit_compile=True, autograph=False)
    def gather(self, flat: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        return tf.gather(flat, index)

    @tf.function(jit_compile=True, autograph=False)
    def resampled(self, gathered: tf.Tensor, weight_x: tf.Tensor, weight_y: tf.Tensor) -> tf.Tensor:
        """Gathered neighbourhoods (int32 [b, H, W]) → the bilinear samples, uint8 [b, H, W]."""

        def byte(k: int) -> tf.Tensor:
            return tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(gathered, 8 * k), 255), tf.float32)

        upper = byte(0) + (byte(1) - byte(0)) * weight_x
        lower = byte(2) + (byte(3) - byte(2)) * weight_x
        return tf.cast(tf.clip_by_value(tf.round(upper + (lower - upper) * weight_y), 0, 255), tf.uint8)

    @tf.function(jit_compile=True, autograph=False)
    def grain(self, image: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """Finished sequences uint8 [b, H, W, 1] and their keys [b] → with grain, each its own amount."""
        height, width = image.shape[1], image.shape[2]
        # A fixed texture of noise rows (zero mean, unit standard deviation); each image row takes one.
        texture = tf.constant(np.random.default_rng(0).standard_normal((_NOISE_ROWS, width)).astype(np.float32))
        amount = NOISE * uniform(hash_words(keys, _SALT, _NOISE_UNIFORM))
        rows = below(hash_words(keys[:, None], _SALT + 3, tf.range(height)), _NOISE_ROWS)
        x = tf.cast(image[..., 0], tf.float32) + tf.gather(texture, rows) * amount[:, None, None]
        return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)[..., None]


def _contrast(x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    low = CONTRAST[0] * u[:, 2][:, None, None]
    high = 1.0 - CONTRAST[1] * u[:, 3][:, None, None]
    return tf.clip_by_value((x - low) / (high - low), 0.0, 1.0)


def _extent(present: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[b, size] bool → the first and one-past-the-last index where it holds ([b] each; the middle
    when nowhere)."""
    size = present.shape[1]
    index = tf.range(size, dtype=tf.float32)[None]
    first = tf.reduce_min(tf.where(present, index, float(size)), axis=1)
    last = tf.reduce_max(tf.where(present, index + 1, 0.0), axis=1)
    anywhere = tf.reduce_any(present, axis=1)
    return tf.where(anywhere, first, size / 2), tf.where(anywhere, last, size / 2)
