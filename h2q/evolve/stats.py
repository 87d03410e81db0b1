"""Statistics over few runs, as rliable reports them (Agarwal et al. 2021, "Deep Reinforcement Learning
at the Edge of the Statistical Precipice"), written from the paper with numpy alone.

Scores are arrays shaped (..., runs, tasks): one row per independent run (run seed), one column per
task (here: a held-out world seed), optional leading axes (e.g. cycles) in front.

* `normalise`: per task, (score - random) / (oracle - random), as Atari and Melting Pot normalise:
  0 is the random policy, 1 the oracle.
* `iqm`: the interquartile mean, the mean of the middle 50% of all runs x tasks scores (the lowest
  and highest 25% cut off, as scipy's trim_mean(0.25) does); robust to outlier runs yet, unlike
  the median, it uses half of the scores.
* `stratified_bootstrap_ci`: a percentile confidence interval of any such statistic. Every
  bootstrap replicate resamples the runs with replacement independently within each task (the
  stratified bootstrap), so the uncertainty is that of the few runs, not of the fixed set of tasks.
  A leading axis keeps its runs together: a run's whole curve is one draw.
* `area_under_curve`: the trapezoidal area under a score-vs-cycle curve, divided by the cycles it
  spans (so it reads as the mean score over the run, in score units).
* `probability_of_improvement`: P(X > Y), per task the Mann-Whitney U statistic over all pairs of
  runs of X and Y (ties counted half), averaged over tasks; `improvement_ci` bootstraps it by
  resampling the runs of X and of Y, each within each task.
"""
from __future__ import annotations

import numpy as np

from h2q.errors import H2QError


def normalise(scores, random, oracle) -> np.ndarray:
    """(..., tasks) scores and (tasks,) reference scores -> (score - random) / (oracle - random)."""
    scores, random, oracle = (np.asarray(a, dtype=np.float64) for a in (scores, random, oracle))
    gap = oracle - random
    if (gap <= 0).any():
        raise H2QError(f"the oracle does not beat random on task(s) {np.flatnonzero(gap <= 0).tolist()}: "
                       f"no scale to normalise by there; score on other world seeds")
    return (scores - random) / gap


def iqm(scores) -> np.ndarray:
    """Interquartile mean over the last two axes (runs, tasks): (..., R, T) -> (...)."""
    scores = np.asarray(scores, dtype=np.float64)
    flat = np.sort(scores.reshape(scores.shape[:-2] + (-1,)), axis=-1)  # (..., R*T)
    cut = int(0.25 * flat.shape[-1])
    return flat[..., cut:flat.shape[-1] - cut].mean(axis=-1)


def area_under_curve(values, cycles=None) -> np.ndarray:
    """Mean height of a curve over its last axis (..., C) at `cycles` (default 1..C): the trapezoidal
    area divided by the cycles spanned (a single point is its own value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] == 1:
        return values[..., 0]
    x = np.arange(1, values.shape[-1] + 1) if cycles is None else np.asarray(cycles, dtype=np.float64)
    area = ((values[..., 1:] + values[..., :-1]) / 2 * np.diff(x)).sum(axis=-1)
    return area / (x[-1] - x[0])


def _resampled(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(..., R, T) -> (reps, ..., R, T): runs drawn with replacement, independently per task."""
    R, T = scores.shape[-2:]
    rows = rng.integers(R, size=(reps, R, T))  # (reps, R, T): which run stands in row r of task t
    moved = np.moveaxis(scores, (-2, -1), (0, 1))  # (R, T, ...)
    out = moved[rows, np.arange(T)]  # (reps, R, T, ...)
    return np.moveaxis(out, (1, 2), (-2, -1))  # (reps, ..., R, T)


def _interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - confidence) / 2
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)


def stratified_bootstrap_ci(scores, statistic=iqm, reps: int = 2000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point estimate, low, high) of `statistic` on (..., R, T) scores. `statistic` maps a
    (B, ..., R, T) stack to (B, ...) (e.g. `iqm`, or the area under the IQM curve:
    `lambda s: area_under_curve(iqm(s))` for scores (cycles, R, T)). Seeded: the same inputs give
    the same interval."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim < 2 or not 0 < confidence < 1 or reps < 1:
        raise H2QError(f"need (..., runs, tasks) scores, 0 < confidence < 1, reps >= 1; got shape {scores.shape}, "
                       f"confidence {confidence}, reps {reps}")
    point = statistic(scores[None])[0]
    samples = statistic(_resampled(scores, reps, np.random.default_rng(seed)))
    return (point, *_interval(samples, confidence))


def probability_of_improvement(x, y) -> np.ndarray:
    """P(X > Y) from (..., Rx, T) and (..., Ry, T) scores: per task the fraction of run pairs where X
    scores higher, ties counted half, then the mean over tasks -> (...)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    pairs = x[..., :, None, :] - y[..., None, :, :]  # (..., Rx, Ry, T)
    wins = (pairs > 0) + 0.5 * (pairs == 0)
    return wins.mean(axis=(-3, -2)).mean(axis=-1)


def improvement_ci(x, y, reps: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(X > Y), low, high): the runs of X and of Y each resampled within each task."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    samples = probability_of_improvement(_resampled(x, reps, rng), _resampled(y, reps, rng))
    return (probability_of_improvement(x, y), *_interval(samples, confidence))
