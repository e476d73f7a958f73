"""Training the ``trained`` judge: fitting, choosing C on validation, the cached default judge.

The regularisation strength C is chosen by mean per-source accuracy on the validation split; the
chosen model is refitted on train + validation and measured on the test rows of each source. Every
training source gets the same total sample weight, then harmful and harmless rows are rescaled to
equal totals (``pku_safe`` and its copies hold only harmless answers).

The labelled rows come from :mod:`nlsr.evaluation.judges.labelled_data`; the model is
:class:`nlsr.evaluation.judges.classifier.TrainedJudge`. Judge ``trained`` is registered here (a saved judge
folder, or the default judge, trained on first use).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nlsr.errors import NlsrError
from nlsr.evaluation.judges.base import Judge, agreement_metrics
from nlsr.evaluation.judges.classifier import CONFIG_NAME, TrainedJudge, input_text, refusal_column
from nlsr.evaluation.judges.labelled_data import (
    FRACTIONS,
    SHORT,
    SOURCES,
    TRAIN_SOURCES,
    Row,
    load_labelled_rows,
    split_rows,
    write_split_rows,
)

METRICS_NAME = "metrics.json"
ROWS_NAME = "training_rows.jsonl"
"""Written next to a trained judge: every labelled row with its split and whether it was fitted on."""
DEFAULT_NAME = "trained-v3"
TEXT_MODES = ("response",)
C_GRID = (1.0, 3.0, 10.0)

VECTORIZERS: dict[str, dict[str, Any]] = {
    "word": {"analyzer": "word", "ngram_range": (1, 2), "min_df": 2, "max_features": 50_000,
             "sublinear_tf": True},
    "char": {"analyzer": "char_wb", "ngram_range": (3, 5), "min_df": 2, "max_features": 50_000,
             "sublinear_tf": True},
}
"""The two TF-IDF feature blocks, concatenated: word 1-2 grams and in-word character 3-5 grams."""


def _make_trained(model: str | os.PathLike | None = None,
                  data_dir: str | os.PathLike | None = None) -> TrainedJudge:
    """``model``: a trained judge directory; without it, the cached default (trained on first use)."""
    if model is not None:
        return TrainedJudge.load(model)
    return load_or_train_default(data_dir)


def _source_weights(rows: Sequence[Row]) -> np.ndarray:
    """Sample weights that give every source the same total weight, then rescale harmful and
    harmless rows to equal totals (mean weight 1)."""
    sources = [r["source"] for r in rows]
    counts = {s: sources.count(s) for s in set(sources)}
    weights = np.array([len(rows) / (len(counts) * counts[s]) for s in sources])
    labels = np.array([bool(r["harmful"]) for r in rows])
    for value in (True, False):
        if (labels == value).any():
            weights[labels == value] *= 0.5 * len(rows) / weights[labels == value].sum()
    return weights


def fit_judge(rows: Sequence[Row], text: str = "response", C: float = 1.0,  # noqa: N803
              refusal_feature: bool = True, meta: Mapping[str, Any] | None = None) -> TrainedJudge:
    """Fit the vectorizers and the classifier on ``rows``; the judge keeps the sklearn model.

    ``refusal_feature`` adds the refusal-phrase flag of the response as one more feature.
    """
    return fit_judges(rows, text, (C,), refusal_feature, meta)[0]


def fit_judges(rows: Sequence[Row], text: str, c_grid: Sequence[float], refusal_feature: bool = True,
               meta: Mapping[str, Any] | None = None) -> list[TrainedJudge]:
    """One judge per C in ``c_grid``, sharing vectorizers fitted once on ``rows``."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from nlsr.evaluation.judges.refusal import REFUSAL_PHRASES

    if len({bool(r["harmful"]) for r in rows}) < 2:
        raise NlsrError("training the judge needs both harmful and harmless labelled responses")
    texts = [input_text(r["prompt"], r["response"], text) for r in rows]
    vectorizers = {name: TfidfVectorizer(**params) for name, params in VECTORIZERS.items()}
    blocks = [vec.fit_transform(texts) for vec in vectorizers.values()]
    phrases = tuple(REFUSAL_PHRASES) if refusal_feature else None
    if phrases is not None:
        blocks.append(refusal_column([r["response"] for r in rows], phrases))
    x = sp.hstack(blocks).tocsr()
    labels = np.array([bool(r["harmful"]) for r in rows])
    weights = _source_weights(rows)
    judges = []
    for c in c_grid:
        # one BLAS thread: L-BFGS on ~1e5 features is memory-bound, and thread contention made
        # it several times slower on small shared machines
        with threadpool_limits(limits=1, user_api="blas"):
            classifier = LogisticRegression(C=c, max_iter=5000).fit(x, labels, sample_weight=weights)
        judges.append(TrainedJudge(
            vectorizers=vectorizers, coef=classifier.coef_.ravel().copy(),
            intercept=float(classifier.intercept_[0]), text=text, refusal_phrases=phrases,
            meta=dict(meta or {}, C=c), classifier=classifier))
    return judges


