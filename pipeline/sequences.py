"""Digit sequences as a tf.data pipeline: stitched into cells, or free as people write numbers.

A sequence of length k (uniform in 1..max_digits) is k MNIST digits of one pool, left to right;
the label positions after the k-th are blank (label 10).
- `cells`: digit i in the i-th 28×28 cell, as MNIST centred it; the cells after the last digit are
  blank (zero pixels). One gather of 28-pixel rows lays the digits straight into place.
- `free`: as people write numbers: each digit its own size, baseline and gap to its neighbour,
  from overlapping to wide, framed by the framing rule a user's photo is framed by
  (`pipeline.free`, `pipeline.framing`).
- `mixed`: each sequence `cells` with probability CELLS_IN_MIXED, else `free` (for training one
  model that reads both).
Batches are built whole, inside XLA; an optional bilinear resize follows. Images stay uint8; the
model scales them on its device.

Determinism: every random number is a hash of (seed, step, example, slot), so batch n is a pure
function of (seed, n): the same seed gives the same bytes on any machine, and a stream started
at step n sees exactly what an uninterrupted one sees there. Example j of a global batch does
not depend on how many shards build the batch nor on how many steps one tf.data call builds.
A fixed set's sequence j has the same digits in every layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pipeline import distort, free
from pipeline.hashing import below, hash_words, uniform
from pipeline.mnist import DigitPool

BLANK = 10
TILE = 28
AUGMENT_MAX_SHIFT = 2  # pixels, each way, per digit and axis
# One tf.data call builds this many sequences (whole batches of them): per-call overhead, not
# the pixels, is what limits small batches.
_SEQUENCES_PER_CALL = 1024

LAYOUTS = ("cells", "free", "mixed")
CELLS_IN_MIXED = 0.25  # share of cell-layout sequences in the mixed layout

# Salts that keep the independent random streams of one seed apart.
_SET, _STREAM, _SHIFT, _EPOCH, _GEOMETRY, _LAYOUT, _FRAME, _DISTORT, _VERSION, _TILT = range(1, 11)
_NUMBERS = 20  # (11–14 are pipeline.distort's)


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """What the images look like.

    max_digits: the longest sequence, and the number of label positions.
    image_size: (height, width) of the images; other than the native 28 × 28·max_digits (None), the
        native image resized to it, bilinear.
    augment: (train data only) in cells, shift every digit independently by up to ±2 px each way;
        in the free layout, jitter the frame (scale ± 5 %, position ± 1 px).
    layout: "cells", "free" or "mixed" (see the module's note).
    distortions: other pens, hands and paper (`pipeline.distort.DISTORTIONS`), each sequence its own.
    """

    max_digits: int = 5
    image_size: tuple[int, int] | None = None
    augment: bool = False
    layout: str = "cells"
    distortions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        unknown = [name for name in self.distortions if name not in distort.DISTORTIONS]
        if unknown:
            raise ValueError(f"unknown distortion {unknown[0]!r}: choose from {', '.join(distort.DISTORTIONS)}")
        object.__setattr__(self, "distortions", tuple(n for n in distort.DISTORTIONS if n in self.distortions))
        if isinstance(self.max_digits, bool) or not isinstance(self.max_digits, int) or self.max_digits < 1:
            raise ValueError(f"max digits must be a whole number of at least 1, not {self.max_digits!r}")
        size = self.native_size if self.image_size is None else tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
            raise ValueError(f"image size must be two positive whole numbers, not {self.image_size!r}")
        object.__setattr__(self, "image_size", size)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) of the sequences as they are laid out, before any resize."""
        return (TILE, TILE * self.max_digits)

    @property
    def resized(self) -> bool:
        return self.image_size != self.native_size


@dataclasses.dataclass(frozen=True, eq=False)
class Numbers:
    """A user's numbers, trained on beside the sequences (`pipeline.folders` makes them): each row of a
    training batch is one of them with probability `share`, in one of its versions, chosen by hashes of
    (seed, step, row) like every other choice."""

    images: np.ndarray  # uint8 [V, N, H, W]: each number's versions (its own first), at the input size
    labels: np.ndarray  # int32 [N, K]
    share: float


def parse_image_size(text: str) -> tuple[int, int] | None:
    """'64x64' → (64, 64); 'native' → None. Raises ValueError with a readable message."""
    if text.strip().lower() == "native":
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"image size must look like 64x64 (height x width) or 'native', not {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, not {text!r}")
    return height, width


