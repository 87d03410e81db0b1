"""rliable's statistics on known cases: IQM, the stratified bootstrap CI, the area under a curve, the
probability of improvement, and normalisation."""
import numpy as np
import pytest

from h2q.errors import H2QError
from h2q.evolve.stats import (
    area_under_curve,
    improvement_ci,
    iqm,
    normalise,
    probability_of_improvement,
    stratified_bootstrap_ci,
)


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(8.0).reshape(2, 4)) == pytest.approx(3.5)  # 2, 3, 4, 5 kept
    scores = np.array([[100.0, 1, 2], [3, 4, -50], [5, 6, 7], [8, 9, 1e6]])  # 12 scores: 3 cut each end
    assert iqm(scores) == pytest.approx(np.mean([3, 4, 5, 6, 7, 8]))
    assert iqm(np.stack([scores, scores + 1])).tolist() == pytest.approx([5.5, 6.5])  # leading axes stay


def test_normalise_maps_random_to_0_and_oracle_to_1():
    random, oracle = np.array([0.0, 0.01]), np.array([0.04, 0.03])
    runs = np.array([[0.0, 0.03], [0.02, 0.01], [0.04, 0.02]])  # (runs, tasks)
    assert np.allclose(normalise(runs, random, oracle), [[0, 1], [0.5, 0], [1, 0.5]])
    with pytest.raises(H2QError, match=r"task\(s\) \[1\]"):
        normalise(runs, random, np.array([0.04, 0.01]))


def test_bootstrap_ci_of_two_runs_is_known():
    # one task, runs 0 and 1: the resampled mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4
    point, low, high = stratified_bootstrap_ci(np.array([[0.0], [1.0]]), lambda s: s.mean(axis=(-2, -1)))
    assert (point, low, high) == (0.5, 0.0, 1.0)
    point, low, high = stratified_bootstrap_ci(np.array([[0.0], [1.0]]), lambda s: s.mean(axis=(-2, -1)),
                                               confidence=0.4)
    assert low == high == 0.5


def test_bootstrap_is_stratified_by_task():
    # every task's runs agree, tasks differ: resampling runs within tasks changes nothing
    scores = np.tile(np.array([0.0, 1.0, 5.0, 9.0]), (5, 1))  # (5 runs, 4 tasks)
    point, low, high = stratified_bootstrap_ci(scores)
    assert point == low == high == iqm(scores)


def test_bootstrap_ci_holds_the_true_mean_and_shrinks_with_runs():
    rng = np.random.default_rng(0)
    mean = lambda s: s.mean(axis=(-2, -1))
    widths = []
    for runs in (5, 80):
        scores = rng.normal(1.0, 1.0, size=(runs, 4))
        point, low, high = stratified_bootstrap_ci(scores, mean, seed=1)
        assert low < 1.0 < high and low < point < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    again = stratified_bootstrap_ci(scores, mean, seed=1)
    assert again == stratified_bootstrap_ci(scores, mean, seed=1)  # seeded


def test_bootstrap_keeps_a_runs_curve_together():
    # (cycles, runs, tasks): run 0 is 0 at every cycle, run 1 is 1: the area under the mean curve
    # of a replicate is the fraction of run-1 draws, so the interval is [0, 1] around 1/2
    curves = np.zeros((3, 2, 1))
    curves[:, 1] = 1.0
    stat = lambda s: area_under_curve(s.mean(axis=(-2, -1)))
    point, low, high = stratified_bootstrap_ci(curves, stat)
    assert (point, low, high) == (0.5, 0.0, 1.0)


def test_area_under_curve():
    assert area_under_curve([0.0, 1.0, 2.0]) == pytest.approx(1.0)  # mean height of a line 0..2
    assert area_under_curve([0.0, 1.0], cycles=[1, 3]) == pytest.approx(0.5)
    assert area_under_curve([[1.0, 1.0], [0.0, 4.0]]).tolist() == pytest.approx([1.0, 2.0])
    assert area_under_curve([0.7]) == pytest.approx(0.7)


def test_probability_of_improvement():
    x, y = np.array([[2.0, 3.0], [4.0, 5.0]]), np.array([[0.0, 1.0], [1.0, 2.0], [-1.0, 0.0]])
    assert probability_of_improvement(x, y) == 1.0  # disjoint
    assert probability_of_improvement(y, x) == 0.0
    assert probability_of_improvement(x, x) == 0.5  # identical
    assert probability_of_improvement(np.array([[0.0], [2.0]]), np.array([[1.0]])) == 0.5
    assert probability_of_improvement(np.array([[1.0]]), np.array([[1.0], [0.0]])) == 0.75  # a tie is half
    # two tasks, X wins one always and loses the other always: 0.5
    assert probability_of_improvement(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == 0.5
    p, low, high = improvement_ci(x, y)
    assert p == low == high == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, size=(5, 8)), rng.normal(0, 1, size=(5, 8))
    p, low, high = improvement_ci(a, b, seed=3)
    assert 0 <= low < p < high <= 1
