"""Means with 95% bootstrap intervals over prompts and seeds, and paired differences.

Every score of the report is a mean of per-prompt outcomes (1 = flagged harmful, answered
correctly, refused ...) over the seeds of the attack: an array ``x`` of shape (seeds, prompts),
with the *same* prompts in every row. The interval resamples both sources of variation at once
(a two-level bootstrap): prompts with replacement (the same draw for every seed, which keeps the
pairing), and seeds with replacement when there are several. A difference between two models
scored on the same prompts and seeds is bootstrapped as one array ``a - b``, so the interval of
a paired difference is much tighter than the two intervals side by side suggest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95% interval (percentile bootstrap), in the units of the data (x 100 for %)."""

    mean: float
    low: float
    high: float
    n_prompts: int
    n_seeds: int

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 3), "ci95": [round(self.low, 3), round(self.high, 3)],
                "n_prompts": self.n_prompts, "n_seeds": self.n_seeds}

    def cell(self, digits: int = 1) -> str:
        """``mean [low, high]`` for a table."""
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _as_matrix(x) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected (seeds, prompts) outcomes with at least one prompt, got shape {array.shape}")
    return array


def resampled_means(arrays: Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """Bootstrap means of several (seeds, prompts) arrays under the *same* resampling, shape (n_boot, k).

    All arrays must have the same shape: the same prompts and seeds, so statistics combining them
    (differences, ratios) stay paired."""
    return resampled_means_sets([arrays], n_boot, seed)[0]


def resampled_means_sets(sets: Sequence[Sequence[np.ndarray]], n_boot: int = N_BOOT,
                         seed: int = BOOT_SEED) -> list[np.ndarray]:
    """:func:`resampled_means` of several sets of arrays scored on the same seeds, each set over its own
    items (e.g. the harmful prompts and the task rows): one (n_boot, len(set)) array per set. Each set's
    items are drawn on their own (the same draw for every array of the set), the seeds once for all sets,
    so a statistic that combines sets (an FA cost and a refusal gain) stays paired by seed. One set
    draws exactly as :func:`resampled_means` always has."""
    groups = [[_as_matrix(a) for a in arrays] for arrays in sets]
    n_seeds = groups[0][0].shape[0]
    for mats in groups:
        shape = mats[0].shape
        if any(m.shape != shape for m in mats) or shape[0] != n_seeds:
            raise ValueError("paired arrays must share one number of seeds, and within a set one (seeds, prompts) "
                             f"shape; got {[[m.shape for m in g] for g in groups]}")
    rng = np.random.default_rng(seed)

    def item_counts(n_items: int) -> np.ndarray:
        return rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_boot)       # (B, N)

    # the first set's items are drawn before the seeds, the other sets' after: the order one set always had
    counts = [item_counts(groups[0][0].shape[1])]
    if n_seeds > 1:
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot)   # (B, S)
    else:
        seed_counts = np.ones((n_boot, 1))
    counts += [item_counts(mats[0].shape[1]) for mats in groups[1:]]
    out = []
    for mats, prompt_counts in zip(groups, counts, strict=True):
        means = np.empty((n_boot, len(mats)))
        n_prompts = mats[0].shape[1]
        for k, m in enumerate(mats):
            per_prompt = seed_counts @ m                                 # (B, N): seed-weighted sums
            means[:, k] = (per_prompt * prompt_counts).sum(axis=1) / (n_seeds * n_prompts)
        out.append(means)
    return out


def estimate(x, scale: float = 100.0, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Estimate:
    """Mean of ``x`` (seeds, prompts) times ``scale``, with its 95% two-level bootstrap interval."""
    m = _as_matrix(x)
    boots = resampled_means([m], n_boot, seed)[:, 0] * scale
    low, high = np.percentile(boots, [2.5, 97.5])
    return Estimate(float(m.mean() * scale), float(low), float(high), m.shape[1], m.shape[0])


def paired(a, b, statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], point: Callable[[float, float], float],
           n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Estimate:
    """A statistic of two paired outcome arrays (same prompts, same seeds) with its 95% interval.

    ``statistic`` maps the two columns of bootstrap means to the statistic; ``point`` gives it on the
    observed means."""
    ma, mb = _as_matrix(a), _as_matrix(b)
    boots = resampled_means([ma, mb], n_boot, seed)
    values = statistic(boots[:, 0], boots[:, 1])
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [2.5, 97.5]) if values.size else (float("nan"), float("nan"))
    return Estimate(float(point(ma.mean(), mb.mean())), float(low), float(high), ma.shape[1], ma.shape[0])


def difference(a, b, scale: float = 100.0) -> Estimate:
    """mean(a) - mean(b) in points (x ``scale``), paired by prompt and seed."""
    return paired(a, b, lambda x, y: (x - y) * scale, lambda x, y: (x - y) * scale)


def relative_cut(defended, undefended) -> Estimate:
    """1 - mean(defended) / mean(undefended), in %: how much of the harm a defence removes."""
    def ratio(x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            return 100.0 * (1.0 - np.asarray(x) / np.asarray(y))
    return paired(defended, undefended, ratio, lambda x, y: float(ratio(x, y)))
