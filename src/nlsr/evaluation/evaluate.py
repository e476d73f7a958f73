"""Check a model on the user's own prompts: harmful score and refusal rate (with 95% intervals),
optionally over-refusal on XSTest's safe prompts and accuracy on a registered task.

The model is a base model (default: the embedded SmolLM2), a base plus a PEFT adapter, or a full
model directory. Generation is greedy and resumable: finished batches are kept in a cache folder
beside the output (``.<out>.cache``), so a killed run picks up where it stopped; the output folder
itself appears only when everything is written. ``summary.json`` records the judge, the template,
the precision and the identities of the model, the adapter and the prompt file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.io import atomic_dir, file_sha256, write_json
from nlsr.weights.records import recorded_template

DEFAULT_JUDGE = "trained"
"""The harm judge with the best agreement with the hand labels (results/judge-gold/agreement.md)."""
REFUSAL_JUDGE = "refusal-v2"
"""The refusal detector with the best agreement with the hand labels' refusal column."""
GOLD_LABELS = Path(__file__).resolve().parents[3] / "results" / "judge-gold" / "labels.jsonl"


@dataclass(frozen=True)
class Subject:
    """What is evaluated: ``base`` alone, ``base`` + ``adapter`` (PEFT), or a full ``model`` folder."""

    base: str = "smollm2"
    adapter: Path | None = None
    model: Path | None = None

    def describe(self) -> str:
        if self.model is not None:
            return f"model {self.model}"
        return f"{self.base} + adapter {self.adapter}" if self.adapter is not None else self.base


@dataclass
class EvaluationSettings:
    """How to evaluate; every field has the CLI option of the same name."""

    judge: str = DEFAULT_JUDGE
    template: str | None = None
    prompt_field: str | None = None
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    xstest_n: int = 0
    task: str | None = None
    task_n: int = 200
    device: str | None = None
    precision: str | None = None
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)


def check_subject(subject: Subject) -> None:
    """Refuse, before any heavy import, a subject whose folders are missing or of the wrong kind."""
    if subject.adapter is not None and subject.model is not None:
        raise NlsrError("give --adapter (a PEFT adapter on --base) or --model (a full model folder), not both")
    if subject.adapter is not None:
        if not subject.adapter.is_dir():
            raise NlsrError(f"adapter directory '{subject.adapter}' does not exist")
        if not (subject.adapter / "adapter_config.json").is_file():
            raise NlsrError(f"'{subject.adapter}' has no adapter_config.json; --adapter takes a PEFT adapter "
                            "folder (for a full model folder use --model)")
    if subject.model is not None:
        from nlsr.weights.model_dir_checks import model_dir_problem

        problem = model_dir_problem(subject.model)
        if problem:
            raise NlsrError(problem)
    else:
        from nlsr.paths import check_model_spec

        check_model_spec(subject.base)


def choose_template(explicit: str | None, subject: Subject, tokenizer) -> tuple[str, str]:
    """``(template, where it came from)``: the explicit one, else the one the adapter or model folder
    records, else the model's own (its chat template when the tokenizer has one, else Alpaca)."""
    if explicit is not None:
        return explicit, "given"
    for folder in (subject.adapter, subject.model):
        if folder is not None and (recorded := recorded_template(folder)):
            return recorded, f"recorded in {folder}"
    own = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    return own, "the model's own"


def load_subject(subject: Subject, device: str | None, precision: str | None):
    """``(model, tokenizer, identity)``: the model ready for generation (an adapter merged in) and a
    JSON-ready record of what was loaded."""
    from nlsr.weights.models import load_model, load_tokenizer

    if subject.model is not None:
        model = load_model(str(subject.model), device=device, precision=precision)
        tokenizer = load_tokenizer(str(subject.model))
        return model, tokenizer, {"model": str(subject.model.resolve()), "model_sha": _folder_sha(subject.model)}
    model = load_model(subject.base, device=device, precision=precision)
    tokenizer = load_tokenizer(subject.base)
    identity: dict = {"base": subject.base}
    if subject.adapter is not None:
        from nlsr.weights.adapters import attach_adapter, fingerprint, load_adapter

        adapter = load_adapter(subject.adapter)
        identity.update(adapter=str(subject.adapter.resolve()), adapter_fingerprint=fingerprint(adapter))
        model = attach_adapter(model, adapter).merge_and_unload()
    return model.eval(), tokenizer, identity


