"""A judge of the hand: after fine-tuning on a user's numbers, each image is read by the model it started from
or by the fine-tuned one, weighed by how much it looks like the user's hand (a `judged` network).

The judge is a logistic regression on the start network's own features (`networks.hand_features`): the
user's numbers, as fine-tuning draws them, against MNIST's sequences. MNIST's numbers then go on being
read by the start model, which fine-tuning would otherwise move away from (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import numpy as np

from model import networks as nets

if TYPE_CHECKING:  # (trained.py reads judged models through this module)
    from model.trained import Trained

EXAMPLES = 6000  # MNIST's sequences, and at most as many of the user's numbers (their drawn versions)
L2 = 1.0  # on the standardised features' weights: scikit-learn's LogisticRegression(C=1)
NEWTON_STEPS = 50


@functools.lru_cache(maxsize=4)
def _jitted_features(network: nets.Network):
    depth = nets.judge_depth(network.layers)
    return jax.jit(lambda variables, images: nets.hand_features(
        network.apply(variables, nets.to_input(images), train=False, depth=depth)))  # fmt: skip


def features(start: Trained, images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, 1] → the start network's hand features [N, 3·C]."""
    return nets.in_batches(lambda chunk: _jitted_features(start.network)(start.variables, chunk), images)


def fit(start: Trained, hand: np.ndarray, others: np.ndarray) -> dict:
    """The judge's Dense parameters ({"kernel": [3·C, 1], "bias": [1]}): log-odds that an image is in the
    hand of `hand` rather than of `others` (uint8 images [N, H, W, 1] each). Standardised features, fit by
    Newton's method (exact and deterministic: 3·C + 1 unknowns); the standardisation folded into the kernel."""
    x = np.concatenate([features(start, hand), features(start, others)]).astype(np.float64)
    y = np.concatenate([np.ones(len(hand)), np.zeros(len(others))])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    x = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    penalty = np.full(x.shape[1], L2)
    penalty[-1] = 0.0  # the bias is not penalised
    w = np.zeros(x.shape[1])
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        gradient = x.T @ (p - y) + penalty * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    kernel = w[:-1] / scale
    bias = w[-1] - kernel @ mean
    return {"kernel": kernel[:, None].astype(np.float32), "bias": np.array([bias], np.float32)}


@functools.lru_cache(maxsize=4)
def _jitted_hand(network: nets.Network):
    def apply(variables, images):
        _, state = network.apply(variables, nets.to_input(images), train=False, mutable=["intermediates"])
        return jax.nn.sigmoid(state["intermediates"]["hand"][0])  # the verdict the network itself reads by

    return jax.jit(apply)


def judged_hand(model: Trained, images: np.ndarray) -> np.ndarray:
    """A judged model's p for each of `images` (uint8 [N, H, W, 1]): the chance it is in the hand of the
    numbers it was fine-tuned on."""
    return nets.in_batches(lambda chunk: _jitted_hand(model.network)(model.variables, chunk), images)


def member(model: Trained, which: str) -> Trained:
    """Of a judged model, its "start" (member 1) or its "tuned" network (member 2), as a model of its own;
    any other model is both."""
    if not model.network.judged:
        return model
    single = dataclasses.replace(model.network, members=1, judged=False)
    variables = nets.member_variables(model.network, model.variables)[{"start": 0, "tuned": 1}[which]]
    return dataclasses.replace(model, network=single, variables=variables)


def judged(network: nets.Network, start: dict, tuned: dict, judge: dict) -> tuple[nets.Network, dict]:
    """The judged model of a single `network` with the variables `start` and `tuned`, and the `judge`."""
    variables = jax.tree.map(np.asarray, nets.judged_variables(start, tuned))
    variables["params"]["judge"] = {name: np.asarray(value) for name, value in judge.items()}
    return dataclasses.replace(network, members=2, judged=True), variables


def with_tuned(network: nets.Network, variables: dict, tuned: dict) -> tuple[nets.Network, dict]:
    """A judged model (`network`, `variables`) with its fine-tuned network's variables replaced by `tuned`."""
    single = dataclasses.replace(network, members=1, judged=False)
    start = nets.member_variables(network, variables)[0]
    return judged(single, start, tuned, variables["params"]["judge"])
