"""TFDS-style split strings, applied the same way to every source."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.data.splits import SplitPart, parse_split, select

SPLITS = {"train": np.arange(1000), "test": np.arange(1000, 1250)}


def test_parse_split_reads_names_slices_and_sums():
    assert parse_split("train") == [SplitPart("train", None, None)]
    assert parse_split("train[:98%]") == [SplitPart("train", None, "98%")]
    assert parse_split("train[10%:20%] + test[-5:]") == [
        SplitPart("train", "10%", "20%"),
        SplitPart("test", "-5", None),
    ]


@pytest.mark.parametrize(
    ("spec", "first", "last", "count"),
    [
        ("train", 0, 999, 1000),
        ("test", 1000, 1249, 250),
        ("train[:98%]", 0, 979, 980),
        ("train[98%:]", 980, 999, 20),
        ("train[:1000]", 0, 999, 1000),
        ("train[10%:20%]", 100, 199, 100),
        ("train[-10:]", 990, 999, 10),
        ("test[:50%]", 1000, 1124, 125),
        ("train[:5]+test[:5]", 0, 1004, 10),
    ],
)
def test_select_takes_the_documented_examples(spec, first, last, count):
    chosen = select(spec, SPLITS, "toy")
    assert (chosen[0], chosen[-1], len(chosen)) == (first, last, count)


def test_percentages_round_like_tfds():
    rounding = pytest.importorskip("tensorflow_datasets").core
    for n in [7, 33, 1797, 50000]:
        info = {"train": rounding.SplitInfo(name="train", shard_lengths=[n], num_bytes=0)}
        for spec in ["train[:98%]", "train[98%:]", "train[13%:47%]", "train[-3%:]", "train[:1%]"]:
            (absolute,) = rounding.ReadInstruction.from_spec(spec).to_absolute(info)
            start = absolute.from_ or 0
            stop = n if absolute.to is None else absolute.to
            if stop <= start:  # tfds allows an empty slice; minivit says so at once
                with pytest.raises(ValueError, match="selects no examples"):
                    select(spec, {"train": np.arange(n)}, "toy")
                continue
            chosen = select(spec, {"train": np.arange(n)}, "toy")
            np.testing.assert_array_equal(chosen, np.arange(start, stop), err_msg=f"{spec} n={n}")


def test_bad_split_strings_get_one_sentence():
    with pytest.raises(ValueError, match="is not a TFDS split string"):
        parse_split("train[::2]")
    with pytest.raises(ValueError, match="has no split 'validation'; available: test, train"):
        select("validation", SPLITS, "toy")
    with pytest.raises(ValueError, match="selects no examples"):
        select("train[50%:10%]", SPLITS, "toy")
    with pytest.raises(ValueError, match="outside -100%..100%"):
        select("train[:150%]", SPLITS, "toy")
