"""The t intervals, paired differences and verdicts against scipy."""

import numpy as np
import pytest
from scipy import stats

from melora.experiments.report.stats import Cell, paired_difference, t_interval


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_t_interval_matches_scipy(n):
    values = list(np.random.default_rng(n).normal(70, 3, size=n))
    low, high = t_interval(values, 0.95)
    ref = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert low == pytest.approx(ref[0], rel=1e-12) and high == pytest.approx(ref[1], rel=1e-12)


def test_t_interval_needs_two_values():
    assert t_interval([1.0]) is None and t_interval([]) is None
    assert Cell(values=[80.0], seeds=[0]).ci95 is None


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    lora = rng.normal(80, 2, size=5)
    melora = lora + rng.normal(-1.5, 0.5, size=5)
    diff = paired_difference(Cell(list(melora), [0, 1, 2, 3, 4]), Cell(list(lora), [0, 1, 2, 3, 4]))
    ref = stats.ttest_rel(melora, lora).confidence_interval(0.95)
    assert diff.mean == pytest.approx(float(np.mean(melora - lora)))
    assert diff.ci[0] == pytest.approx(ref.low) and diff.ci[1] == pytest.approx(ref.high)
    assert diff.verdict == "worse"


def test_paired_difference_pairs_by_seed_not_position():
    method = Cell(values=[3.0, 1.0, 2.0], seeds=[2, 0, 1])
    reference = Cell(values=[0.0, 1.0, 2.0, 9.0], seeds=[0, 1, 2, 3])
    diff = paired_difference(method, reference)
    assert diff.seeds == [2, 0, 1] and diff.differences == [1.0, 1.0, 1.0]  # by position it would be [3, 0, 0]


@pytest.mark.parametrize(
    "offsets, verdict",
    [([1.0, 1.2, 0.9, 1.1, 1.0], "better"), ([-1.0, -1.2, -0.9, -1.1, -1.0], "worse"),
     ([1.0, -1.0, 0.5, -0.5, 0.1], "no detectable difference"), ([2.0], "too few seeds")],
)
def test_verdicts(offsets, verdict):
    seeds = list(range(len(offsets)))
    reference = Cell(values=[50.0] * len(offsets), seeds=seeds)
    method = Cell(values=[50.0 + o for o in offsets], seeds=seeds)
    assert paired_difference(method, reference).verdict == verdict
