"""MELoRA (Ren et al., ACL 2024) and LoRA (Hu et al. 2021), its ``n = 1`` case.

::

        x (..., d_in) ──────────────── W (frozen) ───────────────┐
          │                                                      + ── h (..., d_out)
          └─ dropout ─ split into n chunks (d_in/n each)         │
                x_1 ── A_1 (r×d_in/n) ── B_1 (d_out/n×r) ──┐     │
                ...                                         concat · s
                x_n ── A_n ─────────────  B_n ─────────────┘

    h = W x + s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n) · x

The mini LoRAs are stored packed, ``lora_A: (n, r, d_in/n)`` and
``lora_B: (n, d_out/n, r)``; :func:`reference_forward` and
:func:`delta_weight` are the whole method in a few lines. Layers compute the
same thing faster through :func:`melora.adapters.formulations.forward`
(exact formulations, one picked per call by a cost rule). :class:`Linear` is
PEFT's tuner layer for MELoRA (``get_peft_model(model, MELoRAConfig(...))``,
whose tuner and registration are in ``melora.adapters.peft_melora``) and the
layer ``melora.inject`` puts in, with one adapter; :class:`MELoRALinear` builds
one from ``(base_layer, n, r, ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from melora.adapters import formulations
from melora.adapters.base import (
    ADAPTER_LAYER_TYPES,
    AdapterConfig,
    AdapterMethod,
    Conv1D,
    LayerSummary,
    _meta,
    check_dropout,
    check_positive_int,
    register,
)
from melora.adapters.formulations import FORMULATIONS, block_diagonal, choose_formulation, group_count  # noqa: F401 - the layer's public API

SCALINGS = ("per_mini", "equivalent", "rslora")
INITS = ("kaiming", "gaussian")
PEFT_TYPE = "MELORA"  # PEFT's name of the method (melora.adapters.peft_melora registers it)
ADAPTER_NAME = "default"  # the one adapter of a melora.inject model (PEFT's default name)


# ---- the method in a few lines ----------------------------------------------------


def reference_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``h = W x + s · concat_i(B_i A_i x_i)``: the definition, for reading and for tests.

    Shapes: ``x`` ``(..., d_in)``; ``weight`` ``(d_out, d_in)``; ``lora_A``
    ``(n, r, d_in/n)``; ``lora_B`` ``(n, d_out/n, r)``; output ``(..., d_out)``.
    """
    n = lora_A.shape[0]
    chunks = x.unflatten(-1, (n, -1))  # (..., n, d_in/n): x_1..x_n
    hidden = torch.einsum("...nk,nrk->...nr", chunks, lora_A)  # A_i x_i: (..., n, r)
    mini = torch.einsum("...nr,nmr->...nm", hidden, lora_B)  # B_i A_i x_i: (..., n, d_out/n)
    return x @ weight.T + scaling * mini.flatten(-2)


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``ΔW = s · blockdiag(B_1 A_1, .., B_n A_n)``, ``(d_out, d_in)``: what merging adds to ``W``.

    Computed in ``dtype``; by default float32 (float64 if the factors are).
    """
    dtype = dtype or torch.promote_types(lora_A.dtype, torch.float32)
    blocks = torch.bmm(lora_B.to(dtype), lora_A.to(dtype))  # (n, d_out/n, d_in/n)
    return torch.block_diag(*blocks) * scaling


@torch.no_grad()
def init_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str = "kaiming") -> None:
    """LoRA's initialisation, per mini LoRA: random ``A_i``, zero ``B_i`` (so ``ΔW = 0`` at the start)."""
    if init == "kaiming":
        # Fan-in of each A_i is d_in/n, so initialise block by block (a packed
        # (n, r, d_in/n) tensor would give kaiming a fan-in of r·d_in/n).
        for block in lora_A:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # loralib / PEFT convention
    elif init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[1])
    else:
        raise ValueError(f"init={init!r} is unknown; choose 'kaiming' or 'gaussian'")
    nn.init.zeros_(lora_B)


