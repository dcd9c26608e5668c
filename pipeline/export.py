"""Writes a fixed set of digit sequences to .npz or .h5, and a picture of them.

    python -m pipeline.export --split test --examples 10000 --seed 0 --layout free --out test.npz
    python -m pipeline.export --split train --layout mixed --examples 24 --preview grid.png

`images` uint8 [N, H, W] and `labels` int32 [N, max_digits] (10 = blank): the same sequences
eval.py builds for that split, seed, layout and size. The file appears whole or not at all.
`--preview` draws the first sequences with their digits under them, as the model sees them.
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
from pipeline.sequences import BLANK, fixed_set

PREVIEW_COUNT = 24  # sequences drawn by --preview
PREVIEW_ZOOM = 3


def build(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    pool = load_pool(args.split, args.data_dir, args.mnist_dir)
    return fixed_set(pool, flags.sequence_config(args), args.examples, args.seed)


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
    _write_whole(path, buffer.getvalue())


def _write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def preview(path: Path, images: np.ndarray, labels: np.ndarray, title: str) -> None:
    """A PNG of the first sequences, white on black as the model reads them, each with its digits under it."""
    from PIL import Image, ImageDraw

    shown = images[:PREVIEW_COUNT]
    columns = 2 if shown.shape[2] > shown.shape[1] else 6
    rows = -(-len(shown) // columns)
    cell_w, cell_h = shown.shape[2] * PREVIEW_ZOOM + 16, shown.shape[1] * PREVIEW_ZOOM + 30
    sheet = Image.new("L", (columns * cell_w, rows * cell_h + 24), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill=0)
    for i, (image, label) in enumerate(zip(shown, labels, strict=False)):
        x, y = (i % columns) * cell_w + 8, (i // columns) * cell_h + 24
        sheet.paste(
            Image.fromarray(image).resize((image.shape[1] * PREVIEW_ZOOM, image.shape[0] * PREVIEW_ZOOM)), (x, y)
        )
        digits = "".join(str(d) for d in label if d != BLANK)
        draw.text((x, y + image.shape[0] * PREVIEW_ZOOM + 4), digits, fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    _write_whole(path, buffer.getvalue())


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
    parser.add_argument("--out", type=Path, help="output file, .npz or .h5")
    parser.add_argument(
        "--preview", type=Path, metavar="PNG",
        help=f"also (or only) draw the first {PREVIEW_COUNT} sequences, each with its digits, into this PNG",
    )  # fmt: skip
    flags.add_sequence_flags(parser)
    flags.add_data_flags(parser)
    args = parser.parse_args(argv)
    if args.out is None and args.preview is None:
        parser.error("say where to write: --out FILE (.npz or .h5), --preview FILE.png, or both")
    if args.out is not None:
        if args.out.suffix not in (".npz", ".h5"):
            parser.error(f"--out must end in .npz or .h5, not {args.out.name!r}")
        if args.out.is_dir():
            parser.error(f"--out {args.out} is a folder; name a file ending in .npz or .h5")
    if args.preview is not None and (args.preview.suffix.lower() != ".png" or args.preview.is_dir()):
        parser.error(f"--preview must name a file ending in .png, not {str(args.preview)!r}")
    images, labels = build(args)
    what = f"{len(images)} {args.layout}-layout sequences {images.shape[1]}x{images.shape[2]} from MNIST {args.split}"
    if args.distortions:
        what += f" (distorted: {','.join(args.distortions)})"
    if args.out is not None:
        attrs = {"split": args.split, "seed": args.seed, "max_digits": args.max_digits, "layout": args.layout}
        attrs["distortions"] = ",".join(args.distortions) or "none"
        write(args.out, images, labels, attrs)
        print(f"wrote {what} to {args.out}")
    if args.preview is not None:
        preview(args.preview, images, labels, f"{what}, seed {args.seed}: the first {min(len(images), PREVIEW_COUNT)}")
        print(f"drew {args.preview}")


if __name__ == "__main__":
    flags.exit_with(main, "pipeline.export")