def _per_source(judge: Judge, rows: Sequence[Row]) -> dict[str, dict[str, float | int]]:
    out = {}
    order = {s: i for i, s in enumerate(SOURCES)}
    for source in sorted({r["source"] for r in rows}, key=lambda s: (order.get(s, len(order)), s)):
        subset = [r for r in rows if r["source"] == source]
        flags = judge.judge([r["prompt"] for r in subset], [r["response"] for r in subset])
        out[source] = agreement_metrics(flags, [bool(r["harmful"]) for r in subset])
    return out


def select_and_fit(splits: Mapping[str, Sequence[Row]], seed: int = 0,
                   text_modes: Sequence[str] = TEXT_MODES, c_grid: Sequence[float] = C_GRID,
                   train_sources: Sequence[str] = TRAIN_SOURCES) -> tuple[TrainedJudge, list[dict[str, Any]]]:
    """Choose text mode and C by mean per-source validation accuracy, then refit on the training
    sources' train + validation rows."""
    trials = []
    for mode in text_modes:
        for c, candidate in zip(c_grid, fit_judges(splits["train"], mode, c_grid), strict=True):
            per_source = _per_source(candidate, splits["validation"])
            score = float(np.mean([m["accuracy"] for m in per_source.values()]))
            trials.append({"text": mode, "C": c, "validation_accuracy": score,
                           "per_source": {s: m["accuracy"] for s, m in per_source.items()}})
    best = max(trials, key=lambda t: t["validation_accuracy"])  # the first best wins ties
    rows = list(splits["train"]) + [r for r in splits["validation"] if r["source"] in train_sources]
    meta = {"seed": seed, "fractions": list(FRACTIONS), "sources": list(train_sources),
            "trained_on": "train+validation", "n_rows": len(rows)}
    return fit_judge(rows, text=best["text"], C=best["C"], meta=meta), trials


def train_judge(data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                seed: int = 0, max_prompts: int | None = None, force: bool = False,
                gated: bool = False) -> dict[str, Any]:
    """Train the judge, write it (no pickle), ``metrics.json`` and its labelled rows with their
    split (:data:`ROWS_NAME`) to ``out_dir`` atomically.

    ``out_dir`` defaults to :func:`default_dir`. Returns the metrics: row counts, the validation
    trials, and held-out agreement per source of this judge (``heldout``) and of the refusal judge
    (``refusal_heldout``). ``gated``: train on :mod:`nlsr.evaluation.judges.reserved_data` (judge-reserved
    prompts only, none in an evaluation set, answers cut like the pipeline's generations; at most
    ``max_prompts`` per source) instead of :mod:`nlsr.evaluation.judges.labelled_data`.
    """
    if gated:
        return _train_gated(data_dir, out_dir, seed, max_prompts, force)
    from nlsr.io import check_output_path

    if out_dir is None:
        default_dir().parent.mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) if out_dir is not None else default_dir()
    check_output_path(out, force)
    splits = split_rows(load_labelled_rows(data_dir, max_prompts, seed), seed)
    for name, rows in splits.items():
        missing = [s for s in TRAIN_SOURCES
                   if not s.endswith(SHORT) and not any(r["source"] == s for r in rows)]
        if missing:
            raise NlsrError(f"the {name} split has no rows from {', '.join(missing)}; use more "
                            "data (a larger --max-prompts)")
    judge, trials = select_and_fit(splits, seed)
    return _measure_and_save(judge, trials, splits, SOURCES, out, force, {"max_prompts": max_prompts},
                             lambda path: write_split_rows(path, splits))


