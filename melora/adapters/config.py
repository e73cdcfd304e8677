"""Adapter configurations: one validated dataclass per method.

Every config shares the injection fields (`target_modules`, `modules_to_save`)
and adds the hyper-parameters of its method. `method` is a class-level name
used by the registry, by saved adapters (`adapter_config.json`) and by Hydra.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCALINGS = ("per_mini", "equivalent", "rslora")
INITS = ("kaiming", "gaussian")


def _meta(help_text: str) -> dict:
    return {"help": help_text}


@dataclass
class AdapterConfig:
    """Fields shared by every adapter method.

    Attributes:
        target_modules: Layers to adapt. A list of names matches a module whose
            full path equals a name or ends with ``"." + name`` (``["query",
            "value"]``); a single string is a regular expression that must
            match the full path (``r".*\\.(q|v)_proj"``).
        modules_to_save: Modules trained fully and saved with the adapter
            (e.g. the fresh classification head), matched like
            ``target_modules`` given as a list.
    """

    method: ClassVar[str] = "base"

    target_modules: list[str] | str = field(
        default_factory=lambda: ["query", "value"],
        metadata=_meta("layer names (suffix match) or one regex (full match)"),
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=_meta("modules trained in full and saved, e.g. ['classifier']")
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, list)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one layer, e.g. ['query', 'value']")
        elif not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be a list of names or a regex string, got {type(self.target_modules).__name__}")
        self.modules_to_save = list(self.modules_to_save or [])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the method name."""
        return {"method": self.method, **dataclasses.asdict(self)}


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value}")


@dataclass
class MELoRAConfig(AdapterConfig):
    """MELoRA: ``n`` mini LoRAs of rank ``r`` on the block diagonal.

    ``ΔW = s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n)`` has rank ``n·r`` and
    ``(d_in + d_out)·r`` trainable parameters per layer. ``n = 1`` is LoRA.

    Attributes:
        n: Number of mini LoRAs; must divide ``d_in`` and ``d_out`` of every
            target layer.
        r: Rank of each mini LoRA (equivalent rank ``n·r``).
        alpha: Scaling numerator.
        dropout: Dropout on the adapter input.
        scaling: ``"per_mini"``: ``s = alpha / r`` (the official implementation
            gives each mini LoRA ``alpha / r``; default); ``"equivalent"``:
            ``alpha / (n·r)``, LoRA's convention at the equivalent rank;
            ``"rslora"``: ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"kaiming"`` (Kaiming-uniform ``A_i`` with ``a = sqrt(5)``, as
            loralib and PEFT) or ``"gaussian"`` (``A_i ~ N(0, 1/r²)``, PEFT's
            ``init_lora_weights="gaussian"``). ``B_i`` is always zero.
    """

    method: ClassVar[str] = "melora"

    n: int = field(default=8, metadata=_meta("number of mini LoRAs"))
    r: int = field(default=1, metadata=_meta("rank of each mini LoRA"))
    alpha: float = field(default=16.0, metadata=_meta("scaling numerator"))
    dropout: float = field(default=0.05, metadata=_meta("dropout on the adapter input"))
    scaling: str = field(default="per_mini", metadata=_meta("per_mini: alpha/r | equivalent: alpha/(n r) | rslora: alpha/sqrt(r)"))
    init: str = field(default="kaiming", metadata=_meta("kaiming | gaussian (A); B is zero"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("n", self.n)
        _check_positive_int("r", self.r)
        _check_dropout(self.dropout)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is unknown; choose one of {SCALINGS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INITS}")

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

    @property
    def scale(self) -> float:
        """The factor ``s`` multiplying ``ΔW``."""
        return scaling_factor(self.alpha, self.n, self.r, self.scaling)


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

    n: int = 1
    r: int = 8

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"LoRA has n=1 by definition, got n={self.n}; use MELoRAConfig for n > 1")
        super().__post_init__()


@dataclass
class DyLoRAConfig(AdapterConfig):
    """DyLoRA (Valipour et al. 2023): a LoRA trained at every rank ``b ≤ r``.

    Each training step samples ``b`` uniformly from ``{r_min..r}`` and uses
    only the first ``b`` rows of ``A`` and columns of ``B``, so that any prefix
    of the ranks is a working adapter; evaluation uses ``eval_rank``.

    Attributes:
        r: Maximum rank ``r_max``.
        r_min: Smallest rank sampled.
        alpha: Scaling numerator; the scale is ``alpha / b`` for the rank ``b``
            in use, as in the DyLoRA paper (Eq. 3: the truncated product is
            divided by ``b``).
        dropout: Dropout on the adapter input.
        frozen: The paper's "frozen" mode: only the ``b``-th row/column gets
            gradients, the lower ones are detached.
        eval_rank: Rank used outside training (``None``: ``r``).
    """

    method: ClassVar[str] = "dylora"

    r: int = 8
    r_min: int = 1
    alpha: float = 16.0
    dropout: float = 0.05
    frozen: bool = False
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        _check_positive_int("r_min", self.r_min)
        _check_dropout(self.dropout)
        if self.r_min > self.r:
            raise ValueError(f"r_min={self.r_min} exceeds r={self.r}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise ValueError(f"eval_rank={self.eval_rank} must be in [1, r={self.r}]")


@dataclass
class DeltaLoRAConfig(AdapterConfig):
    """Delta-LoRA (Zi et al. 2023): LoRA whose product's change also updates ``W``.

    After each optimiser step ``t ≥ update_start_step``:
    ``W ← W + λ · s · (B_{t+1} A_{t+1} − B_t A_t)``. The paper drops the
    adapter dropout (it would make the delta inconsistent with ``W``'s gradient).

    Attributes:
        r, alpha: LoRA rank and scaling numerator (``s = alpha / r``).
        delta_lambda: ``λ``, the update ratio (paper: 2 for most GLUE tasks).
        update_start_step: ``K``, warm-up steps before ``W`` starts moving.
    """

    method: ClassVar[str] = "delta_lora"

    r: int = 8
    alpha: float = 16.0
    delta_lambda: float = 2.0
    update_start_step: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        if self.update_start_step < 0:
            raise ValueError(f"update_start_step must be >= 0, got {self.update_start_step}")


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA (Zhang et al. 2023) through ``peft.AdaLoraConfig``.

    SVD-form adapters whose rank budget is reallocated during training from
    ``init_r`` per layer down to an average ``target_r``. The trainer must call
    the method's ``on_step_end`` hook after each optimiser step (it runs PEFT's
    ``update_and_allocate``). ``total_step`` is filled in by the trainer.
    """

    method: ClassVar[str] = "adalora"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("init_r", self.init_r)
        _check_positive_int("target_r", self.target_r)
        _check_dropout(self.dropout)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} exceeds init_r={self.init_r}")


CONFIGS: dict[str, type[AdapterConfig]] = {
    c.method: c for c in (MELoRAConfig, LoRAConfig, DyLoRAConfig, DeltaLoRAConfig, AdaLoRAConfig)
}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict()`` output (or a Hydra ``method`` node)."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIGS:
        raise ValueError(f"method={method!r} is unknown; choose one of {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**d)
