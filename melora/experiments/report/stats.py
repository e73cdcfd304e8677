"""Mean ± standard deviation over seeds, t confidence intervals, paired differences and verdicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Cell:
    """One table cell: a metric over the seeds of one setting.

    ``std`` is the sample standard deviation (ddof = 1), ``None`` for a single seed.
    ``pick`` names the setting (method tag) a best-of row chose for this cell.
    """

    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    pick: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def ci95(self) -> tuple[float, float] | None:
        """95 % t confidence interval of the mean over seeds (``None`` for one seed)."""
        return t_interval(self.values, 0.95)


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t confidence interval for the mean of ``values`` (``None`` below 2 values).

    ``mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with the sample std ``s`` (ddof = 1);
    ``(nan, nan)`` when a value is NaN (a collapsed run: its metric is undefined).
    """
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    half = t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass
class PairedDifference:
    """``method − reference`` over the seeds both have (same seed: same data order and init seed).

    ``verdict``: ``"better"`` / ``"worse"`` when the CI excludes 0 (``"better"``
    means a higher metric), ``"no detectable difference"`` when it contains 0,
    ``"too few seeds"`` below two pairs, ``"collapsed run"`` when a paired run
    diverged or its metric is undefined (NaN).
    """

    seeds: list[int]
    differences: list[float]
    mean: float | None
    ci: tuple[float, float] | None

    @property
    def verdict(self) -> str:
        if self.mean is not None and math.isnan(self.mean):
            return "collapsed run"
        if self.ci is None:
            return "too few seeds"
        low, high = self.ci
        if low > 0:
            return "better"
        if high < 0:
            return "worse"
        return "no detectable difference"


def paired_difference(method: Cell, reference: Cell, confidence: float = 0.95) -> PairedDifference:
    """The paired difference of two cells over their common seeds, with a t interval."""
    ref = dict(zip(reference.seeds, reference.values))
    seeds = [s for s in method.seeds if s in ref]
    diffs = [v - ref[s] for s, v in zip(method.seeds, method.values) if s in ref]
    mean = sum(diffs) / len(diffs) if diffs else None
    return PairedDifference(seeds=seeds, differences=diffs, mean=mean, ci=t_interval(diffs, confidence))
