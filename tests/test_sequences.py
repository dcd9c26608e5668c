"""The stitched-sequence pipeline on real MNIST: honest sources, layout, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiles

from pipeline import distort, framing
from pipeline.hashing import hash_words
from pipeline.mnist import DigitPool
from pipeline.sequences import (
    AUGMENT_MAX_SHIFT,
    BLANK,
    CELLS_IN_MIXED,
    SequenceConfig,
    _builder,
    eval_batches,
    numpy_batches,
    parse_image_size,
    train_batches,
)


def first(dataset: tf.data.Dataset, count: int) -> list[dict[str, np.ndarray]]:
    batches = numpy_batches(dataset)
    return [{k: v.copy() for k, v in next(batches).items()} for _ in range(count)]


def fingerprints(images: np.ndarray) -> dict[bytes, int]:
    return {image.tobytes(): i for i, image in enumerate(images)}


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def check_sources(images, labels, pool, others, k=5):
    """Every non-blank cell is a digit of `pool` with its label; blanks are zero and trailing."""
    index = fingerprints(pool.images)
    foreign = set().union(*(fingerprints(o.images) for o in others))
    cells = tiles(images, k)
    for cell_row, label_row in zip(cells, labels, strict=True):
        length = int(np.sum(label_row != BLANK))
        assert 1 <= length <= k
        assert np.all(label_row[:length] != BLANK) and np.all(label_row[length:] == BLANK)
        for cell, label in zip(cell_row[:length], label_row[:length], strict=True):
            key = cell.tobytes()
            assert key in index, "a digit that is not from its own pool"
            assert pool.labels[index[key]] == label
            assert key not in foreign
        assert not cell_row[length:].any(), "blank cells must be all zero"


def test_test_sequences_use_only_mnist_test_digits(pools):
    batches = concat(first(eval_batches(pools["test"], num_examples=600, batch_size=256, seed=3), 3))
    assert batches["image"].shape == (600, 28, 140, 1) and batches["image"].dtype == np.uint8
    assert batches["labels"].shape == (600, 5) and batches["labels"].dtype == np.int32
    check_sources(batches["image"], batches["labels"], pools["test"], [pools["train"], pools["validation"]])


def test_train_and_validation_sequences_keep_to_their_pools(pools):
    train = concat(first(train_batches(pools["train"], batch_size=128, seed=1), 2))
    check_sources(train["image"], train["labels"], pools["train"], [pools["validation"], pools["test"]])
    val = concat(first(eval_batches(pools["validation"], num_examples=256, batch_size=128, seed=1), 2))
    check_sources(val["image"], val["labels"], pools["validation"], [pools["train"], pools["test"]])


def test_training_on_test_digits_is_refused(pools):
    with pytest.raises(ValueError, match="test digits never feed training"):
        train_batches(pools["test"], batch_size=8, seed=0)


def test_lengths_and_digits_are_roughly_uniform(pools):
    labels = concat(first(train_batches(pools["train"], batch_size=1000, seed=5), 10))["labels"]
    lengths = np.sum(labels != BLANK, axis=1)
    share = np.bincount(lengths, minlength=6)[1:] / len(lengths)
    assert np.all(np.abs(share - 0.2) < 0.02), share
    digits = labels[labels != BLANK]
    assert np.all(np.abs(np.bincount(digits, minlength=10) / len(digits) - 0.1) < 0.02)


ALL = distort.DISTORTIONS


@pytest.mark.parametrize(
    "num_examples,layout,distortions",
    [(None, "cells", ()), (1000, "cells", ()), (None, "free", ()), (1000, "mixed", ()), (None, "mixed", ALL),
     (1000, "cells", ALL)],
)  # fmt: skip
def test_same_seed_same_bytes_other_seed_different(pools, num_examples, layout, distortions):
    config = SequenceConfig(layout=layout, augment=True, distortions=distortions)

    def stream(seed):
        return concat(
            first(train_batches(pools["train"], config, batch_size=64, seed=seed, num_examples=num_examples), 3)
        )

    a, b, c = stream(7), stream(7), stream(8)
    assert a["image"].tobytes() == b["image"].tobytes() and np.array_equal(a["labels"], b["labels"])
    assert a["image"].tobytes() != c["image"].tobytes()


@pytest.mark.parametrize(
    "num_examples,augment,start,layout,distortions",
    [(None, False, 37, "cells", ()), (640, False, 23, "cells", ()), (None, True, 5, "cells", ()),
     (640, True, 61, "cells", ()), (None, True, 45, "mixed", ()), (640, False, 29, "free", ()),
     (None, True, 33, "mixed", ALL), (640, False, 21, "free", ALL)],
)  # fmt: skip
def test_resumed_stream_sees_the_batches_of_a_fresh_one(pools, num_examples, augment, start, layout, distortions):
    config = SequenceConfig(augment=augment, layout=layout, distortions=distortions)

    def stream(start_step):
        return train_batches(
            pools["train"], config, batch_size=32, seed=11, num_examples=num_examples, start_step=start_step
        )

    fresh = first(stream(0), start + 3)[start:]
    resumed = first(stream(start), 3)
    for a, b in zip(fresh, resumed, strict=True):
        assert a["image"].tobytes() == b["image"].tobytes() and np.array_equal(a["labels"], b["labels"])


@pytest.mark.parametrize("layout,distortions", [("cells", ()), ("mixed", ()), ("mixed", ALL)])
def test_shards_make_the_same_global_batch(pools, layout, distortions):
    config = SequenceConfig(layout=layout, augment=True, distortions=distortions)
    whole = first(train_batches(pools["train"], config, batch_size=64, seed=2), 2)
    halves = [first(train_batches(pools["train"], config, batch_size=64, seed=2, shard=(i, 2)), 2) for i in range(2)]
    for step in range(2):
        joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        assert joined.tobytes() == whole[step]["image"].tobytes()


def test_fixed_set_epoch_is_a_permutation_of_the_eval_set(pools):
    # 1000 sequences in batches of 100: each epoch of 10 steps visits every sequence once, in a new order.
    epochs = first(train_batches(pools["train"], batch_size=100, seed=4, num_examples=1000), 20)
    the_set = concat(first(eval_batches(pools["train"], num_examples=1000, batch_size=300, seed=4), 4))
    expected = sorted(image.tobytes() for image in the_set["image"])
    orders = []
    for epoch in (epochs[:10], epochs[10:]):
        images = concat(epoch)["image"]
        assert sorted(image.tobytes() for image in images) == expected
        orders.append([image.tobytes() for image in images])
    assert orders[0] != orders[1]


def test_eval_batches_cover_the_set_with_a_short_last_batch(pools):
    batches = first(eval_batches(pools["test"], num_examples=250, batch_size=100, seed=0), 3)
    assert [len(b["labels"]) for b in batches] == [100, 100, 50]
    again = concat(first(eval_batches(pools["test"], num_examples=250, batch_size=250, seed=0), 1))
    assert concat(batches)["image"].tobytes() == again["image"].tobytes()


def test_streams_run_without_the_autotuning_model_whose_thread_held_the_exit(pools):
    # With tf.data's autotuning model, dropping a stream waited for its thread's sleep between optimisations
    # (a finished or signalled train.py sat up to 30 s, once minutes, after its last line): no such thread.
    streams = (
        train_batches(pools["train"], batch_size=8, seed=0),
        eval_batches(pools["test"], num_examples=8, batch_size=8, seed=0),
    )
    for dataset in streams:
        assert dataset.options().autotune.enabled is False and dataset.options().deterministic is True


def test_augmentation_shifts_each_digit_by_at_most_two_pixels(pools):
    plain = first(train_batches(pools["train"], batch_size=64, seed=9), 1)[0]
    moved = first(train_batches(pools["train"], SequenceConfig(augment=True), batch_size=64, seed=9), 1)[0]
    assert np.array_equal(plain["labels"], moved["labels"])
    assert plain["image"].tobytes() != moved["image"].tobytes()
    s = AUGMENT_MAX_SHIFT
    for before, after in zip(
        tiles(plain["image"], 5).reshape(-1, 28, 28), tiles(moved["image"], 5).reshape(-1, 28, 28), strict=True
    ):
        padded = np.pad(before, s)
        shifted = [
            padded[s - dy : s - dy + 28, s - dx : s - dx + 28] for dy in range(-s, s + 1) for dx in range(-s, s + 1)
        ]
        assert any(np.array_equal(after, candidate) for candidate in shifted)


def test_eval_data_is_never_augmented(pools):
    with pytest.raises(ValueError, match="never augmented"):
        eval_batches(pools["test"], SequenceConfig(augment=True), num_examples=10, batch_size=5, seed=0)


@pytest.mark.parametrize("layout", ["cells", "free"])
def test_64x64_is_bilinear_resize_of_the_native_image(pools, layout):
    native = first(
        eval_batches(pools["test"], SequenceConfig(layout=layout), num_examples=64, batch_size=64, seed=1), 1
    )[0]
    config = SequenceConfig(image_size=(64, 64), layout=layout)
    squashed = first(eval_batches(pools["test"], config, num_examples=64, batch_size=64, seed=1), 1)[0]
    assert squashed["image"].shape == (64, 64, 64, 1) and squashed["image"].dtype == np.uint8
    expected = tf.cast(tf.round(tf.image.resize(native["image"], (64, 64), method="bilinear")), tf.uint8).numpy()
    assert np.abs(squashed["image"].astype(int) - expected).max() <= 1
    assert np.array_equal(squashed["labels"], native["labels"])


def test_max_digits_sets_width_and_positions(pools):
    batch = first(train_batches(pools["train"], SequenceConfig(max_digits=3), batch_size=50, seed=0), 1)[0]
    assert batch["image"].shape == (50, 28, 84, 1) and batch["labels"].shape == (50, 3)
    check_sources(batch["image"], batch["labels"], pools["train"], [pools["test"]], k=3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_digits": 0}, "max digits must be a whole number of at least 1"),
        ({"max_digits": -2}, "max digits must be a whole number of at least 1"),
        ({"image_size": (-64, 64)}, "image size must be two positive whole numbers"),
        ({"image_size": (64,)}, "image size must be two positive whole numbers"),
        ({"layout": "spiral"}, "unknown layout 'spiral': choose one of cells, free, mixed"),
    ],
)
def test_bad_configs_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceConfig(**kwargs)


@pytest.mark.parametrize("text", ["64", "0x64", "-3x5", "axb", "64x64x1"])
def test_bad_image_sizes_are_refused_clearly(text):
    with pytest.raises(ValueError, match="image size"):
        parse_image_size(text)


def test_bad_batch_arguments_are_refused_clearly(pools):
    with pytest.raises(ValueError, match="batch size must be a whole number of at least 1"):
        train_batches(pools["train"], batch_size=0, seed=0)
    with pytest.raises(ValueError, match="start step"):
        train_batches(pools["train"], batch_size=8, seed=0, start_step=-1)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        train_batches(pools["train"], batch_size=8, seed=0, num_examples=4)
    with pytest.raises(ValueError, match="equal shards"):
        train_batches(pools["train"], batch_size=9, seed=0, shard=(0, 2))


# --- the free layout ---------------------------------------------------------------------------


def _eval_set(pool, layout: str, count: int, **config) -> dict[str, np.ndarray]:
    dataset = eval_batches(pool, SequenceConfig(layout=layout, **config), num_examples=count, batch_size=count, seed=6)
    return first(dataset, 1)[0]


@pytest.mark.parametrize("layout", ["free", "mixed"])
def test_every_layout_holds_a_sets_digits_the_cells_hold(pools, layout):
    """Sequence j of a fixed set has the same digits, of the same pool, in every layout."""
    cells, other = _eval_set(pools["test"], "cells", 300), _eval_set(pools["test"], layout, 300)
    check_sources(cells["image"], cells["labels"], pools["test"], [pools["train"], pools["validation"]])
    assert np.array_equal(cells["labels"], other["labels"])
    different = [a.tobytes() != b.tobytes() for a, b in zip(cells["image"], other["image"], strict=True)]
    assert np.mean(different) > (0.99 if layout == "free" else 0.6)
    written = other["image"][np.array(different)]
    assert not written[:, :, -3:].any()  # the written numbers' ink ends before the frame's margin: none is cut off


def test_free_sequences_are_framed_by_the_framing_rule(pools):
    """Framing a free-layout sequence again, by the rule a user's image is framed with, changes next to nothing."""
    images = _eval_set(pools["test"], "free", 400)["image"][..., 0]
    changes, framed = [], []
    for image in images:
        top, left, height, width = framing.ink_box(image)
        framed.append(left in (4, 5) and (height in (19, 20, 21) or width >= 130))
        changes.append(np.abs(framing.frame(image, 140).astype(int) - image).mean())
    assert np.mean(framed) > 0.97  # (a small digit scaled up a lot blurs: its ink box shrinks by a pixel or two)
    assert np.mean(changes) < 0.3 and np.mean(np.array(changes) < 1) > 0.95, sorted(changes)[-10:]


