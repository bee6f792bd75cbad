"""Data for fine-tuning: sources, the official preprocessing, and the batch loader.

`get_source(name_or_path, split)` opens the built-in digits, an `.npz` file, an image folder or a
TFDS data set; `Loader(source, batch_size, image_size, train)` turns it into batches.
"""

from __future__ import annotations

from minivit.data.errors import DataError
from minivit.data.loader import Loader
from minivit.data.preprocess import eval_transform, train_transform
from minivit.data.sources import Source, get_source
from minivit.data.splits import parse_split

__all__ = [
    "DataError",
    "Loader",
    "Source",
    "eval_transform",
    "get_source",
    "parse_split",
    "train_transform",
]
