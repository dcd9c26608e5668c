"""model/: the networks' pieces, the metrics on hand-computed cases, model.h5 read by Keras itself."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model import keras_h5, metrics, training
from model import networks as nets

B = nets.NUM_CLASSES - 1  # blank


def test_max_pool_matches_flax_and_its_gradient():
    x = jax.random.normal(jax.random.key(0), (3, 9, 13, 4))  # odd sizes: the edge is dropped
    assert np.array_equal(nets.max_pool(x, 2), nn.max_pool(x, (2, 2), (2, 2)))
    ours = jax.grad(lambda x: jnp.sum(nets.max_pool(x, 2) ** 2))(x)
    flax_ = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
    np.testing.assert_allclose(ours, flax_, rtol=1e-6)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_dropout_keeps_the_right_share_and_scales(rate):
    mask = nets.dropout_mask(jax.random.key(1), (400, 31, 7), rate)
    assert mask.shape == (400, 31, 7)
    assert abs(float(mask.mean()) - (1 - rate)) < 0.01
    other = nets.dropout_mask(jax.random.key(2), (400, 31, 7), rate)
    assert not np.array_equal(mask, other)
    x = jnp.ones((64, 50))
    out = nets.ByteDropout(rate).apply({}, x, True, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(np.unique(np.asarray(out)), [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert np.array_equal(nets.ByteDropout(rate).apply({}, x, False), x)


def _logits(predicted: np.ndarray) -> jnp.ndarray:
    return jax.nn.one_hot(jnp.asarray(predicted), nets.NUM_CLASSES) * 10.0


def test_metrics_hand_computed():
    labels = np.array([[3, 1, B], [7, B, B], [2, 2, 2], [B, B, B]])
    predicted = np.array([[3, 1, B], [7, 4, B], [2, 2, 5], [B, B, B]])
    figures = metrics.summarize(metrics.counts(_logits(predicted), jnp.asarray(labels)))
    assert figures["num_examples"] == 4
    assert figures["per_position_accuracy"] == [1.0, 0.75, 0.75]
    assert figures["individual_accuracy"] == pytest.approx(10 / 12)
    assert figures["digit_accuracy"] == pytest.approx(5 / 6)  # six digits, the 2 at the end is wrong
    assert figures["sequence_accuracy"] == 0.5  # rows 0 and 3
    assert figures["length_accuracy"] == 0.75  # only row 1 predicts a wrong length (2 for 1)
    per_length = figures["per_length_sequence_accuracy"]
    assert per_length["1"] == 0.0 and per_length["2"] == 1.0 and per_length["3"] == 0.0
    confusion = np.array(figures["confusion"])
    assert confusion.sum() == 12 and confusion[B, 4] == 1 and confusion[2, 5] == 1 and confusion[B, B] == 5


def test_metrics_perfect_all_blank_and_masked_rows():
    labels = np.full((3, 5), B)
    perfect = metrics.summarize(metrics.counts(_logits(labels), jnp.asarray(labels)))
    assert perfect["sequence_accuracy"] == 1.0 and perfect["individual_accuracy"] == 1.0
    assert np.isnan(perfect["digit_accuracy"])  # no digits at all: undefined, not 100 %
    wrong = np.zeros((3, 5), int)
    masked = metrics.counts(_logits(wrong), jnp.asarray(labels), mask=jnp.array([0, 0, 0]))
    assert float(masked["examples"]) == 0 and float(masked["correct"].sum()) == 0
    halves = metrics.add(
        metrics.counts(_logits(labels[:1]), jnp.asarray(labels[:1])),
        metrics.counts(_logits(wrong[1:]), jnp.asarray(labels[1:])),
    )
    assert metrics.summarize(halves)["sequence_accuracy"] == pytest.approx(1 / 3)


def test_an_ensemble_reads_its_members_mean_probabilities():
    network = nets.build(nets.DEFAULT, 3, members=3)
    variables = nets.init_variables(network, (28, 84), seed=0)
    members = nets.member_variables(network, variables)
    single = nets.build(nets.DEFAULT, 3)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 84, 1)).astype(np.uint8)
    each = [nets.probabilities(single, member, images) for member in members]
    assert not np.allclose(each[0], each[1])  # each member its own initial weights
    np.testing.assert_allclose(nets.probabilities(network, variables, images), np.mean(each, axis=0), atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_an_ensemble_step_trains_each_member_as_it_would_alone(label_smoothing):
    layers = tuple(layer for layer in nets.DEFAULT.layers if not isinstance(layer, nets.Dropout))  # same keys
    ensemble, single = nets.Network(layers, positions=2, members=2), nets.Network(layers, positions=2)
    optimizer = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (16, 28, 56, 1)).astype(np.uint8),
        "labels": rng.integers(0, nets.NUM_CLASSES, (16, 2)).astype(np.int32),
    }
    variables = jax.tree.map(np.asarray, nets.init_variables(ensemble, (28, 56), seed=0))  # kept: steps donate
    state = training.create_state(jax.tree.map(jnp.asarray, variables), optimizer, 2)
    trained = training.jit_train_step(ensemble, optimizer, 0, label_smoothing)(state, batch)
    step = training.jit_train_step(single, optimizer, 0, label_smoothing)
    for before, after in zip(nets.member_variables(ensemble, variables),
                             nets.member_variables(ensemble, trained.variables), strict=True):  # fmt: skip
        alone = step(training.create_state(jax.tree.map(jnp.asarray, before), optimizer, 2), batch)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), alone.variables, after)


# The reader every model had before the free layout (one classifier reading the features under each cell):
# their workdirs and model.h5 files are still read, and rewritten.
CELL_READER = nets.Preset(
    "cells", "the default's trunk, read cell by cell", None, (*nets.DEFAULT.layers[:10], nets.Cells(),
    nets.Dense("dense", 128), nets.Dropout(0.25), nets.Heads()),
)  # fmt: skip


def test_a_judged_model_reads_by_its_judge():
    """A judge sure of the hand reads as the fine-tuned member (and shows where it looked), sure of the other
    hand as the start, and in between mixes their probabilities by its sigmoid."""
    network = nets.Network(nets.DEFAULT.layers, positions=2, members=2, judged=True)
    variables = jax.tree.map(np.asarray, nets.init_variables(network, (28, 56), seed=0))
    start, tuned = nets.member_variables(network, variables)
    single = nets.build(nets.DEFAULT, 2)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 56, 1)).astype(np.uint8)
    each = [nets.probabilities(single, member, images) for member in (start, tuned)]
    looked = [nets.where_looked(single, member, images)[1] for member in (start, tuned)]
    assert not np.allclose(*each, atol=1e-3) and not np.allclose(*looked, atol=1e-3)
    kernel = variables["params"]["judge"]["kernel"]
    assert kernel.shape == (3 * 96, 1)  # mean, max and mean square of conv3's 96 channels
    for bias, expected in ((-40.0, each[0]), (40.0, each[1]), (0.0, None)):
        judge = {"kernel": np.zeros_like(kernel), "bias": np.array([bias], np.float32)}
        judged = {**variables, "params": {**variables["params"], "judge": judge}}
        got = nets.probabilities(network, judged, images)
        np.testing.assert_allclose(got, (each[0] + each[1]) / 2 if expected is None else expected, atol=1e-6)
        if bias:
            np.testing.assert_allclose(nets.where_looked(network, judged, images)[1], looked[bias > 0], atol=1e-6)


@pytest.mark.parametrize(
    "preset, members",
    [("seed", 1), ("default", 1), ("default", 3), ("seed", 2), ("accurate", 1), ("cells", 1), ("seed", "judged")],
)
def test_model_h5_opens_in_keras_and_matches_flax(tmp_path, preset, members):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    spec = CELL_READER if preset == "cells" else nets.get_preset(preset)
    judged = members == "judged"  # a fine-tuned model with its start and a judge of the hand (model/judge.py)
    network = nets.Network(spec.layers, 5, 2 if judged else members, judged)
    shape = spec.checked_image_size(5)
    variables = jax.tree.map(np.asarray, nets.init_variables(network, shape, seed=3))
    # Every weight moved a little and the batch-norm statistics a lot, so that a wrong mapping of any would
    # show; the outputs stay far from one-hot, so that they show it.
    rng = np.random.default_rng(0)
    variables["params"] = jax.tree.map(lambda a: a * rng.uniform(0.8, 1.2, a.shape) + rng.uniform(-0.02, 0.02, a.shape),
                                       variables["params"])  # fmt: skip
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(lambda a: a + rng.uniform(0.1, 0.5, a.shape), variables["batch_stats"])
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    if judged:  # a judge in two minds (p ≈ 0.6, varying by image), so that both members' weights show
        kernel = rng.normal(0, 1e-3, variables["params"]["judge"]["kernel"].shape).astype(np.float32)
        variables["params"]["judge"] = {"kernel": kernel, "bias": np.array([0.4], np.float32)}
    path = tmp_path / "model.h5"
    keras_h5.write(path, network, shape, variables, preset, layout="mixed")

    images = rng.integers(0, 256, (6, *shape, 1)).astype(np.uint8)
    flax_probs = jax.nn.softmax(network.apply(variables, nets.to_input(images)), axis=-1)
    assert np.mean((flax_probs > 0.01) & (flax_probs < 0.99)) > 0.3
    model = keras.models.load_model(path)
    assert [t.shape[1:] for t in model.inputs] == [(*shape, 1)]
    outputs = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    assert len(outputs) == 5 and model.output_names == [f"position_{k}" for k in range(1, 6)]
    np.testing.assert_allclose(np.stack(outputs, axis=1), flax_probs, atol=1e-5)

    back = keras_h5.read(path)
    assert (back.network, back.image_size, back.preset, back.layout) == (network, shape, preset, "mixed")
    assert jax.tree.all(jax.tree.map(np.array_equal, back.variables, variables))


def test_model_h5_bad_files_give_one_sentence(tmp_path):
    network, shape = nets.build(nets.SEED, 5), (64, 64)
    good = tmp_path / "model.h5"
    keras_h5.write(good, network, shape, nets.init_variables(network, shape, 0), "seed")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.h5"
    text.write_text("not a model")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    # The weights of the 64x64 network under a description that says 28x140: another input size.
    relabelled = tmp_path / "relabelled.h5"
    relabelled.write_bytes(good.read_bytes())
    with h5py.File(relabelled, "r+") as f:
        description = json.loads(f.attrs["digitseq"])
        f.attrs["digitseq"] = json.dumps(description | {"image_size": [28, 140]})
    poisoned = tmp_path / "poisoned.h5"  # one batch-norm beta NaN, as a diverged run would leave it
    default, default_shape = nets.build(nets.DEFAULT, 2), (28, 56)
    keras_h5.write(poisoned, default, default_shape, nets.init_variables(default, default_shape, 0), "default")
    with h5py.File(poisoned, "r+") as f:
        f["model_weights/bn2/bn2/beta"][3] = np.nan
    cases = {
        tmp_path / "missing.h5": "does not exist",
        poisoned: "poisoned.h5 holds NaN or infinite weights \\(first in bn2/beta\\): it cannot predict anything",
        relabelled: "does not fit the network it describes .* another preset or input size",
        truncated: "not a readable HDF5 file",
        text: "not a readable HDF5 file",
        foreign: "was not written by digitseq",
    }
    for path, message in cases.items():
        with pytest.raises(keras_h5.ModelFileError, match=message) as error:
            keras_h5.read(path)
        assert "\n" not in str(error.value)


def test_a_failed_write_keeps_the_previous_model_h5(tmp_path):
    network, shape = nets.build(nets.SEED, 5), (64, 64)
    path = tmp_path / "model.h5"
    keras_h5.write(path, network, shape, nets.init_variables(network, shape, 0), "seed")
    before = path.read_bytes()
    with pytest.raises(KeyError):
        keras_h5.write(path, network, shape, {"params": {}}, "seed")  # no weights: fails mid-way
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_presets_check_the_image_size():
    assert nets.DEFAULT.checked_image_size(5) == (28, 140) and nets.SEED.checked_image_size(3) == (64, 64)
    assert nets.DEFAULT.checked_image_size(5, (64, 64)) == (64, 64)  # the localiser finds digits at any width
    with pytest.raises(ValueError, match="divides into 5 equal columns"):
        CELL_READER.checked_image_size(5, (64, 64))
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        nets.get_preset("big")


def test_a_model_h5_written_before_layouts_reads_as_cells(tmp_path):
    network, shape = nets.build(nets.DEFAULT, 2), (28, 56)
    path = tmp_path / "model.h5"
    keras_h5.write(path, network, shape, nets.init_variables(network, shape, 0), "default", layout="mixed")
    assert keras_h5.read(path).layout == "mixed"
    with h5py.File(path, "r+") as f:
        description = json.loads(f.attrs["digitseq"])
        del description["layout"]
        description["image_shape"] = description.pop("image_size")  # the image size's name in older files
        f.attrs["digitseq"] = json.dumps(description)
    model = keras_h5.read(path)
    assert model.layout == "cells" and model.image_size == shape
