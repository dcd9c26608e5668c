"""The pictures eval.py --plots writes: one function per PNG, plain arrays in, matplotlib out.

Figures are built with matplotlib's object API (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from model.metrics import BLANK

DPI = 100
_WRONG, _RIGHT = "#c62828", "#2e7d32"


def sequence_text(labels: np.ndarray) -> str:
    """[K] labels → '482··' (blank shown as a middle dot, so a misplaced blank is visible)."""
    return "".join("·" if label == BLANK else str(label) for label in labels)


def _grid_figure(
    shape: tuple[int, int], panels: int, max_columns: int, title_rows: int, extra_rows: int = 0
) -> tuple[int, Figure]:
    """(columns, figure) for a grid of images of this (height, width), 13 inches wide."""
    aspect = shape[1] / shape[0]
    columns = max(2, min(max_columns, round(max_columns / aspect**0.6)))
    rows = -(-panels // columns) + extra_rows
    panel_height = 13 / columns / aspect + 0.35
    return columns, Figure(figsize=(13, rows * panel_height + 0.3 * title_rows + 0.3), layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def examples(path: Path, images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, count: int = 24) -> Path:
    """A grid of test images [N, H, W] titled true / predicted: mistakes first (red), then right ones."""
    wrong = np.flatnonzero(np.any(labels != predicted, axis=1))
    right = np.flatnonzero(np.all(labels == predicted, axis=1))
    shown = np.concatenate([wrong[: count // 2], right])[:count]
    columns, figure = _grid_figure(images.shape[1:3], len(shown), max_columns=6, title_rows=2)
    figure.suptitle(
        f"{len(wrong)} of the first {len(labels)} test sequences misread, {min(len(wrong), count // 2)} shown in red\n"
        "each titled true / predicted (· = blank)"
    )
    rows = -(-len(shown) // columns)
    for i, index in enumerate(shown):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(images[index], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        mistake = i < min(len(wrong), count // 2)  # the mistakes come first
        colour = _WRONG if mistake else _RIGHT
        axes.set_title(f"{sequence_text(labels[index])} / {sequence_text(predicted[index])}", color=colour, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(3 if mistake else 1)
    return _save(figure, path)


_POSITION_COLOURS = ("#e53935", "#fb8c00", "#43a047", "#1e88e5", "#8e24aa", "#6d4c41", "#00897b", "#546e7a")


def where_looked(
    path: Path, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray, count: int = 8
) -> Path:
    """Test images [N, H, W] and, under each, where every position of the reader looked: its weights over
    the feature columns [N, K, C] as one curve per position, each labelled with the digit it read and how
    sure it was. Mistakes first (titles in red)."""
    predicted = probabilities.argmax(-1)
    wrong = np.flatnonzero(np.any(labels != predicted, axis=1))
    right = np.flatnonzero(np.all(labels == predicted, axis=1))
    shown = np.concatenate([wrong[: count // 2], right])[:count]
    height, width = images.shape[1:3]
    positions, columns = weights.shape[1:]
    figure = Figure(figsize=(13, 2.1 * len(shown) + 0.6), layout="constrained")
    figure.suptitle(
        "where each position looked: its weights over the image's feature columns (one curve per position), "
        "and what it read"
    )
    grid = figure.add_gridspec(2 * len(shown), 1, height_ratios=[1.3, 0.9] * len(shown))
    x = (np.arange(columns) + 0.5) * width / columns  # a feature column's centre, in image pixels
    for row, index in enumerate(shown):
        picture = figure.add_subplot(grid[2 * row])
        picture.imshow(images[index], cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="auto")
        mistake = index in wrong
        picture.set_title(
            f"true {sequence_text(labels[index])} / read {sequence_text(predicted[index])}",
            color=_WRONG if mistake else _RIGHT, fontsize=9, loc="left",
        )  # fmt: skip
        picture.set_axis_off()
        curves = figure.add_subplot(grid[2 * row + 1], sharex=picture)
        for k in range(positions):
            colour = _POSITION_COLOURS[k % len(_POSITION_COLOURS)]
            read = predicted[index, k]
            sure = probabilities[index, k, read]
            name = "blank" if read == BLANK else str(read)
            curves.plot(x, weights[index, k], color=colour, label=f"pos {k + 1}: {name} ({sure:.0%})")
            curves.fill_between(x, weights[index, k], color=colour, alpha=0.15)
        curves.set_xlim(-0.5, width - 0.5)
        curves.set_ylim(0, max(weights[index].max() * 1.1, 1e-3))
        curves.set_yticks([])
        curves.tick_params(labelsize=7)
        curves.legend(fontsize=7, ncol=positions, loc="upper right", frameon=False)
    return _save(figure, path)


def _bars(axes, names: list[str], values: list[float], colour: str) -> None:
    bars = axes.bar(names, values, color=colour)
    axes.bar_label(bars, labels=[f"{v:.2%}" for v in values], fontsize=8, padding=2)
    finite = [v for v in values if np.isfinite(v)]
    low = min(finite) if finite else 0.0
    axes.set_ylim(max(0.0, low - (1.0 - low) * 0.6 - 0.002), 1.0 + (1.0 - low) * 0.12 + 0.001)
    axes.set_yticks([tick for tick in axes.get_yticks() if tick <= 1.0])  # no ticks above 100 %
    axes.yaxis.set_major_formatter(lambda v, _: f"{v:.1%}")
    axes.grid(axis="y", alpha=0.3)


def per_position(path: Path, figures: dict) -> Path:
    """Accuracy of each position's head, with the overall figures; sequence accuracy by true length."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    names = [f"pos {k + 1}" for k in range(len(figures["per_position_accuracy"]))]
    _bars(left, [*names, "individual", "digit", "sequence"], [
        *figures["per_position_accuracy"], figures["individual_accuracy"], figures["digit_accuracy"],
        figures["sequence_accuracy"],
    ], colour=["#1565c0"] * len(names) + ["#6a1b9a", "#6a1b9a", "#ef6c00"])  # fmt: skip
    left.set_title("accuracy per position (blank counts as a class) and overall")
    lengths = figures["per_length_sequence_accuracy"]
    _bars(right, [f"{k} digit{'s' * (k != '1')}" for k in lengths], list(lengths.values()), colour="#ef6c00")
    right.set_title("sequence accuracy by true length")
    figure.suptitle(f"{figures['num_examples']:,} test sequences")
    return _save(figure, path)


