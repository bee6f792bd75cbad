"""A folder of images, in either layout.

* `root/{train,test}/<class>/<image>` as the official `vit_jax/input_pipeline.py` reads it (any
  other folder next to `train`, such as `validation`, is one more split, read only when asked for);
* `root/<class>/<image>`: a fixed fraction of each class is held out as 'test'.

Classes are the sorted folder names of `train` (or of `root`); images are the files with a common
image extension, sorted by name. Pillow (imported on first use) decodes them; grey, grey+alpha,
RGBA, CMYK, palette and 16-bit images become 8-bit RGB. Files of the chosen split that Pillow
cannot open are skipped and counted (one warning); a file that opens but fails to decode is
replaced by the next readable image of the list, also with one warning.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from minivit.data.errors import DataError
from minivit.data.sources import HOLDOUT, Source, holdout_splits
from minivit.data.splits import parse_split, select

EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .ico".split()
)
LAYOUTS = "root/<class>/<image> or root/{train,test}/<class>/<image>"


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to 8-bit RGB.

    Shapes: -> (H, W, 3) uint8
    """
    from PIL import Image  # noqa: PLC0415 (pillow is the optional 'images' extra)

    with Image.open(path) as img:
        if img.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grey: scale 0..65535 to 0..255
            grey = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255)
            return np.repeat(np.rint(grey).astype(np.uint8)[:, :, None], 3, axis=2)  # (H, W, 3)
        if img.mode == "P":
            img = img.convert("RGBA")  # palette with transparency goes through RGBA cleanly
        return np.asarray(img.convert("RGB"))


def _opens(path: Path) -> bool:
    """True when Pillow recognises the file (reads the header only)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path):
            return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible_entries(folder) if p.is_file() and p.suffix.lower() in EXTENSIONS]


def _class_folders(folder: Path) -> list[Path]:
    """The class folders of `folder`; images lying directly in it are a mixed-up layout."""
    loose = _image_files(folder)
    classes = [p for p in _visible_entries(folder) if p.is_dir()]
    if loose:
        raise DataError(
            f"{folder} holds images directly (e.g. {loose[0].name}) next to "
            f"{len(classes)} class folders; put every image in a class folder: {LAYOUTS}"
        )
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {LAYOUTS}")
    return classes


def _class_files(folder: Path) -> list[Path]:
    """The images of one class folder; an empty one is an error (it would shift the labels)."""
    files = _image_files(folder)
    if not files:
        inner = [p.name for p in _visible_entries(folder) if p.is_dir()]
        hint = (
            f"it holds folders ({', '.join(inner[:3])}): point at one of them"
            if inner
            else f"add images ({', '.join(sorted(EXTENSIONS)[:6])}, ...) or remove it"
        )
        raise DataError(f"class folder {folder} holds no images; {hint}")
    return files


def _split_folders(root: Path, names: set[str], wanted: set[str]) -> list[Path]:
    """The split folders `root/<split>` that the split string asks for (others are not read)."""
    if not {"train", "test"} <= names:
        have, lack = ("train", "test") if "train" in names else ("test", "train")
        raise DataError(
            f"{root} has {have}/ but no {lack}/; add {root / lack}/<class>/ or "
            "use root/<class>/<image> so that a fraction is held out"
        )
    unknown = sorted(wanted - names)
    if unknown:
        raise DataError(
            f"{root} has no split {unknown[0]!r}; available: {', '.join(sorted(names))}"
        )
    return [root / name for name in sorted(wanted)]


def _scan(root: Path, wanted: set[str]) -> tuple[list[str], list[Path], np.ndarray, np.ndarray]:
    """Class names, then every image file of the wanted splits with its label and its split
    folder ("" for the root/<class>/<image> layout, where every file is read)."""
    names = {p.name for p in _visible_entries(root) if p.is_dir()}
    if "train" in names or "test" in names:
        split_dirs = _split_folders(root, names, wanted)
        class_names = [p.name for p in _class_folders(root / "train")]
    else:
        split_dirs = [None]
        class_names = [p.name for p in _class_folders(root)]
    files, labels, owner = [], [], []
    for split_dir in split_dirs:
        for folder in _class_folders(split_dir or root):
            if folder.name not in class_names:
                raise DataError(
                    f"{folder} is a class that {root / 'train'} lacks; "
                    "every split must use the class folders of train/"
                )
            found = _class_files(folder)
            files += found
            labels += [class_names.index(folder.name)] * len(found)
            owner += [split_dir.name if split_dir else ""] * len(found)
    return class_names, files, np.array(labels, np.int64), np.array(owner)


def _drop_unreadable(files: list[Path], labels: np.ndarray, where: str):
    """Skip files Pillow cannot open, with one warning that counts them."""
    with ThreadPoolExecutor(8) as pool:  # header reads are I/O bound
        ok = np.array(list(pool.map(_opens, files)), bool)
    if not ok.any():
        raise DataError(
            f"none of the {len(files)} image files of {where} could be read (e.g. "
            f"{files[0]}); check that they are images"
        )
    if not ok.all():
        bad = [files[i] for i in np.flatnonzero(~ok)]
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {where} (e.g. {bad[0]})", stacklevel=4
        )
    return [f for f, keep in zip(files, ok) if keep], labels[ok]


class ImageFolder(Source):
    """Images in a folder, decoded on each `get`.

    Shapes: get(i) -> (image (H, W, 3) uint8, label int)
    """

    def __init__(self, root: str | Path, split: str, holdout: float = HOLDOUT):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        wanted = {part.name for part in parse_split(split)}
        class_names, files, labels, owner = _scan(root, wanted)
        if (owner == "").all():  # root/<class>/<image>: hold out a fraction of each class
            splits = holdout_splits(labels, holdout)
        else:
            splits = {name: np.flatnonzero(owner == name) for name in wanted}
        indices = select(split, splits, str(root))
        self.where = f"{root} [{split}]"
        self.files, self.labels = _drop_unreadable(
            [files[i] for i in indices], labels[indices], self.where
        )
        self.class_names = class_names
        self.replaced = 0  # files that opened but failed to decode, replaced by the next one
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        for j in range(i, i + len(self.files)):
            path = self.files[j % len(self.files)]
            try:
                return read_image(path), int(self.labels[j % len(self.files)])
            except (OSError, ValueError, SyntaxError) as err:
                self._count_failure(path, err)
        raise DataError(f"no image of {self.where} could be decoded")

    def _count_failure(self, path: Path, err: Exception) -> None:
        with self._lock:
            self.replaced += 1
            if self.replaced == 1:
                warnings.warn(
                    f"could not decode {path} ({err}); using the next image in its "
                    "place (count kept in source.replaced)",
                    stacklevel=3,
                )
