"""pipeline.images: a user's image file → the sequences' layout, and the one-line errors."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from conftest import tiles
from PIL import Image, ImageFilter

from pipeline import framing
from pipeline.images import ImageFileError, gray_array, model_input, native_layout, read_gray


@pytest.fixture(scope="module")
def sequence(pools):
    """A 3-digit native sequence image [28, 140] of MNIST test digits, and its cells' digits."""
    pool = pools["test"]
    picks = [3, 17, 42]
    image = np.zeros((28, 140), np.uint8)
    for cell, index in enumerate(picks):
        image[:, cell * 28 : (cell + 1) * 28] = pool.images[index]
    return image, [int(pool.labels[i]) for i in picks]


def _save(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


def test_an_image_of_the_model_size_is_taken_as_it_is(tmp_path, sequence):
    image, _ = sequence
    assert np.array_equal(model_input(_save(tmp_path / "a.png", image), (28, 140), 5), image)
    inverted = _save(tmp_path / "b.png", 255 - image)  # dark ink on white paper
    assert np.array_equal(model_input(inverted, (28, 140), 5), image)


def test_the_seed_preset_gets_the_pipelines_resize(tmp_path, sequence):
    import tensorflow as tf

    image, _ = sequence
    got = model_input(_save(tmp_path / "a.png", image), (64, 64), 5)
    expected = tf.image.resize(image[None, :, :, None], (64, 64), method="bilinear")
    assert got.shape == (64, 64)
    assert np.abs(got.astype(int) - np.round(expected.numpy()[0, :, :, 0]).astype(int)).max() <= 1


def test_a_photo_like_image_is_split_into_mnist_cells(tmp_path, sequence):
    """Dark on light, wide margins, uneven gaps, 3× larger, RGB JPEG: each digit lands in its own
    cell, fitted and centred the way MNIST's are, the cells after the last digit blank."""
    image, _ = sequence
    cells = tiles(image[None], 5)[0]
    spaced = np.concatenate([np.pad(cells[0], ((0, 0), (0, 30))), cells[1], np.pad(cells[2], ((0, 0), (12, 0)))], 1)
    photo = Image.fromarray(255 - np.pad(spaced, 25)).convert("RGB")
    photo = photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)
    layout = model_input(path, (28, 140), 5)
    got = tiles(layout[None], 5)[0]
    assert not got[3:].any()  # cells 4 and 5: blank
    for cell in range(3):  # the same digit, placed to within a pixel
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        moved = [np.roll(got[cell], shift, axis=(0, 1)).ravel() for shift in shifts]
        assert max(np.corrcoef(m, cells[cell].ravel())[0, 1] for m in moved) > 0.85, cell


def test_an_image_without_ink_is_an_empty_sequence():
    assert not native_layout(np.full((50, 80), 7, np.uint8), 5).any()


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width × height (its pixel data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.png", None, "does not exist"),
        ("empty.png", b"", "is empty"),
        ("notes.png", b"these are not pixels", "is not an image"),
        ("huge.png", _png_header_only(20_000, 20_000), "scale it down"),
        ("big.png", _png_header_only(8_000, 6_000), "8000x6000 pixels"),
        ("cut.png", "truncated", "damaged or truncated"),
    ],
    ids=["missing", "empty", "not-an-image", "20000x20000", "48-megapixels", "truncated"],
)
def test_bad_files_get_one_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "truncated":
        Image.fromarray(np.arange(28 * 140, dtype=np.uint32).astype(np.uint8).reshape(28, 140)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageFileError, match=message) as error:
        read_gray(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageFileError, match="is a folder"):
        read_gray(tmp_path)


def test_a_corrupt_exif_block_is_read_without_a_word_from_pillow(tmp_path, sequence):
    image, _ = sequence
    exif = Image.Exif()
    exif[0x010F] = "a camera maker"  # Make
    exif[0x0110] = "a camera model"  # Model
    path = tmp_path / "photo.jpg"
    Image.fromarray(255 - image).save(path, exif=exif.tobytes()[:-6], quality=95)  # the block cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gray = read_gray(path)
    assert not caught, [str(w.message) for w in caught]
    assert np.abs(gray.astype(int) - image).mean() < 3  # the pixels, inverted back to white on black


def _written(pools) -> tuple[np.ndarray, str]:
    from pipeline.sequences import SequenceConfig, eval_batches, numpy_batches

    data = eval_batches(pools["test"], SequenceConfig(layout="free"), num_examples=8, batch_size=8, seed=2)
    batch = next(numpy_batches(data))
    return batch["image"][..., 0], batch["labels"]


