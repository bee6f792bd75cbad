"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input; the message is one sentence naming the file, folder, data set or split."""
