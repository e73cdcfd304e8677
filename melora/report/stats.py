"""Mean ± standard deviation over seeds."""

from __future__ import annotations

import math
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
