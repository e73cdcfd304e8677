"""Exceptions raised by the MELoRA data loaders."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file exists but its content is not in the expected format.

    The message always names the file and the line (TSV) or record index
    (JSON) of the first offending entry, and says how to fix it.
    """
