"""The networks: one list of layer specs per preset, read by Flax (here) and by Keras (keras_h5.py).

A network maps images, float32 in [0, 1] with shape [B, H, W, 1], to logits [B, positions, 11]:
one 11-way classifier per position (digit 0–9, or 10 for blank). Writing the layers once as
plain specs keeps the Flax module and the Keras model.h5 the same network by construction.

Two choices make the CPU train step fast without changing the maths (see model/benchmark.py):
2×2 max-pooling is a max over reshaped windows (XLA's generic reduce-window gradient is ~8×
slower on CPU), and dropout draws one byte per unit (four per 32-bit random word) instead of
a 32-bit float — exact for rates that are multiples of 1/256, such as 0.25 and 0.5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 11  # digits 0–9 and blank
JUDGED_MEMBERS = ("start", "tuned")  # a judged model's two networks (Network.judged), in member order
_GLOROT = nn.initializers.glorot_uniform()  # Keras's default kernel initializer, as in the notebook


# --- layer specs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conv:
    name: str
    features: int
    kernel: int = 3
    padding: str = "same"  # or "valid"
    use_bias: bool = True
    stride: int = 1
    activation: str | None = "relu"


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    name: str
    momentum: float = 0.9
    epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class Relu:
    pass


@dataclasses.dataclass(frozen=True)
class MaxPool:
    size: int = 2


@dataclasses.dataclass(frozen=True)
class Dropout:
    rate: float


@dataclasses.dataclass(frozen=True)
class Flatten:
    pass


@dataclasses.dataclass(frozen=True)
class Cells:
    """[B, H, W, C] → [B, positions, H·(W/positions)·C]: the feature columns under each position."""


@dataclasses.dataclass(frozen=True)
class Attend:
    """[B, H, W, C] → [B, positions, window·features]: for each position, a window of `window`
    feature columns centred where a small localisation network looks (position k: the k-th digit
    from the left, wherever the digits stand).

    Each column (H·C values) is first projected to `features` (Dense + ReLU, `{name}_columns`). The
    localiser sees the whole width: each projected column reduced to `summary` features
    (`{name}_summary`), all of them flattened into one Dense layer of `hidden` units
    (`{name}_locator`), which scores every column for every position (`{name}_where`); the softmax
    of a position's scores weights the windows centred on each column.

    With `fit_window`, the localiser also gates each column of each position's window (a sigmoid
    per position and offset, `{name}_fit`): the window fits the digit it reads, and a neighbour's
    strokes close beside it can be left out.
    """

    name: str
    window: int = 7
    features: int = 128
    summary: int = 16
    hidden: int = 256
    fit_window: bool = False


@dataclasses.dataclass(frozen=True)
class Dense:
    name: str
    units: int
    activation: str | None = "relu"


@dataclasses.dataclass(frozen=True)
class Heads:
    """The per-position classifiers.

    On a vector [B, D]: one Dense layer per position, `position_1` … `position_K` (the notebook's
    five heads). On cells [B, K, D]: one Dense layer `classifier` shared by every position.
    """


Layer = Conv | BatchNorm | Relu | MaxPool | Dropout | Flatten | Cells | Attend | Dense | Heads


# --- presets -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    image_size: tuple[int, int] | None  # None: native 28 × 28·positions
    layers: tuple[Layer, ...]

    def checked_image_size(self, positions: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The (height, width) this network reads, checked; image_size overrides the preset's."""
        height, width = image_size or self.image_size or (28, 28 * positions)
        factor = math.prod(
            layer.size if isinstance(layer, MaxPool) else layer.stride
            for layer in self.layers
            if isinstance(layer, (MaxPool, Conv))
        )
        if any(isinstance(layer, Cells) for layer in self.layers):
            if height % factor or width % (factor * positions):
                raise ValueError(
                    f"the {self.name} preset reads images whose width divides into {positions} equal "
                    f"columns after downsampling by {factor}; {height}x{width} does not (use the native size)"
                )
        elif min(height, width) < factor + 2:
            raise ValueError(f"{height}x{width} is too small for the {self.name} preset")
        return height, width


SEED = Preset(
    name="seed",
    summary="the 2017 notebook's CNN on 64x64 input (Conv32-Conv32-MaxPool-Dense128, five heads)",
    image_size=(64, 64),
    layers=(
        Conv("conv1", 32, padding="same"),
        Conv("conv2", 32, padding="valid"),
        MaxPool(2),
        Dropout(0.25),
        Flatten(),
        Dense("dense", 128),
        Dropout(0.5),
        Heads(),
    ),
)

