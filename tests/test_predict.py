"""predict.py run for real on image files, with the briefly trained 2-digit model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import command
from PIL import Image

pytestmark = pytest.mark.slow  # they read a model trained for them (the trained_workdir fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist_dir):
    """12 test sequences from pipeline.export, as PNGs (exact layout) and as photo-like JPEGs
    (dark on light, wide margins, 3× larger, RGB), with their labels as digit strings."""
    folder = tmp_path_factory.mktemp("images")
    result = command("-m", "pipeline.export", "--examples", "12", "--max-digits", "2", "--out", str(folder / "t.npz"))
    assert result.returncode == 0, result.stderr
    data = np.load(folder / "t.npz")
    pngs, photos, labels = [], [], []
    for i, (image, label) in enumerate(zip(data["images"], data["labels"], strict=True)):
        Image.fromarray(image).save(folder / f"{i}.png")
        photo = Image.fromarray(255 - np.pad(image, 25)).convert("RGB")
        photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg")
        pngs.append(str(folder / f"{i}.png"))
        photos.append(str(folder / f"{i}.jpg"))
        labels.append("".join(str(d) for d in label if d != 10))
    return pngs, photos, labels


def _predicted(stdout: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if ": " in line and not line.startswith(" ")]


def test_exported_pngs_read_as_their_labels(trained_workdir, exported):
    pngs, _, labels = exported
    result = command("predict.py", *pngs, "--weights", str(trained_workdir / "model.h5"))
    assert result.returncode == 0, result.stderr
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == pngs
    assert _predicted(result.stdout) == labels


def test_photo_like_images_read_as_their_labels(trained_workdir, exported):
    _, photos, labels = exported
    result = command("predict.py", *photos, "--workdir", str(trained_workdir), "--probs")
    assert result.returncode == 0, result.stderr
    got = _predicted(result.stdout)
    assert sum(a == b for a, b in zip(got, labels, strict=True)) >= 11, (got, labels)
    rows = [line for line in result.stdout.splitlines() if line.startswith("  pos ")]
    assert len(rows) == 2 * len(photos)
    probabilities = np.array([[float(p) for p in row.split(":")[1].split()] for row in rows])
    assert probabilities.shape == (24, 11) and np.allclose(probabilities.sum(1), 1, atol=0.01)


def test_bad_files_get_one_line_each_and_the_rest_are_read(trained_workdir, exported, tmp_path):
    pngs, _, labels = exported
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not pixels")
    bad = [str(tmp_path / "empty.png"), str(tmp_path / "notes.png"), str(tmp_path / "missing.png")]
    model = str(trained_workdir / "model.h5")
    result = command("predict.py", bad[0], pngs[0], bad[1], bad[2], pngs[1], "--weights", model)
    assert result.returncode == 1
    assert _predicted(result.stdout) == labels[:2]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert "is empty" in errors[0] and "is not an image" in errors[1] and "does not exist" in errors[2]


def test_no_model_is_one_line(tmp_path):
    result = command("predict.py", "x.png", "--weights", str(tmp_path / "none.h5"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