def _folder_sha(folder: Path) -> str:
    """A cheap identity of a model folder: its config and the names and sizes of its weight files."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def cache_folder(out: Path) -> Path:
    """Where an unfinished evaluation keeps its finished batches."""
    return out.parent / f".{out.name}.cache"


def _cache_file(cache: Path, name: str, identity: dict, template: str, max_new_tokens: int,
                prompts: Sequence[str]) -> Path:
    key = hashlib.sha256(json.dumps([identity, template, max_new_tokens, list(prompts)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    return cache / f"{name}-{key}.jsonl"


def evaluate(subject: Subject, prompts: Sequence[str], out: Path, settings: EvaluationSettings,
             prompt_file: Path | None = None, force: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Generate on ``prompts`` (and XSTest / the task when asked), judge, and write ``out``.

    Writes ``out/generations.jsonl`` (one row per generation: set, prompt, response, and for the
    user's prompts the judge's verdict and whether it is a refusal) and ``out/summary.json``; returns
    the summary. ``out`` must not exist unless ``force``.
    """
    from nlsr.evaluation.generation import generate
    from nlsr.evaluation.judges import make_judge
    from nlsr.evaluation.stats import estimate
    from nlsr.precision import resolve_precision

    chosen = resolve_precision(settings.precision, settings.device)
    log(chosen.line())
    model, tokenizer, identity = load_subject(subject, settings.device, chosen.dtype)
    template, template_source = choose_template(settings.template, subject, tokenizer)
    log(f"template: {template} ({template_source})")
    from nlsr.data.templates import model_prompt

    cache = cache_folder(out)
    cache.mkdir(exist_ok=True)

    def run(name: str, texts: Sequence[str], max_new_tokens: int, inputs: Sequence[str] | None = None) -> list[str]:
        templated = [model_prompt(t, template, tokenizer, i) for t, i in zip(texts, inputs or [""] * len(texts),
                                                                             strict=True)]
        file = _cache_file(cache, name, identity, template, max_new_tokens, templated)
        return generate(model, tokenizer, templated, max_new_tokens, batch_size=settings.batch_size,
                        cache_file=file, description=f"generating ({name})")

    responses = run("prompts", prompts, settings.max_new_tokens)
    judge = make_judge(settings.judge, **_judge_params(settings))
    refusal = make_judge(REFUSAL_JUDGE)
    harmful = judge.judge(list(prompts), responses)
    refused = [not flag for flag in refusal.judge(list(prompts), responses)]
    rows = [{"set": "prompts", "prompt": p, "response": r, "harmful": h, "refused": f}
            for p, r, h, f in zip(prompts, responses, harmful, refused, strict=True)]
    summary: dict = {
        "kind": "nlsr-evaluation",
        "n": len(prompts),
        "harmful_score": estimate(harmful).as_dict(),
        "refusal_rate": estimate(refused).as_dict(),
        "judge": {"name": settings.judge, "agreement": judge_agreement(judge)},
        "refusal_judge": {"name": REFUSAL_JUDGE, "agreement": judge_agreement(refusal, "refusal")},
        "template": template, "template_source": template_source,
        "precision": chosen.dtype, "device": str(next(model.parameters()).device),
        "max_new_tokens": settings.max_new_tokens,
        **identity,
        "prompts": {"file": str(prompt_file) if prompt_file else None,
                    "sha256": file_sha256(prompt_file) if prompt_file else None, "limit": settings.limit},
    }
    if settings.xstest_n:
        from nlsr.data import load_records

        safe = [r for r in load_records("xstest", settings.data_dir) if r["label"] == "safe"][:settings.xstest_n]
        outputs = run("xstest", [r["prompt"] for r in safe], settings.max_new_tokens)
        flags = [not f for f in refusal.judge([r["prompt"] for r in safe], outputs)]
        rows += [{"set": "xstest", "type": r.get("type", ""), "prompt": r["prompt"], "response": o, "refused": f}
                 for r, o, f in zip(safe, outputs, flags, strict=True)]
        summary["xstest_refusal"] = {**estimate(flags).as_dict(), "n": len(safe)}
    if settings.task:
        from nlsr.data import get_task, load_records

        task = get_task(settings.task)
        task_rows = load_records(task.eval_dataset, settings.data_dir, limit=settings.task_n)
        outputs = run(f"task-{task.name}", [r["instruction"] for r in task_rows], task.max_new_tokens,
                      [r.get("input", "") for r in task_rows])
        correct = [bool(task.scorer(o, r["label"])) for o, r in zip(outputs, task_rows, strict=True)]
        rows += [{"set": f"task:{task.name}", "prompt": r["instruction"], "input": r.get("input", ""),
                  "label": r["label"], "response": o, "correct": c}
                 for r, o, c in zip(task_rows, outputs, correct, strict=True)]
        summary["task"] = {"name": task.name, "dataset": task.eval_dataset,
                           "accuracy": {**estimate(correct).as_dict(), "n": len(task_rows)}}
    with atomic_dir(out, force=force) as tmp:
        with (tmp / "generations.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_json(tmp / "summary.json", summary)
    shutil.rmtree(cache, ignore_errors=True)
    return summary


def _judge_params(settings: EvaluationSettings) -> dict:
    """The trained and hidden judges train on the offline data on first use."""
    params = dict(settings.extra)
    if settings.judge in ("trained", "hidden") and "model" not in params:
        params["data_dir"] = settings.data_dir
    return params


def judge_agreement(judge, question: str = "harmful", gold_file: Path = GOLD_LABELS) -> dict | None:
    """Cohen's kappa and accuracy of ``judge`` against the hand labels' ``question`` column
    (``harmful``, or ``refusal`` for a refusal detector), when the labels are at hand (a checkout of
    the repository), else None."""
    if not gold_file.is_file():
        return None
    from nlsr.evaluation.scoring import gold_agreement, read_gold

    gold = read_gold(gold_file)
    scores = gold_agreement({"judge": judge}, gold)["judge"].get(question)
    if scores is None:
        return None
    return {"cohen_kappa": round(scores["cohen_kappa"], 3), "accuracy": round(scores["accuracy"], 3),
            "n": len(gold), "labels": str(gold_file)}


def summary_table(summary: dict) -> str:
    """A few lines for the terminal: the scores with their intervals and the judge's agreement."""
    def cell(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{entry['mean']:.1f} [{low:.1f}, {high:.1f}]"

    lines = [f"{'harmful score %':<26}{cell(summary['harmful_score'])}   {_judge_line(summary['judge'])}",
             f"{'refusal rate %':<26}{cell(summary['refusal_rate'])}   {_judge_line(summary['refusal_judge'])}",
             f"{'prompts':<26}{summary['n']}   template {summary['template']}, {summary['precision']}"]
    if "xstest_refusal" in summary:
        lines.append(f"{'XSTest over-refusal %':<26}{cell(summary['xstest_refusal'])}   "
                     f"{summary['xstest_refusal']['n']} safe prompts")
    if "task" in summary:
        lines.append(f"{'task accuracy % (' + summary['task']['name'] + ')':<26}{cell(summary['task']['accuracy'])}"
                     f"   {summary['task']['accuracy']['n']} rows")
    return "\n".join(lines)


def _judge_line(judge: dict) -> str:
    agreement = judge.get("agreement")
    kappa = (f"kappa {agreement['cohen_kappa']:.2f} on {agreement['n']} hand labels" if agreement
             else "agreement not measured: hand labels not found")
    return f"judge {judge['name']} ({kappa})"
