"""Learning-rate grids that bracket the optimum, chosen on validation only.

A setting (task, epochs, method config) starts on a grid such as
``{1e-3, 3e-3, 1e-2}``. When the best mean validation metric over seeds sits
at an edge of the grid, the grid is extended by one step of the 1-3 ladder
(``… 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 …``: factors of about 3) on that side,
until the best is interior. The extension stops without bracketing, with a
reason, when the next step would leave ``[min_lr, max_lr]`` (``limit``) or
when the edge is not strictly better than its neighbour, e.g. every lr gives
the same metric (``flat``: nothing to bracket).

A run that diverged, or whose metric is undefined (a correlation of constant
predictions), has *collapsed*: it ranks below every value, so a grid that
reached a collapsed lr is bracketed on that side.

Means are compared over the seeds that every lr of the grid has (so a seed
that finished at one lr only cannot move the choice); ties go to the smaller lr.
Only validation metrics enter here: the test half is never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The 1-3 ladder: mantissas of each decade.
_LADDER = (1.0, 3.0)


def ladder_step(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3 ladder above (``up``) or below ``lr`` (on the ladder or not)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    exponent = math.floor(math.log10(lr))
    rungs = sorted(float(f"{m * 10.0 ** e:.12g}") for e in (exponent - 1, exponent, exponent + 1) for m in _LADDER)
    if up:
        return next(r for r in rungs if r > lr * (1 + 1e-9))
    return next(r for r in reversed(rungs) if r < lr * (1 - 1e-9))


def ranked(value: float | None) -> float:
    """A validation metric for ranking: collapsed (``None``: diverged, or NaN) ranks lowest."""
    return -math.inf if value is None or math.isnan(value) else value


@dataclass
class Bracket:
    """Where a setting's lr grid stands.

    Attributes:
        status: ``"interior"`` (the best lr has a tried lr on each side),
            ``"extend"`` (``next_lr`` should be run), ``"limit"`` (the best is at
            an edge and the next step is out of bounds), ``"flat"`` (the edge
            ties its neighbour), ``"incomplete"`` (a grid lr has no seed yet),
            ``"single"`` (one lr tried).
        best_lr: The lr with the best mean validation metric over ``seeds``.
        next_lr: The lr to add (``status == "extend"``), else ``None``.
        edge: ``"top"`` / ``"bottom"`` when the best lr is the grid's largest / smallest.
        means: lr → mean validation metric over ``seeds`` (``-inf``: collapsed).
        seeds: The seeds every lr has.
    """

    status: str
    best_lr: float | None = None
    next_lr: float | None = None
    edge: str = ""
    means: dict[float, float] = field(default_factory=dict)
    seeds: tuple = ()

    @property
    def reason(self) -> str:
        """Why the chosen lr may sit at a grid edge, in words ('' when it does not)."""
        if not self.edge:
            return ""
        if self.status == "limit":
            return f"grid limit: the next lr past the {self.edge} is outside the searched range"
        if self.status == "flat":
            return f"flat: the {self.edge} lr ties its neighbour, nothing to bracket"
        return f"at the {self.edge}: the grid is still being extended"


def bracket(values: dict[float, dict[int, float | None]], min_lr: float = 1e-5, max_lr: float = 0.3) -> Bracket:
    """Where a grid stands, from ``{lr: {seed: validation metric or None (collapsed)}}``."""
    lrs = sorted(values)
    if not lrs or any(not values[lr] for lr in lrs):
        return Bracket("incomplete")
    seeds = set.intersection(*(set(values[lr]) for lr in lrs))
    if not seeds:
        return Bracket("incomplete")
    means = {lr: sum(ranked(values[lr][s]) for s in seeds) / len(seeds) for lr in lrs}
    best = max(lrs, key=lambda lr: means[lr])  # max keeps the first of equals: the smaller lr
    common = tuple(sorted(seeds))
    if len(lrs) == 1:
        return Bracket("single", best, None, "", means, common)
    if best == lrs[-1]:
        edge, neighbour, step = "top", lrs[-2], ladder_step(best, up=True)
    elif best == lrs[0]:
        edge, neighbour, step = "bottom", lrs[1], ladder_step(best, up=False)
    else:
        return Bracket("interior", best, None, "", means, common)
    if not means[best] > means[neighbour]:
        return Bracket("flat", best, None, edge, means, common)
    if not min_lr <= step <= max_lr:
        return Bracket("limit", best, None, edge, means, common)
    return Bracket("extend", best, step, edge, means, common)
