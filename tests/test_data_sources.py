"""Every data source: the built-in digits, `.npz` arrays, image folders of both layouts, TFDS."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pytest

from minivit.data import DataError, get_source

Image = pytest.importorskip("PIL.Image")


# ---- built-in digits ----------------------------------------------------------------------------


def test_digits_is_the_real_scikit_learn_set_with_a_fixed_split():
    train, test = get_source("digits", "train"), get_source("digits", "test")
    assert (len(train), len(test)) == (1437, 360)  # 1797 = 80 / 20, stratified
    assert train.class_names == [str(k) for k in range(10)]
    image, label = test.get(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and 0 <= label < 10
    assert (image[..., 0] == image[..., 2]).all()  # grey, repeated into three channels
    everything = np.stack([get_source("digits", "all").get(i)[0] for i in range(1797)])
    assert everything.max() == 255 and everything.min() == 0  # 0..16 scaled to 0..255
    counts = np.bincount([test.get(i)[1] for i in range(len(test))], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each class


def test_digits_against_scikit_learn_when_installed():
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    everything = get_source("digits", "all")
    for i in [0, 1, 500, 1796]:
        image, label = everything.get(i)
        np.testing.assert_array_equal(image[..., 0], np.rint(reference.images[i] * 255 / 16))
        assert label == reference.target[i]


# ---- npz ----------------------------------------------------------------------------------------


def _npz(tmp_path, **arrays):
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_class_names_and_a_held_out_fraction(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)  # 60 examples, 3 classes
    images = rng.integers(0, 256, (60, 5, 6), dtype=np.uint8)
    path = _npz(tmp_path, images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    train, test = get_source(path, "train"), get_source(path, "test")
    assert (len(train), len(test)) == (54, 6) and train.class_names == ["a", "b", "c"]
    seen = [train.get(i)[0][..., 0].tobytes() for i in range(54)]
    seen += [test.get(i)[0][..., 0].tobytes() for i in range(6)]
    assert sorted(seen) == sorted(im.tobytes() for im in images)  # disjoint, together all
    assert np.bincount([test.get(i)[1] for i in range(6)]).tolist() == [2, 2, 2]
    again = get_source(path, "test")
    assert all((again.get(i)[0] == test.get(i)[0]).all() for i in range(6))  # deterministic


def test_npz_with_a_split_key_and_split_strings(tmp_path):
    images = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    split = np.array(["train"] * 8 + ["test"] * 2)
    path = _npz(tmp_path, images=images, labels=np.arange(10) % 4, split=split)
    source = get_source(path, "train[:50%]")
    assert len(source) == 4 and source.num_classes == 4 and source.class_names[3] == "3"
    np.testing.assert_array_equal(source.get(3)[0], images[3])
    assert get_source(path, "test").get(1)[1] == 9 % 4
    with pytest.raises(DataError, match="has no split 'validation'; available: all, test, train"):
        get_source(path, "validation")


def test_npz_bad_input_gets_one_sentence(tmp_path):
    with pytest.raises(DataError, match="has no key 'labels'"):
        get_source(_npz(tmp_path, images=np.zeros((2, 3, 3), np.uint8)), "train")
    floats = _npz(tmp_path, images=np.zeros((2, 3, 3), np.float32), labels=np.zeros(2, int))
    with pytest.raises(DataError, match="'images' is float32"):
        get_source(floats, "train")
    short = _npz(tmp_path, images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(DataError, match="'labels' is int64 \\(3,\\)"):
        get_source(short, "train")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataError, match="could not be read as an .npz file"):
        get_source(str(tmp_path / "text.npz"), "train")
    with pytest.raises(DataError, match="does not exist"):
        get_source(str(tmp_path / "missing.npz"), "train")


# ---- image folders ------------------------------------------------------------------------------

RGB = (200, 100, 50)


def _write_kinds(folder, stem: str) -> dict[str, tuple[int, int, int]]:
    """One image of every kind of file, and the RGB value each must decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (7, 5), RGB).save(folder / f"{stem}_rgb.png")
    Image.new("L", (6, 6), 77).save(folder / f"{stem}_grey.PNG")
    Image.new("LA", (6, 6), (90, 10)).save(folder / f"{stem}_grey_alpha.png")
    Image.new("RGBA", (5, 8), (10, 20, 30, 128)).save(folder / f"{stem}_rgba.png")
    Image.new("CMYK", (6, 6), (0, 255, 0, 0)).save(folder / f"{stem}_cmyk.tif")
    Image.new("RGB", (6, 6), RGB).quantize(colors=4).save(folder / f"{stem}_palette.gif")
    Image.new("I;16", (6, 6), 100 * 257).save(folder / f"{stem}_16bit.png")
    Image.new("RGB", (9, 9), RGB).save(folder / f"{stem}_photo.jpg", quality=95)
    (folder / f"{stem}_notes.txt").write_text("not an image, ignored")
    return {
        "rgb": RGB,
        "grey": (77,) * 3,
        "grey_alpha": (90,) * 3,
        "rgba": (10, 20, 30),
        "cmyk": (255, 0, 255),
        "palette": RGB,
        "16bit": (100,) * 3,
        "photo": RGB,
    }