def confusion(path: Path, matrix: list[list[int]]) -> Path:
    """The 11×11 confusion matrix (true × predicted, blank included), counts on a log colour scale."""
    counts = np.asarray(matrix)
    names = [str(d) for d in range(BLANK)] + ["blank"]
    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.maximum(counts, 0.5), cmap="Blues", norm=LogNorm(vmin=0.5, vmax=max(counts.max(), 1)))
    for (row, column), n in np.ndenumerate(counts):
        if n:
            dark = n > np.sqrt(max(counts.max(), 1))
            axes.text(column, row, str(n), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axes.set_xticks(range(len(names)), names)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    wrong = counts.sum() - np.trace(counts)
    axes.set_title(f"confusion over all positions: {wrong:,} of {counts.sum():,} wrong")
    figure.colorbar(image, ax=axes, label="positions (log scale)")
    return _save(figure, path)


def training_curves(path: Path, records: list[dict]) -> Path:
    """Loss and accuracies per epoch from metrics.jsonl records, train (solid) vs validation (dashed)."""
    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for name, axes in (("loss", loss_axes), ("sequence_acc", accuracy_axes), ("individual_acc", accuracy_axes)):
        line = axes.plot(epochs, [r[name] for r in records], marker="o", label=f"train {name}")[0]
        values = [r.get(f"val_{name}", np.nan) for r in records]
        axes.plot(epochs, values, marker="o", linestyle="--", color=line.get_color(), label=f"validation {name}")
    loss_axes.set_yscale("log")
    for formatter in (loss_axes.yaxis.set_major_formatter, loss_axes.yaxis.set_minor_formatter):
        formatter(lambda v, _: f"{v:g}")
    loss_axes.set_title("loss (sum over positions)")
    accuracy_axes.set_title("accuracy")
    accuracy_axes.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}" if v < 0.99 else f"{v:.1%}")
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("training curves (train: running mean over the epoch, with dropout; validation: at its end)")
    return _save(figure, path)


def filters(path: Path, kernel: np.ndarray) -> Path:
    """First-layer filters, kernel [kh, kw, 1, C], each on its own symmetric scale (red +, blue −)."""
    count = kernel.shape[-1]
    columns = min(8, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(columns * 1.1, rows * 1.2 + 0.5), layout="constrained")
    figure.suptitle(f"first-layer filters ({kernel.shape[0]}x{kernel.shape[1]}, {count})")
    for c in range(count):
        weights = kernel[:, :, 0, c]
        bound = np.abs(weights).max() or 1.0
        axes = figure.add_subplot(rows, columns, c + 1)
        axes.imshow(weights, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        axes.set_title(str(c + 1), fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    return _save(figure, path)


def activations(path: Path, image: np.ndarray, maps: np.ndarray, title: str) -> Path:
    """One input [H, W] and the first layer's activation maps of it [H, W, C]."""
    count = maps.shape[-1]
    columns, figure = _grid_figure(image.shape, count, max_columns=8, title_rows=1, extra_rows=1)
    rows = -(-count // columns) + 1
    grid = figure.add_gridspec(rows, columns)
    axes = figure.add_subplot(grid[0, :])
    axes.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
    for c in range(count):
        axes = figure.add_subplot(grid[1 + c // columns, c % columns])
        axes.imshow(maps[:, :, c], cmap="magma", interpolation="nearest")
        silent = not maps[:, :, c].any()
        axes.set_title(f"map {c + 1}" + (" (silent)" if silent else ""), fontsize=7)
        axes.set_axis_off()
    return _save(figure, path)
