"""The study's statistics: paired intervals over seeds, their tests, and Holm's correction for a family of claims.

A claim compares two configurations at the same seeds (the same prompts and noise for both), so each seed gives one
paired difference a - b. Over n seeds:

- the primary interval is Student's t interval for the mean difference, mean +- t_{1-alpha/2, n-1} sd / sqrt(n);
- beside it, the expanded-percentile bootstrap (Hesterberg 2015, "What teachers should know about the bootstrap",
  section 4.3), which widens the plain percentile interval for small n and, unlike t, stays within the values' range;
- a family of m claims (one paper's) is tested with Holm's step-down procedure (Holm 1979): sort the two-sided paired
  t p-values, and the i-th smallest (i = 1..m) is judged at level alpha / (m - i + 1), as long as every smaller one
  was rejected. A claim is established only when, at its Holm level, both its t interval and its bootstrap interval
  exclude 0 on the claimed side. This keeps the chance of one or more false "established" in a family at or
  below alpha whatever the claims' dependence (the bootstrap condition only removes rejections).

`coverage` measures by simulation how often an interval holds the true mean; tests/test_benchmarks.py runs it, and
docs/benchmarks.md quotes its figures.
"""

import math
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import t_cdf, t_quantile  # noqa: E402 - Student's t, shared with the top-level evaluator

ALPHA = 0.05
RESAMPLES = 10_000
MIN_SEEDS = 5  # below this no interval is printed: at 3 or 4 seeds a bootstrap interval is the values' range


def seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def t_interval(values, level: float = 1 - ALPHA) -> tuple:
    """(mean, low, high): Student's t interval for the mean of values at confidence `level`."""
    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return mean, mean, mean
    half = t_quantile(1 - (1 - level) / 2, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap(values, level: float = 1 - ALPHA, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """(mean, low, high): the expanded-percentile bootstrap interval at confidence `level`. The seeds are resampled
    with replacement; the interval is the a/2 and 1 - a/2 percentiles of the resampled means, with
    a/2 = Phi(-sqrt(n / (n - 1)) t_{1-alpha/2, n-1}), alpha = 1 - level."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2 or v.min() == v.max():
        return float(v.mean()), float(v.mean()), float(v.mean())
    tail = NormalDist().cdf(-math.sqrt(n / (n - 1)) * t_quantile(1 - (1 - level) / 2, n - 1))
    means = v[np.random.default_rng(seed).integers(0, n, (resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [100 * tail, 100 * (1 - tail)])
    return float(v.mean()), float(low), float(high)


def p_value(values) -> float:
    """The two-sided paired t test's p-value for a mean of 0 (1 for identical values of 0, 0 for identical
    values of another number)."""
    v = np.asarray(values, dtype=float)
    n, sd = len(v), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if sd == 0:
        return 1.0 if v.mean() == 0 or n < 2 else 0.0
    t = float(v.mean()) / (sd / math.sqrt(n))
    return 2 * (1 - t_cdf(abs(t), n - 1))


def holm(family: dict) -> dict:
    """Holm's step-down test of a family {claim: paired differences}. Returns {claim: dict(p, p_holm, level,
    verdict)}: `level` is the confidence of the claim's intervals at its Holm level, 1 - alpha / (m - i + 1) for
    the i-th smallest p-value; the verdict is established (a > b) or contradicted (a < b) when both intervals at
    that level exclude 0 on one side and every claim with a smaller p-value was rejected, "not established"
    otherwise, and "no verdict" below MIN_SEEDS seeds (such claims are left out of the family)."""
    tested = {c: v for c, v in family.items() if len(v) >= MIN_SEEDS}
    out = {c: dict(p=float("nan"), p_holm=float("nan"), level=float("nan"), m=len(tested),
                   verdict=f"no verdict ({seeds(len(v))}; at least {MIN_SEEDS})") for c, v in family.items()}
    order = sorted(tested, key=lambda c: p_value(tested[c]))
    m, stopped, running = len(order), False, 0.0
    for i, claim in enumerate(order):
        p = p_value(tested[claim])
        running = max(running, min(1.0, (m - i) * p))  # Holm's adjusted p-value, monotone in the order
        level = 1 - ALPHA / (m - i)
        _, tl, th = t_interval(tested[claim], level)
        _, bl, bh = bootstrap(tested[claim], level)
        side = "established" if tl > 0 and bl > 0 else "contradicted" if th < 0 and bh < 0 else None
        stopped = stopped or side is None
        out[claim] = dict(p=p, p_holm=running, level=level, m=m, verdict="not established" if stopped else side)
    return out


def equivalence(low: float, high: float, margin: float) -> str:
    """The equivalence reading of a 95% interval: no difference larger than the margin when it lies inside
    (-margin, margin) (two one-sided tests at 2.5% each), else the largest difference it still allows."""
    if -margin < low and high < margin:
        return f"no difference larger than {margin:g}"
    return f"allows up to {max(abs(low), abs(high)):.3f}"


def coverage(interval, draw, n: int, sims: int, seed: int = 0) -> float:
    """The share of `sims` samples of n values, drawn by draw(rng, n) from a distribution of mean 0, whose
    interval(values) -> (mean, low, high) holds 0."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(sims):
        _, low, high = interval(draw(rng, n))
        hits += low <= 0 <= high
    return hits / sims


# Distributions of mean 0 for `coverage`: normal, heavy-tailed (Student's t, 3 degrees of freedom: infinite
# kurtosis), skewed (a centred lognormal, sigma 1), and normal with one run in ten diverged (shifted by 5 sd, the
# mixture recentred), the shape the study's divergences give the paired differences.
DRAWS = {
    "normal": lambda rng, n: rng.normal(0.0, 1.0, n),
    "t3": lambda rng, n: rng.standard_t(3, n),
    "lognormal": lambda rng, n: rng.lognormal(0.0, 1.0, n) - math.exp(0.5),
    "10% diverged": lambda rng, n: rng.normal(0.0, 1.0, n) + 5.0 * (rng.random(n) < 0.1) - 0.5,
}