def _check_decoded(source, expected_by_kind):
    """Each image decodes to its colour; returns the labels seen, by kind."""
    labels = {}
    for i in range(len(source)):
        image, label = source.get(i)
        kind = source.files[i].stem.split("_", 1)[1]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        tolerance = 3 if kind == "photo" else 0  # lossy JPEG
        assert np.abs(image.astype(int) - expected_by_kind[kind]).max() <= tolerance, kind
        labels.setdefault(kind, set()).add(label)
    return labels


def test_folder_with_train_and_test_folders_reads_every_kind_of_image(tmp_path):
    expected = {}
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            expected = _write_kinds(tmp_path / split / name, name)
    (tmp_path / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        train = get_source(str(tmp_path), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unreadable file is not in this split
        test = get_source(str(tmp_path), "test")
    assert train.class_names == ["cat", "dog"] and (len(train), len(test)) == (16, 16)
    _check_decoded(train, expected)
    assert [test.get(i)[1] for i in range(16)] == [0] * 8 + [1] * 8
    assert len(get_source(str(tmp_path), "train[:25%]")) == 4
    (tmp_path / "notes").mkdir()  # a folder of something else is not read unless asked for
    assert len(get_source(str(tmp_path), "test[:50%]+test[50%:]")) == 16
    with pytest.raises(DataError, match="has no split 'validation'; available: notes, test, train"):
        get_source(str(tmp_path), "validation")


def test_flat_folder_holds_out_a_fraction_of_each_class(tmp_path):
    for name in ("a", "b", "c"):
        for k in range(10):
            _one(tmp_path / name / f"{k}.png")
    train, test = get_source(str(tmp_path), "train"), get_source(str(tmp_path), "test")
    assert (len(train), len(test)) == (27, 3)
    assert sorted(test.get(i)[1] for i in range(3)) == [0, 1, 2]
    assert not set(map(str, train.files)) & set(map(str, test.files))
    assert set(map(str, get_source(str(tmp_path), "test").files)) == set(map(str, test.files))
    assert len(get_source(str(tmp_path), "test", holdout=0.5)) == 15


def test_image_that_opens_but_cannot_be_decoded_is_replaced_by_the_next(tmp_path):
    folder = tmp_path / "only"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "a_full.jpg")
    data = (folder / "a_full.jpg").read_bytes()
    (folder / "0_truncated.jpg").write_bytes(data[: len(data) // 3])
    source = get_source(str(tmp_path), "all")
    with pytest.warns(UserWarning, match="could not decode .*0_truncated.jpg"):
        image, _ = source.get(0)
    assert image.shape == (64, 64, 3) and source.replaced == 1


@pytest.mark.parametrize(
    ("images", "split", "message"),
    [
        ([], "train", "has no class folders"),
        (["cat/"], "train", "class folder .*cat holds no images; add images"),
        (["cat/x.png", "loose.png"], "train", "holds images directly \\(e.g. loose.png\\)"),
        (["train/cat/x.png"], "train", "has train/ but no test/"),
        (["train/cat/x.png", "test/cow/y.png"], "test", "test/cow is a class that .*train lacks"),
        (
            ["data/train/cat/x.png"],
            "train",
            "class folder .*data holds no images; it holds folders",
        ),
    ],
)
def test_empty_or_mixed_up_folders_get_one_sentence(tmp_path, images, split, message):
    root = tmp_path / "root"
    root.mkdir()
    for name in images:
        if name.endswith("/"):
            (root / name).mkdir(parents=True)
        else:
            _one(root / name)
    with pytest.raises(DataError, match=message):
        get_source(str(root), split)


def _one(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (3, 3)).save(path)


# ---- TFDS ---------------------------------------------------------------------------------------


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_source_reads_mock_data(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        cifar = get_source("cifar10", "train", data_dir=str(tmp_path))
        pets = get_source("oxford_iiit_pet", "test", data_dir=str(tmp_path))
        assert len(cifar) == 12 and cifar.num_classes == 10
        image, label = cifar.get(3)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label < 10
        image, label = pets.get(0)  # variable-size photos, 37 breeds
        assert image.ndim == 3 and image.shape[2] == 3 and pets.num_classes == 37


def test_unprepared_tfds_set_names_the_build_command_without_the_network(
    tfds, tmp_path, monkeypatch
):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(DataError, match=f"tfds build cifar10 --data_dir {tmp_path}/env_dir"):
        get_source("cifar10", "train")
    with pytest.raises(DataError, match=f"not prepared in {tmp_path}.*--manual_dir /downloads"):
        get_source("imagenet2012", "train", data_dir=str(tmp_path), manual_dir="/downloads")
    with pytest.raises(DataError, match="neither a file, a folder, 'digits' nor a TFDS"):
        get_source("cifar1O", "train", data_dir=str(tmp_path))