# --- resizing ---------------------------------------------------------------------------------


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the two input pixels it lies between and the weight of the second."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    first = np.minimum(np.floor(source), size_in - 1).astype(np.int32)
    second = np.minimum(first + 1, size_in - 1)
    return first, second, (source - first).astype(np.float32)


def _lerp(x: tf.Tensor, taps: tuple[np.ndarray, np.ndarray, np.ndarray], axis: int) -> tf.Tensor:
    first, second, weight = taps
    a, b = tf.gather(x, first, axis=axis), tf.gather(x, second, axis=axis)
    shape = [1] * x.shape.rank
    shape[axis] = -1
    return a + (b - a) * tf.reshape(weight, shape)


def resize(image: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """uint8 [b, h, w, 1] → uint8 [b, *image_size, 1]: bilinear, one axis at a time. The same numbers
    as tf.image.resize (half-pixel centres), several times faster than its CPU kernel or XLA's
    lowering of it."""
    height, width = image_size
    x = tf.cast(image, tf.float32)
    x = _lerp(x, _bilinear_taps(image.shape[2], width), axis=2)
    x = _lerp(x, _bilinear_taps(image.shape[1], height), axis=1)
    return tf.cast(tf.round(x), tf.uint8)


# --- building images ---------------------------------------------------------------------------


class _Builder:
    """Sequences of one pool: per-example keys in, images and labels out, all inside XLA."""

    def __init__(self, pool: DigitPool, config: SequenceConfig):
        self.config = config
        self.pool_size = len(pool)
        # The cell layout is stitched from whole rows of tiles; with distortions it goes through the
        # free renderer instead (a cell is a free digit placed in its cell), as the cells of `mixed` do.
        self.stitched = config.layout == "cells" and not config.distortions
        self.distorter = distort.Distorter(config.distortions)
        self.variants = distort.VARIANTS if config.distortions else 1
        versions = distort.pool_versions(pool, config.distortions) if config.distortions else pool.images[None]
        blank = np.zeros((len(versions), 1, TILE, TILE), np.uint8)
        tiles = np.concatenate([versions, blank], axis=1).reshape(-1, TILE, TILE)  # each version, then a blank
        if not self.stitched:
            self.boxes = tf.constant(free.ink_boxes(tiles))
        elif config.augment:
            # Horizontally shifted copies of every tile, so that a shift is only another row
            # index; vertical shifts index rows directly (out of range → the zero row at the end).
            # (The free renderer shifts the cells of `mixed` by any amount.)
            s = AUGMENT_MAX_SHIFT
            shifted = np.zeros((2 * s + 1, *tiles.shape), np.uint8)
            for i, dx in enumerate(range(-s, s + 1)):
                shifted[i, :, :, max(dx, 0) : TILE + min(dx, 0)] = tiles[:, :, max(-dx, 0) : TILE - max(dx, 0)]
            tiles = shifted.reshape(-1, TILE, TILE)
        rows = np.concatenate([tiles.reshape(-1, TILE), np.zeros((1, TILE), np.uint8)])
        self.zero_row = len(rows) - 1
        # A 28-pixel row moves as seven int32s: one gather fetches whole rows.
        self.rows = tf.constant(rows.view(np.int32))
        self.labels = tf.constant(np.concatenate([pool.labels, [BLANK]]).astype(np.int32))

    @tf.function(jit_compile=True, autograph=False)
    def draw(
        self, keys: tf.Tensor, shift_keys: tf.Tensor | None = None, distort_keys: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """keys [b] → the random choices: "digits" [b, K] (pool indices; blank = pool size after the
        length) and "tiles" [b, K] (the version of each digit drawn: `pipeline.distort`); stitched cells
        with augmentation: "shifts" [b, K, 2]; every other layout: the digits' "boxes" [b, K, 6]
        (`free.ink_boxes`) and their "scale", "top", "left" [b, K]. shift_keys and distort_keys [b]:
        the keys of augmentation and distortions (None: none)."""
        k, layout = self.config.max_digits, self.config.layout
        draws = hash_words(keys[:, None], tf.range(k + 1))
        length = 1 + below(draws[:, 0], k)
        digits = tf.where(tf.range(k) < length[:, None], below(draws[:, 1:], self.pool_size), self.pool_size)
        tiles = digits
        if distort_keys is not None:  # one of the digit's versions, MNIST's own (0) among them
            version = below(hash_words(distort_keys[:, None], _VERSION, tf.range(k)), self.variants)
            tiles = version * (self.pool_size + 1) + digits
        shifts = None
        if shift_keys is not None:
            s = AUGMENT_MAX_SHIFT
            shifts = below(hash_words(shift_keys[:, None, None], tf.range(k)[:, None], tf.range(2)), 2 * s + 1) - s
        if self.stitched:
            drawn = {"digits": digits, "tiles": tiles}
            return drawn if shifts is None else {**drawn, "shifts": shifts}
        boxes = tf.gather(self.boxes, tiles)
        words = hash_words(keys[:, None, None], _GEOMETRY, tf.range(k)[:, None], tf.range(free.UNIFORMS_PER_DIGIT))
        jitter = None
        if shift_keys is not None:
            jitter = uniform(hash_words(shift_keys[:, None], _FRAME, tf.range(free.UNIFORMS_PER_FRAME)))
        tilt = None
        if distort_keys is not None and "rotation" in self.config.distortions:
            tilt = distort.ROTATION * (2 * uniform(hash_words(distort_keys, _TILT)) - 1)
        if layout != "cells":
            placed = free.geometry(boxes, length, uniform(words), TILE * k, jitter, tilt)
        if layout != "free":
            cells = free.cell_geometry(boxes, length, shifts, TILE * k)
            if layout == "cells":
                placed = cells
            else:
                in_cells = (uniform(hash_words(keys, _LAYOUT)) < CELLS_IN_MIXED)[:, None]
                placed = [tf.where(in_cells, c, f) for c, f in zip(cells, placed, strict=True)]
        scale, top, left = placed
        return {"digits": digits, "tiles": tiles, "boxes": boxes, "scale": scale, "top": top, "left": left}

    # Separate XLA functions from `draw` and from each other: fused, XLA recomputes the hashes for
    # every row, and gathers every element of the column pass's transpose alone.
    @tf.function(jit_compile=True, autograph=False)
    def stitch(self, digits: tf.Tensor, shifts: tf.Tensor | None = None) -> tf.Tensor:
        """The cell layout: digits [b, K] (their tiles) → image uint8 [b, 28, 28·K, 1]."""
        row = tf.range(TILE)[None, :, None]
        if shifts is None:
            index = digits[:, None, :] * TILE + row  # [b, 28, K]: row r of every cell
        else:
            dx, dy = shifts[..., 0], shifts[..., 1]
            tile = (dx + AUGMENT_MAX_SHIFT) * (self.pool_size + 1) + digits
            source_row = row - dy[:, None, :]
            inside = (source_row >= 0) & (source_row < TILE)
            index = tf.where(inside, tile[:, None, :] * TILE + source_row, self.zero_row)
        rows = tf.gather(self.rows, index)  # [b, 28, K, 7] int32
        return tf.reshape(tf.bitcast(rows, tf.uint8), [-1, TILE, TILE * self.config.max_digits, 1])

    @tf.function(jit_compile=True, autograph=False)
    def resample_rows(self, drawn: dict[str, tf.Tensor]) -> tf.Tensor:
        tiles, boxes, scale, top = drawn["tiles"], drawn["boxes"], drawn["scale"], drawn["top"]
        return free.resample_rows(self.rows, self.zero_row, tiles, boxes, scale, top)

    @tf.function(jit_compile=True, autograph=False)
    def pack_columns(self, resampled: tf.Tensor) -> tf.Tensor:
        return free.pack_columns(resampled)

    @tf.function(jit_compile=True, autograph=False)
    def resample_columns(self, columns: tf.Tensor, drawn: dict[str, tf.Tensor]) -> tf.Tensor:
        width = TILE * self.config.max_digits
        return free.resample_columns(columns, drawn["boxes"], drawn["scale"], drawn["left"], width)

    def lay_out(self, drawn: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The choices of `draw` → image uint8 [b, 28, 28·K, 1], labels int32 [b, K]."""
        if self.stitched:
            image = self.stitch(drawn["tiles"], drawn.get("shifts"))
        else:
            image = self.resample_columns(self.pack_columns(self.resample_rows(drawn)), drawn)
        return {"image": image, "labels": tf.gather(self.labels, drawn["digits"])}

    @tf.function(jit_compile=True, autograph=False)
    def resize(self, image: tf.Tensor) -> tf.Tensor:
        return resize(image, self.config.image_size)

    def build(
        self, keys: tf.Tensor, shift_keys: tf.Tensor | None = None, distort_keys: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """keys [b] → image uint8 [b, H, W, 1], labels int32 [b, K]. shift_keys, distort_keys [b]: training's
        keys for augmentation and distortions (each step its own); without them a fixed set's sequence is
        distorted by its own key."""
        if self.config.distortions and distort_keys is None:
            distort_keys = hash_words(keys, _DISTORT)
        batch = self.lay_out(self.draw(keys, shift_keys, distort_keys))
        if "noise" in self.config.distortions:
            batch = {**batch, "image": self.distorter.grain(batch["image"], distort_keys)}
        if not self.config.resized:
            return batch
        return {**batch, "image": self.resize(batch["image"])}

    @staticmethod
    def set_keys(seed: int, members: tf.Tensor) -> tf.Tensor:
        """Keys of the members of the fixed set of a seed."""
        return hash_words(seed, _SET, members)


def _check_whole(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, not {value!r}")


def _plain(function):
    """A function traced as written: AutoGraph's rewrite (1–2 s at every start) has nothing to convert here."""
    return tf.autograph.experimental.do_not_convert(function)


def _finish(dataset: tf.data.Dataset, threads: int | None) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning model: its thread, asleep between optimisations (up to a minute apart), was often not
    # woken when the iterator went away, and a finished or signalled train.py waited up to 30 s (once
    # minutes) after its last line. Without it, map's AUTOTUNE takes the cores and prefetch sizes itself.
    options.autotune.enabled = False
    if threads is not None:
        _check_whole("threads", threads, 1)
        options.threading.private_threadpool_size = threads
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


@functools.lru_cache(maxsize=4)
def _builder(pool: DigitPool, config: SequenceConfig) -> _Builder:
    """One builder per (pool, config) in a process: its tables are made and its graphs traced and
    compiled (seconds) once, however many streams and sets it serves, of any seed (a validation set
    every epoch, a test's streams). A few are kept: each holds its pool's digits in every version and shift."""
    return _Builder(pool, config)


def train_batches(
    pool: DigitPool,
    config: SequenceConfig = SequenceConfig(),
    *,
    batch_size: int,
    seed: int,
    num_examples: int | None = None,
    start_step: int = 0,
    shard: tuple[int, int] = (0, 1),
    threads: int | None = None,
    numbers: Numbers | None = None,
) -> tf.data.Dataset:
    """An endless stream of training batches; the one at step n is a pure function of (seed, n).

    num_examples=None streams fresh sequences every step. A number fixes a set of that many
    sequences (a function of the seed), visited in a new order every epoch of
    num_examples // batch_size steps (the remainder waits for a later epoch's order).
    shard=(i, n) keeps rows i·B/n .. (i+1)·B/n of every global batch of B.
    numbers: a user's numbers, in place of a share of the rows (`Numbers`).

    Each element of the dataset holds several consecutive steps' batches, stacked on a leading
    axis (`numpy_batches` hands them out one step at a time).
    """
    if pool.split == "test":
        raise ValueError("test digits never feed training: build training batches from the train pool")
    _check_whole("batch size", batch_size, 1)
    _check_whole("start step", start_step, 0)
    index, count = shard
    if not 0 <= index < count or batch_size % count:
        raise ValueError(f"a batch of {batch_size} cannot be split into {count} equal shards (shard {index})")
    if num_examples is not None:
        _check_whole("number of examples", num_examples, 1)
        if num_examples < batch_size:
            raise ValueError(f"a fixed set of {num_examples} sequences cannot fill a batch of {batch_size}")
    builder = _builder(pool, config)
    per_shard = batch_size // count
    columns = tf.range(index * per_shard, (index + 1) * per_shard, dtype=tf.int64)  # this shard's rows
    steps_per_call = max(1, _SEQUENCES_PER_CALL // per_shard)
    mix = None if numbers is None else _mixer(numbers, builder, config)

    def make(first_step: tf.Tensor) -> dict[str, tf.Tensor]:
        steps = first_step + tf.range(steps_per_call, dtype=tf.int64)[:, None]  # [S, 1]
        if num_examples is None:
            keys = hash_words(seed, _STREAM, steps, columns)
        else:
            steps_per_epoch = num_examples // batch_size
            epoch, offset = steps // steps_per_epoch, steps % steps_per_epoch
            # index_shuffle: a stateless permutation of the set per epoch, without materialising it.
            positions = tf.reshape(offset * batch_size + columns, [-1])
            epochs = tf.reshape(tf.broadcast_to(epoch, [steps_per_call, per_shard]), [-1])
            epoch_seeds = tf.stack(
                [
                    tf.fill(tf.shape(epochs), tf.constant(seed, tf.int64)),
                    tf.fill(tf.shape(epochs), tf.constant(_EPOCH, tf.int64)),
                    epochs,
                ],
                -1,
            )
            # (the raw op: the public wrapper mishandles one seed per index)
            members = tf.raw_ops.RandomIndexShuffle(
                index=positions, seed=epoch_seeds, max_index=tf.constant(num_examples - 1, tf.int64)
            )
            keys = builder.set_keys(seed, members)
        shift_keys = hash_words(seed, _SHIFT, steps, columns) if config.augment else None
        distort_keys = hash_words(seed, _DISTORT, steps, columns) if config.distortions else None
        flat = builder.build(*(None if k is None else tf.reshape(k, [-1]) for k in (keys, shift_keys, distort_keys)))
        if mix is not None:
            flat = mix(flat, tf.reshape(hash_words(seed, _NUMBERS, steps, columns), [-1]))
        return {name: tf.reshape(t, [steps_per_call, per_shard, *t.shape[1:]]) for name, t in flat.items()}

    calls = tf.data.Dataset.range(start_step, 2**62, steps_per_call)
    return _finish(calls.map(_plain(make), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), threads)


def _mixer(numbers: Numbers, builder: _Builder, config: SequenceConfig):
    """A function (batch, keys [b]) → the batch with each row, with probability numbers.share, one of the
    numbers in one of its versions (with grain when the sequences have it)."""
    versions, count, height, width = numbers.images.shape
    if (height, width) != config.image_size or numbers.labels.shape[1:] != (config.max_digits,):
        raise ValueError(
            f"the numbers are {height}x{width} with {numbers.labels.shape[1]} positions; the sequences "
            f"{config.image_size[0]}x{config.image_size[1]} with {config.max_digits}"
        )
    images = tf.constant(numbers.images.reshape(-1, height, width, 1))
    labels = tf.constant(numbers.labels.astype(np.int32))

    def mix(batch: dict[str, tf.Tensor], keys: tf.Tensor) -> dict[str, tf.Tensor]:
        draws = hash_words(keys[:, None], tf.range(3))
        taken = uniform(draws[:, 0]) < numbers.share
        number = below(draws[:, 1], count)
        image = tf.gather(images, below(draws[:, 2], versions) * count + number)
        if "noise" in config.distortions:
            image = builder.distorter.grain(image, keys)
        return {
            "image": tf.where(taken[:, None, None, None], image, batch["image"]),
            "labels": tf.where(taken[:, None], tf.gather(labels, number), batch["labels"]),
        }

    return mix


def eval_batches(
    pool: DigitPool,
    config: SequenceConfig = SequenceConfig(),
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    threads: int | None = None,
) -> tf.data.Dataset:
    """One pass, in order, over the fixed set of num_examples sequences of this seed.

    The same set `train_batches` visits for that seed and size. The last batch is smaller when
    batch_size does not divide num_examples. Never augmented. Each element is a stack of one
    step ([1, B, ...]), as `train_batches` stacks several: `numpy_batches` takes both.
    """
    if config.augment:
        raise ValueError("evaluation data is never augmented: pass a config with augment=False")
    _check_whole("number of examples", num_examples, 1)
    _check_whole("batch size", batch_size, 1)
    builder = _builder(pool, config)

    def make(start: tf.Tensor) -> dict[str, tf.Tensor]:
        members = tf.range(start, tf.minimum(start + batch_size, num_examples))
        batch = builder.build(builder.set_keys(seed, members))
        return {name: t[None] for name, t in batch.items()}  # a stack of one step, like train_batches'

    starts = tf.data.Dataset.range(0, num_examples, batch_size)
    return _finish(starts.map(_plain(make), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), threads)


def numpy_stacks(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's elements as NumPy arrays sharing the tensors' memory: stacks of steps' batches
    ([S, B, ...]: several steps per element for training, one for evaluation). (`_numpy()` is what
    `as_numpy_iterator` calls too: a view of a CPU tensor's buffer, no copy.)"""
    for element in dataset:
        yield {name: tensor._numpy() for name, tensor in element.items()}


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches, one step at a time, as views into `numpy_stacks`, which costs nothing."""
    for arrays in numpy_stacks(dataset):
        for step in range(arrays["labels"].shape[0]):
            yield {name: array[step] for name, array in arrays.items()}


def fixed_set(
    pool: DigitPool, config: SequenceConfig, num_examples: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed set `eval_batches` builds, whole in memory: images uint8 [N, H, W], labels int32 [N, K]."""
    parts = list(numpy_batches(eval_batches(pool, config, num_examples=num_examples, batch_size=1000, seed=seed)))
    return np.concatenate([p["image"][..., 0] for p in parts]), np.concatenate([p["labels"] for p in parts])