def test_a_photo_of_a_written_number_is_framed_as_the_free_layout_is(tmp_path, pools):
    """Grey ink on light paper, wide margins, 3× larger, blurred, as a JPEG: framed, it is the sequence again."""
    images, _ = _written(pools)
    likeness = []
    for i, image in enumerate(images):
        paper = 230 - (230 - 70) * (np.pad(image, ((20, 30), (15, 40))) / 255.0)
        photo = Image.fromarray(paper.astype(np.uint8)).convert("RGB")
        photo = photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC)
        photo.filter(ImageFilter.GaussianBlur(1.5)).save(tmp_path / f"{i}.jpg", quality=90)
        framed = model_input(tmp_path / f"{i}.jpg", (28, 140), 5, layout="free")
        assert framed.shape == (28, 140) and framed.dtype == np.uint8
        likeness.append(np.corrcoef(framed.ravel().astype(float), image.ravel().astype(float))[0, 1])
    assert min(likeness) > 0.8 and np.mean(likeness) > 0.92, likeness  # the blur stays, a little


def test_arrays_read_as_their_files_do(tmp_path, pools):
    images, _ = _written(pools)
    image = images[0]
    path = _save(tmp_path / "a.png", 255 - image)
    from_file = model_input(path, (28, 140), 5, layout="free")
    for array in (255 - image, (255 - image) / 255.0, np.stack([255 - image] * 3, axis=-1), image[..., None]):
        assert np.array_equal(model_input(array, (28, 140), 5, layout="free"), from_file)
    with pytest.raises(ImageFileError, match="must be \\[height, width\\]"):
        model_input(np.zeros((2, 3, 4, 5)), (28, 140), 5)
    assert np.array_equal(gray_array(np.full((8, 8), 0.0)), np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageFileError, match="the image array is 7x8 pixels, too small to hold a digit"):
        gray_array(np.zeros((8, 7)))


def _on_paper(number: np.ndarray, ink=(25, 40, 150), paper=(240, 228, 190), light=None, grain=0.0, seed=0):
    """A white-on-black number → RGB float: ink on paper, 3× the size with wide margins, lit by `light`
    (a function of (rows, columns) in [0, 1] → brightness factor), with Gaussian grain."""
    padded = Image.fromarray(np.pad(number, ((20, 24), (15, 40))))
    size = (3 * (number.shape[1] + 55), 3 * (number.shape[0] + 44))
    big = np.asarray(padded.resize(size, Image.Resampling.BICUBIC), np.float32) / 255
    picture = np.array(paper, np.float32) * (1 - big[..., None]) + np.array(ink, np.float32) * big[..., None]
    rows, columns = np.mgrid[0 : big.shape[0], 0 : big.shape[1]]
    if light is not None:
        picture *= light(rows / big.shape[0], columns / big.shape[1])[..., None]
    picture += np.random.default_rng(seed).normal(0, grain, picture.shape) if grain else 0
    return np.clip(np.round(picture), 0, 255).astype(np.uint8)


PAGES = {  # each photo's trouble, alone
    "light from one side": dict(light=lambda r, c: 0.3 + 0.7 * c),
    "a shadow's edge": dict(light=lambda r, c: 1 - 0.45 / (1 + np.exp(-(c + 0.3 * r - 0.55) / 0.03))),
    "grey paper, black ink": dict(ink=(30, 30, 30), paper=(150, 150, 145)),
    "grain": dict(grain=12.0),
    "a dim corner, grain": dict(light=lambda r, c: 0.35 + 0.65 * np.minimum(1, r + c), grain=6.0),
}


@pytest.mark.parametrize("trouble", PAGES)
def test_a_photo_of_a_written_number_on_uneven_paper_frames_as_the_number(tmp_path, pools, trouble):
    """Light from one side, a shadow, grey paper, grain, tinted paper and blue ink, saved as a JPEG of quality
    60: framed, it is the number again. (By the border's median, the rule before the page was normalised,
    such a photo frames to a grey ramp: the paper darker than the median becomes ink.)"""
    images, _ = _written(pools)
    likeness = []
    for i, image in enumerate(images[:4]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(_on_paper(image, **PAGES[trouble], seed=i)).save(path, quality=60)
        framed = model_input(path, (28, 140), 5, layout="free")
        likeness.append(np.corrcoef(framed.ravel().astype(float), image.ravel().astype(float))[0, 1])
    assert min(likeness) > 0.8, likeness


def test_a_small_number_in_a_large_photo_is_found_and_specks_left_out(tmp_path, pools):
    images, _ = _written(pools)
    image = images[1]
    photo = np.full((1500, 2000, 3), 225, np.uint8)
    number = _on_paper(image, paper=(225, 225, 225), ink=(30, 30, 30))
    photo[900 : 900 + number.shape[0], 300 : 300 + number.shape[1]] = number  # a ninth of the height
    rng = np.random.default_rng(0)
    for row, column in rng.integers([0, 0], [1500, 2000], size=(12, 2)):
        if not (800 < row < 1200 and 200 < column < 900):
            photo[row : row + 4, column : column + 4] = 40  # specks of dust, away from the number
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=80)
    framed = model_input(path, (28, 140), 5, layout="free")
    assert np.corrcoef(framed.ravel().astype(float), image.ravel().astype(float))[0, 1] > 0.85


