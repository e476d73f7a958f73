"""What each stage reads besides its input stages, as content hashes that enter its key.

A data stage's key covers the SHA-256 of every offline file it reads, and the report's key covers
the trained judges it uses (see :mod:`nlsr.experiment.provenance`), so that a stage made from other data or
another judge is never skipped, nor copied by ``reuse_from``. The lists below must name every data
set the functions of :mod:`nlsr.experiment.stages.data` load: ``tests/test_provenance.py`` runs each data
stage and fails when one loads a data set that is not listed here.
"""

from __future__ import annotations

from pathlib import Path

from nlsr.experiment.provenance import datasets_content, files_content
from nlsr.paths import is_bundled


def _gate(cfg) -> list[str]:
    from nlsr.experiment.stages.data import evaluation_set_names

    return evaluation_set_names(cfg.evaluate.harmful_dataset)


def eval_datasets(cfg) -> list[str]:
    """The data sets of the ``data`` stage (the evaluation sets)."""
    from nlsr.data import get_task

    ev = cfg.evaluate
    return [ev.harmful_dataset, *ev.extra_harmful, get_task(cfg.attack.task).eval_dataset, "xstest"]


def align_datasets(cfg) -> list[str]:
    """The data sets of ``data-align``: the alignment sets and every set of the disjointness gate."""
    names = [cfg.align.sft.dataset, cfg.realign.calibration_dataset, cfg.align.dpo.dataset]
    if cfg.align.helpful.n:
        names.append(cfg.align.helpful.dataset)
    return names + _gate(cfg)


def defence_datasets(cfg) -> list[str]:
    """The data sets of ``data-defences``: the SFT set and the gate's."""
    return [cfg.align.sft.dataset, *_gate(cfg)]


def refusal_pairs_datasets(cfg) -> list[str]:
    """The data set of ``data-refusal-pairs``: the harmful answers."""
    return [cfg.align.dpo.refusal_pairs_dataset]


def refusal_pairs_content(ctx) -> dict:
    """Content hashes of the ``data-refusal-pairs`` stage's files."""
    return _content(ctx, refusal_pairs_datasets(ctx.config))


def attack_datasets(cfg) -> list[str]:
    """The data sets of ``data-attack``: task and poison rows (unless ready-made) and the gate's."""
    from nlsr.data import get_task

    own = [] if cfg.attack.source == "ready_made" else [get_task(cfg.attack.task).train_dataset,
                                                         cfg.attack.poison_dataset]
    return own + _gate(cfg)


def task_calibration_datasets(cfg) -> list[str]:
    """The data sets of an ``identify-task`` stage: the task's training set and the gate's."""
    from nlsr.data import get_task

    return [get_task(cfg.attack.task).train_dataset, *_gate(cfg)]


def task_calibration_content(ctx) -> dict:
    """Content hashes of an ``identify-task`` stage's files."""
    return _content(ctx, task_calibration_datasets(ctx.config))


def antidote_content(ctx) -> dict:
    """Content hashes of an ``antidote-scores`` stage's files: the poison pool and the gate's sets."""
    return _content(ctx, [ctx.config.attack.poison_dataset, *_gate(ctx.config)])


def _content(ctx, names: list[str], files: list[Path] | None = None) -> dict:
    out: dict = {"datasets": datasets_content(names, ctx.data_dir)}
    if is_bundled(ctx.data_dir):   # only then, so that the keys of stages made from other folders stay
        out["bundled_data"] = True
    if files:
        out["files"] = files_content(files, Path(ctx.data_dir).resolve())
    return out


def eval_content(ctx) -> dict:
    """Content hashes of the ``data`` stage's files."""
    return _content(ctx, eval_datasets(ctx.config))


def align_content(ctx) -> dict:
    """Content hashes of the ``data-align`` stage's files."""
    return _content(ctx, align_datasets(ctx.config))


def defence_content(ctx) -> dict:
    """Content hashes of the ``data-defences`` stage's files."""
    return _content(ctx, defence_datasets(ctx.config))


def attack_content(ctx) -> dict:
    """Content hashes of a ``data-attack`` stage's files (the authors' ready-made file included)."""
    from nlsr.data.poison import ready_made_path

    cfg = ctx.config
    files = ([ready_made_path(cfg.attack.task, cfg.attack.p, Path(ctx.data_dir).resolve())]
             if cfg.attack.source == "ready_made" else [])
    return _content(ctx, attack_datasets(cfg), files)


def judge_content(ctx) -> dict:
    """Content hashes of every trained judge of the report, by label (the model files, not its
    metrics). The default judge is trained here if it is not cached yet, as the report would."""
    from nlsr.evaluation.judges import hidden
    from nlsr.evaluation.judges.classifier import CONFIG_NAME, WEIGHTS_NAME
    from nlsr.evaluation.judges.training import default_dir, load_or_train_default

    out = {}
    for spec in ctx.config.evaluate.judges:
        if spec.name not in ("trained", "hidden"):
            continue
        trained = spec.name == "trained"
        if spec.model is None:
            (load_or_train_default if trained else hidden.load_or_train_default)(ctx.data_dir)
        bundled = is_bundled(ctx.data_dir)
        folder = (Path(spec.model) if spec.model is not None
                  else default_dir(bundled) if trained else hidden.default_dir(bundled))
        names = (CONFIG_NAME, WEIGHTS_NAME) if trained else (hidden.CONFIG_NAME, hidden.WEIGHTS_NAME)
        out[spec.label] = files_content([folder / n for n in names], folder)
    return out
