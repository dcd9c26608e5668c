"""model.h5 both ways: Flax variables → the Keras HDF5 model layout (h5py only), and back.

The file is what `keras.Model.save("model.h5")` writes (Keras 3): a root attribute
`model_config` (the functional model as JSON), `keras_version`, `backend`, and a group
`model_weights` with one sub-group per layer, in layer order, each naming its weights. So
`keras.models.load_model("model.h5")` rebuilds the network: input float32 [N, H, W, 1] in [0, 1],
outputs the per-position softmax arrays `position_1` … `position_K`, in order. An ensemble is one
such model: its members side by side (layers `member_1_conv1`, …), each output the `Average` of
the members' softmaxes; a judged model (model/judge.py) mixes its two members' softmaxes by its judge.

A root attribute `digitseq` (JSON: layer specs, positions, members, image shape, preset) lets the project
rebuild the same Flax network without Keras, whatever the presets look like by then.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import h5py
import jax
import numpy as np

from model import networks as nets
from model.workdir import RECORDED_BEFORE, atomic_write

KERAS_VERSION = "3.15.1"  # the layout written; Keras 3 reads it
FORMAT = 1
# Flax leaf → Keras weight name, for batch-norm layers (others use the same names)
_BATCH_NORM_NAMES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


class ModelFileError(ValueError):
    """A model.h5 that cannot be read, with a sentence saying why."""


# --- Keras model config --------------------------------------------------------------------------


class _Graph:
    """Keras functional-model layer configs, built one layer at a time from a current tensor."""

    def __init__(self, image_size: tuple[int, int]):
        self.shapes: dict[str, tuple[int, ...]] = {"image": (*image_size, 1)}  # per layer, batch dim left out
        self.weights: dict[str, list[tuple[str, np.ndarray]]] = {}
        self.tensor = "image"
        self.layers: list[dict] = [
            {
                "class_name": "InputLayer",
                "name": "image",
                "config": {"name": "image", "batch_shape": [None, *self.shapes["image"]], "dtype": "float32"},
                "inbound_nodes": [],
            }
        ]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[self.tensor]

    def add(
        self, class_name: str, base: str, config: dict, shape: tuple, source: str | list[str] | None = None, weights=()
    ) -> str:
        """Appends a layer reading `source` (default: the current tensor; a list: a merge layer's
        inputs); returns its unique name."""
        name, n = base, 1
        while name in self.shapes:
            n += 1
            name = f"{base}_{n}"

        def tensor(source: str) -> dict:
            history = {"shape": [None, *self.shapes[source]], "dtype": "float32", "keras_history": [source, 0, 0]}
            return {"class_name": "__keras_tensor__", "config": history}

        source = source or self.tensor
        args = [[tensor(s) for s in source]] if isinstance(source, list) else [tensor(source)]
        self.layers.append(
            {
                "class_name": class_name,
                "name": name,
                "config": {"name": name, "trainable": True, "dtype": "float32", **config},
                "inbound_nodes": [{"args": args, "kwargs": {}}],
            }
        )
        self.shapes[name] = tuple(shape)
        self.weights[name] = [(f"{name}/{w}", np.asarray(v, np.float32)) for w, v in weights]
        return name


def _keras_layers(
    graph: _Graph, layers, positions: int, variables: dict, prefix: str = "", taps: list[str] | None = None
) -> list[str]:
    """Adds one network's layers to `graph`, reading its input tensor, each named prefix + its name;
    returns the names of its K per-position softmax outputs. `taps` gets the tensor before each layer."""
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    graph.tensor = "image"

    def step(class_name, base, config, shape, weights=()):
        graph.tensor = graph.add(class_name, prefix + base, config, shape, weights=weights)

    outputs: list[str] = []
    for layer in layers:
        if taps is not None:
            taps.append(graph.tensor)
        if isinstance(layer, nets.Conv):
            p = params[layer.name]
            height, width, _ = graph.shape
            if layer.padding == "valid":
                height, width = height - layer.kernel + 1, width - layer.kernel + 1
            height, width = -(-height // layer.stride), -(-width // layer.stride)
            weights = [("kernel", p["kernel"])] + ([("bias", p["bias"])] if layer.use_bias else [])
            config = {
                "filters": layer.features,
                "kernel_size": [layer.kernel, layer.kernel],
                "strides": [layer.stride, layer.stride],
                "padding": layer.padding,
                "data_format": "channels_last",
                "activation": layer.activation or "linear",
                "use_bias": layer.use_bias,
            }
            step("Conv2D", layer.name, config, (height, width, layer.features), weights)
        elif isinstance(layer, nets.BatchNorm):
            p, s = params[layer.name], stats[layer.name]
            weights = [("gamma", p["scale"]), ("beta", p["bias"]), ("moving_mean", s["mean"]),
                       ("moving_variance", s["var"])]  # fmt: skip
            config = {"axis": -1, "momentum": layer.momentum, "epsilon": layer.epsilon, "center": True, "scale": True}
            step("BatchNormalization", layer.name, config, graph.shape, weights)
        elif isinstance(layer, nets.Relu):
            step("Activation", "relu", {"activation": "relu"}, graph.shape)
        elif isinstance(layer, nets.MaxPool):
            height, width, channels = graph.shape
            config = {"pool_size": [layer.size] * 2, "strides": [layer.size] * 2, "padding": "valid",
                      "data_format": "channels_last"}  # fmt: skip
            step("MaxPooling2D", "max_pooling2d", config, (height // layer.size, width // layer.size, channels))
        elif isinstance(layer, nets.Dropout):
            step("Dropout", "dropout", {"rate": layer.rate}, graph.shape)
        elif isinstance(layer, nets.Flatten):
            step("Flatten", "flatten", {"data_format": "channels_last"}, (int(np.prod(graph.shape)),))
        elif isinstance(layer, nets.Cells):
            height, width, channels = graph.shape
            columns = width // positions
            step("Reshape", "split_columns", {"target_shape": [height, positions, columns, channels]},
                 (height, positions, columns, channels))  # fmt: skip
            step("Permute", "cells_first", {"dims": [2, 1, 3, 4]}, (positions, height, columns, channels))
            step("Reshape", "cells", {"target_shape": [positions, height * columns * channels]},
                 (positions, height * columns * channels))  # fmt: skip
        elif isinstance(layer, nets.Attend):
            _attend_layers(graph, layer, positions, params, prefix)
        elif isinstance(layer, nets.Dense):
            p = params[layer.name]
            config = {"units": layer.units, "activation": layer.activation or "linear", "use_bias": True}
            step("Dense", layer.name, config, (*graph.shape[:-1], layer.units),
                 [("kernel", p["kernel"]), ("bias", p["bias"])])  # fmt: skip
        elif isinstance(layer, nets.Heads):
            softmax = {"units": nets.NUM_CLASSES, "activation": "softmax", "use_bias": True}
            if len(graph.shape) == 1:  # one Dense per position
                source = graph.tensor
                for k in range(positions):
                    p = params[f"position_{k + 1}"]
                    outputs.append(
                        graph.add(
                            "Dense",
                            f"{prefix}position_{k + 1}",
                            softmax,
                            (nets.NUM_CLASSES,),
                            source=source,
                            weights=[("kernel", p["kernel"]), ("bias", p["bias"])],
                        )  # fmt: skip
                    )
            else:  # one Dense shared by the cells, then one output per position
                p = params["classifier"]
                config = {"units": nets.NUM_CLASSES, "activation": "linear", "use_bias": True}
                step("Dense", "classifier", config, (positions, nets.NUM_CLASSES),
                     [("kernel", p["kernel"]), ("bias", p["bias"])])  # fmt: skip
                logits = graph.tensor
                for k in range(positions):
                    crop = graph.add("Cropping1D", f"{prefix}crop_{k + 1}", {"cropping": [k, positions - 1 - k]},
                                     (1, nets.NUM_CLASSES), source=logits)  # fmt: skip
                    flat = graph.add("Flatten", f"{prefix}logits_{k + 1}", {"data_format": "channels_last"},
                                     (nets.NUM_CLASSES,), source=crop)  # fmt: skip
                    outputs.append(
                        graph.add(
                            "Softmax", f"{prefix}position_{k + 1}", {"axis": -1}, (nets.NUM_CLASSES,), source=flat
                        )
                    )
    return outputs


def _attend_layers(graph: _Graph, layer: nets.Attend, positions: int, params: dict, prefix: str) -> None:
    """`nets.Attend` in Keras layers: the columns, the localiser's softmax weights [K, W], and each
    window offset as the weights dotted with the columns shifted by it (ZeroPadding1D, Cropping1D),
    concatenated."""
    height, width, channels = graph.shape
    features = height * channels

    def dense(name: str, units: int, activation: str, shape: tuple) -> None:
        p = params[f"{layer.name}_{name}"]
        config = {"units": units, "activation": activation, "use_bias": True}
        weights = [("kernel", p["kernel"]), ("bias", p["bias"])]
        graph.tensor = graph.add("Dense", f"{prefix}{layer.name}_{name}", config, shape, weights=weights)

    graph.tensor = graph.add("Permute", f"{prefix}columns_first", {"dims": [2, 1, 3]}, (width, height, channels))
    graph.tensor = graph.add(
        "Reshape", f"{prefix}split_columns", {"target_shape": [width, features]}, (width, features)
    )
    dense("columns", layer.features, "relu", (width, layer.features))
    columns, features = graph.tensor, layer.features
    dense("summary", layer.summary, "relu", (width, layer.summary))
    flat = (width * layer.summary,)
    graph.tensor = graph.add("Flatten", f"{prefix}summaries", {"data_format": "channels_last"}, flat)
    dense("locator", layer.hidden, "relu", (layer.hidden,))
    located = graph.tensor
    dense("where", positions * width, "linear", (positions * width,))
    graph.tensor = graph.add("Reshape", f"{prefix}scores", {"target_shape": [positions, width]}, (positions, width))
    weights = graph.add("Softmax", f"{prefix}where_weights", {"axis": -1}, (positions, width))
    before = layer.window // 2
    after = layer.window - 1 - before
    padded = graph.add(
        "ZeroPadding1D", f"{prefix}padded_columns", {"padding": [before, after]}, (width + layer.window - 1, features),
        source=columns,
    )  # fmt: skip
    windows = []
    for offset in range(layer.window):
        shifted = graph.add(
            "Cropping1D", f"{prefix}columns_{offset}", {"cropping": [offset, layer.window - 1 - offset]},
            (width, features), source=padded,
        )  # fmt: skip
        windows.append(
            graph.add(
                "Dot",
                f"{prefix}window_{offset}",
                {"axes": [2, 1], "normalize": False},
                (positions, features),
                source=[weights, shifted],
            )  # fmt: skip
        )
    flat = (positions, layer.window * features)
    graph.tensor = graph.add("Concatenate", f"{prefix}windows", {"axis": -1}, flat, source=windows)
    if layer.fit_window:  # each window column times its gate, a sigmoid of the localiser's hidden units
        split = (positions, layer.window, features)
        windows = graph.add("Reshape", f"{prefix}window_columns", {"target_shape": list(split)}, split)
        graph.tensor = located
        dense("fit", positions * layer.window, "sigmoid", (positions * layer.window,))
        gates = graph.add("Reshape", f"{prefix}gates", {"target_shape": [positions, layer.window, 1]},
                          (positions, layer.window, 1))  # fmt: skip
        graph.tensor = graph.add("Multiply", f"{prefix}fitted_windows", {}, split, source=[windows, gates])
        graph.tensor = graph.add("Reshape", f"{prefix}fitted", {"target_shape": list(flat)}, flat)


def _keras_graph(network: nets.Network, image_size: tuple[int, int], variables: dict) -> tuple[_Graph, list[str]]:
    """The whole model: the network, or an ensemble's members side by side (`member_1_conv1`, …)
    with each position's output the Average of the members' softmaxes (of a judged model: their mix
    by the judge, `_judge_layers`)."""
    graph = _Graph(image_size)
    members = nets.member_variables(network, variables)
    if len(members) == 1:
        return graph, _keras_layers(graph, network.layers, network.positions, variables)
    taps: list[str] = []
    member_outputs = [
        _keras_layers(graph, network.layers, network.positions, member, f"member_{m + 1}_", taps if m == 0 else None)
        for m, member in enumerate(members)
    ]
    if network.judged:
        hand = _judge_layers(graph, taps[nets.judge_depth(network.layers)], variables["params"]["judge"])
        weights = {"start": graph.add("Dense", "start_weight", {"units": nets.NUM_CLASSES, "activation": "linear",
                                      "use_bias": True}, (nets.NUM_CLASSES,), source=hand,
                                      weights=[("kernel", -np.ones((1, nets.NUM_CLASSES))),
                                               ("bias", np.ones(nets.NUM_CLASSES))]),
                   "tuned": graph.add("Dense", "tuned_weight", {"units": nets.NUM_CLASSES, "activation": "linear",
                                      "use_bias": False}, (nets.NUM_CLASSES,), source=hand,
                                      weights=[("kernel", np.ones((1, nets.NUM_CLASSES)))])}  # fmt: skip
        outputs = []
        for k, sources in enumerate(zip(*member_outputs, strict=True)):
            weighed = [graph.add("Multiply", f"{which}_position_{k + 1}", {}, (nets.NUM_CLASSES,),
                                 source=[source, weights[which]])
                       for which, source in zip(weights, sources, strict=True)]  # fmt: skip
            outputs.append(graph.add("Add", f"position_{k + 1}", {}, (nets.NUM_CLASSES,), source=weighed))
        return graph, outputs
    outputs = [
        graph.add("Average", f"position_{k + 1}", {}, (nets.NUM_CLASSES,), source=list(sources))
        for k, sources in enumerate(zip(*member_outputs, strict=True))
    ]
    return graph, outputs


def _judge_layers(graph: _Graph, maps: str, judge: dict) -> str:
    """The judge of a judged model on the start's feature maps `maps` (`networks.hand_features`, then one
    sigmoid unit): returns its output, p [1], the weight of the fine-tuned member (the start's is 1 - p,
    both spread over the 11 classes by the constant Dense layers `tuned_weight` and `start_weight`)."""
    channels = graph.shapes[maps][-1]
    pooling = {"data_format": "channels_last", "keepdims": False}
    mean = graph.add("GlobalAveragePooling2D", "hand_mean", pooling, (channels,), source=maps)
    peak = graph.add("GlobalMaxPooling2D", "hand_max", pooling, (channels,), source=maps)
    squares = graph.add("Multiply", "hand_squares", {}, graph.shapes[maps], source=[maps, maps])
    mean_square = graph.add("GlobalAveragePooling2D", "hand_mean_square", pooling, (channels,), source=squares)
    features = graph.add("Concatenate", "hand_features", {"axis": -1}, (3 * channels,),
                         source=[mean, peak, mean_square])  # fmt: skip
    return graph.add("Dense", "judge", {"units": 1, "activation": "sigmoid", "use_bias": True}, (1,), source=features,
                     weights=[("kernel", judge["kernel"]), ("bias", judge["bias"])])  # fmt: skip


def _keras_order(layers: list[dict], outputs: list[str]) -> list[str]:
    """The names of `layers` in the order Keras lists a functional model's layers, which is the order
    it loads their weights in (keras.src.ops.function.map_graph): the farthest from the outputs
    first, ties in the order a depth-first walk from the outputs first meets them. The members of
    an ensemble, side by side, are interleaved by it."""
    inbound = {}
    for layer in layers:
        args = layer["inbound_nodes"][0]["args"] if layer["inbound_nodes"] else []
        tensors = args[0] if args and isinstance(args[0], list) else args
        inbound[layer["name"]] = [tensor["config"]["keras_history"][0] for tensor in tensors]
    first_met: dict[str, int] = {}

    def walk(name: str) -> None:
        if name not in first_met:
            first_met[name] = len(first_met)
            for source in inbound[name]:
                walk(source)

    for name in outputs:
        walk(name)
    depth = dict.fromkeys(first_met, 0)
    changed = True
    while changed:  # longest distance to an output (the graph is small and acyclic)
        changed = False
        for name in first_met:
            for source in inbound[name]:
                if depth[source] < depth[name] + 1:
                    depth[source], changed = depth[name] + 1, True
    return sorted(first_met, key=lambda name: (-depth[name], first_met[name]))


# --- files -------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:160]


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=h5py.string_dtype())


def write(
    path: str | Path,
    network: nets.Network,
    image_size: tuple[int, int],
    variables: dict,
    preset: str,
    step: int | None = None,
    layout: str = RECORDED_BEFORE["layout"],
    label_smoothing: float | None = None,
) -> None:
    """Writes model.h5 atomically: a failed write leaves any previous file as it was.

    `step`: the training step of the weights, recorded so that a rerun can tell a stale file.
    `layout`: the layout of the sequences it was trained on, recorded so that it is read that way.
    `label_smoothing`: of its training, recorded so that a reader can undo it (a reading's confidence).
    The file is built in memory and written by `atomic_write`: HDF5 never meets a full disk
    (where it crashes) and a failed write is one OSError.
    """
    graph, outputs = _keras_graph(network, image_size, variables)
    model_config = {
        "class_name": "Functional",
        "config": {
            "name": f"digitseq_{preset}",
            "trainable": True,
            "layers": graph.layers,
            "input_layers": ["image", 0, 0],
            "output_layers": [[name, 0, 0] for name in outputs],
        },
    }
    description = {
        "format": FORMAT,
        "preset": preset,
        "positions": network.positions,
        "members": network.members,
        "judged": network.judged,
        "image_size": list(image_size),
        "layers": nets.layers_to_json(network.layers),
        "layout": layout,
        "step": step,
        "label_smoothing": label_smoothing,
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.attrs["model_config"] = json.dumps(model_config)
        file.attrs["keras_version"] = KERAS_VERSION
        file.attrs["backend"] = "tensorflow"
        file.attrs["digitseq"] = json.dumps(description)
        weights = file.create_group("model_weights")
        order = _keras_order(graph.layers, outputs)
        weights.attrs["layer_names"] = _strings(order)
        weights.attrs["keras_version"] = KERAS_VERSION
        weights.attrs["backend"] = "tensorflow"
        for name in order:
            group = weights.create_group(name)
            named = graph.weights.get(name, [])
            group.attrs["weight_names"] = _strings([name for name, _ in named])
            for name, value in named:
                group.create_dataset(name, data=value)
    atomic_write(path, buffer.getvalue())


def recorded_step(path: str | Path) -> int | None:
    """The training step a model.h5 records (None: no file, not readable, or no step recorded)."""
    try:
        with h5py.File(path, "r") as file:
            step = json.loads(file.attrs["digitseq"]).get("step")
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return step if isinstance(step, int) else None


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What a model.h5 holds."""

    network: nets.Network
    image_size: tuple[int, int]
    variables: dict
    preset: str
    layout: str  # of the sequences it was trained on ("cells" in a file written before layouts)
    label_smoothing: float | None  # of its training (None: a file written before it was recorded)


def read(path: str | Path) -> ModelFile:
    """model.h5 → the Flax network, its input shape and variables, preset and layout. Raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist (or is not a file)")
    try:
        file = h5py.File(path, "r")
    except OSError:
        raise ModelFileError(f"{path} is not a readable HDF5 file (truncated, or not a model.h5)") from None
    with file:
        if "digitseq" not in file.attrs:
            raise ModelFileError(f"{path} was not written by digitseq (it lacks the 'digitseq' description)")
        try:
            description = json.loads(file.attrs["digitseq"])
            layers = nets.layers_from_json(description["layers"])
            members = int(description.get("members", 1))
            judged = bool(description.get("judged", False)) and members == 2
            network = nets.Network(layers, int(description["positions"]), members, judged)
            # "image_shape": its name in files written before the image size had one name throughout
            image_size = tuple(int(s) for s in description.get("image_size", description.get("image_shape")))
            preset = str(description["preset"])
            layout = str(description.get("layout", RECORDED_BEFORE["layout"]))
            smoothing = description.get("label_smoothing")
            label_smoothing = None if smoothing is None else float(smoothing)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path} has an unreadable digitseq description ({error})") from None
        single = nets.Network(layers=layers, positions=network.positions)  # each member's network
        try:
            expected = nets.variables_structure(single, image_size)
        except (TypeError, ValueError) as error:
            raise ModelFileError(
                f"{path} has a digitseq description that does not make a network "
                f"(image size {list(image_size)}: {_first_line(error)}); the file was altered"
            ) from None
        prefixes = [""] if members == 1 else [f"member_{m + 1}_" for m in range(members)]
        found = [_read_member(path, file, layers, expected, prefix) for prefix in prefixes]
        judge = _read_judge(path, file, nets.variables_structure(network, image_size)["params"]) if judged else None
    if members == 1:
        return ModelFile(network, image_size, found[0], preset, layout, label_smoothing)
    if judged:
        variables = nets.judged_variables(*found)
        variables["params"]["judge"] = judge
        return ModelFile(network, image_size, variables, preset, layout, label_smoothing)
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *found)
    variables = {name: {"members": tree} for name, tree in stacked.items() if tree}
    return ModelFile(network, image_size, variables, preset, layout, label_smoothing)


def _read_judge(path: Path, file: h5py.File, params: dict) -> dict:
    """A judged model's judge (its kernel [3·C, 1] and bias [1]), checked against the network's `params`."""
    expected = params["judge"]
    try:
        group = file["model_weights"]["judge"]["judge"]
        judge = {leaf: group[leaf][()] for leaf in expected}
    except (KeyError, OSError) as error:
        raise ModelFileError(f"{path} is damaged: its judge cannot be read ({error})") from None
    for leaf, want in expected.items():
        if judge[leaf].shape != want.shape:
            raise ModelFileError(f"{path} does not fit the network it describes (judge/{leaf} has shape "
                                 f"{judge[leaf].shape}, the network needs {want.shape})")  # fmt: skip
    if not all(np.isfinite(value).all() for value in judge.values()):
        raise ModelFileError(f"{path} holds NaN or infinite weights (in its judge): use another model")
    return judge


def _read_member(path: Path, file: h5py.File, layers, expected: dict, prefix: str) -> dict:
    """One network's variables from the file's layers named prefix + layer name, checked against `expected`."""
    batch_norms = {layer.name for layer in layers if isinstance(layer, nets.BatchNorm)}
    variables: dict = {collection: {} for collection in expected}
    try:
        weights = file["model_weights"]
        for collection, by_layer in expected.items():
            for layer_name, leaves in by_layer.items():
                group = weights[prefix + layer_name][prefix + layer_name]
                renamed = _BATCH_NORM_NAMES if layer_name in batch_norms else {}
                variables[collection][layer_name] = {leaf: group[renamed.get(leaf, leaf)][()] for leaf in leaves}
    except (KeyError, OSError) as error:
        raise ModelFileError(f"{path} is damaged: its weights cannot be read ({error})") from None
    for collection, by_layer in expected.items():
        for layer_name, leaves in by_layer.items():
            for leaf, want in leaves.items():
                got = variables[collection][layer_name][leaf].shape
                if got != want.shape:
                    raise ModelFileError(
                        f"{path} does not fit the network it describes ({prefix}{layer_name}/{leaf} has shape {got}, "
                        f"the network needs {want.shape}): its weights are of another preset or input size"
                    )
                if not np.isfinite(variables[collection][layer_name][leaf]).all():
                    renamed = _BATCH_NORM_NAMES if layer_name in batch_norms else {}
                    name = f"{prefix}{layer_name}/{renamed.get(leaf, leaf)}"
                    raise ModelFileError(
                        f"{path} holds NaN or infinite weights (first in {name}): it cannot predict anything; "
                        "write it again from a good checkpoint (rerun train.py) or use another model"
                    )
    return variables