def test_free_digits_stand_left_to_right_as_their_positions(pools):
    builder = _builder(pools["test"], SequenceConfig(layout="free"))
    drawn = builder.draw(hash_words(3, np.arange(2000)))
    labels = builder.lay_out(drawn)["labels"].numpy()
    left, scale = drawn["left"].numpy(), drawn["scale"].numpy()
    lengths = np.sum(labels != BLANK, axis=1)
    for row_left, row_scale, length in zip(left, scale, lengths, strict=True):
        assert np.all(np.diff(row_left[:length]) > 0) and np.all(row_left[length:] > 140)
        assert 3 <= row_left[0] <= 5 and np.all((row_scale[:length] > 0.4) & (row_scale[:length] < 3))


def test_the_free_layout_spans_overlapping_to_wide(pools):
    """Neighbouring digits' ink: some overlapping, some touching, some apart (in the framed image)."""
    builder = _builder(pools["test"], SequenceConfig(layout="free"))
    drawn = builder.draw(hash_words(4, np.arange(4000)))
    boxes, scale, left = (drawn[name].numpy() for name in ("boxes", "scale", "left"))
    right = left + boxes[..., 3] * scale
    gaps = (left[:, 1:] - right[:, :-1])[left[:, 1:] < 140]  # between neighbours that exist
    narrower = np.minimum((boxes[..., 3] * scale)[:, 1:], (boxes[..., 3] * scale)[:, :-1])[left[:, 1:] < 140]
    overlap = -gaps / narrower
    assert 0.15 < np.mean(gaps < 0) < 0.45 and np.mean(overlap > 0.2) > 0.05 and overlap.max() <= 0.41
    assert np.mean((gaps >= 0) & (gaps < 3)) > 0.1 and np.mean(gaps > 6) > 0.2


