"""Where the offline data folder is: an explicit argument or ``MELORA_DATA_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MELORA_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the data folder to read local files from, or ``None`` for the hub.

    Args:
        data_dir (str | os.PathLike | None): An explicit folder. Takes precedence
            over the environment.

    Returns:
        Path | None: ``data_dir`` if given, else ``$MELORA_DATA_DIR`` if set and
        non-empty, else ``None`` (meaning: load from the Hugging Face hub).
    """
    if data_dir not in (None, ""):  # Hydra's `data_dir=` gives "": unset, as an empty environment variable
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env) if env else None
