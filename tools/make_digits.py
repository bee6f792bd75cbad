"""Build `minivit/data/digits.npz`, the built-in data set, from scikit-learn's bundled digits.

The 1797 handwritten digits of `sklearn.datasets.load_digits` (8x8 grey, values 0..16, from the
UCI "Optical Recognition of Handwritten Digits" data) become uint8 images 0..255
(`round(v * 255 / 16)`), with labels, class names '0'..'9' and a fixed stratified 80/20 split
(`train_test_split(..., test_size=0.2, stratify=labels, random_state=0)`) stored per example in
`split`. scikit-learn is needed only to run this script: `pip install scikit-learn`, then
`python tools/make_digits.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT = Path(__file__).resolve().parents[1] / "minivit" / "data" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)  # (1797,)
    _, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    split = np.full(len(labels), "train", dtype="<U5")
    split[test] = "test"
    np.savez_compressed(
        OUT,
        images=images,
        labels=labels,
        class_names=np.array([str(k) for k in range(10)]),
        split=split,
    )
    print(f"wrote {OUT}: {len(labels)} images, {int((split == 'test').sum())} test")


if __name__ == "__main__":
    main()
