"""Batched generation, log-likelihood scoring and end-to-end runs on a tiny random Llama."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from fixtures.toy import byte_tokenizer, tiny_llama, write_toy_data

from melora.experiments.instructeval import evaluate_all, fit_shots, generate_batch
from melora.experiments.instructeval.generation import continuation_logprobs, count_tokens, next_token_logprobs
from melora.experiments.instructeval.mmlu import build_mmlu_prompt, evaluate_mmlu, predict_mmlu_loglik

PROMPTS = [
    "Hi",
    "Question: what is 2 + 2?\nAnswer:",
    "A much longer prompt that needs a lot of left padding in its batch. " * 3,
    "x",
    "def f(a):\n    return",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny matmuls are far slower with several OpenMP threads on small machines.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


def test_batched_left_padded_equals_unbatched(model, tokenizer):
    model.train()
    batched = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    single = [generate_batch(model, tokenizer, [p], 12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert generate_batch(model, tokenizer, PROMPTS, 12, batch_size=2) == single
    assert all(len(s) > 0 for s in single)
    assert model.training  # mode restored
    assert tokenizer.pad_token == tokenizer.eos_token  # was missing, now set
    assert tokenizer.padding_side == "right"  # padding is done by hand, setting untouched
    assert generate_batch(model, tokenizer, [], 5) == []


def test_stop_strings_cut_generation(model, tokenizer):
    full = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    stop = full[1][3:5]
    cut = generate_batch(model, tokenizer, PROMPTS, 12, batch_size=5, stop=[stop])
    for f, c in zip(full, cut):
        assert c == f[: f.find(stop)] if stop in f else c == f


def test_left_truncation_of_long_prompts(model, tokenizer):
    long = "y" * 300 + "tail"
    out = generate_batch(model, tokenizer, [long], 5, max_input_tokens=20)
    ids = tokenizer(long)["input_ids"][-20:]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert out[0] == tokenizer.decode(ref[0, 20:], skip_special_tokens=True)


def test_logprobs_batched_equal_unbatched(model, tokenizer):
    ids = [258, 259, 260, 261]
    batched = next_token_logprobs(model, tokenizer, PROMPTS, ids, batch_size=5)
    single = torch.cat([next_token_logprobs(model, tokenizer, [p], ids) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    cont = continuation_logprobs(model, tokenizer, PROMPTS, [" A"] * 5, batch_size=5)
    torch.testing.assert_close(torch.tensor(cont), batched[:, 0], atol=1e-5, rtol=1e-5)


class _KwargsWrapper(torch.nn.Module):
    """A model whose forward takes **kwargs and has no ``logits_to_keep`` parameter."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_logprobs_through_wrappers(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    ids = [258, 259, 260, 261]
    reference = torch.cat([next_token_logprobs(model, tokenizer, [p], ids) for p in PROMPTS])
    wrapped = next_token_logprobs(_KwargsWrapper(model), tokenizer, PROMPTS, ids, batch_size=5)
    torch.testing.assert_close(wrapped, reference, atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    single = [generate_batch(peft_model, tokenizer, [p], 8)[0] for p in PROMPTS]
    assert generate_batch(peft_model, tokenizer, PROMPTS, 8, batch_size=5) == single
    batched = next_token_logprobs(peft_model, tokenizer, PROMPTS, ids, batch_size=5)
    alone = torch.cat([next_token_logprobs(peft_model, tokenizer, [p], ids) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, reference)  # the random LoRA weights are in effect


def test_mmlu_loglik_single_and_multi_token_paths_agree(model):
    prompts = [p + "\nAnswer:" for p in PROMPTS]
    single = predict_mmlu_loglik(model, byte_tokenizer(letter_merges=True), prompts, batch_size=3)
    multi_tok = byte_tokenizer(letter_merges=False)
    multi = predict_mmlu_loglik(model, multi_tok, prompts, batch_size=3)
    # Reference for the multi-token path: explicit summed log-probs of " A".." D".
    for prompt, letter in zip(prompts, multi):
        scores = continuation_logprobs(model, multi_tok, [prompt] * 4, [" A", " B", " C", " D"])
        assert letter == "ABCD"[max(range(4), key=scores.__getitem__)]
    for prompt, letter in zip(prompts, single):
        lp = next_token_logprobs(model, byte_tokenizer(), [prompt], [258, 259, 260, 261])
        assert letter == "ABCD"[int(lp.argmax())]


def test_fit_shots_drops_shots_until_prompt_fits(tokenizer, tmp_path):
    from melora.experiments.instructeval.data import load_mmlu

    root = write_toy_data(tmp_path)
    data = load_mmlu(root, ["toy_colors"])["toy_colors"]

    def build(k):
        return build_mmlu_prompt("toy_colors", data["dev"][:k], data["test"][0])

    budget = count_tokens(tokenizer, build(2)) + 2
    fitted = fit_shots(tokenizer, build, 5, max_length=budget, max_new_tokens=2)
    assert (fitted.n_shots, fitted.fits, fitted.text) == (2, True, build(2))
    assert fit_shots(tokenizer, build, 5, max_length=None, max_new_tokens=2).n_shots == 5
    tiny = fit_shots(tokenizer, build, 5, max_length=10, max_new_tokens=2)
    assert (tiny.n_shots, tiny.fits) == (0, False)


def test_mmlu_shot_reduction_reported(model, tokenizer, tmp_path):
    root = write_toy_data(tmp_path)
    # Toy prompts: arithmetic 5 shots = ~352 tokens, 4 = ~306; colors 3 = ~328, 2 = ~266.
    res = evaluate_mmlu(model, tokenizer, data_dir=root, max_length=310, scoring="loglik")
    assert res["shots"]["requested"] == 5
    assert (res["shots"]["min"], res["shots"]["max"]) == (2, 4)
    assert res["shots"]["n_reduced"] == res["n_examples"] == 9
    assert res["n_truncated"] == 0
    assert res["generation"]["scoring"] == "loglik"


RESULT_KEYS = {
    "task", "metric", "score", "metrics", "per_subtask", "n_examples", "shots", "n_truncated",
    "generation", "max_examples", "max_examples_scope", "seed", "data_source", "time_s",
}


def _check_run(out, tasks, n_per_task):
    assert set(out) == {"results", "scores", "average", "time_s"}
    assert list(out["results"]) == list(tasks)
    for task, res in out["results"].items():
        assert set(res) >= RESULT_KEYS, task
        assert res["task"] == task
        assert res["n_examples"] == n_per_task[task], task
        assert 0.0 <= res["score"] <= 1.0
        assert res["metric"] in res["metrics"]
        assert res["generation"]["do_sample"] is False
        assert res["time_s"] > 0
        assert out["scores"][task] == res["score"]
        for sub in res["per_subtask"].values():
            assert sub["n"] >= 1
    json.dumps(out)  # serialisable


def test_evaluate_all_on_toy_data(model, tokenizer, tmp_path):
    root = write_toy_data(tmp_path)
    out = evaluate_all(
        model, tokenizer, data_dir=root, max_examples=3, batch_size=4, max_length=512,
        task_kwargs={"humaneval": {"max_new_tokens": 24}}, return_predictions=True,
    )
    # MMLU and BBH: 3 per subject/task (toy_words has only 2 after its 3 shots).
    _check_run(out, ("mmlu", "drop", "humaneval", "bbh"),
               {"mmlu": 6, "bbh": 5, "drop": 3, "humaneval": 3})
    assert out["results"]["mmlu"]["max_examples_scope"] == "per_subtask"
    assert out["results"]["drop"]["max_examples_scope"] == "total"
    assert out["results"]["humaneval"]["data_source"] == f"local:{root / 'humaneval'}"
    assert len(out["results"]["humaneval"]["predictions"]) == 3


def test_evaluate_all_on_real_data(model, tokenizer):
    root = os.environ.get("MELORA_DATA_DIR")
    if not root:
        pytest.skip("MELORA_DATA_DIR is not set: end-to-end run on the real benchmark files")
    out = evaluate_all(
        model, tokenizer, max_examples=3, batch_size=4, max_length=1024,
        task_kwargs={
            "mmlu": {"subjects": ["world_religions", "high_school_european_history"]},
            "bbh": {"tasks": ["boolean_expressions", "date_understanding"]},
            "humaneval": {"max_new_tokens": 24},
        },
    )
    _check_run(out, ("mmlu", "drop", "humaneval", "bbh"),
               {"mmlu": 6, "bbh": 6, "drop": 3, "humaneval": 3})
    mmlu = out["results"]["mmlu"]
    # European-history questions are long: shots must have been dropped to fit 1024 bytes.
    assert mmlu["shots"]["n_reduced"] > 0 and mmlu["shots"]["requested"] == 5
    assert out["results"]["drop"]["shots"]["requested"] == 3
    assert mmlu["data_source"] == f"local:{os.path.join(root, 'mmlu')}"


def test_evaluate_all_rejects_unknown_tasks(model, tokenizer):
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_all(model, tokenizer, tasks=["mmlu", "gsm8k"])
    with pytest.raises(ValueError, match="task_kwargs"):
        evaluate_all(model, tokenizer, tasks=["mmlu"], task_kwargs={"bbh": {}})
