"""Evaluates a trained digit-sequence reader on the honest test set.

    python eval.py --workdir runs/default        # its final weights (those in its model.h5)
    python eval.py --weights model.h5            # the network rebuilt from the file alone
    python eval.py --weights model.h5 --data test.npz --json report.json
    python eval.py --workdir runs/default --plots plots/  # and the pictures

Test sequences come only from MNIST test digits (10,000 by default, fixed by --seed), or from a
file written by `python -m pipeline.export` (or laid out like one). The figures are computed by
model/metrics.py, the code train.py validates with.
"""

from __future__ import annotations

import startup  # noqa: F401  (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from model import metrics, plots, trained
from model import networks as nets
from model.workdir import atomic_write
from pipeline import export, flags, folders
from pipeline.mnist import load_pool
from pipeline.sequences import LAYOUTS, SequenceConfig, eval_batches, numpy_batches

PROG = "eval.py"
BATCH = 1000


def test_batches(
    args: argparse.Namespace, image_size: tuple[int, int], positions: int, layout: str
) -> tuple[Iterator, int]:
    if args.data and not args.data.exists():
        raise ValueError(f"{args.data} does not exist; give a labelled folder (images and labels.csv with the columns "
                         "file,digits) or a .npz/.h5 that python -m pipeline.export wrote")  # fmt: skip
    if args.data and args.data.is_dir():  # a labelled folder: each image framed as predict.py frames it
        folder = folders.read_folder(args.data, positions, layout)
        return folders.batches(folder.canvases, folder.labels(positions), image_size, BATCH), len(folder)
    if args.data:
        images, labels = export.read(args.data)
        if images.shape[1:] != image_size or labels.shape[1] != positions:
            raise ValueError(
                f"{args.data} holds {images.shape[1]}x{images.shape[2]} images with {labels.shape[1]} positions; "
                f"the model reads {image_size[0]}x{image_size[1]} with {positions}"
            )
        batches = (
            {"image": images[i : i + BATCH, ..., None], "labels": labels[i : i + BATCH]}
            for i in range(0, len(images), BATCH)
        )
        return batches, len(images)
    config = SequenceConfig(positions, image_size, layout=layout, distortions=args.distortions)
    pool = load_pool("test", args.data_dir, args.mnist_dir)
    data = eval_batches(pool, config, num_examples=args.examples, batch_size=BATCH, seed=args.seed)
    return numpy_batches(data), args.examples