DEFAULT = Preset(
    name="default",
    summary="batch-normalised CNN on the native 28x(28*digits) input: a 4x4 stride-2 convolution "
    "to 14x(14*digits), a 3x3 convolution there, a pooling to 7x(7*digits) and one more 3x3 "
    "convolution; then each position reads a 7-column window where a localiser that sees the whole "
    "width looks (its digit, wherever it stands), each column gated to fit the digit, through one "
    "classifier shared by the positions",
    image_size=None,
    layers=(
        # Downsampling 2× right away (a 4×4 stride-2 convolution of the one input channel) puts
        # the first 3×3 convolution at 14×14 per digit, where it sees strokes, and the second at
        # 7×7, where it is cheap. Accuracy per second of CPU was compared over networks of
        # 1–8× this one's cost (docs/results.md).
        Conv("conv1", 32, kernel=4, stride=2, use_bias=False, activation=None),
        BatchNorm("bn1"),
        Relu(),
        Conv("conv2", 48, use_bias=False, activation=None),
        MaxPool(2),  # before the batch norm and ReLU: they then see a quarter of the pixels (~1.12x steps/s)
        BatchNorm("bn2"),
        Relu(),
        Conv("conv3", 96, use_bias=False, activation=None),
        BatchNorm("bn3"),
        Relu(),
        # Where the k-th digit stands is found, not assumed: a cell reader trained on written numbers
        # reads 40 % of them, a global Dense layer 44 %, this 91 % (2 epochs, docs/results.md). No
        # dropout: every step's sequences are fresh, and without it the same epochs read more. Its
        # window fitted to the digit reads close and overlapping digits better (docs/results.md).
        Attend("attend", fit_window=True),
        Dense("dense", 128),
        Heads(),
    ),
)


def _conv_bn_relu(number: int, features: int) -> tuple[Layer, ...]:
    return (Conv(f"conv{number}", features, use_bias=False, activation=None), BatchNorm(f"bn{number}"), Relu())