def test_light_ink_on_dark_paper_and_dark_ink_on_light_frame_alike(tmp_path, pools):
    images, _ = _written(pools)
    light = _on_paper(images[2], ink=(30, 30, 30), paper=(235, 235, 235), light=lambda r, c: 0.4 + 0.6 * c)
    dark = 255 - light  # chalk on a board, lit from the other side
    framed = [model_input(array, (28, 140), 5, layout="free") for array in (light, dark)]
    assert np.corrcoef(framed[0].ravel().astype(float), framed[1].ravel().astype(float))[0, 1] > 0.95


def _cropped_close(ink: np.ndarray) -> np.ndarray:
    """Ink alpha float [h, w] in [0, 1] → dark ink on white paper, uint8, cropped to the ink's box."""
    rows, columns = np.flatnonzero((ink > 0.5).any(axis=1)), np.flatnonzero((ink > 0.5).any(axis=0))
    ink = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    return np.round(245 - 225 * ink).astype(np.uint8)


def _likeness(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def _framed_with_margins(ink: np.ndarray) -> np.ndarray:
    """What a number of this ink frames to written small on a wide page: the rule's plainest case."""
    return model_input(np.pad(np.round(255 * ink), 60).astype(np.uint8), (28, 140), 5, layout="free")


@pytest.mark.parametrize("stroke", [0, 4, 8])
def test_a_bold_typeset_number_cropped_close_frames_as_the_number(stroke):
    """Black on white, strokes up to a quarter of the height, the ink over a third of the image: the paper is
    what the border shows. (By what stands out of the local paper alone, the rule before, it was taken
    for ink: a dark number in a white box.)"""
    from PIL import ImageDraw, ImageFont

    page = Image.new("L", (420, 160), 0)
    ImageDraw.Draw(page).text((20, 20), "2468", font=ImageFont.load_default(size=90), fill=255, stroke_width=stroke)
    ink = np.asarray(page, np.float32) / 255
    close = _cropped_close(ink)
    assert (close < 128).mean() > 0.33
    expected = _framed_with_margins(ink)
    for image in (close, 255 - close):  # either polarity
        assert _likeness(model_input(image, (28, 140), 5, layout="free"), expected) > 0.95


def test_numbers_in_a_felt_tip_marker_cropped_close_frame_as_the_number(pools):
    """MNIST test digits redrawn with strokes a fifth of their height, cropped at the ink: solid strokes,
    where loops fill in too. (The rule before took filled loops for paper: grey holes in the ink.)"""
    import scipy.ndimage as ndi

    images, _ = _written(pools)
    for image in images[:6]:
        shape = np.asarray(Image.fromarray(image).resize((560, 112), Image.Resampling.BICUBIC)) > 110
        rows = np.flatnonzero(shape.any(axis=1))
        ink = (ndi.distance_transform_edt(~shape) <= 0.07 * (rows[-1] - rows[0])).astype(np.float32)
        ink = ndi.gaussian_filter(ink, 1.0)
        expected = _framed_with_margins(ink)
        assert _likeness(model_input(_cropped_close(ink), (28, 140), 5, layout="free"), expected) > 0.95


def _written_with_a_pen(number: str, width: int) -> np.ndarray:
    """`number` in tests/page.py's letterforms, 100 px high, drawn with a line `width` px wide: white on black."""
    from page import layout
    from PIL import ImageDraw

    page = Image.new("L", (100 * len(number) + 60, 160), 0)
    draw = ImageDraw.Draw(page)
    for stroke in layout(number, None, (0.3, 0.3)):
        draw.line([(30 + x * 100, 30 + y * 100) for x, y in stroke], fill=255, width=width, joint="curve")
    return np.asarray(page)


@pytest.mark.parametrize("number", ["2026", "4789", "1035"])
def test_a_hairline_number_frames_with_strokes_as_wide_as_mnists(number):
    """A pencil's or a pointer's line, one pixel wide on a number 100 px high, grey on white: framed, its
    strokes are as wide as MNIST's thinnest and as bright. (Resampled as they were, they framed a fifth of
    a pixel wide and faint — 2 px above INK_LEVEL, a quarter as bright: pencil numbers lost their thin digits.)"""
    hairline = model_input(235 - _written_with_a_pen(number, 1) // 2, (28, 140), 5, layout="free")
    ink = hairline > framing.INK_LEVEL
    assert framing.stroke_width(ink) >= 2.5 and np.percentile(hairline[ink], 75) > 200


@pytest.mark.parametrize(
    "value,named",
    [
        (None, "None (NoneType)"),
        (3, "3 (int)"),
        (2.5, "2.5 (float)"),
        ([[0, 255], [255, 0]], "[[0, 255], [255, 0]] (list)"),
        ({"image": "a.png"}, "{'image': 'a.png'} (dict)"),
    ],
    ids=["None", "int", "float", "nested-list", "dict"],
)
def test_what_is_not_an_image_is_refused_in_one_sentence(value, named):
    with pytest.raises(ImageFileError) as refused:
        model_input(value, (28, 140), 5, layout="free")
    message = str(refused.value)
    assert message.startswith(f"{named} is not an image: give a file's path, its bytes, an open binary file")
    assert "\n" not in message and ("np.asarray" in message) == isinstance(value, list)