def _measure_and_save(judge: TrainedJudge, trials: list[dict[str, Any]], splits: Mapping[str, Sequence[Row]],
                      sources: Sequence[str], out: Path, force: bool, extra: dict[str, Any],
                      write_rows) -> dict[str, Any]:
    """The judge's metrics (row counts per split and source, validation trials, held-out agreement
    of it and of the refusal matcher), then judge, metrics and rows written to ``out`` atomically."""
    from nlsr.evaluation.judges.refusal import RefusalJudge
    from nlsr.io import atomic_dir, write_json

    metrics = {
        "judge": "trained", **extra, "seed": judge.meta.get("seed"), "text": judge.text, "C": judge.meta["C"],
        "threshold": judge.threshold,
        "n_rows": {name: {source: sum(r["source"] == source for r in part) for source in sources}
                   for name, part in splits.items()},
        "validation_trials": trials,
        "heldout": _per_source(judge, splits["test"]),
        "refusal_heldout": _per_source(RefusalJudge(), splits["test"]),
    }
    judge.meta["heldout"] = {s: {k: m[k] for k in ("n", "accuracy", "cohen_kappa")}
                             for s, m in metrics["heldout"].items()}
    with atomic_dir(out, force=force) as tmp:
        judge.save(tmp)
        write_json(tmp / METRICS_NAME, metrics)
        write_rows(tmp / ROWS_NAME)
    return metrics


def _train_gated(data_dir, out_dir, seed: int, max_per_source: int | None, force: bool) -> dict[str, Any]:
    from nlsr.evaluation.judges import reserved_data
    from nlsr.io import check_output_path

    out = Path(out_dir) if out_dir is not None else default_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(out, force)
    rows, gate = reserved_data.build_rows(data_dir, max_per_source=max_per_source, seed=seed)
    splits = reserved_data.by_split(rows)
    judge, trials = select_and_fit(splits, seed, train_sources=reserved_data.SOURCES)
    extra = {"data": "gated (nlsr.evaluation.judges.reserved_data)", "gate": gate, "max_per_source": max_per_source}
    return _measure_and_save(judge, trials, splits, reserved_data.SOURCES, out, force, extra,
                             lambda path: reserved_data.write_rows(path, rows))


def default_dir(bundled: bool = False) -> Path:
    """The cached default judge: ``<nlsr cache>/judges/trained-v3`` (trained on the gated rows);
    ``bundled``: the one trained on the bundled data subset, ``trained-v3-bundled``, kept apart so
    that it never stands in for the judge trained on the full data."""
    from nlsr.paths import cache_dir

    return cache_dir() / "judges" / (DEFAULT_NAME + ("-bundled" if bundled else ""))


def load_or_train_default(data_dir: str | os.PathLike | None = None) -> TrainedJudge:
    """The default trained judge, trained on the gated rows (seed 0, every reserved prompt) and
    cached on first use (one per kind of data folder, :func:`default_dir`): it never saw a prompt
    the pipeline trains or evaluates on."""
    from nlsr.paths import on_bundled_data

    out = default_dir(on_bundled_data(data_dir))
    if not (out / CONFIG_NAME).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        train_judge(data_dir, out, seed=0, force=True, gated=True)
    return TrainedJudge.load(out)