ACCURATE = Preset(
    name="accurate",
    summary="for accelerators: 3x3 convolutions at full size (32, 32), pooled to 14x14 per digit (64, 64), "
    "pooled to 7x7 (128); the default's reader, twice as wide; ~4.4x the default's arithmetic",
    image_size=None,
    layers=(
        *_conv_bn_relu(1, 32),
        *_conv_bn_relu(2, 32),
        MaxPool(2),
        *_conv_bn_relu(3, 64),
        *_conv_bn_relu(4, 64),
        MaxPool(2),
        *_conv_bn_relu(5, 128),
        Attend("attend", features=256),
        Dense("dense", 256),
        Dropout(0.3),
        Heads(),
    ),
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (DEFAULT, ACCURATE, SEED)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# --- Flax --------------------------------------------------------------------------------------


def max_pool(x: jax.Array, size: int) -> jax.Array:
    """size×size max-pooling, stride size (the edge that does not fill a window is dropped).

    The same values as nn.max_pool, written as a max over reshaped windows: its gradient is an
    elementwise compare-and-select, which XLA runs several times faster on CPU than the
    select-and-scatter of reduce_window's gradient. (On exact ties inside a window the gradient
    is shared instead of going to the first maximum; after a ReLU, ties are zeros.)
    """
    batch, height, width, channels = x.shape
    height, width = height // size, width // size
    windows = x[:, : height * size, : width * size].reshape(batch, height, size, width, size, channels)
    return windows.max(axis=(2, 4))


_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# On CPU the kernel gradient is summed over slices of this many examples: XLA computes each
# slice's gradient as a convolution that first transposes its input (features ↔ batch), and
# transposes of a few examples stay in cache where one of the whole batch does not. Measured on
# an AVX-512 machine at batch 128: 16 runs the default network's step 1.13× and the seed's 1.4×
# as fast as no slicing (4 and 32: within 5 % for the seed network, up to 13 % slower for the default).
_KERNEL_GRAD_SLICE = 16


def _conv(x: jax.Array, kernel: jax.Array, padding: str, stride: int) -> jax.Array:
    strides = (stride, stride)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_CONV_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_sliced_kernel_grad(x: jax.Array, kernel: jax.Array, padding: str, stride: int) -> jax.Array:
    return _conv(x, kernel, padding, stride)


def _conv_forward(x, kernel, padding, stride):
    return _conv(x, kernel, padding, stride), (x, kernel)


def _conv_backward(padding, stride, saved, grad):
    x, kernel = saved
    grad_x = jax.vjp(lambda x: _conv(x, kernel, padding, stride), x)[1](grad)[0]
    grad_kernel = jnp.zeros_like(kernel)
    for start in range(0, x.shape[0], _KERNEL_GRAD_SLICE):
        piece = slice(start, start + _KERNEL_GRAD_SLICE)
        grad_kernel += jax.vjp(lambda k, x=x[piece]: _conv(x, k, padding, stride), kernel)[1](grad[piece])[0]
    return grad_x, grad_kernel


_conv_sliced_kernel_grad.defvjp(_conv_forward, _conv_backward)


def conv2d(x: jax.Array, kernel: jax.Array, padding: str, stride: int = 1) -> jax.Array:
    """2-D convolution, NHWC × HWIO; the same maths everywhere, its gradient CPU-tuned."""
    if jax.default_backend() == "cpu" and x.shape[0] % _KERNEL_GRAD_SLICE == 0:
        return _conv_sliced_kernel_grad(x, kernel, padding, stride)
    return _conv(x, kernel, padding, stride)


class Conv2D(nn.Module):
    """nn.Conv's parameters (kernel HWIO, bias), computed by `conv2d`."""

    features: int
    kernel_size: int
    padding: str
    use_bias: bool
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _GLOROT, (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
        y = conv2d(x, kernel, self.padding, self.stride)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def dropout_mask(key: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
    """Keep-mask with P(keep) = round((1-rate)·256)/256, from one random byte per unit."""
    keep_below = round((1.0 - rate) * 256)
    batch, units = shape[0], math.prod(shape[1:])
    words = jax.random.bits(key, (batch, -(-units // 4)), jnp.uint32)
    random_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(batch, -1)[:, :units]
    return (random_bytes < keep_below).reshape(shape)


class ByteDropout(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0:
            return x
        keep = round((1.0 - self.rate) * 256) / 256
        mask = dropout_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(mask, x / keep, 0.0)


def _activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
    return {None: lambda x: x, "relu": nn.relu}[name]


class Network(nn.Module):
    """Images float32 [B, H, W, 1] in [0, 1] → logits [B, positions, 11].

    With members = N > 1, an ensemble: N copies of the layers, each with its own weights (stacked
    along a first axis, under "members") and dropout. Training reads each member's logits
    [N, B, positions, 11]; inference reads the log of the members' mean probabilities, so its
    softmax is that mean.

    `judged` (members = 2): a fine-tuned model with a judge of the hand. Its members are the model it
    started from ("start") and the fine-tuned one ("tuned"); a logistic regression (`judge`, one Dense unit)
    on the start's last feature map (`hand_features`) gives p, the chance that an image is in the hand it
    was fine-tuned on, and the probabilities are (1 - p)·the start's + p·the fine-tuned one's: MNIST's hand
    read as before (model/judge.py).
    """

    layers: tuple[Layer, ...]
    positions: int = 5
    members: int = 1
    judged: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, depth: int | None = None, tap: int | None = None
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits; with `depth`, the output of the first `depth` layers instead (to look at them); with `tap`,
        (that, the output of the first `tap` layers)."""
        if self.judged:  # two networks of their own, run one after the other (vmapped, CPU convolutions are slow)
            start, tuned = (Network(self.layers, self.positions, name=name) for name in JUDGED_MEMBERS)
            if train or depth is not None:
                return jnp.stack([start(images, train, depth), tuned(images, train, depth)])
            logits, maps = start(images, False, None, judge_depth(self.layers))
            hand = nn.Dense(1, name="judge")(hand_features(maps))[:, 0]  # log-odds of the hand [B]
            self.sow("intermediates", "hand", hand)  # (where_looked shows the one that reads it)
            weights = jnp.stack([jax.nn.log_sigmoid(-hand), jax.nn.log_sigmoid(hand)])[:, :, None, None]
            both = jnp.stack([jax.nn.log_softmax(logits), jax.nn.log_softmax(tuned(images))])
            return jax.nn.logsumexp(both + weights, axis=0)
        if self.members > 1:
            stacked = nn.vmap(
                Network, variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},  # each member's own
                split_rngs={"params": True, "dropout": True}, in_axes=None, out_axes=0, axis_size=self.members,
            )  # fmt: skip
            outputs = stacked(self.layers, self.positions, name="members")(images, train, depth)
            return outputs if train or depth is not None else mean_probability_logits(outputs)
        x, tapped = images, None
        for index, layer in enumerate(self.layers[:depth]):
            if index == tap:
                tapped = x
            if isinstance(layer, Conv):
                conv = Conv2D(
                    layer.features, layer.kernel, layer.padding.upper(), layer.use_bias, layer.stride, name=layer.name
                )
                x = _activation(layer.activation)(conv(x))
            elif isinstance(layer, BatchNorm):
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=layer.momentum, epsilon=layer.epsilon, name=layer.name
                )(x)
            elif isinstance(layer, Relu):
                x = nn.relu(x)
            elif isinstance(layer, MaxPool):
                x = max_pool(x, layer.size)
            elif isinstance(layer, Dropout):
                x = ByteDropout(layer.rate)(x, train)
            elif isinstance(layer, Flatten):
                x = x.reshape(x.shape[0], -1)
            elif isinstance(layer, Cells):
                batch, height, width, channels = x.shape
                x = x.reshape(batch, height, self.positions, width // self.positions, channels)
                x = x.transpose(0, 2, 1, 3, 4).reshape(batch, self.positions, -1)
            elif isinstance(layer, Attend):
                x = self._attend(x, layer)
            elif isinstance(layer, Dense):
                dense = nn.Dense(layer.units, kernel_init=_GLOROT, name=layer.name)
                x = _activation(layer.activation)(dense(x))
            elif isinstance(layer, Heads):
                if x.ndim == 2:
                    heads = [
                        nn.Dense(NUM_CLASSES, kernel_init=_GLOROT, name=f"position_{k + 1}")(x)
                        for k in range(self.positions)
                    ]
                    x = jnp.stack(heads, axis=1)
                else:
                    x = nn.Dense(NUM_CLASSES, kernel_init=_GLOROT, name="classifier")(x)
            else:
                raise TypeError(f"unknown layer spec {layer!r}")
        return x if tap is None else (x, tapped)

    def _attend(self, x: jax.Array, layer: Attend) -> jax.Array:
        batch, height, width, channels = x.shape
        columns = x.transpose(0, 2, 1, 3).reshape(batch, width, height * channels)
        columns = nn.relu(nn.Dense(layer.features, kernel_init=_GLOROT, name=f"{layer.name}_columns")(columns))
        summary = nn.relu(nn.Dense(layer.summary, kernel_init=_GLOROT, name=f"{layer.name}_summary")(columns))
        hidden = nn.Dense(layer.hidden, kernel_init=_GLOROT, name=f"{layer.name}_locator")(summary.reshape(batch, -1))
        scores = nn.Dense(self.positions * width, kernel_init=_GLOROT, name=f"{layer.name}_where")(nn.relu(hidden))
        weights = jax.nn.softmax(scores.reshape(batch, self.positions, width), axis=-1)  # [B, K, W]
        self.sow("intermediates", "where", weights)  # where each position looks (`where_looked`)
        # Offset o of position k's window is column i weighted by the weight of the centre i - o + o₀
        # (o₀ = window // 2): the weights shifted once per offset, then one matrix product with the columns.
        window, centre = layer.window, layer.window // 2
        padded = jnp.pad(weights, ((0, 0), (0, 0), (window - 1 - centre, centre)))
        shifted = jnp.stack([padded[..., window - 1 - o : window - 1 - o + width] for o in range(window)], axis=2)
        windows = jnp.einsum("bkow,bwd->bkod", shifted, columns)
        if layer.fit_window:
            gates = nn.Dense(self.positions * window, kernel_init=_GLOROT, name=f"{layer.name}_fit")(nn.relu(hidden))
            windows = windows * jax.nn.sigmoid(gates).reshape(batch, self.positions, window, 1)
        return windows.reshape(batch, self.positions, window * layer.features)


def build(preset: Preset, positions: int, members: int = 1) -> Network:
    return Network(layers=preset.layers, positions=positions, members=members)


def judge_depth(layers: Sequence[Layer]) -> int:
    """How many layers make the network's last feature map [B, H, W, C], which the judge of a judged model
    reads: those before the first that ends the image's shape (Flatten, Cells, Attend)."""
    for depth, layer in enumerate(layers):
        if isinstance(layer, Flatten | Cells | Attend):
            return depth
    raise ValueError("the network has no layer that flattens its feature map")


def hand_features(maps: jax.Array) -> jax.Array:
    """[B, H, W, C] feature maps → [B, 3·C]: each channel's mean, maximum and mean square over the image —
    what a judge tells a hand by (the style of strokes, not where they stand)."""
    return jnp.concatenate([maps.mean(axis=(1, 2)), maps.max(axis=(1, 2)), (maps * maps).mean(axis=(1, 2))], -1)


def mean_probability_logits(member_logits: jax.Array) -> jax.Array:
    """[N, ..., 11] members' logits → the log of their mean probabilities (softmax of it = that mean)."""
    log_probabilities = jax.nn.log_softmax(member_logits)
    return jax.nn.logsumexp(log_probabilities, axis=0) - math.log(member_logits.shape[0])


def judged_variables(start: dict, tuned: dict) -> dict:
    """A judged model's variables, less its judge, from those of its two networks (`member_variables` back)."""
    members = dict(zip(JUDGED_MEMBERS, (start, tuned), strict=True))
    return {name: {member: given[name] for member, given in members.items()}
            for name in ("params", "batch_stats") if start.get(name)}  # fmt: skip


def member_variables(network: Network, variables: dict) -> list[dict]:
    """An ensemble's variables → each member's, as a single network's (one member: the variables as they are;
    a judged model: its start's and its fine-tuned network's)."""
    if network.members == 1:
        return [variables]
    if network.judged:
        return [{name: tree[member] for name, tree in variables.items() if tree} for member in JUDGED_MEMBERS]
    return [
        {name: jax.tree.map(lambda leaf, m=m: leaf[m], tree["members"]) for name, tree in variables.items() if tree}
        for m in range(network.members)
    ]


_LAYER_TYPES = {cls.__name__: cls for cls in Layer.__args__}


def layers_to_json(layers: Sequence[Layer]) -> list[dict]:
    """Layer specs as JSON-able dicts: model.h5 and a workdir's config.json record their network so."""
    return [{"type": type(layer).__name__, **dataclasses.asdict(layer)} for layer in layers]


def layers_from_json(entries: list[dict]) -> tuple[Layer, ...]:
    """The inverse of `layers_to_json`; raises KeyError, TypeError or ValueError on a malformed entry."""
    layers = []
    for entry in entries:
        fields = dict(entry)
        layers.append(_LAYER_TYPES[fields.pop("type")](**fields))
    return tuple(layers)


def variable_shapes(variables: dict) -> dict:
    """The tree of a network's variables with each array replaced by its shape (to compare networks)."""
    return jax.tree.map(lambda x: tuple(x.shape), variables)


def init_variables(network: Network, image_size: tuple[int, int], seed: int) -> dict:
    """Parameters (and batch-norm statistics) of a fresh network, a pure function of the seed."""
    images = jnp.zeros((1, *image_size, 1), jnp.float32)
    init = jax.jit(network.init, static_argnames="train", compiler_options=run_once_options())  # eager: op by op, slow
    return dict(init(jax.random.key(seed), images, train=False))


def variables_structure(network: Network, image_size: tuple[int, int]) -> dict:
    """What init_variables returns, as shapes and dtypes only: nothing is computed or compiled."""
    images = jax.ShapeDtypeStruct((1, *image_size, 1), jnp.float32)
    return dict(jax.eval_shape(lambda x: network.init(jax.random.key(0), x, train=False), images))


def first_activation_depth(layers: Sequence[Layer]) -> int:
    """How many layers make up the first convolution with its activation (conv → [pool →] [BN →] ReLU)."""
    for depth, layer in enumerate(layers, start=1):
        if isinstance(layer, Relu) or (isinstance(layer, Conv) and layer.activation):
            return depth
    raise ValueError("the network has no activation")


@functools.lru_cache(maxsize=8)
def _jitted_apply(network: Network, depth: int | None) -> Callable:
    def apply(variables, images):
        out = network.apply(variables, to_input(images), train=False, depth=depth)
        return out if depth is not None else jax.nn.softmax(out)

    return jax.jit(apply)  # inference: XLA's defaults (see compiler_options)


def probabilities(network: Network, variables: dict, images: np.ndarray) -> np.ndarray:
    """Images uint8 [B, H, W, 1] → class probabilities [B, positions, 11]."""
    return np.asarray(_jitted_apply(network, None)(variables, images))


READ_BATCH = 256  # images per network call when reading; fewer are padded to the next power of two


def in_batches(apply: Callable, images: np.ndarray):
    """`apply` over uint8 [N, H, W, 1] images READ_BATCH at a time; its outputs (arrays, or a tuple of
    them, each [batch, ...]) joined. Padding to powers of two keeps the compiled shapes few."""
    parts = []
    for start in range(0, len(images), READ_BATCH):
        chunk = images[start : start + READ_BATCH]
        padded = 1 << (len(chunk) - 1).bit_length()
        if padded > len(chunk):
            chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        real = min(READ_BATCH, len(images) - start)
        parts.append(jax.tree.map(lambda out, real=real: np.asarray(out)[:real], apply(chunk)))
    return jax.tree.map(lambda *outs: np.concatenate(outs), *parts)


def read_in_batches(network: Network, variables: dict, images: np.ndarray) -> np.ndarray:
    """Any number of images uint8 [N, H, W, 1] → probabilities [N, positions, 11]: how predict.py reads."""
    if not len(images):
        return np.zeros((0, network.positions, 11), np.float32)
    return in_batches(lambda chunk: probabilities(network, variables, chunk), images)


@functools.lru_cache(maxsize=4)
def _jitted_where(network: Network) -> Callable:
    def apply(variables, images):
        logits, state = network.apply(variables, to_input(images), train=False, mutable=["intermediates"])
        sown = state["intermediates"]
        if network.judged:  # the where of the network whose hand the judge takes it for
            start, tuned = (sown[member]["where"][0] for member in JUDGED_MEMBERS)
            return jax.nn.softmax(logits), jnp.where(sown["hand"][0][:, None, None] > 0, tuned, start)
        weights = jax.tree.leaves(sown)[0]
        return jax.nn.softmax(logits), weights[0] if network.members > 1 else weights

    return jax.jit(apply)


def where_looked(network: Network, variables: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Any number of images uint8 [N, H, W, 1] → (class probabilities [N, positions, 11], the weights
    each position of the reader (`Attend`) gives the feature columns [N, positions, columns]: where it
    looked; of an ensemble, its first member's; of a judged model, that of the network whose hand the judge
    takes the image for). None for a network without that reader."""
    if not any(isinstance(layer, Attend) for layer in network.layers) or not len(images):
        return None
    return in_batches(lambda chunk: _jitted_where(network)(variables, chunk), images)


def first_activations(network: Network, variables: dict, images: np.ndarray) -> np.ndarray:
    """Images uint8 [B, H, W, 1] → the first convolution's activation maps [B, H, W, features]
    (of an ensemble: its first member's)."""
    maps = np.asarray(_jitted_apply(network, first_activation_depth(network.layers))(variables, images))
    return maps[0] if network.members > 1 else maps


def to_input(images: jax.Array) -> jax.Array:
    """Pipeline images (uint8, 0–255) → the network's input (float32, 0–1)."""
    return images.astype(jnp.float32) / 255.0


def run_once_options() -> dict[str, str]:
    """XLA options for jitting what runs once or rarely (an init, a check): on CPU, unoptimised. XLA's
    optimisations take seconds to compile a network's random draws; without them the same bits compile
    3-5x faster, and a run starts sooner."""
    return {"xla_backend_optimization_level": "0"} if jax.default_backend() == "cpu" else {}


def compiler_options() -> dict[str, str]:
    """XLA options for jitting a train step of this module's networks on the current backend.

    On CPU, XLA (jax 0.10) routes VALID convolutions and some dots to its YNNPACK fusions, which
    run the notebook's Conv32→Conv32 train step ~7× slower here than XLA's Eigen convolutions;
    turning those fusions off is worth ~3× on the whole train step. Inference is the other way
    round (the forward pass alone runs ~1.3–1.5× faster with them), so evaluation keeps XLA's
    defaults. Other backends get no options.
    """
    if jax.default_backend() == "cpu":
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return {}
