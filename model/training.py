"""The train step: pure, so `jax.jit` compiles it once and shards it over a device mesh.

Loss: the softmax cross-entropies of the positions, summed, averaged over the batch (the
notebook's five categorical cross-entropies). The dropout key of step n is fold_in(seed, n):
like the data, a pure function of the step, which is what makes resumed runs exact.

An ensemble (network.members > 1) trains its members in the same step on the same batch: the
loss is the sum of the members' losses, so each member's gradient is its own loss's; the running
figures are those of the members' mean probabilities.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from model import metrics
from model import networks as nets


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    sums: dict  # metric sums (model.metrics.counts) of the running epoch

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(variables: dict, optimizer: optax.GradientTransformation, positions: int) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.array(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        sums=metrics.zeros(positions),
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    network: nets.Network,
    optimizer: optax.GradientTransformation,
    seed: int,
    label_smoothing: float = 0.0,
) -> TrainState:
    """One optimizer step on one global batch {"image": uint8 [B, H, W, 1], "labels": int32 [B, K]}.

    With label_smoothing ε the targets are (1-ε)·one-hot + ε/11 (the reported loss stays plain CE).
    """
    images, labels = nets.to_input(batch["image"]), batch["labels"]
    dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
        logits, updates = network.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        if label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
            losses = optax.softmax_cross_entropy(logits, targets)
        else:
            losses = metrics.position_losses(logits, jnp.broadcast_to(labels, logits.shape[:-1]))  # members too
        return losses.sum(axis=-1).mean(axis=-1).sum(), (logits, updates)  # the last sum: over members

    (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if network.members > 1:
        logits = nets.mean_probability_logits(logits)
    changes, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, changes),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
        sums=metrics.add(state.sums, metrics.counts(logits, labels)),
    )


def all_finite(tree) -> jax.Array:
    """True when no leaf of `tree` holds a NaN or an infinity."""
    return _jitted_all_finite()(tree)


@functools.cache
def _jitted_all_finite() -> Callable:
    def check(tree):
        return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))

    return jax.jit(check, compiler_options=nets.run_once_options())  # built at first use: after jax.distributed


def jit_train_step(
    network: nets.Network,
    optimizer: optax.GradientTransformation,
    seed: int,
    label_smoothing: float = 0.0,
    **jit_kwargs,
):
    """train_step with the network, optimizer, seed and label smoothing bound, jitted (state donated).

    Called as step(state, batch), or as step(state, batches, index) with batches stacked on a leading
    axis ([S, B, ...]): the step trains on batch `index` of them. Putting a stack on the devices once
    and picking its batches inside the step saves a host-to-device transfer per step.
    """

    def step(state: TrainState, batch: dict, index: jax.Array | None = None) -> TrainState:
        if index is not None:
            batch = jax.tree.map(lambda stacked: jax.lax.dynamic_index_in_dim(stacked, index, keepdims=False), batch)
        return train_step(
            state, batch, network=network, optimizer=optimizer, seed=seed, label_smoothing=label_smoothing
        )

    return jax.jit(step, donate_argnums=0, compiler_options=nets.compiler_options(), **jit_kwargs)
