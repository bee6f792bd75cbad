"""TFDS-style split strings (`train`, `test[:1000]`, `train[:98%]`, `train[10%:20%]+test`).

The same grammar and rounding as `tfds.core.ReadInstruction`: each `+`-separated part names a split
and an optional slice; slice bounds are example counts or percentages, may be negative (counted from
the end), and a percentage becomes `round(pct * n / 100)` examples (tfds' default "closest"
rounding). minivit applies it to every source, so `train[:98%]` means the same thing for an image
folder, an `.npz` file and the built-in digits as it does for TFDS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from minivit.data.errors import DataError

_PART = re.compile(
    r"^(?P<name>[\w-]+)"
    r"(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$"
)


@dataclass(frozen=True)
class SplitPart:
    """One `name[start:stop]` part of a split string; bounds kept as written (None = open)."""

    name: str
    start: str | None
    stop: str | None

    def bounds(self, n: int) -> tuple[int, int]:
        """Absolute `[start, stop)` of this part in a split of `n` examples."""
        start = 0 if self.start is None else _absolute(self.start, n)
        stop = n if self.stop is None else _absolute(self.stop, n)
        return start, max(start, stop)


def _absolute(bound: str, n: int) -> int:
    """An example count or percentage as a position in `[0, n]`, negatives counted from the end."""
    if bound.endswith("%"):
        pct = int(bound[:-1])
        if abs(pct) > 100:
            raise DataError(f"split bound {bound} is outside -100%..100%")
        value = int(round(pct * n / 100))
    else:
        value = int(bound)
    if value < 0:
        value += n
    return min(max(value, 0), n)


def parse_split(spec: str) -> list[SplitPart]:
    """Parse a split string into its `+`-separated parts.

    Shapes: "train[:98%]+test" -> [SplitPart("train", None, "98%"), SplitPart("test", None, None)]
    """
    parts = []
    for text in spec.replace(" ", "").split("+"):
        match = _PART.match(text)
        if match is None:
            raise DataError(
                f"split {spec!r} is not a TFDS split string; write e.g. 'train', 'test', "
                "'train[:98%]', 'train[98%:]', 'train[:1000]' or 'train[10%:20%]'"
            )
        parts.append(SplitPart(match["name"], match["start"], match["stop"]))
    return parts


def select(spec: str, splits: dict[str, np.ndarray], where: str) -> np.ndarray:
    """The example indices a split string selects, given each named split's indices in order.

    Shapes: splits name -> (n_name,) int64 -> (n_selected,) int64

    Args:
        spec: the split string.
        splits: the named splits of the source and the example indices each holds, in order.
        where: the source, named in error messages.
    """
    chosen = []
    for part in parse_split(spec):
        if part.name not in splits:
            raise DataError(
                f"{where} has no split {part.name!r}; available: {', '.join(sorted(splits))}"
            )
        indices = splits[part.name]
        start, stop = part.bounds(len(indices))
        chosen.append(indices[start:stop])
    selected = np.concatenate(chosen).astype(np.int64)
    if selected.size == 0:
        raise DataError(f"split {spec!r} of {where} selects no examples; widen the slice")
    return selected
