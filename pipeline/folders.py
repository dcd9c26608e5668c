"""A labelled folder: a user's own numbers, to train on, fine-tune with and evaluate on.

    DIR/labels.csv      file,digits          (a header line, then one row per image)
                        scan_01.png,4071
                        photos/kitchen.jpg,12
    DIR/scan_01.png …   the images: PNG, JPEG, BMP, … any size or polarity, photos too

`file` is relative to the folder; `digits` is the number, 1 to 5 characters 0–9 (leading zeros kept).
Every row is checked before anything else happens: a missing or unreadable file, a label that is not
1–5 digits, a file listed twice — all of them are refused together, in one message listing them by
line. Each image is framed by the rule predict.py frames a file by (`pipeline.images`), so a model
trains and is measured on what it will be given. A folder's digest (its rows and every file's bytes)
is what a training run records: a changed folder is another run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np

from pipeline import distort, framing, images
from pipeline.sequences import BLANK, Numbers

LABELS = "labels.csv"
COLUMNS = ("file", "digits")
HELD_OUT = 0.2  # of a training folder's numbers, kept to choose the checkpoint when no --val-data is given
SHARE = 0.5  # of every training batch, by default: the folders' numbers (the rest: MNIST sequences)
SPLICES = 30  # new numbers per number trained on: several of them side by side, the digits in new company
STOP = 0.3  # after each number spliced on, the chance that the new one ends there (while more would fit)
SPLICE_GAP = (-0.3, 0.1)  # between the two, of the ink's height: overlapping as close writers do, to apart
_SHOWN = 5  # bad rows named in the message; the rest are counted


class FolderError(ValueError):
    """A labelled folder that cannot be used; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Folder:
    """A checked labelled folder, its images framed at the native size of a model of `layout`."""

    path: Path
    files: tuple[str, ...]  # as labels.csv names them
    digits: tuple[str, ...]
    canvases: np.ndarray  # uint8 [N, 28, 28·K], white on black, framed as a model of the layout asked for reads
    digest: str  # sha256 of the rows and every file's bytes

    def __len__(self) -> int:
        return len(self.files)

    def labels(self, max_digits: int) -> np.ndarray:
        """int32 [N, max_digits], blank (10) after each number's last digit."""
        out = np.full((len(self), max_digits), BLANK, np.int32)
        for row, number in enumerate(self.digits):
            out[row, : len(number)] = [int(c) for c in number]
        return out


def read_folder(path: Path, max_digits: int = 5, layout: str = "free") -> Folder:
    """The folder at `path`, every row checked and every image framed; a FolderError naming all bad rows."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a folder"
        raise FolderError(f"{path} {what}; give a folder holding the images and a {LABELS} (file,digits)")
    rows = _rows(path)
    problems: list[str] = []
    first_line: dict[str, int] = {}
    files, digits, canvases = [], [], []
    digest = hashlib.sha256()
    for line, row in rows:
        name, number = _fields(row)
        wrong = [] if number else ["no digits given"]
        if number and not (number.isascii() and number.isdigit() and len(number) <= max_digits):
            wrong.append(f"the digits {number!r} are not 1 to {max_digits} characters 0-9")
        data = None
        if not name:
            wrong.insert(0, "no file named")
        elif name in first_line:
            wrong.insert(0, f"{name} is listed again (first on line {first_line[name]})")
        elif Path(name).is_absolute() or not (path / name).resolve().is_relative_to(path.resolve()):
            wrong.insert(0, f"{name} is outside the folder (name files relative to it)")
        else:
            first_line[name] = line
            data, unread = _read(path / name, name)
            if unread:
                wrong.insert(0, unread)
        if wrong:
            problems.append(f"line {line}: " + ", ".join(wrong))
            continue
        source = io.BytesIO(data)
        source.name = name  # (named in images' messages)
        try:
            gray = images.read_gray(source)
        except images.ImageFileError as error:
            problems.append(f"line {line}: {error}")
            continue
        canvas = images.native(gray, max_digits, layout)
        if not canvas.any():
            problems.append(f"line {line}: {name} has no ink on it to read")
            continue
        files.append(name)
        digits.append(number)
        canvases.append(canvas)
        digest.update(f"{name}\0{number}\0{len(data)}\0".encode())
        digest.update(data)
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise FolderError(
            f"{path / LABELS} has {_count(len(problems), 'bad row')}: " + "; ".join(problems[:_SHOWN]) + more
            + "; fix or remove them (nothing was read)"
        )  # fmt: skip
    return Folder(path, tuple(files), tuple(digits), np.stack(canvases), digest.hexdigest())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fields(row: dict) -> tuple[str, str]:
    return tuple((row.get(column) or "").strip() for column in COLUMNS)


def _read(file: Path, name: str) -> tuple[bytes | None, str | None]:
    """The file's bytes, or why they cannot be read."""
    try:
        return file.read_bytes(), None
    except IsADirectoryError:
        return None, f"{name} is a folder, not an image file"
    except FileNotFoundError:
        return None, f"{name} does not exist"
    except OSError as error:
        return None, f"{name} cannot be read ({error.strerror or error})"


def _rows(path: Path) -> list[tuple[int, dict]]:
    """labels.csv's rows with their line numbers; the file and its header checked."""
    labels = path / LABELS
    if not labels.is_file():
        raise FolderError(
            f"{path} has no {LABELS}; write one with the header line file,digits and a row for each image "
            "(e.g. scan_01.png,4071)"
        )
    try:
        text = labels.read_text(encoding="utf-8-sig")  # (a spreadsheet's byte-order mark is no column name)
    except UnicodeDecodeError:
        raise FolderError(f"{labels} is not UTF-8 text; save it as CSV (UTF-8)") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if not set(COLUMNS) <= set(header):
        shown = ",".join(header) if header else "nothing"
        raise FolderError(f"{labels} must begin with the header line file,digits (it begins with {shown})")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
            continue  # a blank line
        rows.append((reader.line_num, row))
    if not rows:
        raise FolderError(f"{labels} lists no images; add a row file,digits for each")
    return rows


