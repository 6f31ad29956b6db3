"""Statistics for the report: CIs across seeds, cluster bootstrap over test queries, paired
comparisons, and the batch-sensitivity slope. Pure functions of numbers.

Across seeds (n >= 2): mean with a Student-t 95% interval; paired differences against clip use
scipy's paired t-test. With one seed the test set is the only source of variation: test images
are resampled with replacement (all captions of a drawn image come along, so the five captions
of an image are not treated as independent queries), B times with a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
LABEL_PREFIXES = ("zeroshot_", "linprobe_")  # per-image correctness: zero-shot, linear probe


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int
    how: str  # "t" (across seeds), "bootstrap" (over test images) or "single"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values: Sequence[float]) -> Estimate:
    """Mean and Student-t 95% confidence interval across seeds."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean, mean, mean, len(x), "single")
    sem = float(x.std(ddof=1) / math.sqrt(len(x)))
    if sem == 0:
        return Estimate(mean, mean, mean, len(x), "t")
    low, high = stats.t.interval(CONFIDENCE, len(x) - 1, loc=mean, scale=sem)
    return Estimate(mean, float(low), float(high), len(x), "t")


# ---------------------------------------------------------------- per-query data


@dataclass(frozen=True)
class Queries:
    """Per-query results of one run, grouped by test image for the cluster bootstrap."""

    i2t_rank: np.ndarray  # one per test image
    t2i_rank: np.ndarray  # one per caption
    caption_owner: np.ndarray  # image index of each caption
    correct: dict[str, np.ndarray]  # per labelled image, e.g. "zeroshot_shape"
    # per metric prefix, from ``correct`` and each entry's test-image index (``*_image`` in
    # eval_ranks.json, absent from older files; ``_label_columns``): read by every draw
    label_columns: dict[str, tuple]

    @classmethod
    def from_json(cls, raw: dict) -> Queries:
        def by_suffix(suffix: str) -> dict[str, np.ndarray]:
            return {k[: -len(suffix)]: np.asarray(v) for k, v in raw.items() if k.endswith(suffix)}

        correct = by_suffix("_correct")
        images = {k: v.astype(int) for k, v in by_suffix("_image").items()}
        return cls(
            i2t_rank=np.asarray(raw.get("i2t_rank", []), dtype=int),
            t2i_rank=np.asarray(raw.get("t2i_rank", []), dtype=int),
            caption_owner=np.asarray(raw.get("caption_owner", []), dtype=int),
            correct=correct,
            label_columns={p: _label_columns(correct, images, p) for p in LABEL_PREFIXES},
        )


def metric_from_queries(name: str) -> Callable[[Queries, np.ndarray], float] | None:
    """A function (queries, resampled image ids) -> metric, for the metrics that have one."""
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            if name == f"{direction}_r{k}":
                return _recall(direction, k)
    if name == "mean_r1":
        i2t, t2i = _recall("i2t", 1), _recall("t2i", 1)
        return lambda q, ids: 0.5 * (i2t(q, ids) + t2i(q, ids))
    for prefix in LABEL_PREFIXES:
        if name == f"{prefix}mean_top1":
            return lambda q, ids, prefix=prefix: _mean_accuracy(q, prefix, ids)
        if name.startswith(prefix) and name.endswith("_top1"):
            key = name[: -len("_top1")]
            return lambda q, ids, key=key: 100.0 * float(q.correct[key][ids].mean())
    return None


def _label_columns(
    correct: dict[str, np.ndarray], images: dict[str, np.ndarray], prefix: str
) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """The labelled test images of a prefix's tasks: their number, and per task the positions
    of its images among them with whether each was classified correctly. (0, []) when a task
    lacks its image indices (files written before they were kept)."""
    keys = sorted(k for k in correct if k.startswith(prefix))
    if not keys or any(k not in images for k in keys):
        return 0, []
    labelled = np.unique(np.concatenate([images[k] for k in keys]))
    return len(labelled), [(np.searchsorted(labelled, images[k]), correct[k]) for k in keys]


def _mean_accuracy(q: Queries, prefix: str, ids: np.ndarray) -> float:
    """Mean over tasks of top-1 accuracy on the drawn labelled test images (with multiplicity):
    the images are resampled once for every task, as the tasks share them. A task none of whose
    images was drawn makes the draw NaN (left out of the interval)."""
    n, tasks = q.label_columns[prefix]
    drawn = np.bincount(ids, minlength=n)
    accuracies = []
    for positions, correct in tasks:
        weight = drawn[positions]
        total = weight.sum()
        accuracies.append(100.0 * float((weight * correct).sum() / total) if total else math.nan)
    return float(np.mean(accuracies))


def _recall(direction: str, k: int) -> Callable[[Queries, np.ndarray], float]:
    def recall(q: Queries, ids: np.ndarray) -> float:
        if direction == "i2t":
            return 100.0 * float((q.i2t_rank[ids] < k).mean())
        # every caption of every drawn image (with multiplicity)
        counts = np.bincount(ids, minlength=len(q.i2t_rank))
        hits = np.bincount(q.caption_owner, weights=(q.t2i_rank < k), minlength=len(q.i2t_rank))
        per_image = np.bincount(q.caption_owner, minlength=len(q.i2t_rank))
        return 100.0 * float((counts * hits).sum() / (counts * per_image).sum())

    return recall


def _resamples(n: int) -> np.ndarray:
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    return rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))


def percentile_ci(draws: np.ndarray) -> tuple[float, float]:
    """The central CONFIDENCE interval of bootstrap draws (NaN draws left out)."""
    q = [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2]
    low, high = np.nanpercentile(draws, q)
    return float(low), float(high)


