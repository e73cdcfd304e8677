"""Batched greedy generation and log-likelihood scoring for any HF causal LM.

Prompts are tokenized one by one, left-padded by hand (so the tokenizer's own
``padding_side`` is never changed) and run in batches sorted by length, which
keeps padding small; outputs come back in the input order. Generation is
greedy (``do_sample=False``, one beam) with the KV cache; batched, left-padded
generation gives the same text as generating each prompt alone, because the
attention mask hides the padding and positions are derived from the mask.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from melora.experiments.models import ensure_pad_token


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less modules)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Puts ``model`` in eval mode under ``torch.inference_mode``, then restores its mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def encode(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (e.g. BOS).

    Args:
        max_tokens: if set and exceeded, the ids are cut from the left (the end of
            a prompt is what the model must continue).
    """
    ids = list(tokenizer(text)["input_ids"])
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[len(ids) - max_tokens :]
    return ids


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text``, special tokens included."""
    return len(tokenizer(text)["input_ids"])


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads id lists.

    Returns:
        ``(input_ids, attention_mask)``, both ``LongTensor[batch, max_len]``.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cuts ``text`` at the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = [s for s in stop if s]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, self.prompt_len :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _padded_batches(
    seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(indices, input_ids, attention_mask)`` per batch of left-padded ``seqs``, on ``device``.

    Batches run longest first, so that similar lengths share a batch and the first
    batch shows an out-of-memory error early, if any.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], pad_id)
        yield idx, ids.to(device), mask.to(device)


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] | None = None,
    *,
    max_input_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` with a causal LM.

    Args:
        model: any ``transformers`` causal LM (``generate`` with a KV cache).
        tokenizer: its tokenizer; a pad token is set if missing.
        prompts: ``n`` prompt strings.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per forward pass.
        stop: strings that end a continuation; the returned text is cut before
            the first one, and a row stops generating once it produced one.
        max_input_tokens: prompts longer than this are cut from the left.

    Returns:
        ``n`` decoded continuations (special tokens skipped), in input order.
    """
    if not prompts:
        return []
    pad_id = ensure_pad_token(tokenizer)
    model_config = getattr(model, "generation_config", None)
    eos = model_config.eos_token_id if model_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )
    encoded = [encode(tokenizer, p, max_input_tokens) for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    with eval_mode(model):
        for idx, ids, mask in _padded_batches(encoded, batch_size, pad_id, model_device(model)):
            criteria = None
            if stop:
                criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, ids.shape[1], stop)])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=criteria,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = truncate_at_stop(text, stop)
    return outputs


def _forward_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Float logits of the last ``keep_last`` positions, ``[batch, keep_last, vocab]``."""
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    # Left padding shifts every real token; positions must follow the mask so that a
    # padded row scores exactly like the same prompt alone. Wrappers such as PEFT
    # models pass **kwargs through to the base model.
    if "position_ids" in params or takes_kwargs:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    # Full-vocabulary logits for every position would be [batch, seq, vocab]; only the
    # last few are needed.
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep_last
    logits = model(**kwargs).logits
    return logits[:, -keep_last:, :].float()


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """Tokens that ``continuation`` adds after ``context``.

    ``context + continuation`` is tokenized as a whole and the context's tokens are
    removed, so the ids are those the model would see; if the tokenizer merges
    across the boundary, the continuation is tokenized on its own instead.
    """
    ctx = list(tokenizer(context)["input_ids"])
    whole = list(tokenizer(context + continuation)["input_ids"])
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx) :]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def next_token_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    batch_size: int = 8,
    *,
    max_input_tokens: int | None = None,
) -> torch.Tensor:
    """Log-probabilities of candidate next tokens after each prompt.

    Returns:
        ``FloatTensor[n_prompts, len(token_ids)]`` (log-softmax over the full
        vocabulary, then the candidates' columns), on CPU.
    """
    pad_id = ensure_pad_token(tokenizer)
    encoded = [encode(tokenizer, p, max_input_tokens) for p in prompts]
    out = torch.empty((len(prompts), len(token_ids)))
    cols = torch.tensor(list(token_ids), dtype=torch.long)
    with eval_mode(model):
        for idx, ids, mask in _padded_batches(encoded, batch_size, pad_id, model_device(model)):
            logits = _forward_logits(model, ids, mask, 1)[:, -1, :]
            out[idx] = torch.log_softmax(logits, dim=-1)[:, cols.to(logits.device)].cpu()
    return out


def continuation_logprobs(
    model,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    *,
    max_input_tokens: int | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context.

    Args:
        contexts, continuations: ``n`` pairs.
        max_input_tokens: contexts are cut from the left so that context plus
            continuation fits.

    Returns:
        ``n`` floats, ``sum_t log p(cont_t | context, cont_<t)``.
    """
    pad_id = ensure_pad_token(tokenizer)
    pairs = []
    for ctx, cont in zip(contexts, continuations, strict=True):
        cont_ids = continuation_ids(tokenizer, ctx, cont)
        budget = None if max_input_tokens is None else max(1, max_input_tokens - len(cont_ids))
        ctx_ids = encode(tokenizer, ctx, budget)
        if not ctx_ids:
            raise ValueError("continuation_logprobs needs a non-empty context (or a BOS token)")
        pairs.append((ctx_ids, cont_ids))
    seqs = [c + k for c, k in pairs]
    out = [0.0] * len(seqs)
    with eval_mode(model):
        for idx, ids, mask in _padded_batches(seqs, batch_size, pad_id, model_device(model)):
            # The last len(cont) tokens are predicted by the len(cont) positions before
            # them, so the last 1 + max len(cont) positions suffice.
            keep = 1 + max(len(pairs[i][1]) for i in idx)
            logits = _forward_logits(model, ids, mask, keep)
            logprobs = torch.log_softmax(logits, -1)
            for row, i in enumerate(idx):
                cont = pairs[i][1]
                # Kept position j is sequence position width - keep + j; the token at
                # sequence position p is predicted at p - 1.
                pos = torch.arange(keep - 1 - len(cont), keep - 1, device=logprobs.device)
                tgt = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                out[i] = float(logprobs[row, pos, tgt].sum())
    return out