def digest(trained_on: list[Folder], chosen_by: list[Folder]) -> str:
    """One digest of the folders a run trains on and those that choose its checkpoint (none: a share of the
    first ones held out), in order."""
    parts = [folder.digest for folder in trained_on] + ["held out" if not chosen_by else "validated on"]
    return hashlib.sha256(" ".join(parts + [folder.digest for folder in chosen_by]).encode()).hexdigest()


def split(folders: list[Folder]) -> tuple[np.ndarray, np.ndarray]:
    """The numbers of `folders` (concatenated) to train on and to hold out: HELD_OUT of them (at least one),
    chosen by a hash of each file's name, so the same numbers are held out in every run."""
    names = [f"{i}/{name}" for i, folder in enumerate(folders) for name in folder.files]
    if len(names) < 2:
        raise FolderError(
            "one number cannot be both trained on and held out to choose the checkpoint; add more numbers, "
            "or give the numbers that choose it with --val-data"
        )
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    held = max(1, round(HELD_OUT * len(names)))
    held_out = np.zeros(len(names), bool)
    held_out[order[:held]] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def joined(folders: list[Folder], max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """The folders' canvases uint8 [N, 28, 28·K] and labels int32 [N, K], in order."""
    return np.concatenate([f.canvases for f in folders]), np.concatenate([f.labels(max_digits) for f in folders])


def spliced(canvases: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SPLICES·N new numbers, each two or more of the N side by side (each one's ink SPLICE_GAP from the one
    before, framed again) whose digits together fit the positions: the writer's digits at other positions
    and beside other neighbours than the few numbers given show them — a network then reads the hand
    instead of remembering the numbers."""
    max_digits = labels.shape[1]
    lengths = (labels != BLANK).sum(axis=1)
    inks = [_ink_columns(canvas) for canvas in canvases]
    rng = np.random.default_rng([seed, 36])
    made, made_labels = [], []
    for _ in range(SPLICES * len(canvases) if lengths.min() * 2 <= max_digits else 0):
        pieces = [int(rng.integers(len(canvases)))]
        while True:
            fitting = np.flatnonzero(lengths + lengths[pieces].sum() <= max_digits)
            if not len(fitting) or (len(pieces) > 1 and rng.uniform() < STOP):
                break
            pieces.append(int(rng.choice(fitting)))
        if len(pieces) < 2:
            continue
        joined = inks[pieces[0]]
        for piece in pieces[1:]:
            gap = round(rng.uniform(*SPLICE_GAP) * framing.INK_HEIGHT)
            start = joined.shape[1] + gap
            wider = np.zeros((joined.shape[0], max(start + inks[piece].shape[1], joined.shape[1])), np.uint8)
            wider[:, : joined.shape[1]] = joined
            wider[:, start : start + inks[piece].shape[1]] = np.maximum(wider[:, start : start + inks[piece].shape[1]],
                                                                        inks[piece])  # fmt: skip
            joined = wider
        rows = np.flatnonzero((joined > framing.INK_LEVEL).any(axis=1))
        made.append(framing.place(joined, (int(rows[0]), 0, int(rows[-1] - rows[0] + 1), joined.shape[1]),
                                  canvases.shape[2]))  # fmt: skip
        digits = np.concatenate([labels[i, : lengths[i]] for i in pieces])
        made_labels.append(np.concatenate([digits, np.full(max_digits - len(digits), BLANK)]).astype(np.int32))
    if not made:
        return canvases[:0], labels[:0]
    return np.stack(made), np.stack(made_labels)


def _ink_columns(canvas: np.ndarray) -> np.ndarray:
    columns = np.flatnonzero((canvas > framing.INK_LEVEL).any(axis=0))
    return canvas[:, columns[0] : columns[-1] + 1] if len(columns) else canvas[:, :1]


def versions(canvases: np.ndarray, distortions: tuple[str, ...]) -> np.ndarray:
    """Each number as it is and, with distortions, as other pens and hands would have written it: uint8
    [V, N, 28, 28·K] — the versions `pipeline.distort` makes of MNIST's digits, made of whole numbers."""
    per_number = tuple(name for name in distortions if name in distort.PER_DIGIT)
    return distort.Distorter(per_number).variants(canvases) if per_number else canvases[None]


def numbers(
    canvases: np.ndarray, labels: np.ndarray, share: float, distortions: tuple[str, ...],
    image_size: tuple[int, int], seed: int,
) -> Numbers:  # fmt: skip
    """What training mixes into its batches: the numbers and `spliced` ones, in all their versions, at the
    model's input size."""
    new, new_labels = spliced(canvases, labels, seed)
    canvases, labels = np.concatenate([canvases, new]), np.concatenate([labels, new_labels])
    drawn = versions(canvases, distortions)
    if drawn.shape[2:] != tuple(image_size):
        drawn = np.stack([np.stack([images.sized(c, image_size) for c in version]) for version in drawn])
    return Numbers(drawn, labels, share)


def batches(canvases: np.ndarray, labels: np.ndarray, image_size: tuple[int, int], batch_size: int):
    """The numbers as evaluation batches ({"image": uint8 [B, H, W, 1], "labels": int32 [B, K]}), in order."""
    framed = np.stack([images.sized(c, image_size) for c in canvases])
    for start in range(0, len(framed), batch_size):
        yield {"image": framed[start : start + batch_size, ..., None], "labels": labels[start : start + batch_size]}
