"""Curves compared at equal cost: how much safety each method's curve buys for the same FA.

Two repair families (identified masks and random masks, say) cannot be compared at equal q: one q
does not cost what the other costs. So each curve of the frontier is read at fixed FA costs instead.
The attacked model is every curve's origin (no repair: no cost, no gain); along the curve, in the
order of its knob, the first segment whose FA cost reaches the target is interpolated linearly.
A curve that never costs that much has no value there ("not reached"; nothing is extrapolated).

Gains and costs are paired differences against the attacked model on the test split: the FA cost is
``FA(attacked) - FA(model)`` on the task rows, the gains are the refusal rate of the harmful prompts
(refusal-v2) minus the attacked model's, and the HS cut ``HS(attacked) - HS(model)``. The interval
resamples the harmful prompts, the task rows and the seeds (:func:`resampled_means_sets`), the same
draw for every model, so the difference between two curves at one cost is paired as well. In a draw
where a curve does not reach the cost the value is missing; the share of draws that reached it is
reported beside the interval (the interval is taken over those draws).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nlsr.evaluation.scoring import Outcomes
from nlsr.evaluation.stats import N_BOOT, resampled_means_sets

FA_KEY = "fa"
REFUSAL_KEY = "harmful_refused_v2/test"
GAINS = ("refusal", "hs_cut")


def value_at_cost(costs: np.ndarray, gains: np.ndarray, target: float | np.ndarray) -> np.ndarray:
    """Each row's gain where its curve first reaches the ``target`` cost, by linear interpolation.

    ``costs``, ``gains``: (draws, points) along the curve in knob order, the origin (0, 0) first;
    ``target``: one cost, or one per draw. The first segment ``j`` with
    ``costs[j] < target <= costs[j + 1]`` is interpolated; a row with no such segment gives NaN."""
    costs, gains = np.atleast_2d(costs), np.atleast_2d(gains)
    targets = np.broadcast_to(np.asarray(target, dtype=np.float64), costs.shape[:1])
    out = np.full(costs.shape[0], np.nan)
    left, right = costs[:, :-1], costs[:, 1:]
    crosses = (left < targets[:, None]) & (targets[:, None] <= right)
    found = crosses.any(axis=1)
    j = np.argmax(crosses, axis=1)[found]
    rows = np.flatnonzero(found)
    c0, c1 = costs[rows, j], costs[rows, j + 1]
    g0, g1 = gains[rows, j], gains[rows, j + 1]
    out[rows] = g0 + (targets[rows] - c0) / (c1 - c0) * (g1 - g0)
    return out


def _estimate(observed: float, draws: np.ndarray) -> dict:
    reached = np.isfinite(draws)
    share = float(reached.mean()) if draws.size else 0.0
    low, high = np.percentile(draws[reached], [2.5, 97.5]) if reached.any() else (np.nan, np.nan)
    return {"mean": None if not np.isfinite(observed) else round(float(observed), 3),
            "ci": [None if not np.isfinite(low) else round(float(low), 3),
                   None if not np.isfinite(high) else round(float(high), 3)],
            "reached": round(share, 3)}


def equal_cost(outcomes: Mapping[str, Outcomes], curves: Mapping[str, Sequence[str]], targets: Sequence[float],
               judge: str, against: str | None = None, points: Sequence[str] = (),
               n_boot: int = N_BOOT) -> dict | None:
    """Every curve's refusal gain and HS cut at each FA cost in ``targets`` (points), with 95% intervals,
    and each curve's difference from the curve ``against`` (default: the first) at the same cost. Each
    model of ``points`` (a lone repair or a defence) is placed against every curve at its own FA cost:
    its gain minus the curve's gain there (positive: above the curve), in the same draws.

    ``curves``: ``{label: [model, ...]}`` in knob order. Models without outcomes on the attacked model's
    seeds are left out, and so is a curve left with none. None without an attacked model or any curve."""
    attacked = outcomes.get("attacked")
    if attacked is None or not (targets or points):
        return None
    hs_key = f"hs/{judge}/test"
    needed = (FA_KEY, REFUSAL_KEY, hs_key)
    if not all(k in attacked.arrays for k in needed):
        return None

    def usable(name: str) -> bool:
        o = outcomes.get(name)
        return o is not None and o.seeds == attacked.seeds and all(
            k in o.arrays and o.arrays[k].shape == attacked.arrays[k].shape for k in needed)

    kept = {label: [m for m in models if usable(m)] for label, models in curves.items()}
    kept = {label: models for label, models in kept.items() if models}
    if not kept:
        return None
    against = against if against in kept else next(iter(kept))
    lone = [m for m in points if usable(m)]
    models = ["attacked"] + sorted({m for ms in kept.values() for m in ms} | set(lone))
    column = {m: i for i, m in enumerate(models)}
    harmful = [outcomes[m].arrays[k] for m in models for k in (REFUSAL_KEY, hs_key)]
    task = [outcomes[m].arrays[FA_KEY] for m in models]
    boot_harm, boot_task = resampled_means_sets([harmful, task], n_boot)
    seen_harm = np.array([[a.mean() for a in harmful]])
    seen_task = np.array([[a.mean() for a in task]])

    def paired(harm: np.ndarray, fa: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """FA cost, refusal gain and HS cut of ``names`` against the attacked model: (draws, models)."""
        idx = [column[m] for m in names]
        return {"cost": 100 * (fa[:, [0]] - fa[:, idx]),
                "refusal": 100 * (harm[:, [2 * i for i in idx]] - harm[:, [0]]),
                "hs_cut": 100 * (harm[:, [1]] - harm[:, [2 * i + 1 for i in idx]])}

    def curve_at(harm: np.ndarray, fa: np.ndarray, names: Sequence[str], cost) -> dict[str, np.ndarray]:
        """The curve ``names`` (the origin prepended) read at ``cost`` (one, or one per draw)."""
        d = {k: np.hstack([np.zeros((v.shape[0], 1)), v]) for k, v in paired(harm, fa, names).items()}
        return {g: value_at_cost(d["cost"], d[g], cost) for g in GAINS}

    result: dict = {"targets": [float(t) for t in targets], "against": against, "judge": judge,
                    "cost": "FA(attacked) - FA(model), test task rows, points",
                    "gains": {"refusal": "refused (refusal-v2) - attacked's, harmful test prompts, points",
                              "hs_cut": f"HS(attacked) - HS(model), judge '{judge}', points"},
                    "curves": {}, "differences": {}, "points": {}}
    seen = {(label, t): curve_at(seen_harm, seen_task, ms, t) for label, ms in kept.items() for t in targets}
    drawn = {(label, t): curve_at(boot_harm, boot_task, ms, t) for label, ms in kept.items() for t in targets}
    for label in kept:
        result["curves"][label] = {"models": kept[label], **{
            f"{t:g}": {g: _estimate(seen[label, t][g][0], drawn[label, t][g]) for g in GAINS} for t in targets}}
        if label != against:
            result["differences"][label] = {f"{t:g}": {
                g: _estimate(seen[label, t][g][0] - seen[against, t][g][0], drawn[label, t][g] - drawn[against, t][g])
                for g in GAINS} for t in targets}
    for name in lone:
        own_seen, own_drawn = paired(seen_harm, seen_task, [name]), paired(boot_harm, boot_task, [name])
        entry = {k: _estimate(own_seen[k][0, 0], own_drawn[k][:, 0]) for k in ("cost", *GAINS)}
        entry["minus_curve"] = {}
        for label, ms in kept.items():
            at_seen = curve_at(seen_harm, seen_task, ms, own_seen["cost"][:, 0])
            at_drawn = curve_at(boot_harm, boot_task, ms, own_drawn["cost"][:, 0])
            entry["minus_curve"][label] = {g: _estimate(own_seen[g][0, 0] - at_seen[g][0],
                                                        own_drawn[g][:, 0] - at_drawn[g]) for g in GAINS}
        result["points"][name] = entry
    return result


def _cell(est: dict) -> str:
    if est["mean"] is None:
        return "not reached"
    text = f"{est['mean']:+.1f}"
    if est["ci"][0] is not None:
        text += f" [{est['ci'][0]:+.1f}, {est['ci'][1]:+.1f}]"
    if est["reached"] < 0.95:
        text += f" ({100 * est['reached']:.0f}% of draws)"
    return text


def equal_cost_markdown(result: dict) -> str:
    """The tables of :func:`equal_cost`: each curve's refusal gain and HS cut at each FA cost, each curve
    minus the ``against`` curve at the same cost, and each lone model minus each curve at its own cost."""
    targets = [f"{t:g}" for t in result["targets"]]
    head = " | ".join(f"refused +, FA -{t} | HS cut, FA -{t}" for t in targets)
    rule = "|".join(["---"] * (1 + 2 * len(targets)))

    def by_cost(entries: dict) -> list[str]:
        return [f"| {label} | " + " | ".join(f"{_cell(entry[t]['refusal'])} | {_cell(entry[t]['hs_cut'])}"
                                             for t in targets) + " |" for label, entry in entries.items()]

    lines = [f"| curve | {head} |", f"|{rule}|", *by_cost(result["curves"])]
    if result["differences"]:
        lines += ["", f"Minus the `{result['against']}` curve at the same FA cost (paired draws):", "",
                  f"| curve - {result['against']} | {head} |", f"|{rule}|", *by_cost(result["differences"])]
    if result["points"]:
        lines += ["", "Each lone model against each curve at the model's own FA cost (its gain minus the curve's "
                  "there; positive: above the curve; paired draws):", "",
                  "| model | its FA cost | refused + | HS cut | curve | refused +: model - curve | "
                  "HS cut: model - curve |", "|---|---|---|---|---|---|---|"]
        for name, entry in result["points"].items():
            for i, (label, diff) in enumerate(entry["minus_curve"].items()):
                own = (f"{_cell(entry['cost'])} | {_cell(entry['refusal'])} | {_cell(entry['hs_cut'])}"
                       if i == 0 else " | | ")
                lines.append(f"| {name if i == 0 else ''} | {own} | {label} | {_cell(diff['refusal'])} | "
                             f"{_cell(diff['hs_cut'])} |")
    return "\n".join(lines)