def report_table(figures: dict) -> str:
    rows = [f"examples              {figures['num_examples']:,}"]
    for k, accuracy in enumerate(figures["per_position_accuracy"]):
        rows.append(f"position {k + 1} accuracy   {accuracy:.2%}")
    rows += [
        f"individual accuracy   {figures['individual_accuracy']:.2%}   (all positions, blanks included)",
        f"digit accuracy        {figures['digit_accuracy']:.2%}   (non-blank positions)",
        f"sequence accuracy     {figures['sequence_accuracy']:.2%}   (every position right)",
    ]
    for length, accuracy in figures["per_length_sequence_accuracy"].items():
        rows.append(f"  length {length}            {accuracy:.2%}")
    rows += [
        f"length accuracy       {figures['length_accuracy']:.2%}   (predicted number of digits right)",
        f"speed                 {figures['examples_per_s']:,.0f} sequences/s",
        "confusion (rows: true 0-9, blank; columns: predicted)",
    ]
    rows += ["  " + " ".join(f"{n:5d}" for n in row) for row in figures["confusion"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int | None:
    parser = flags.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=Path, help="a train.py workdir: evaluates its checkpoint (see --checkpoint)")
    source.add_argument("--weights", type=Path, help="a model.h5 written by train.py: nothing else needed")
    parser.add_argument(
        "--checkpoint", choices=trained.CHECKPOINT_CHOICES, default="latest", help=trained.CHECKPOINT_HELP
    )
    parser.add_argument(
        "--data", type=Path,
        help="evaluate on this instead: a labelled folder (image files and labels.csv with the columns file,digits; "
        "each image framed as predict.py frames it), or a fixed set's .npz/.h5 (python -m pipeline.export)",
    )  # fmt: skip
    parser.add_argument(
        "--examples", type=flags.positive_int, default=10_000, help="test sequences to build (default: 10000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the test set (default: 0)")
    parser.add_argument(
        "--layout", choices=LAYOUTS,
        help=f"the test sequences' layout: {flags.LAYOUT_HELP} (default: the one the model reads: cells for a "
        "model trained on cells, else free)",
    )  # fmt: skip
    parser.add_argument(
        "--distortions", type=flags.distortion_names, default=(), metavar="NAMES",
        help=flags.distortions_help(
            "(default: none: MNIST test digits as they are)",
            "build the test sequences of MNIST test digits as other pens, hands and paper would have written them",
        ),
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--plots", type=Path, metavar="DIR",
        help="also write PNGs there: examples (mistakes marked), where each position looked (the reader's "
        "weights over the columns, under a few test images), per-position accuracy, confusion, training "
        "curves (from the workdir's metrics.jsonl), first-layer filters and activations",
    )  # fmt: skip
    flags.add_data_flags(parser)
    args = parser.parse_args(argv)
    if args.data and (args.distortions or args.layout):
        parser.error(f"--{'distortions' if args.distortions else 'layout'} builds test sequences; --data is "
                     "evaluated as it is (a folder's images framed as the model reads them)")  # fmt: skip

    model = trained.from_weights(args.weights) if args.weights else trained.from_workdir(args.workdir, args.checkpoint)
    network, image_size = model.network, model.image_size
    layout = None if args.data and not args.data.is_dir() else args.layout or model.reads  # (a folder: as it reads)
    batches, total = test_batches(args, image_size, network.positions, layout)
    variables = jax.device_put(model.variables)
    first = next(iter(batches))
    metrics.evaluate(network, variables, [first], BATCH)  # compiles; not timed
    progress = tqdm(total=total, desc="evaluating", unit="seq", leave=False, disable=None)
    started = time.perf_counter()
    figures = metrics.evaluate(network, variables, _chain(first, batches), BATCH, progress=progress.update)
    seconds = time.perf_counter() - started
    progress.close()
    figures["examples_per_s"] = figures["num_examples"] / seconds
    figures["model"] = model.description
    figures["layout"] = layout  # of the test sequences (None: a --data file's, whatever it is)
    figures["distortions"] = list(args.distortions)
    drawn = f", drawn with {', '.join(args.distortions)}" if args.distortions else ""
    built = f"{args.examples} sequences of MNIST test digits{drawn}, seed {args.seed}"
    figures["data"] = str(args.data) if args.data else built
    print(f"{model.description} on {args.data or f'{layout}-layout sequences of MNIST test digits{drawn}'}")
    print(report_table(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(figures, indent=1) + "\n")
    if args.plots:
        for line in write_plots(args.plots, model, variables, first, figures):
            print(line)


def write_plots(folder: Path, model: trained.Trained, variables: dict, batch: dict, figures: dict) -> list[str]:
    """The PNGs of --plots; returns one line per picture (written, or why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    network, images, labels = model.network, batch["image"], batch["labels"]
    predicted = nets.probabilities(network, variables, images).argmax(-1)
    written = [plots.examples(folder / "examples.png", images[..., 0], labels, predicted)]
    notes = []
    looked = nets.where_looked(network, variables, images)
    if looked:
        written.append(plots.where_looked(folder / "where_looked.png", images[..., 0], labels, *looked))
    else:
        notes.append("where_looked.png skipped: this network's reader does not look for its digits (no Attend)")
    written += [
        plots.per_position(folder / "per_position.png", figures),
        plots.confusion(folder / "confusion.png", figures["confusion"]),
    ]
    records = model.workdir.read_metrics() if model.workdir else []
    if records:
        written.append(plots.training_curves(folder / "training_curves.png", records))
    else:
        notes.append("training_curves.png skipped: no metrics.jsonl of the training run beside the model")
    first_conv = next(layer for layer in network.layers if isinstance(layer, nets.Conv))
    first_member = nets.member_variables(network, variables)[0]  # an ensemble shows its first member's
    kernel = np.asarray(first_member["params"][first_conv.name]["kernel"])
    written.append(plots.filters(folder / "filters.png", kernel))
    maps = nets.first_activations(network, variables, images[:1])[0]
    title = f"input (true {plots.sequence_text(labels[0])}) and the first layer's activation maps"
    written.append(plots.activations(folder / "activations.png", images[0, ..., 0], maps, title))
    return [f"wrote {path}" for path in written] + notes


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


if __name__ == "__main__":
    flags.exit_with(main, PROG)
