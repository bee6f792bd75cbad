"""Data sources behind one interface: `len(source)`, `.class_names`, `.get(i) -> (image, label)`.

`get_source` picks the kind from its argument: `digits` (the built-in data set), a path to an
`.npz` file of arrays, a path to a folder of images, or else the name of a TFDS data set. Every
source takes a TFDS-style split string (see `splits.py`).
"""

from __future__ import annotations

import abc
import os
import zipfile
from pathlib import Path

import numpy as np

from minivit.data.errors import DataError
from minivit.data.preprocess import as_rgb
from minivit.data.splits import select

DIGITS = Path(__file__).with_name("digits.npz")  # built by tools/make_digits.py
HOLDOUT = 0.1  # fraction of each class held out as 'test' when a source has no test split


class Source(abc.ABC):
    """A labelled image collection with random access.

    Shapes: get(i) -> (image (H, W, 3) uint8, label int); H and W may differ between examples.
    """

    where: str  # what error messages call this source, e.g. "cifar10 [train[:98%]]"
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abc.abstractmethod
    def get(self, i: int) -> tuple[np.ndarray, int]:
        """Example `i` as (uint8 RGB image, integer label)."""


class ArraySource(Source):
    """Images held in memory as one array (an `.npz` file, the built-in digits).

    Shapes: images (N, H, W) | (N, H, W, 1) | (N, H, W, 3) uint8, labels (N,) int
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names, where: str):
        self.images = images
        self.labels = labels.astype(np.int64)
        self.class_names = list(class_names)
        self.where = where

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        return as_rgb(self.images[i]), int(self.labels[i])


def holdout_splits(labels: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """'train', 'test' and 'all' for a pool without a test split: a fixed fraction of each class.

    Shapes: labels (N,) -> name -> sorted indices

    Deterministic (one `default_rng(0)` visiting classes in order), stratified, and each class
    with at least two examples keeps at least one on each side.
    """
    rng = np.random.default_rng(0)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test).astype(np.int64)] = True
    return {
        "train": np.flatnonzero(~is_test),
        "test": np.flatnonzero(is_test),
        "all": np.arange(len(labels)),
    }


def _check_arrays(data, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `images` and `labels` arrays of an npz file, checked."""
    missing = [k for k in ("images", "labels") if k not in data.files]
    if missing:
        raise DataError(
            f"{path} has no key {missing[0]!r}; an npz data set needs 'images' "
            "(N, H, W[, C]) uint8 and 'labels' (N,) int"
        )
    images, labels = data["images"], data["labels"]
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or images.shape[3:] not in ((), (1,), (3,))
    ):
        raise DataError(
            f"{path}: 'images' is {images.dtype} {images.shape}; it must be uint8 "
            "(N, H, W), (N, H, W, 1) or (N, H, W, 3) with values 0..255"
        )
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' is {labels.dtype} {labels.shape}; it must be integers "
            f"of shape ({len(images)},), one per image"
        )
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: 'labels' holds {labels.min()}; labels must be 0 .. classes - 1")
    return images, labels


def load_npz(path: str | Path, split: str, holdout: float = HOLDOUT, where: str | None = None):
    """An `.npz` data set: keys `images`, `labels`, optional `class_names` and `split`.

    Shapes: images (N, H, W[, C]) uint8, labels (N,), class_names (K,) str, split (N,) str

    `split` names each example's split (e.g. 'train' / 'test'); without it a fraction `holdout`
    of each class is held out as 'test' (see `holdout_splits`).
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} could not be read as an .npz file ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds one array, not an .npz archive with 'images' and 'labels'")
    with data:
        images, labels = _check_arrays(data, path)
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        names = [str(n) for n in data["class_names"]] if "class_names" in data.files else None
        if "split" in data.files:
            tags = data["split"].astype(str)
            splits = {t: np.flatnonzero(tags == t) for t in np.unique(tags)}
            splits["all"] = np.arange(len(labels))
        else:
            splits = holdout_splits(labels, holdout)
    if names is None:
        names = [str(k) for k in range(num_classes)]
    elif len(names) < num_classes:
        raise DataError(
            f"{path}: 'class_names' has {len(names)} names but labels go up to "
            f"{num_classes - 1}; give one name per class"
        )
    where = where or str(path)
    indices = select(split, splits, where)
    return ArraySource(images[indices], labels[indices], names, f"{where} [{split}]")


def get_source(
    name_or_path: str,
    split: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    holdout: float = HOLDOUT,
) -> Source:
    """Open a data set by name or path.

    Shapes: -> Source whose get(i) gives (H, W, 3) uint8 images and int labels

    Args:
        name_or_path: 'digits' (built in), a path to an `.npz` file or an image folder, or a
            TFDS name ('cifar10', 'oxford_iiit_pet', 'imagenet2012', ...).
        split: a TFDS split string: 'train', 'test', 'train[:98%]', 'train[10%:20%]', ...
        data_dir: TFDS data directory (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
        manual_dir: TFDS manual download directory, named in the `tfds build` command when the
            data set is not prepared yet.
        holdout: fraction held out as 'test' by a folder or npz that has no test split.
    """
    if name_or_path == "digits":
        return load_npz(DIGITS, split, where="digits")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".npz" or os.sep in name_or_path or path.exists():
        if not path.exists():
            raise DataError(
                f"data set {name_or_path} does not exist; give an existing .npz "
                "file, an image folder, 'digits' or a TFDS name such as 'cifar10'"
            )
        if path.is_dir():
            from minivit.data.folder import ImageFolder  # noqa: PLC0415 (needs pillow)

            return ImageFolder(path, split, holdout)
        return load_npz(path, split, holdout)
    from minivit.data.tfds_source import TFDSSource  # noqa: PLC0415 (optional tfds)

    return TFDSSource(name_or_path, split, data_dir, manual_dir)