def two_sided_p(draws: np.ndarray) -> float:
    """Percentile-bootstrap p-value of "the quantity is 0": twice the smaller tail at 0, a draw
    of exactly 0 counting half to each tail (NaN draws left out)."""
    d = draws[~np.isnan(draws)]
    ties = 0.5 * (d == 0).mean()
    return float(min(1.0, 2 * min((d < 0).mean() + ties, (d > 0).mean() + ties)))


def bootstrap(q: Queries, name: str) -> Estimate | None:
    """Percentile bootstrap 95% CI of one run's metric over test images."""
    fn = metric_from_queries(name)
    n = _population(q, name)
    if fn is None or n == 0:
        return None
    full = fn(q, np.arange(n))
    draws = np.array([fn(q, ids) for ids in _resamples(n)])
    low, high = percentile_ci(draws)
    return Estimate(full, float(low), float(high), 1, "bootstrap")


def _population(q: Queries, name: str) -> int:
    for prefix in LABEL_PREFIXES:
        if name == f"{prefix}mean_top1":
            return q.label_columns[prefix][0]
    if name.startswith(LABEL_PREFIXES):
        key = name[: -len("_top1")]
        return len(q.correct.get(key, []))
    return len(q.i2t_rank)


@dataclass(frozen=True)
class Comparison:
    diff: float
    low: float
    high: float
    p_value: float
    n: int
    how: str  # "paired t across seeds" or "paired bootstrap over test images"


def paired_seeds(method: Sequence[float], baseline: Sequence[float]) -> Comparison | None:
    """Paired t-test across seeds of method - baseline (same batch, same seeds)."""
    a, b = np.asarray(method, float), np.asarray(baseline, float)
    if len(a) < 2:
        return None
    d = a - b
    est = t_interval(d)
    # equal differences in every seed leave the t statistic undefined: no p-value (n/a),
    # rather than a p of 0 from two seeds
    p = float(stats.ttest_rel(a, b).pvalue) if d.std(ddof=1) > 0 else math.nan
    return Comparison(float(d.mean()), est.low, est.high, p, len(d), "paired t across seeds")


def paired_bootstrap(method: Queries, baseline: Queries, name: str) -> Comparison | None:
    """Difference on the same resampled test images; two-sided percentile-bootstrap p-value."""
    fn = metric_from_queries(name)
    n = _population(method, name)
    if fn is None or n == 0 or n != _population(baseline, name):
        return None
    observed = fn(method, np.arange(n)) - fn(baseline, np.arange(n))
    draws = np.array([fn(method, ids) - fn(baseline, ids) for ids in _resamples(n)])
    low, high = percentile_ci(draws)
    p = two_sided_p(draws)
    return Comparison(
        float(observed), float(low), float(high), float(p), 1, "paired bootstrap over test images"
    )


@dataclass(frozen=True)
class Slope:
    slope: float  # metric change per doubling of the batch
    low: float
    high: float
    points: int


def batch_slope(batches: Sequence[int], values: Sequence[float]) -> Slope | None:
    """Least-squares slope of the metric against log2(batch) with a 95% t interval."""
    x = np.log2(np.asarray(batches, float))
    y = np.asarray(values, float)
    if len(set(x.tolist())) < 2:
        return None
    fit = stats.linregress(x, y)
    if len(x) < 3:
        return Slope(float(fit.slope), float("nan"), float("nan"), len(x))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(x) - 2) * fit.stderr
    return Slope(float(fit.slope), float(fit.slope - half), float(fit.slope + half), len(x))


def gap_slope_seeds(
    batches: Sequence[int], method: Sequence[float], baseline: Sequence[float]
) -> GapSlope | None:
    """Slope of (method - baseline) against log2(batch) over paired runs (several seeds), its
    95% t interval and the regression's two-sided p-value for a slope of 0 (None below 3 runs)."""
    gaps = np.subtract(method, baseline)
    fit = batch_slope(batches, gaps)
    if fit is None or math.isnan(fit.low):
        return None
    p = stats.linregress(np.log2(np.asarray(batches, float)), gaps).pvalue
    return GapSlope(fit.slope, fit.low, fit.high, float(p), "t across seeds")


@dataclass(frozen=True)
class GapSlope:
    slope: float  # change of (method - baseline) per doubling of the batch
    low: float
    high: float
    p_value: float  # two-sided: is the slope different from 0?
    how: str


def gap_slope_bootstrap(pairs: dict[int, tuple[Queries, Queries]], name: str) -> GapSlope | None:
    """One seed: the same resampled test images for every batch size and both methods, the
    differences regressed on log2(batch) for each resample; percentile CI and p-value."""
    fn = metric_from_queries(name)
    batches = sorted(pairs)
    if fn is None or len(batches) < 2:
        return None
    n = _population(pairs[batches[0]][0], name)
    if n == 0 or any(_population(q, name) != n for pair in pairs.values() for q in pair):
        return None
    x = np.log2(np.asarray(batches, float))

    def slope_for(ids: np.ndarray) -> float:
        gaps = [fn(pairs[b][0], ids) - fn(pairs[b][1], ids) for b in batches]
        return float(np.polyfit(x, gaps, 1)[0])

    observed = slope_for(np.arange(n))
    draws = np.array([slope_for(ids) for ids in _resamples(n)])
    low, high = percentile_ci(draws)
    p = two_sided_p(draws)
    return GapSlope(observed, float(low), float(high), float(p), "bootstrap over test images")