def test_mixed_lays_out_its_share_in_exact_cells(pools):
    cells, mixed = _eval_set(pools["test"], "cells", 2000), _eval_set(pools["test"], "mixed", 2000)
    same = np.array([a.tobytes() == b.tobytes() for a, b in zip(cells["image"], mixed["image"], strict=True)])
    assert abs(same.mean() - CELLS_IN_MIXED) < 0.03


# --- distortions ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(pools):
    """Every distortion's versions of 600 validation digits, alone and all together: {name: [V, N, 28, 28]}."""
    digits = pools["validation"].images[:600]
    out = {name: distort.Distorter((name,)).variants(digits, seed=3) for name in distort.PER_DIGIT}
    out["all"] = distort.Distorter(ALL).variants(digits, seed=3)
    return out


def _ink_area(images: np.ndarray) -> np.ndarray:
    return (images > framing.INK_LEVEL).sum(axis=(-1, -2))


def test_a_digits_first_version_is_mnists_own_the_others_its_own_each(pools, versions):
    digits = pools["validation"].images[:600]
    for name, made in versions.items():
        assert made.shape == (distort.VARIANTS, *digits.shape) and made.dtype == np.uint8
        assert np.array_equal(made[0], digits), name
        changed = np.mean([np.mean(np.any(made[v] != digits, axis=(1, 2))) for v in range(1, distort.VARIANTS)])
        assert changed > (distort.PEN_SHARE - 0.1 if name == "pen" else 0.9), (name, changed)
        assert not np.array_equal(made[1], made[2])
    again = distort.Distorter(ALL).variants(digits, seed=3)
    assert np.array_equal(again, versions["all"])  # a function of the seed
    assert not np.array_equal(distort.Distorter(ALL).variants(digits, seed=4)[1:], versions["all"][1:])


