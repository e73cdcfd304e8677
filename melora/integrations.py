"""MELoRA (and its baselines) under the Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

One callback runs the method's training hooks and writes the adapter::

    model = melora.inject(model, melora.MELoRAConfig(n=8, r=1, target_modules=["query", "value"]))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[MELoRACallback(model)])
    trainer.train()                 # output_dir/adapter/: the trained adapter
    model = melora.load_adapter(base_model, "output_dir/adapter")

How the hooks of ``melora.get_method(config)`` map onto the Trainer's events
(as read in ``Trainer._inner_training_loop`` of transformers 5.24)::

    method hook              Trainer event            where in the loop
    on_step_begin            on_step_begin            before the forward of the first micro-batch of optimiser step k
    before_optimizer_step    on_pre_optimizer_step    after the last micro-batch's backward and the gradient clipping,
                                                      before optimizer.step()
    on_step_end              on_optimizer_step        after optimizer.step(), before lr_scheduler.step() and
                                                      model.zero_grad()

``k`` is ``state.global_step``: the optimiser steps finished so far, which the
Trainer increments only after ``zero_grad``, so all three hooks of a step see
the same 0-based ``k`` (restored from ``trainer_state.json`` on resume). Under
gradient accumulation each event fires once per optimiser step, not per
micro-batch. The Trainer's own ``on_step_end`` event comes after
``model.zero_grad()``: too late for AdaLoRA, whose allocator reads the gradients.

AdaLoRA's rank-budget schedule is fixed when the model is injected: pass
``melora.AdaLoRAConfig(total_step=N)`` with ``N`` the Trainer's number of
optimiser steps (``max_steps``, or ``ceil(examples / (batch × accumulation ×
processes)) × epochs``); the callback refuses a mismatch when training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn
import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

import melora

__all__ = ["MELoRACallback"]


def _is_peft_model(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def _delete_full_weights(folder: Path) -> None:
    """Remove the weight files ``save_pretrained`` wrote into ``folder`` (shards included)."""
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = folder / index_name
        if index.is_file():
            for shard in set(json.loads(index.read_text())["weight_map"].values()):
                (folder / shard).unlink(missing_ok=True)
            index.unlink()
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        (folder / name).unlink(missing_ok=True)


class MELoRACallback(TrainerCallback):
    """Runs an adapter method's training hooks in a ``Trainer`` and saves the adapter.

    Works with any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer``
    included). The hooks act on the Trainer's ``model``, which must be the model
    ``melora.inject`` returned (for AdaLoRA the ``PeftModel``).

    Saving:

    - ``checkpoint-<k>/``: ``melora.save_adapter`` writes ``adapter_config.json``
      and ``adapter_model.safetensors`` next to the Trainer's own files each time
      the Trainer saves. The Trainer writes the full model too and needs it to
      ``resume_from_checkpoint`` or ``load_best_model_at_end``; ``adapter_only=True``
      deletes those weight files (the checkpoint then holds the adapter, config,
      tokenizer and trainer state: pair it with ``save_only_model=True``, as the
      optimiser state is of no use without the weights).
    - ``output_dir/<adapter_dir>/``: the adapter at the end of training (after
      ``load_best_model_at_end``, so the best one if that is set).
    - AdaLoRA: the Trainer saves a ``PeftModel`` as PEFT's own adapter-only
      files, which resuming reads, so checkpoints are left as they are (ours would
      replace PEFT's files of the same names); the melora adapter is written at
      the end only. PEFT does not checkpoint its allocator's importance averages,
      so a resumed AdaLoRA run restarts them.

    Not supported: DeepSpeed (its engine steps and zeroes the gradients inside
    ``backward``, so the optimiser events no longer bracket the real step) and
    ``hyperparameter_search`` (checkpoints under ``run-<trial>/``).

    Args:
        model_or_config (nn.Module | melora.AdapterConfig | None): The injected
            model the Trainer trains, or its adapter config: checked against the
            Trainer's model when training starts. ``None``: whatever the
            Trainer's model carries.
        seed (int | None): Seed of the method's random draws (DyLoRA's ranks);
            ``None``: ``TrainingArguments.seed``.
        adapter_dir (str | None): Folder under ``output_dir`` for the final
            adapter; ``None`` writes none.
        adapter_only (bool): Delete the full model weights from each checkpoint.

    Raises:
        ValueError: (at ``on_train_begin``) the Trainer's model has no melora
            adapter or another config than the one given, AdaLoRA's
            ``total_step`` differs from the Trainer's steps, or
            ``adapter_only`` is combined with ``load_best_model_at_end``.
    """

    def __init__(
        self,
        model_or_config: nn.Module | melora.AdapterConfig | None = None,
        *,
        seed: int | None = None,
        adapter_dir: str | None = "adapter",
        adapter_only: bool = False,
    ) -> None:
        missing = [e for e in ("on_pre_optimizer_step", "on_optimizer_step") if not hasattr(TrainerCallback, e)]
        if missing:
            raise ImportError(f"transformers {transformers.__version__} has no Trainer events {missing}; pip install -U transformers")
        if isinstance(model_or_config, nn.Module):
            model_or_config = melora.get_config(model_or_config)
        self.config = model_or_config
        self.seed = seed
        self.adapter_dir = adapter_dir
        self.adapter_only = adapter_only
        self.method: melora.AdapterMethod | None = None  # built at on_train_begin, when args.seed is known

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = melora.get_config(model)
        if self.config is not None and config != self.config:
            raise ValueError(
                f"MELoRACallback was given a '{self.config.method}' adapter config that differs from the Trainer's "
                f"model ('{config.method}'); pass the injected model the Trainer trains"
            )
        field = type(config).total_steps_field  # a schedule fixed at injection (AdaLoRA's total_step)
        if field and getattr(config, field) != state.max_steps:
            raise ValueError(
                f"'{config.method}' was injected with {field}={getattr(config, field)} but the Trainer runs "
                f"{state.max_steps} optimiser steps; inject with {type(config).__name__}({field}={state.max_steps}, ...)"
            )
        if self.adapter_only and args.load_best_model_at_end and not _is_peft_model(model):
            raise ValueError(
                "adapter_only=True leaves no full weights for load_best_model_at_end to load; set one of them to False"
            )
        self.method = melora.get_method(config, seed=args.seed if self.seed is None else self.seed)

    def _hooks(self) -> melora.AdapterMethod:
        if self.method is None:
            raise RuntimeError("MELoRACallback got a step event before on_train_begin; pass it in the Trainer's callbacks")
        return self.method

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._hooks().on_step_begin(model, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._hooks().before_optimizer_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._hooks().on_step_end(model, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save or _is_peft_model(model):
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the Trainer saved no {folder}: MELoRACallback supports Trainer.train(), not hyperparameter_search"
            )
        melora.save_adapter(model, folder)
        if self.adapter_only:
            _delete_full_weights(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.adapter_dir is not None and args.should_save:
            melora.save_adapter(model, os.path.join(args.output_dir, self.adapter_dir))
