"""Stable fingerprints for caching preprocessed datasets.

``datasets`` caches ``Dataset.map`` results next to a dataset's own Arrow
files, which in-memory datasets (built from TSV/JSON here) do not have. The
helpers below build cache keys that are stable across processes, so explicit
``cache_file_name`` paths can be used instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stable_hash(*parts: Any) -> str:
    """Hash JSON-serialisable values into a short hex digest.

    Args:
        *parts (Any): Values to hash; non-JSON types are hashed through ``str``.

    Returns:
        str: The first 16 hex characters of the SHA-256 digest.
    """
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


_PROBE = ("Hello World, naïve ÜBER-test 123!", "Second  segment.")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identify a tokenizer by class, ``name_or_path``, size, vocabulary and behaviour.

    The vocabulary is hashed because two different tokenizers can share a
    ``name_or_path`` (e.g. several GGUF files in one folder), and the encoding
    of a probe sentence pair catches differences in normalisation (casing,
    accents) and special-token templates. The runtime truncation/padding state
    is deliberately not part of the key.

    Args:
        tokenizer (Any): A ``transformers`` tokenizer.

    Returns:
        str: A 16-hex-character fingerprint.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    try:
        probe = tokenizer(*_PROBE)["input_ids"]
    except Exception:  # noqa: BLE001 - some tokenizers cannot encode pairs
        probe = tokenizer(_PROBE[0])["input_ids"]
    return stable_hash(
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        len(tokenizer),
        hashlib.sha256(json.dumps(vocab, ensure_ascii=True).encode("utf-8")).hexdigest(),
        list(probe),
    )


def default_cache_dir() -> Path:
    """Return the default folder for tokenised datasets.

    Returns:
        Path: ``$HF_DATASETS_CACHE/melora/tokenized`` (``datasets``' own cache
        root, so the usual environment variable relocates it).
    """
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "melora" / "tokenized"