def test_a_pools_versions_are_kept_beside_it_read_back_and_made_again_when_damaged(pools, tmp_path):
    digits, labels = pools["validation"].images[:300], pools["validation"].labels[:300]
    names = ("thickness", "slant")

    def versions() -> np.ndarray:  # as a new process gets them: a pool of its own (each pool's are cached)
        return distort.pool_versions(DigitPool("validation", digits, labels, folder=tmp_path), names)

    made = distort.Distorter(names).variants(digits)
    left = tmp_path / f".{distort._versions_name(digits, names)}.1.partial"  # a process killed while writing left it
    left.touch()
    assert np.array_equal(versions(), made)
    [kept] = tmp_path.iterdir()  # one file, no partial one left
    assert kept.name.startswith("digitseq-versions-") and kept.suffix == ".npz"
    np.savez_compressed(kept, versions=255 - made[1:])  # what is kept is what the next process reads
    assert np.array_equal(versions()[1:], 255 - made[1:])
    other_code = tmp_path / f"{kept.name.rsplit('-', 1)[0]}-000000000000.npz"
    other_code.write_bytes(kept.read_bytes())
    kept.write_bytes(kept.read_bytes()[:-1000])  # damaged: made again, kept whole, the other code's removed
    assert np.array_equal(versions(), made) and np.array_equal(np.load(kept)["versions"], made[1:])
    assert not other_code.exists()
    assert np.array_equal(distort.pool_versions(DigitPool("validation", digits, labels), names), made)  # no folder
    distort.pool_versions(DigitPool("validation", digits, labels, folder=tmp_path), ("blur",))
    assert len(list(tmp_path.iterdir())) == 2  # other distortions: a file of their own beside it