def check_divides(n: int, d_in: int, d_out: int, name: str = "") -> None:
    """Raise a ``ValueError`` naming the choices when ``n`` does not divide both dimensions of a layer."""
    where = f" of layer '{name}'" if name else ""
    for dim_name, dim in (("d_in", d_in), ("d_out", d_out)):
        if dim % n:
            divisors = [k for k in range(1, min(dim, 64) + 1) if d_in % k == 0 and d_out % k == 0]
            raise ValueError(
                f"{dim_name}={dim}{where} is not divisible by n={n}; choose n among the common "
                f"divisors of d_in={d_in} and d_out={d_out}: {divisors}"
            )


# ---- configs ------------------------------------------------------------------------


@dataclass
class MELoRAConfig(AdapterConfig, PeftConfig):
    """MELoRA: ``n`` mini LoRAs of rank ``r`` on the block diagonal.

    ``ΔW = s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n)`` has rank ``n·r`` and
    ``(d_in + d_out)·r`` trainable parameters per layer. ``n = 1`` is LoRA.

    Attributes:
        n: Number of mini LoRAs; must divide ``d_in`` and ``d_out`` of every
            target layer.
        r: Rank of each mini LoRA (equivalent rank ``n·r``).
        alpha: Scaling numerator.
        dropout: Dropout on the adapter input.
        scaling: The rule that gives the factor ``s`` (the layer keeps the factor
            itself as ``melora_scaling[name]``, PEFT's ``scaling``): ``"per_mini"``: ``s = alpha / r`` (the official implementation
            gives each mini LoRA ``alpha / r``; default); ``"equivalent"``:
            ``alpha / (n·r)``, LoRA's convention at the equivalent rank;
            ``"rslora"``: ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"kaiming"`` (Kaiming-uniform ``A_i`` with ``a = sqrt(5)``, as
            loralib and PEFT) or ``"gaussian"`` (``A_i ~ N(0, 1/r²)``, PEFT's
            ``init_lora_weights="gaussian"``). ``B_i`` is always zero.
        exclude_modules: Layers never to adapt (PEFT's rule; ``None``: none).

    The defaults (``n = 8``, ``r = 1``) are the paper's headline setting, 8x fewer
    parameters than LoRA r=8 at the same equivalent rank; ``configs/method/melora.yaml``
    defaults to the official GLUE script's ``n = 2``, ``r = 8`` instead.

    It is also a PEFT config: ``peft.get_peft_model(model, MELoRAConfig(...))``
    (after ``import melora``), with PEFT's ``task_type``, ``inference_mode`` and
    ``base_model_name_or_path``; ``to_dict()`` is PEFT's ``adapter_config.json``.
    """

    method: ClassVar[str] = "melora"
    display_name: ClassVar[str] = "MELoRA"
    has_spectra: ClassVar[bool] = True

    n: int = field(default=8, metadata=_meta("number of mini LoRAs"))
    r: int = field(default=1, metadata=_meta("rank of each mini LoRA"))
    alpha: float = field(default=16.0, metadata=_meta("scaling numerator"))
    dropout: float = field(default=0.05, metadata=_meta("dropout on the adapter input"))
    scaling: str = field(default="per_mini", metadata=_meta("per_mini: alpha/r | equivalent: alpha/(n r) | rslora: alpha/sqrt(r)"))
    init: str = field(default="kaiming", metadata=_meta("kaiming | gaussian (A); B is zero"))
    exclude_modules: list[str] | str | None = field(default=None, metadata=_meta("layers never to adapt (PEFT's rule)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int("n", self.n)
        check_positive_int("r", self.r)
        check_dropout(self.dropout)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is unknown; choose one of {SCALINGS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INITS}")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` dict (``as_record()``: the hyper-parameters of a run record)."""
        return PeftConfig.to_dict(self)

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

    @property
    def scale(self) -> float:
        """The factor ``s`` multiplying ``ΔW``."""
        return scaling_factor(self.alpha, self.n, self.r, self.scaling)

    @property
    def blocks(self) -> int:
        return self.n

    def row_name(self) -> str:
        # Another scaling convention is another method (the scaling study), not a setting to pick among.
        variant = f" ({self.scaling})" if self.scaling != "per_mini" else ""
        return f"{self.display_name} r={self.r}{variant}"

    def choice_name(self) -> str:
        return f"n={self.n}"


def scaling_factor(alpha: float, n: int, r: int, rule: str) -> float:
    """``s`` for a MELoRA layer with ``n`` mini LoRAs of rank ``r``."""
    if rule == "per_mini":
        return alpha / r
    if rule == "equivalent":
        return alpha / (n * r)
    if rule == "rslora":
        return alpha / math.sqrt(r)
    raise ValueError(f"scaling={rule!r} is unknown; choose one of {SCALINGS}")


@dataclass
class LoRAConfig(MELoRAConfig):
    """LoRA (Hu et al. 2021): MELoRA with a single mini LoRA (``n = 1``)."""

    method: ClassVar[str] = "lora"
    display_name: ClassVar[str] = "LoRA"

    n: int = 1
    r: int = 8

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"LoRA has n=1 by definition, got n={self.n}; use MELoRAConfig for n > 1")
        super().__post_init__()

    def choice_name(self) -> str:
        return "-"


def quantized_kind(layer: nn.Module) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` for a bitsandbytes layer, else ``None``."""
    if not type(layer).__module__.startswith("bitsandbytes"):
        return None
    return {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}.get(type(layer).__name__)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear base layer: ``nn.Linear``, transformers ``Conv1D``, bitsandbytes ``Linear4bit``/``Linear8bitLt``."""
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear) or quantized_kind(layer):
        return layer.in_features, layer.out_features
    raise TypeError(
        f"MELoRA adapts linear layers (nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt), "
        f"got {type(layer).__name__}; name the linear layers in target_modules"
    )


# ---- the layer ----------------------------------------------------------------------


class MELoRALayer(BaseTunerLayer):
    """What a layer with MELoRA adapters holds, per adapter name: packed factors, ``n``, ``r``, ``s``, dropout.

    PEFT's tuner layer (``BaseTunerLayer``: several named adapters, enable/disable,
    set/delete): ``melora_A[name]`` ``(n, r, d_in/n)``, ``melora_B[name]``
    ``(n, d_out/n, r)``, ``melora_n``/``melora_r``/``melora_scaling``/``melora_dropout[name]``.
    ``formulation``: the formulation of a single active adapter (``"auto"`` or one of ``FORMULATIONS``).
    """

    adapter_layer_names = ("melora_A", "melora_B")
    other_param_names = ("melora_n", "melora_r", "melora_scaling", "melora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.melora_n: dict[str, int] = {}
        self.melora_r: dict[str, int] = {}
        self.melora_scaling: dict[str, float] = {}
        self.melora_dropout = nn.ModuleDict({})
        self.melora_A = nn.ParameterDict({})
        self.melora_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.formulation = "auto"
        self.kwargs = kwargs
        self.in_features, self.out_features = linear_dims(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: MELoRAConfig, name: str = "") -> None:
        """Add adapter ``adapter_name`` with ``config``'s ``n``, ``r``, scaling, dropout and initialisation."""
        n, r = config.n, config.r
        check_divides(n, self.in_features, self.out_features, name)
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # a quantized base stores integers
        self.melora_n[adapter_name], self.melora_r[adapter_name] = n, r
        self.melora_scaling[adapter_name] = scaling_factor(config.alpha, n, r, config.scaling)
        self.melora_A[adapter_name] = nn.Parameter(torch.empty(n, r, self.in_features // n, dtype=dtype, device=weight.device))
        self.melora_B[adapter_name] = nn.Parameter(torch.empty(n, self.out_features // n, r, dtype=dtype, device=weight.device))
        self.melora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_factors(self.melora_A[adapter_name], self.melora_B[adapter_name], config.init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout (``(d_out, d_in)``; transposed for ``Conv1D``)."""
        delta = delta_weight(self.melora_A[adapter], self.melora_B[adapter], self.melora_scaling[adapter])
        return delta.T if self.fan_in_fan_out else delta

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base weight is stored ``(d_in, d_out)`` (transformers ``Conv1D``)."""
        return bool(Conv1D and isinstance(self.get_base_layer(), Conv1D))


class Linear(nn.Module, MELoRALayer):
    """A frozen linear layer with one or more named MELoRA adapters: PEFT's tuner layer and ``melora.inject``'s.

    With one adapter (``melora.inject``) it also reads as that adapter: ``lora_A``,
    ``lora_B``, ``n``, ``r``, ``scaling``, ``delta_weight()``, ``formulation_for(x)``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MELoRAConfig, name: str = "", **kwargs: Any) -> None:
        super().__init__()
        MELoRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name)

    # -- the active adapter, for single-adapter code (melora.inject, save_adapter, the trainer)
    @property
    def adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.melora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Parameter:
        return self.melora_B[self.adapter]

    @property
    def lora_dropout(self) -> nn.Module:
        return self.melora_dropout[self.adapter]

    @property
    def n(self) -> int:
        return self.melora_n[self.adapter]

    @property
    def r(self) -> int:
        return self.melora_r[self.adapter]

    @property
    def scaling(self) -> float:
        return self.melora_scaling[self.adapter]

    @property
    def d_in(self) -> int:
        return self.in_features

    @property
    def d_out(self) -> int:
        return self.out_features

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``ΔW = s · blockdiag(B_i A_i)``, ``(d_out, d_in)`` (float32 by default; float64 if the factors are)."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling, dtype)

    def dense_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``blockdiag(A_1..A_n)`` ``(n·r, d_in)`` and ``blockdiag(B_1..B_n)`` ``(d_out, n·r)``, differentiable."""
        return block_diagonal(self.lora_A), block_diagonal(self.lora_B)

    def formulation_for(self, x: torch.Tensor) -> str:
        """The formulation a single active adapter uses for input ``x``: ``self.formulation``, or :func:`choose_formulation`'s."""
        return formulations.resolve_formulation(self.formulation, x, self.base_layer, self.lora_A, self.lora_B)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """``result += s · concat_i(B_i A_i x_i)`` in place (``path``: ``"dense"`` or the ``"bmm"`` products)."""
        return formulations.add_adapter_output(result, x, self.lora_A, self.lora_B, self.scaling, path or self.formulation_for(x))

    # -- merging (PEFT's API; with one adapter also melora's)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' ``ΔW`` into the base weight; already merged ones are skipped.

        Args:
            safe_merge: Compute the merged weight out of place and refuse (``ValueError``)
                if it holds NaN or Inf, leaving the base weight untouched.
            adapter_names: Adapters to merge; ``None``: the active ones.
        """
        adapter_names = [a for a in (adapter_names or self.active_adapters) if a not in self.merged_adapters and a in self.melora_A]
        if not adapter_names:
            return
        kind = quantized_kind(self.get_base_layer())
        if kind:
            raise ValueError(
                f"merging MELoRA into a {kind} quantized base weight is not supported: load the base model without "
                "quantization (e.g. in bf16), load the adapter onto it, then merge; or serve the adapter unmerged"
            )
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            delta = self.get_delta_weight(adapter).detach().to(weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data.float() + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"refusing to merge adapter '{adapter}': W + ΔW holds NaN/Inf; the adapter weights are broken")
                    weight.data.copy_(merged.to(weight.dtype))
                else:
                    weight.data.add_(delta)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` from the base weight again (a no-op when none is merged)."""
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.sub_(self.get_delta_weight(adapter).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_active s · blockdiag(B) · blockdiag(A) · dropout(x)``; ``x`` ``(..., d_in)`` → ``(..., d_out)``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.melora_A]
        quantized = quantized_kind(self.get_base_layer())
        if len(active) == 1 and not args and not kwargs and not quantized:
            a = active[0]
            return formulations.forward(x, self.base_layer, self.melora_A[a], self.melora_B[a], self.melora_scaling[a],
                                        self.melora_dropout[a], self.formulation)
        result = self.base_layer(x, *args, **kwargs)
        if quantized:  # bitsandbytes returns its Function's output as a view: add into a copy
            result = result.clone()
        for a in active:
            path = "dense" if self.melora_n[a] == 1 else "bmm"  # the frozen output exists: add each adapter's product into it
            result = formulations.add_adapter_output(result, self.melora_dropout[a](x), self.melora_A[a], self.melora_B[a],
                                                     self.melora_scaling[a], path)
        return result

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: n={self.melora_n[a]}, r={self.melora_r[a]}, scaling={self.melora_scaling[a]:g}" for a in self.melora_A)

    def __repr__(self) -> str:
        return "melora." + super().__repr__()


class MELoRALinear(Linear):
    """A frozen linear layer plus ``n`` mini LoRAs of rank ``r`` on the diagonal: :class:`Linear` with one adapter.

    Args:
        base_layer: ``nn.Linear`` (weight ``(d_out, d_in)``), transformers ``Conv1D``
            (weight ``(d_in, d_out)``) or a bitsandbytes 4/8-bit linear layer; frozen, kept as ``base_layer``.
        n, r, alpha, dropout, scaling, init: As :class:`MELoRAConfig`.
        name: Module path, used in error messages.

    Shapes:
        ``lora_A``: ``(n, r, d_in/n)``; ``lora_B``: ``(n, d_out/n, r)``;
        input ``(..., d_in)`` → output ``(..., d_out)``.

    Formulation:
        ``layer.formulation`` is ``"auto"`` (default: :func:`choose_formulation` picks per call from
        ``(d_in, d_out, n, r, tokens, dtype, device)`` and whether gradients are
        needed) or one of ``FORMULATIONS`` to force it; every path gives the same output
        and gradients up to rounding.

    Precision:
        The frozen output keeps its dtype (under autocast, the autocast dtype). The first
        adapter product runs in the autocast dtype under ``torch.autocast``, else in the
        factors' dtype; the second product and the addition run in the frozen output's
        dtype. Under bf16 autocast all adapter math is bf16, as PEFT's LoRA, while the
        factors and their gradients stay fp32.

    Raises:
        ValueError: if ``n`` does not divide ``d_in`` or ``d_out``.
    """

    def __init__(self, base_layer: nn.Module, n: int, r: int, alpha: float = 16.0, dropout: float = 0.0, scaling: str = "per_mini",
                 init: str = "kaiming", name: str = "") -> None:
        config = MELoRAConfig(n=n, r=r, alpha=alpha, dropout=dropout, scaling=scaling, init=init)
        super().__init__(base_layer, ADAPTER_NAME, config, name=name)
        for p in self.get_base_layer().parameters():
            p.requires_grad_(False)


@register
class MELoRAMethod(AdapterMethod):
    """MELoRA needs no training hooks; its update is a LoRA of rank ``n·r``."""

    config_class = MELoRAConfig
    config: MELoRAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> Linear:
        return Linear(base_layer, ADAPTER_NAME, self.config, name=name)

    def layer_summary(self, name: str, module: nn.Module) -> LayerSummary | None:
        if not isinstance(module, Linear):
            return None
        params = module.lora_A.numel() + module.lora_B.numel()
        return LayerSummary(name, type(module).__name__, module.d_in, module.d_out, module.n, module.r, module.equivalent_rank, params)

    def lora_factors(self, layer: Linear) -> tuple[torch.Tensor, torch.Tensor, float]:
        # ΔW = s·blockdiag(B_i)·blockdiag(A_i): a LoRA of rank n·r whose factors are zero off the diagonal.
        return block_diagonal(layer.lora_A.detach()), block_diagonal(layer.lora_B.detach()), layer.scaling


@register
class LoRAMethod(MELoRAMethod):
    config_class = LoRAConfig


ADAPTER_LAYER_TYPES.append(MELoRALayer)
