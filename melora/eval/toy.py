"""A tiny random causal LM, a byte-level tokenizer and a miniature data root.

For smoke tests of the harness without any hub access: the tokenizer is a
byte-level BPE whose only merges make " A".." D" single tokens (so both the
single-token and the multi-token log-likelihood paths can be exercised), and
:func:`write_toy_data` writes a few real-format records of each benchmark.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<s>", "</s>"


def byte_tokenizer(letter_merges: bool = True) -> PreTrainedTokenizerFast:
    """Lossless byte-level tokenizer: ids 0/1 are BOS/EOS, then the 256 bytes.

    Args:
        letter_merges: also merge " A", " B", " C", " D" into single tokens
            (ids 258-261); without it they are two tokens each.

    Returns:
        A fast tokenizer that prepends BOS and has no pad token.
    """
    vocab = {BOS: 0, EOS: 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    space = "\u0120"  # byte-level symbol of " "
    merges = []
    for letter in "ABCD":
        vocab[space + letter] = len(vocab)
        if letter_merges:
            merges.append((space, letter))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_llama(vocab_size: int = 262, seed: int = 0, max_positions: int = 4096) -> LlamaForCausalLM:
    """Random ``LlamaForCausalLM``: hidden 32, 2 layers, 4 heads (2 KV heads)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


_MMLU = {
    "toy_arithmetic": [
        ("What is 1 + 1?", ["1", "2", "3", "4"], 1),
        ("What is 2 + 2?", ["4", "5", "6", "7"], 0),
        ("What is 3 + 3?", ["5", "7", "6", "8"], 2),
        ("What is 4 + 4?", ["1", "2", "3", "8"], 3),
        ("What is 5 + 5?", ["10", "2", "3", "4"], 0),
    ],
    "toy_colors": [
        ("What color is the sky?", ["Red", "Blue", "Green", "Black"], 1),
        ("What color is grass?", ["Green", "Blue", "Red", "White"], 0),
        ("What color is snow?", ["Red", "Blue", "White", "Green"], 2),
        ("What color is coal?", ["Red", "Blue", "White", "Black"], 3),
        ("What color is blood?", ["Red", "Blue", "White", "Black"], 0),
    ],
}

# Different test sizes, so that micro and macro averages differ.
_MMLU_TEST_SIZE = {"toy_arithmetic": 4, "toy_colors": 5}

_BBH = {
    "toy_boolean": [
        ("not True is", "False"), ("not False is", "True"), ("True and False is", "False"),
        ("True or False is", "True"), ("not not True is", "True"), ("False or False is", "False"),
    ],
    "toy_words": [
        ("Sort: b a", "a b"), ("Sort: d c", "c d"), ("Sort: f e", "e f"),
        ("Sort: h g", "g h"), ("Sort: j i", "i j"),
    ],
}

_DROP = [
    ("The Bears scored 7 points. The Lions scored 3.", "How many points did the Bears score?", "7"),
    ("Anna has 2 apples and 5 pears.", "How many pears does Anna have?", "5|five"),
    ("The war began in 1914 and ended in 1918.", "When did the war end?", "1918"),
    ("Tom and Jerry went to Paris.", "Who went to Paris?", "Tom and Jerry"),
    ("Rain fell for 3 days in May.", "How many days did rain fall?", "3"),
    ("The bridge is 40 yards long.", "How long is the bridge?", "40 yards"),
]

_HUMANEVAL = [
    ("add", "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "    return a + b\n",
     "def check(candidate):\n    assert candidate(1, 2) == 3\n"),
    ("neg", "def neg(x):\n    \"\"\"Return -x.\"\"\"\n", "    return -x\n",
     "def check(candidate):\n    assert candidate(3) == -3\n"),
    ("first", "def first(xs):\n    \"\"\"First element.\"\"\"\n", "    return xs[0]\n",
     "def check(candidate):\n    assert candidate([4, 5]) == 4\n"),
]


def write_toy_data(root: str | Path) -> Path:
    """Writes a miniature data root (``mmlu/ bbh/ drop/ humaneval/``) in the real layout.

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in _MMLU.items():
        for split, part in (("dev", rows), ("test", rows[::-1][: _MMLU_TEST_SIZE[subject]])):
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for q, choices, answer in part:
                    w.writerow([q, *choices, answer])
    (root / "bbh" / "bbh").mkdir(parents=True, exist_ok=True)
    for task, rows in _BBH.items():
        examples = [{"input": i, "target": t} for i, t in rows]
        (root / "bbh" / "bbh" / f"{task}.json").write_text(json.dumps({"examples": examples}))
    (root / "drop").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "drop" / "drop_v0_dev.jsonl.gz", "wt") as f:
        for passage, question, ref in _DROP:
            context = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
            row = {"context": context, "completion": " " + ref.split("|")[0], "ref_text": ref}
            f.write(json.dumps(row) + "\n")
    (root / "humaneval").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        for i, (entry, prompt, solution, test) in enumerate(_HUMANEVAL):
            row = {
                "task_id": f"Toy/{i}", "prompt": prompt, "entry_point": entry,
                "canonical_solution": solution, "test": test,
            }
            f.write(json.dumps(row) + "\n")
    return root
