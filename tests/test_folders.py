"""A user's own numbers: the labelled folder and its refusals, mixing into training batches, fine-tuning
end to end (train.py --data --init-from, eval.py --data)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import only_line, run, weights
from PIL import Image
from writer import write_folder

from model import judge, trained
from pipeline import folders, framing, images
from pipeline.sequences import BLANK, Numbers, SequenceConfig, fixed_set, numpy_stacks, train_batches


def test_a_folder_reads_every_number_framed_with_its_digits(tmp_path):
    rows = write_folder(tmp_path, 6, seed=1)
    (tmp_path / "labels.csv").write_text("file,digits\n" + "".join(f"{f},{d}\n\n" for f, d in rows))  # blank lines
    folder = folders.read_folder(tmp_path)
    assert folder.files == tuple(f for f, _ in rows) and folder.digits == tuple(d for _, d in rows)
    assert folder.canvases.shape == (6, 28, 140) and folder.canvases.dtype == np.uint8
    ink_rows = np.flatnonzero((folder.canvases[0] > 64).any(axis=1))
    assert 18 <= len(ink_rows) <= 22  # framed: the ink about 20 px high, white on black
    labels = folder.labels(5)
    assert "".join(str(d) for d in labels[0] if d != BLANK) == rows[0][1]
    # The digest is of the contents: the same again, another for one changed byte.
    assert folders.read_folder(tmp_path).digest == folder.digest
    image = tmp_path / rows[0][0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(image)
    assert folders.read_folder(tmp_path).digest != folder.digest


def test_every_bad_row_is_refused_together_by_line(tmp_path):
    write_folder(tmp_path, 3, seed=2)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "sub").mkdir()
    lines = [
        "file,digits", "number_0000.png,12", "missing.png,3", "notes.png,4", "number_0001.png,12a",
        "number_0002.png,123456", "number_0000.png,12", "../outside.png,1", "sub,5", "number_0002.png,", "blank.png,3",
    ]  # fmt: skip
    Image.new("L", (60, 30), 255).save(tmp_path / "blank.png")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(folders.FolderError) as refused:
        folders.read_folder(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "has 9 bad rows" in message and "(and 4 more)" in message, message
    assert "line 3: missing.png does not exist" in message
    assert "line 4: notes.png is not an image" in message
    assert "line 5: the digits '12a' are not 1 to 5 characters 0-9" in message
    assert "line 6: the digits '123456'" in message
    assert "line 7: number_0000.png is listed again (first on line 2)" in message
    with pytest.raises(folders.FolderError, match="line 2: blank.png has no ink on it to read"):
        (tmp_path / "labels.csv").write_text("file,digits\nblank.png,3\n")
        folders.read_folder(tmp_path)


@pytest.mark.parametrize(
    "make, said",
    [
        (lambda d: None, "has no labels.csv"),
        (lambda d: (d / "labels.csv").write_text("name,number\na.png,1\n"), "must begin with the header line"),
        (lambda d: (d / "labels.csv").write_text("file,digits\n\n"), "lists no images"),
        (lambda d: (d / "labels.csv").write_bytes(b"file,digits\n\xff\xfe.png,1\n"), "is not UTF-8"),
    ],
)  # fmt: skip
def test_a_folder_without_usable_labels_is_refused_in_one_sentence(tmp_path, make, said):
    make(tmp_path)
    with pytest.raises(folders.FolderError, match=said):
        folders.read_folder(tmp_path)


def test_a_bad_folder_stops_train_and_eval_before_anything_is_written(tmp_path, trained_workdir):
    write_folder(tmp_path / "mine", 4, seed=3, max_digits=2)
    with open(tmp_path / "mine" / "labels.csv", "a") as labels:
        labels.write("gone.png,7\n")
    workdir = tmp_path / "run"
    result = run("train.py", "--data", str(tmp_path / "mine"), "--init-from", str(trained_workdir / "model.h5"),
                 "--workdir", str(workdir))  # fmt: skip
    assert result.returncode == 2
    assert only_line(result.stderr) == (
        f"train.py: error: {tmp_path / 'mine' / 'labels.csv'} has 1 bad row: line 6: gone.png does not exist; "
        "fix or remove them (nothing was read)"
    )
    assert not workdir.exists()
    result = run("eval.py", "--weights", str(trained_workdir / "model.h5"), "--data", str(tmp_path / "mine"))
    assert result.returncode == 2 and "line 6: gone.png does not exist" in only_line(result.stderr)
    result = run("eval.py", "--weights", str(trained_workdir / "model.h5"), "--data", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere does not exist; give a labelled folder" in only_line(result.stderr)


def test_numbers_take_their_share_of_every_batch_deterministically(pools):
    config = SequenceConfig(2, layout="free")
    white = np.full((1, 3, 28, 56), 255, np.uint8)
    labels = np.array([[1, 2], [3, BLANK], [4, 5]], np.int32)
    numbers = Numbers(white, labels, share=0.25)

    def stacks(start_step: int) -> dict:
        data = train_batches(pools["train"], config, batch_size=64, seed=5, start_step=start_step, numbers=numbers)
        return next(numpy_stacks(data))

    first = stacks(0)
    taken = (first["image"] == 255).all(axis=(2, 3, 4))  # [steps, batch]
    assert 0.2 < taken.mean() < 0.3
    assert all(tuple(row) in {(1, 2), (3, BLANK), (4, 5)} for row in first["labels"][taken])
    again = stacks(3)  # a stream started at step 3 sees what an uninterrupted one sees there
    np.testing.assert_array_equal(again["image"][0], first["image"][3])
    np.testing.assert_array_equal(again["labels"][0], first["labels"][3])


def test_spliced_numbers_put_several_numbers_side_by_side(tmp_path):
    write_folder(tmp_path, 8, seed=4, max_digits=2)
    folder = folders.read_folder(tmp_path, max_digits=4)
    labels = folder.labels(4)
    made, made_labels = folders.spliced(folder.canvases, labels, seed=0)
    assert len(made) == folders.SPLICES * 8 and made.shape[1:] == (28, 112)
    numbers = {"".join(str(d) for d in row if d != BLANK) for row in labels}

    def joined(text: str, pieces: int) -> bool:  # `text` is at least `pieces` of the numbers, one after another
        return (pieces <= 1 and text in numbers) or any(
            text.startswith(n) and joined(text[len(n) :], pieces - 1) for n in numbers if len(n) < len(text)
        )

    for row in made_labels:
        text = "".join(str(d) for d in row if d != BLANK)
        assert len(text) <= 4 and all(d == BLANK for d in row[len(text) :]) and joined(text, 2), text
    assert made.max() > 200 and (made > 64).any(axis=2).sum(axis=1).min() >= 16  # framed ink, about 20 px high


def test_spliced_numbers_stand_from_overlapping_to_apart():
    # Ten one-digit "numbers", bars of ink 20 px high and 6–15 px wide, spliced in pairs: a made number's ink
    # is as wide as its two bars and the gap between them, which spans SPLICE_GAP — overlapping as close
    # writers' digits do, to apart.
    widths = np.arange(6, 16)
    canvases = np.zeros((10, 28, 56), np.uint8)
    for digit, width in enumerate(widths):
        canvases[digit, 4:24, 4 : 4 + width] = 255
    labels = np.stack([np.arange(10), np.full(10, BLANK)], axis=1).astype(np.int32)
    made, made_labels = folders.spliced(canvases, labels, seed=0)
    inked = (made > 127).any(axis=1)
    extent = inked.shape[1] - inked[:, ::-1].argmax(axis=1) - inked.argmax(axis=1)
    gaps = extent - widths[made_labels].sum(axis=1)
    low, high = (round(end * framing.INK_HEIGHT) for end in folders.SPLICE_GAP)
    assert low - 1 <= gaps.min() <= low + 1 and high - 1 <= gaps.max() <= high + 1, (gaps.min(), gaps.max())
    assert low <= -0.25 * framing.INK_HEIGHT  # as close as a writer's leaning digits stand (docs/results.md)


@pytest.mark.slow
def test_fine_tuning_on_a_folder_end_to_end(tmp_path, trained_workdir, pools):
    mine = tmp_path / "mine"
    write_folder(mine, 12, seed=5, max_digits=2)
    start = trained_workdir / "model.h5"
    workdir = tmp_path / "tuned"
    tune = ["train.py", "--data", str(mine), "--init-from", str(start), "--workdir", str(workdir),
            "--epochs", "1", "--train-examples", "320", "--batch-size", "32"]  # fmt: skip
    result = run(*tune)
    assert result.returncode == 0, result.stderr
    config = json.loads((workdir / "config.json").read_text())
    started = json.loads((trained_workdir / "config.json").read_text())
    assert config["data"] == [str(mine)] and config["data_share"] == folders.SHARE and config["val_data"] == []
    assert config["val_examples"] == 2  # a fifth of the 12 numbers held out
    assert config["init_from"].startswith(str(start)) and len(config["init_digest"]) == 64
    assert config["layers"] == started["layers"] and config["learning_rate"] == 1e-3
    # model.h5 is the judged model: the start kept whole, the fine-tuned network moved, the judge beside them.
    before, after = weights(start), weights(workdir / "model.h5")
    assert (workdir / "start.h5").is_file() and "judge/judge/kernel" in after
    assert all(np.array_equal(before[name], after[in_member(name, 1)]) for name in before)
    assert any(not np.array_equal(before[name], after[in_member(name, 2)]) for name in before)
    from_workdir, from_file = trained.load(workdir), trained.load(workdir / "model.h5")
    assert from_workdir.network == from_file.network and from_file.network.judged
    assert jax.tree.all(jax.tree.map(np.array_equal, from_workdir.variables, from_file.variables))
    # The judge tells the folder's hand from MNIST's.
    canvases, _ = folders.joined([folders.read_folder(mine, 2)], 2)
    mnist, _ = fixed_set(pools["test"], SequenceConfig(2, from_file.image_size, layout="free"), 40, seed=1)
    sized = np.stack([images.sized(canvas, from_file.image_size) for canvas in canvases])
    hand = [judge.judged_hand(from_file, batch[..., None]) for batch in (sized, mnist)]
    assert np.mean(hand[0] > 0.5) >= 0.75 and np.mean(hand[1] < 0.5) >= 0.75, hand
    figures = tmp_path / "figures.json"
    result = run("eval.py", "--workdir", str(workdir), "--data", str(mine), "--json", str(figures))
    assert result.returncode == 0, result.stderr
    assert json.loads(figures.read_text())["num_examples"] == 12
    # The same command again: nothing to do. The folder changed: refused, the run untouched.
    result = run(*tune)
    assert result.returncode == 0 and "already trained" in result.stdout
    shutil.copy(mine / "number_0000.png", mine / "copy.png")
    with open(mine / "labels.csv", "a") as labels:
        labels.write("copy.png,7\n")
    saved = (workdir / "model.h5").read_bytes()
    result = run(*tune)
    assert result.returncode == 2 and "data_digest=" in only_line(result.stderr)
    assert (workdir / "model.h5").read_bytes() == saved
    result = run("train.py", "--data", str(mine), "--init-from", str(start), "--preset", "seed")
    assert result.returncode == 2 and "--preset cannot be given with --init-from" in only_line(result.stderr)
    (workdir / "start.h5").write_bytes((workdir / "start.h5").read_bytes()[:1000])  # damaged: said what to do
    result = run("eval.py", "--workdir", str(workdir))
    assert result.returncode == 2 and "train it again with --no-resume" in only_line(result.stderr)


def in_member(name: str, member: int) -> str:
    """A weight's name in a single network's model.h5 → in a two-member model's: conv1/conv1/kernel →
    member_1_conv1/member_1_conv1/kernel."""
    layer, path, leaf = name.split("/")
    return f"member_{member}_{layer}/member_{member}_{path}/{leaf}"


def test_a_fifth_is_held_out_by_name_the_same_in_every_order(tmp_path):
    write_folder(tmp_path, 10, seed=6, max_digits=2)
    folder = folders.read_folder(tmp_path)
    kept, held = folders.split([folder])
    assert len(held) == 2 and sorted([*kept, *held]) == list(range(10))
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    (tmp_path / "labels.csv").write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    reordered = folders.read_folder(tmp_path)
    assert {reordered.files[i] for i in folders.split([reordered])[1]} == {folder.files[i] for i in held}
    (tmp_path / "labels.csv").write_text("\n".join(rows[:2]) + "\n")
    with pytest.raises(folders.FolderError, match="one number cannot be both trained on and held out"):
        folders.split([folders.read_folder(tmp_path)])


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--val-data", "x"], "--val-data chooses the checkpoint of a run on --data folders; give --data DIR too"),
        (["--data-share", "0.3"], "--data-share is the share of the --data folders' numbers; give --data DIR too"),
        (["--data", "x", "--data-share", "1.5"], "must be a fraction above 0 and at most 1"),
    ],
)
def test_own_number_flags_without_their_folder_are_one_line(flags, said):
    result = run("train.py", *flags)
    assert result.returncode == 2 and said in only_line(result.stderr)
