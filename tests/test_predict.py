"""predict.py run for real on image files, with the briefly trained 2-digit model; digitseq.Reader beside it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import command, run
from handwritten import predicted, read_right, write_numbers
from PIL import Image

from digitseq import Reader

pytestmark = pytest.mark.slow  # they read a model trained for them (the trained_workdir fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist_dir):
    """12 free-layout test sequences from pipeline.export as PNGs, and 12 cell-layout ones as photo-like
    JPEGs (dark on light, wide margins, 3× larger, RGB); their images and their labels as digit strings."""
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for layout in ("free", "cells"):
        flags = ["--examples", "12", "--max-digits", "2", "--layout", layout, "--out", str(folder / f"{layout}.npz")]
        result = run("-m", "pipeline.export", *flags)
        assert result.returncode == 0, result.stderr
        data = np.load(folder / f"{layout}.npz")
        paths = []
        for i, image in enumerate(data["images"]):
            if layout == "free":
                Image.fromarray(image).save(folder / f"{i}.png")
                paths.append(str(folder / f"{i}.png"))
            else:
                photo = Image.fromarray(255 - np.pad(image, 25)).convert("RGB")
                photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg")
                paths.append(str(folder / f"{i}.jpg"))
        labels = ["".join(str(d) for d in label if d != 10) for label in data["labels"]]
        out[layout] = paths, data["images"], labels
    return out


def test_exported_pngs_read_as_the_model_reads_the_exported_set(trained_workdir, exported):
    """Framing a free-layout sequence again changes next to nothing: from its PNG file the model gives the
    probabilities it gives the exported array itself (a briefly trained model's near ties may tip either way,
    so the digits are compared where predict.py and the library read the same file)."""
    paths, images, labels = exported["free"]
    # As a user types it, in a process of its own (the other tests of the command call it in this one).
    result = command("predict.py", *paths, "--weights", str(trained_workdir / "model.h5"))
    assert result.returncode == 0, result.stderr
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == paths
    reader = Reader.load(trained_workdir / "model.h5")
    from_files = reader.read_prepared([reader.prepare(path) for path in paths])
    assert list(predicted(result.stdout).values()) == [reading.digits for reading in from_files]
    as_exported = reader.read_prepared(list(images))
    for path, from_file, exported_reading in zip(paths, from_files, as_exported, strict=True):
        difference = np.abs(from_file.probabilities - exported_reading.probabilities).max()
        assert difference < 0.03, (path, difference)
    right = sum(reading.digits == label for reading, label in zip(as_exported, labels, strict=True))
    assert right >= 9, ([reading.digits for reading in as_exported], labels)


def test_photo_like_images_read_as_their_labels(trained_workdir, exported):
    paths, _, labels = exported["cells"]
    result = run("predict.py", *paths, "--workdir", str(trained_workdir), "--probs")
    assert result.returncode == 0, result.stderr
    got = list(predicted(result.stdout).values())
    assert sum(a == b for a, b in zip(got, labels, strict=True)) >= 10, (got, labels)
    rows = [line for line in result.stdout.splitlines() if line.startswith("  pos ")]
    assert len(rows) == 2 * len(paths)
    probabilities = np.array([[float(p) for p in row.split(":")[1].split()] for row in rows])
    assert probabilities.shape == (24, 11) and np.allclose(probabilities.sum(1), 1, atol=0.01)


def test_handwritten_numbers_whose_digits_touch_are_read(trained_workdir, tmp_path):
    """A user's scans: two-digit numbers of MNIST test digits, composed as ink on paper by a composer of
    their own (tests/handwritten.py), their digits touching or crossing, read by predict.py end to end.
    Cutting such an image at its ink-free columns reads almost none of them."""
    model = ["--weights", str(trained_workdir / "model.h5")]
    touching = [
        number
        for style in ("touching", "overlapping")
        for number in write_numbers(tmp_path / style, style, count=60, max_digits=2, seed=1)
        if len(number[1]) == 2
    ]
    assert len(touching) > 40
    assert read_right(touching, *model) >= 0.5


def test_photos_of_written_numbers_are_read(trained_workdir, tmp_path):
    """Phone photos (tests/handwritten.py's "photo" style): blue or black ink on white, grey or tinted
    paper, turned by up to 5°, soft focus, lit from one side and half of them under a shadow's edge,
    grain, JPEG quality 60 — read by predict.py end to end. Framed by the border's median, as before the
    page was normalised, such photos read as (almost) nothing: paper darker than the median becomes ink."""
    photos = write_numbers(tmp_path / "photo", "photo", count=40, max_digits=2, seed=3)
    assert all(path.suffix == ".jpg" for path, _ in photos)
    assert read_right(photos, "--weights", str(trained_workdir / "model.h5")) >= 0.6


def test_the_library_reads_paths_and_arrays_alike(trained_workdir, exported):
    paths, images, _ = exported["free"]
    reader = Reader.load(trained_workdir)
    from_files = reader.read(paths[:4])
    from_arrays = reader.read([np.asarray(Image.open(path)) for path in paths[:4]])
    dark_on_light = reader.read([1.0 - image / 255.0 for image in images[:4]])  # floats, ink dark on paper
    assert [r.digits for r in from_files] == [r.digits for r in from_arrays] == [r.digits for r in dark_on_light]
    assert from_files[0].probabilities.shape == (2, 11)
    np.testing.assert_allclose(from_files[0].probabilities, from_arrays[0].probabilities, atol=1e-6)


def test_bad_files_get_one_line_each_and_the_rest_are_read(trained_workdir, exported, tmp_path):
    paths, _, _ = exported["free"]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not pixels")
    bad = [str(tmp_path / "empty.png"), str(tmp_path / "notes.png"), str(tmp_path / "missing.png")]
    model = str(trained_workdir / "model.h5")
    good = run("predict.py", paths[0], paths[1], "--weights", model)
    result = run("predict.py", bad[0], paths[0], bad[1], bad[2], paths[1], "--weights", model)
    assert result.returncode == 1
    assert result.stdout == good.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert "is empty" in errors[0] and "is not an image" in errors[1] and "does not exist" in errors[2]


def test_no_model_is_one_line(tmp_path):
    result = run("predict.py", "x.png", "--weights", str(tmp_path / "none.h5"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
