"""TFDS data sets by name, read with `tfds.data_source` (random access, no TensorFlow needed).

Only data already prepared (in the ArrayRecord format that random access needs) is read; minivit
never downloads or builds a data set, so nothing touches the network. An unprepared data set gets
one sentence with the `tfds build` command that prepares it. `tensorflow_datasets` is imported
here, on first use, so the rest of minivit works without it.
"""

from __future__ import annotations

import os

import numpy as np

from minivit.data.errors import DataError
from minivit.data.preprocess import as_rgb
from minivit.data.sources import Source
from minivit.data.splits import parse_split


def default_data_dir(data_dir: str | None) -> str:
    """The TFDS data directory: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(chosen)


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional extra)
    except ImportError as err:
        raise DataError(
            f"'{name}' is not a file or folder, and reading it as a TFDS data set "
            "needs tensorflow-datasets: pip install 'minivit[tfds]'"
        ) from err
    return tfds


def _build_command(builder, name: str, data_dir: str, manual_dir: str | None) -> str:
    command = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
    if manual_dir:
        command += f" --manual_dir {manual_dir}"
    elif getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        command += " --manual_dir DIR_WITH_THE_DOWNLOADED_FILES"
    return command


def _unreadable(tfds, name: str, split: str, data_dir: str, manual_dir, err) -> DataError:
    """The one-sentence error for a data set `tfds.data_source` could not open."""
    builder = tfds.builder(name, data_dir=data_dir)
    command = _build_command(builder, name, data_dir, manual_dir)
    if not builder.is_prepared():
        return DataError(
            f"TFDS data set '{name}' is not prepared in {data_dir}; prepare it once "
            f"with `{command}` (minivit never downloads data itself)"
        )
    if "array_record" not in str(builder.info.file_format).lower():
        return DataError(
            f"TFDS data set '{name}' in {builder.data_dir} is stored as "
            f"{builder.info.file_format}, which has no random access; rebuild it "
            f"with `{command}`"
        )
    return DataError(f"TFDS data set '{name}' split '{split}' could not be opened: {err}")


def _features(info, name: str) -> tuple[str, str]:
    """The keys of the image feature and of the class-label feature ('label' preferred)."""
    from tensorflow_datasets import features as tfds_features  # noqa: PLC0415

    items = info.features.items()
    images = [k for k, f in items if isinstance(f, tfds_features.Image)]
    labels = [k for k, f in items if isinstance(f, tfds_features.ClassLabel)]
    if not images or not labels:
        raise DataError(
            f"TFDS data set '{name}' has no image feature with a class label "
            f"(features: {', '.join(info.features)}); use an image classification set"
        )
    return images[0], "label" if "label" in labels else labels[0]


class TFDSSource(Source):
    """A split of a prepared TFDS data set.

    Shapes: get(i) -> (image (H, W, 3) uint8, label int)
    """

    def __init__(
        self, name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None
    ):
        parse_split(split)  # the same grammar (and error) as every other source
        tfds = _import_tfds(name)
        data_dir = default_data_dir(data_dir)
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:
            raise DataError(
                f"'{name}' is neither a file, a folder, 'digits' nor a TFDS data set "
                "name (e.g. cifar10, cifar100, oxford_iiit_pet, oxford_flowers102, "
                "imagenet2012)"
            ) from err
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:  # tfds raises several kinds; each gets the sentence it needs
            raise _unreadable(tfds, name, split, data_dir, manual_dir, err) from err
        self._image_key, self._label_key = _features(builder.info, name)
        self.class_names = list(builder.info.features[self._label_key].names)
        self.where = f"{name} [{split}]"

    def __len__(self) -> int:
        return len(self._data)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        example = self._data[i]
        image = np.asarray(example[self._image_key], dtype=np.uint8)
        return as_rgb(image), int(example[self._label_key])