def test_each_distortion_does_what_it_says(pools, versions):
    digits = pools["validation"].images[:600].astype(float)
    area = _ink_area(digits)
    thick = _ink_area(versions["thickness"][1:]) / area
    assert (thick > 1.3).mean() > 0.4 and (thick < 0.95).mean() > 0.05 and thick.max() > 2  # thicker, some thinner
    blurred = versions["blur"][1:].astype(float)
    steepest = np.abs(np.diff(blurred, axis=-1)).max(axis=(-1, -2))
    sharpness = steepest / np.abs(np.diff(digits, axis=-1)).max(axis=(-1, -2))
    assert np.median(sharpness) < 0.8 and blurred.max(axis=(-1, -2)).min() > 200  # softer; the strongest ink white
    pen = versions["pen"][1:]
    redrawn = np.any(pen != digits, axis=(-1, -2))
    widths = _ink_area(pen)[redrawn] / np.broadcast_to(area, pen.shape[:2])[redrawn]
    assert (widths < 0.7).mean() > 0.15 and (widths > 1.3).mean() > 0.15  # from a hairline to a marker
    steepest = np.abs(np.diff(pen[redrawn].astype(float), axis=-1)).max(axis=(-1, -2))
    assert np.median(steepest) > 200  # hard edges: one pen, not a scan's soft stroke
    for name in ("slant", "rotation", "elastic"):  # the ink moves, and stays about as much ink
        moved = versions[name][1:].astype(float)
        assert np.mean(np.abs(moved - digits)) > 3, name
        assert 0.85 < np.median(_ink_area(moved) / area) < 1.15, name
    slanted = versions["slant"][1:].astype(float)
    rows = np.arange(28)[:, None]
    tops, bottoms = slanted[..., :10, :], slanted[..., 18:, :]
    columns = np.arange(28)
    lean = (tops * columns).sum((-1, -2)) / tops.sum((-1, -2)).clip(1) - (bottoms * columns).sum((-1, -2)) / (
        bottoms.sum((-1, -2)).clip(1)
    )
    assert np.std(lean) > 1.0 and rows.size == 28  # the tops lean left of the bottoms in some, right in others


def test_noise_is_grain_on_the_finished_sequence(pools):
    clean = _eval_set(pools["test"], "free", 64, distortions=())
    grainy = _eval_set(pools["test"], "free", 64, distortions=("noise",))
    assert np.array_equal(clean["labels"], grainy["labels"])
    difference = grainy["image"].astype(float) - clean["image"]
    assert 2 < difference.std() < 12
    paper = clean["image"] == 0
    assert (grainy["image"][paper] > 0).mean() > 0.2  # the paper has grain; half of it is clipped at black


def test_distorted_written_numbers_are_framed_by_the_framing_rule(pools):
    """A thick-pen or turned number is framed by its own ink box, as a user's photo of it would be."""
    images = _eval_set(pools["test"], "free", 300, distortions=ALL)["image"][..., 0]
    framed = []
    for image in images:
        top, left, height, width = framing.ink_box(image)
        framed.append(left in (3, 4, 5) and (height in (19, 20, 21) or width >= 129))
    assert np.mean(framed) > 0.9


def test_test_sets_are_mnists_own_unless_distortions_are_named(pools):
    plain = _eval_set(pools["test"], "mixed", 200, distortions=())
    assert np.array_equal(plain["image"], _eval_set(pools["test"], "mixed", 200)["image"])
    distorted = _eval_set(pools["test"], "mixed", 200, distortions=ALL)
    assert np.array_equal(distorted["labels"], plain["labels"])
    assert np.mean(np.any(distorted["image"] != plain["image"], axis=(1, 2, 3))) > 0.9
    assert np.array_equal(distorted["image"], _eval_set(pools["test"], "mixed", 200, distortions=ALL)["image"])


def test_unknown_distortions_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown distortion 'smudge': choose from thickness, pen, blur"):
        SequenceConfig(distortions=("smudge",))
