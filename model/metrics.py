"""Every accuracy figure, one implementation for training, validation and eval.py.

`counts` turns one batch's logits and labels into sums (jit-friendly, padded rows masked out);
sums of batches add up with `add`; `summarize` turns the total into the reported figures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import networks as nets
from model.networks import NUM_CLASSES

BLANK = NUM_CLASSES - 1


def position_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy per example and position, [B, K]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def counts(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over one batch. logits [B, K, 11], labels [B, K]; mask [B] (1 = real row) or None."""
    batch, positions = labels.shape
    weight = jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    predicted = jnp.argmax(logits, axis=-1)
    right = (predicted == labels).astype(jnp.float32)  # [B, K]
    sequence_right = jnp.all(predicted == labels, axis=1).astype(jnp.float32)
    length = jnp.sum(labels != BLANK, axis=1)  # true length, 0..K
    by_length = jax.nn.one_hot(length - 1, positions) * weight[:, None]  # [B, K]; column k = length k+1
    digit = (labels != BLANK).astype(jnp.float32) * weight[:, None]
    true_onehot = jax.nn.one_hot(labels, NUM_CLASSES) * weight[:, None, None]
    return {
        "examples": jnp.sum(weight),
        "loss": jnp.sum(position_losses(logits, labels) * weight[:, None], axis=0),  # [K]
        "correct": jnp.sum(right * weight[:, None], axis=0),  # [K]
        "sequence_correct": jnp.sum(sequence_right * weight),
        "length_examples": jnp.sum(by_length, axis=0),  # [K]
        "length_sequence_correct": jnp.sum(by_length * sequence_right[:, None], axis=0),  # [K]
        "length_correct": jnp.sum((jnp.sum(predicted != BLANK, axis=1) == length) * weight),
        "digits": jnp.sum(digit),
        "digits_correct": jnp.sum(digit * right),
        "confusion": jnp.einsum("bkt,bkp->tp", true_onehot, jax.nn.one_hot(predicted, NUM_CLASSES)),  # [11, 11]
    }


def zeros(positions: int) -> dict[str, jax.Array]:
    """The sums of no batch at all."""
    shapes = jax.eval_shape(counts, jnp.zeros((1, positions, NUM_CLASSES)), jnp.zeros((1, positions), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def add(a: dict, b: dict) -> dict:
    return jax.tree.map(jnp.add, a, b)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def summarize(total: dict) -> dict:
    """Sums → figures (plain Python numbers; NaN where nothing was counted)."""
    total = jax.tree.map(np.asarray, total)
    n = float(total["examples"])
    positions = len(total["correct"])
    per_position_loss = [_ratio(x, n) for x in total["loss"]]
    per_position_accuracy = [_ratio(x, n) for x in total["correct"]]
    return {
        "num_examples": int(n),
        "loss": float(sum(per_position_loss)),  # the training loss: summed over positions
        "per_position_loss": per_position_loss,
        "per_position_accuracy": per_position_accuracy,
        "individual_accuracy": _ratio(total["correct"].sum(), n * positions),
        "digit_accuracy": _ratio(total["digits_correct"], total["digits"]),
        "sequence_accuracy": _ratio(total["sequence_correct"], n),
        "per_length_sequence_accuracy": {
            str(k + 1): _ratio(total["length_sequence_correct"][k], total["length_examples"][k])
            for k in range(positions)
        },
        "length_accuracy": _ratio(total["length_correct"], n),
        "confusion": total["confusion"].astype(np.int64).tolist(),
    }


def flat(figures: dict, prefix: str = "") -> dict[str, float]:
    """The scalar figures under Keras-like names, for the epoch line, metrics.jsonl and TensorBoard."""
    out = {f"{prefix}loss": figures["loss"]}
    pairs = zip(figures["per_position_loss"], figures["per_position_accuracy"], strict=True)
    for k, (loss, accuracy) in enumerate(pairs):
        out[f"{prefix}position_{k + 1}_loss"] = loss
        out[f"{prefix}position_{k + 1}_acc"] = accuracy
    for name in ("individual_accuracy", "digit_accuracy", "sequence_accuracy", "length_accuracy"):
        out[f"{prefix}{name.replace('accuracy', 'acc')}"] = figures[name]
    return out


def keras_line(figures: dict, prefix: str = "") -> str:
    """'loss: 0.8100 - position_1_loss: … - position_1_acc: … - sequence_acc: …', as Keras prints."""
    return " - ".join(f"{name}: {value:.4f}" for name, value in flat(figures, prefix).items())


@functools.lru_cache(maxsize=8)
def _eval_step(network: nets.Network) -> Callable:
    def step(variables, images, labels, mask):
        return counts(network.apply(variables, nets.to_input(images), train=False), labels, mask)

    return jax.jit(step)  # XLA's defaults: inference runs faster with its YNNPACK fusions (see compiler_options)


def evaluate(
    network: nets.Network,
    variables: dict,
    batches: Iterable[dict[str, np.ndarray]],
    batch_size: int,
    sharding: jax.sharding.Sharding | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """`summarize` of the network's predictions over every batch (image uint8, labels).

    A short last batch is padded to batch_size and masked, so one compiled shape serves all.
    With a sharding, each batch is split over the devices along its first axis (over the devices of
    all processes, each of which passes the same batches).
    """
    step = _eval_step(network)
    total = None
    for batch in batches:
        images, labels = batch["image"], batch["labels"]
        n = len(labels)
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros((batch_size - n, *labels.shape[1:]), labels.dtype)])
        mask = np.arange(batch_size) < n
        arrays = (images, labels, mask)
        if sharding is not None:  # every process holds the whole batch; each device takes its rows
            arrays = tuple(jax.make_array_from_callback(a.shape, sharding, a.__getitem__) for a in arrays)
        sums = step(variables, *arrays)
        total = sums if total is None else add(total, sums)
        if progress is not None:
            progress(n)
    if total is None:
        raise ValueError("nothing to evaluate: no batches")
    return summarize(total)
