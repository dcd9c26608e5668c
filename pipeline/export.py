"""Writes a fixed set of stitched sequences to .npz or .h5.

    python -m pipeline.export --split test --examples 10000 --seed 0 --out test.npz

`images` uint8 [N, H, W] and `labels` int32 [N, max_digits] (10 = blank): the same sequences
eval.py builds for that split, seed and size. The file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline import flags
from pipeline.mnist import SPLITS, load_pool
from pipeline.sequences import BLANK, eval_batches, numpy_batches


def build(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    pool = load_pool(args.split, args.data_dir, args.mnist_dir)
    batches = eval_batches(
        pool, flags.sequence_config(args), num_examples=args.examples, batch_size=1000, seed=args.seed
    )
    parts = list(numpy_batches(batches))
    images = np.concatenate([p["image"][..., 0] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    return images, labels


def write(path: Path, images: np.ndarray, labels: np.ndarray, attrs: dict[str, object]) -> None:
    """Writes atomically: the file is built in memory, written to a hidden `.NAME.partial` beside it
    and renamed into place when complete. A failed write removes the partial; one left by a kill -9
    is replaced by the next export to the same path."""
    buffer = io.BytesIO()
    if path.suffix == ".h5":
        import h5py

        with h5py.File(buffer, "w") as f:
            f.create_dataset("images", data=images, compression="gzip", chunks=True)
            f.create_dataset("labels", data=labels, compression="gzip", chunks=True)
            f.attrs.update(attrs)
    else:
        np.savez_compressed(buffer, images=images, labels=labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [N, H, W] and labels int32 [N, K] from a file `write` wrote (or one laid out so)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (or is not a file)")
    try:
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                images, labels = f["images"][()], f["labels"][()]
        else:
            with np.load(path) as f:
                images, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable sequence file with 'images' and 'labels' ({why})") from None
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or labels.ndim != 2 or len(images) != len(labels) or not len(images):
        raise ValueError(
            f"{path}: expected images [N, H, W] and labels [N, positions], got {images.shape} and {labels.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0-255), not {images.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{path}: labels must be whole numbers (0-9, {BLANK} = blank), not {labels.dtype}")
    if labels.min() < 0 or labels.max() > BLANK:
        raise ValueError(f"{path}: labels must be 0-9 for digits and {BLANK} for blank")
    return images, labels.astype(np.int32)


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(
        prog="python -m pipeline.export",
        description="Write a fixed set of stitched digit sequences: images uint8 [N, H, W], labels int32 "
        "[N, max_digits] (10 = blank). .npz, or .h5 when --out ends in .h5.",
    )
    parser.add_argument(
        "--split",
        choices=list(SPLITS),
        default="test",
        help="digit pool: train = MNIST train[:55000], validation = train[55000:], test = MNIST test (default: test)",
    )
    parser.add_argument(
        "--examples", type=flags.positive_int, default=10000, help="sequences to write (default: 10000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the set: same seed, same bytes (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="output file, .npz or .h5")
    flags.add_sequence_flags(parser)
    flags.add_data_flags(parser)
    args = parser.parse_args(argv)
    if args.out.suffix not in (".npz", ".h5"):
        parser.error(f"--out must end in .npz or .h5, not {args.out.name!r}")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; name a file ending in .npz or .h5")
    images, labels = build(args)
    attrs = {"split": args.split, "seed": args.seed, "max_digits": args.max_digits}
    write(args.out, images, labels, attrs)
    print(f"wrote {len(images)} sequences {images.shape[1]}x{images.shape[2]} from MNIST {args.split} to {args.out}")


if __name__ == "__main__":
    flags.run(main, "pipeline.export")
