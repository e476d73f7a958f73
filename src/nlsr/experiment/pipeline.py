"""The experiment as a graph of stages with manifests: skip what is done, resume what was killed.

Each stage writes into ``runs/<name>/<stage>/``. It is built in ``<stage>.partial/`` (kept across
a kill, so training resumes from its last checkpoint and evaluation from its last batch) and
renamed when complete; ``manifest.json`` is written last and records the stage's key (a hash of
its parameters, of its inputs' keys, of the code version and of the data files and judge it
reads, see :mod:`nlsr.experiment.provenance`), the library versions, the seed, the machine and precision,
the wall time, the tokens the stage processed and its peak resident memory.
A rerun skips every stage whose manifest key matches, and reruns a stage (and everything
downstream) whose parameters or inputs changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlsr.errors import NlsrError
from nlsr.experiment import provenance
from nlsr.experiment.config import ExperimentConfig

MANIFEST = "manifest.json"


@dataclass
class Stage:
    """One step of the experiment: a function of its parameters and its input stages."""

    name: str
    run: Callable[[RunContext, Path, dict[str, Path]], dict]
    params: dict[str, Any]
    inputs: list[str] = field(default_factory=list)
    seed: int | None = None
    """The seed of a per-seed stage (the attack and what follows); None = the config's ``seed``."""
    roles: dict[str, str] = field(default_factory=dict)
    """Input stage name -> the name the stage function knows it by (``attack-s1`` -> ``attack``)."""
    content: Callable[[RunContext], dict] | None = None
    """What the stage reads besides its inputs, as content hashes (data files, a trained judge; see
    :mod:`nlsr.experiment.provenance`): computed when the stage is reached, part of its key and manifest."""


@dataclass
class RunContext:
    """What every stage may use: the config, the run folder, the data folder, loaded helpers."""

    config: ExperimentConfig
    run_dir: Path
    data_dir: Path
    cache: dict[str, Any] = field(default_factory=dict)
    seed: int = -1
    """The seed of the stage being run (set by :func:`run_stages`; the config's ``seed`` outside)."""

    def __post_init__(self) -> None:
        if self.seed < 0:
            self.seed = self.config.seed

    @property
    def precision(self):
        """The resolved :class:`nlsr.precision.Precision` of this run (config ``precision``, device)."""
        if "precision" not in self.cache:
            from nlsr.precision import resolve_precision

            self.cache["precision"] = resolve_precision(self.config.precision, self.config.device)
        return self.cache["precision"]

    def tokenizer(self):
        if "tokenizer" not in self.cache:
            from nlsr.weights.models import load_tokenizer

            self.cache["tokenizer"] = load_tokenizer(self.config.model)
        return self.cache["tokenizer"]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("nlsr", "torch", "transformers", "peft", "trl", "datasets", "scikit-learn"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def _reset_peak_memory() -> None:
    """Give freed memory back to the system (models of the last stage, via glibc's ``malloc_trim``)
    and reset the process's peak resident set (Linux: ``clear_refs`` 5), so each stage gets its own."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float | None:
    """Peak resident memory of this process since the last reset, in MiB (None where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        return None


def upstream_of(stages: list[Stage], target: str) -> list[Stage]:
    """``target`` and every stage it depends on, in run order (``nlsr run --until``)."""
    by_name = {s.name: s for s in stages}
    if target not in by_name:
        raise NlsrError(f"--until names an unknown stage '{target}'; stages are {list(by_name)}")
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].inputs
    return [s for s in stages if s.name in needed]


def stage_key(stage: Stage, input_keys: dict[str, str], content: dict | None = None) -> str:
    """The stage's identity: its name, parameters, inputs' keys, the code version (nlsr version and
    source commit, :func:`nlsr.experiment.provenance.code_version`) and the ``content`` hashes of what it reads."""
    payload = json.dumps({"name": stage.name, "params": stage.params, "inputs": input_keys,
                          "code": provenance.code_version(), "content": content},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def find_reusable(stage_name: str, key: str, reuse_from: list[Path],
                  same_but_code: Callable[[dict], bool] | None = None) -> Path | None:
    """A finished ``stage_name`` with this exact key in one of the ``reuse_from`` run folders (or, with
    ``same_but_code``, one that predicate accepts: see ``accept_code_change`` of :func:`run_stages`)."""
    for run_dir in reuse_from:
        manifest = read_manifest(run_dir / stage_name)
        if manifest and (manifest.get("key") == key or (same_but_code is not None and same_but_code(manifest))):
            return run_dir / stage_name
    return None


def same_but_code(manifest: dict, stage: Stage, content: dict | None, input_keys: dict[str, str]) -> bool:
    """Whether a finished stage's manifest differs from ``stage`` at most in the code that made it:
    the same parameters, the same content hashes, the same input stages (by key)."""
    params = json.loads(json.dumps(stage.params, sort_keys=True, default=str))
    return (manifest.get("params") == params and manifest.get("content") == content
            and manifest.get("inputs") == input_keys)


def _note_other_code(stage: Stage, key: str, content: dict | None, input_keys: dict[str, str],
                     existing: dict | None, reuse_from: list[Path], log: Callable[[str], None]) -> None:
    """Say so when the stage about to run is finished here or in ``reuse_from`` by other code only."""
    def differs_in_code(manifest: dict | None) -> bool:
        return bool(manifest) and manifest.get("key") != key and same_but_code(manifest, stage, content, input_keys)

    if differs_in_code(existing):
        where, verb = "this run", "keep"
    else:
        found = next((d for d in reuse_from if differs_in_code(read_manifest(d / stage.name))), None)
        if found is None:
            return
        where, verb = str(found), "copy"
    log(f"[note] {stage.name}: {where} has it finished by other code, the same otherwise; it runs again. "
        f"To {verb} it instead (for a code change that cannot change it), "
        "stop and rerun with --accept-code-change")


def _copy_stage(source: Path, partial: Path, final: Path) -> dict:
    """Copy a finished stage (hard links where the file system allows) and install it atomically."""
    if partial.exists():
        shutil.rmtree(partial)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, partial, copy_function=link_or_copy)
    manifest = json.loads((partial / MANIFEST).read_text())
    manifest["reused_from"] = str(source)
    (partial / MANIFEST).unlink()          # a hard link: rewrite a new file, never the source's
    _install(partial, final, manifest)
    return manifest


def record_templates(stage_dir: Path, template: str) -> None:
    """Every adapter or model folder a stage wrote records the run's prompt template (``nlsr.json``),
    so that ``nlsr evaluate``, ``identify`` and ``realign`` take it instead of guessing."""
    from nlsr.weights.records import RECORD_FILE, read_record, record_bytes

    for config in [*stage_dir.rglob("adapter_config.json"), *stage_dir.rglob("config.json")]:
        folder = config.parent
        if "checkpoint-" in str(folder) or (folder / RECORD_FILE).exists():
            continue
        (folder / RECORD_FILE).write_bytes(record_bytes(**{**read_record(folder), "template": template}))


def _install(partial: Path, final: Path, manifest: dict) -> None:
    """Write the manifest last, then replace ``final`` by the finished ``partial`` folder."""
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def _resumable_state(partial: Path) -> list[Path]:
    """What a killed stage left that a rerun continues from: training checkpoints, generation caches."""
    return sorted(partial.rglob("checkpoint-*")) + sorted(partial.rglob("*.cache.jsonl"))


def describe_partial(partial: Path) -> str:
    """Say what a rerun of an interrupted stage actually continues from."""
    checkpoints = sorted(partial.rglob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    caches = sorted(partial.rglob("*.cache.jsonl"))
    if checkpoints:
        return f"resuming training from {checkpoints[-1].name} of the interrupted run"
    if caches:
        lines = sum(1 for c in caches for line in c.read_text().splitlines() if line.strip())
        return f"resuming generation: {lines} answers of the interrupted run are kept"
    return "the interrupted run saved nothing to resume from; starting the stage over"


def run_stages(ctx: RunContext, stages: list[Stage], force: set[str] | None = None,
               log: Callable[[str], None] = print, reuse_from: list[Path] | None = None,
               until: str | None = None, accept_code_change: bool = False) -> dict[str, dict]:
    """Run ``stages`` in order (inputs must come first); returns each stage's manifest.

    A stage not done here but done with the same key in one of ``reuse_from`` is copied, not rerun.
    ``accept_code_change`` also keeps (or copies) a finished stage made by another commit of the code
    when nothing else differs (parameters, content hashes, inputs): an explicit choice for edits that
    cannot change a stage's outputs (a report fix, say); each such stage is logged with both commits.
    A forced stage (``force``: names, or ``all``) reruns, and so does every stage downstream of a
    stage that ran in this call: a stage's key does not change when it is merely rerun, so its
    dependants must not be skipped with results made from its old outputs."""
    force = force or set()
    names = [s.name for s in stages]
    unknown = sorted(force - set(names) - {"all"})
    if unknown:
        raise NlsrError(f"--force names unknown stages {unknown}; stages are {names}")
    if until is not None:
        stages = upstream_of(stages, until)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, dict] = {}
    ran: set[str] = set()                       # stages run in this call: their dependants rerun
    for stage in stages:
        missing = [i for i in stage.inputs if i not in manifests]
        assert not missing, f"stage {stage.name} runs before its inputs {missing}"
        content = stage.content(ctx) if stage.content is not None else None
        key = stage_key(stage, {i: manifests[i]["key"] for i in stage.inputs}, content)
        final = ctx.run_dir / stage.name
        existing = read_manifest(final)
        forced = bool(force & {stage.name, "all"})
        upstream_ran = any(i in ran for i in stage.inputs)
        input_keys = {i: manifests[i]["key"] for i in stage.inputs}

        def other_code(manifest: dict, stage=stage, content=content, input_keys=input_keys) -> bool:
            return accept_code_change and same_but_code(manifest, stage, content, input_keys)

        if existing and not forced and not upstream_ran and (existing.get("key") == key or other_code(existing)):
            if existing.get("key") != key:
                made = (existing.get("code") or {}).get("commit")
                now = provenance.code_version()["commit"]
                log(f"[skip] {stage.name}: done by code {str(made)[:10]} (now {str(now)[:10]}), "
                    "kept by --accept-code-change")
            log(f"[skip] {stage.name}: done ({existing['summary_line']})")
            manifests[stage.name] = existing
            continue
        partial = ctx.run_dir / f"{stage.name}.partial"
        source = (None if forced or upstream_ran else
                  find_reusable(stage.name, key, reuse_from or [], other_code if accept_code_change else None))
        if source is not None:
            manifests[stage.name] = _copy_stage(source, partial, final)
            log(f"[reuse] {stage.name}: copied from {source.parent} ({manifests[stage.name]['summary_line']})")
            continue
        if not (accept_code_change or forced or upstream_ran):
            _note_other_code(stage, key, content, input_keys, existing, reuse_from or [], log)
        if partial.exists():
            marker = partial / ".key"
            if not marker.exists() or marker.read_text() != key or forced or upstream_ran:
                shutil.rmtree(partial)          # other settings or inputs: start over
            else:
                log(f"[resume] {stage.name}: {describe_partial(partial)}")
        partial.mkdir(exist_ok=True)
        (partial / ".key").write_text(key)
        log(f"[run] {stage.name}")
        _reset_peak_memory()
        started = time.perf_counter()
        ctx.seed = ctx.config.seed if stage.seed is None else stage.seed
        try:
            summary = stage.run(ctx, partial, {stage.roles.get(i, i): ctx.run_dir / i for i in stage.inputs})
            record_templates(partial, ctx.config.template)
        except NlsrError:
            # Bad input or config: nothing to resume; leave no half-made folder behind.
            if not _resumable_state(partial):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        ran.add(stage.name)
        seconds = time.perf_counter() - started
        line = summary.pop("line", "") if isinstance(summary, dict) else ""
        tokens = summary.get("tokens") if isinstance(summary, dict) else None
        manifest = {"stage": stage.name, "key": key, "params": stage.params,
                    "inputs": {i: manifests[i]["key"] for i in stage.inputs},
                    "seed": ctx.seed, "seconds": round(seconds, 2), "tokens": tokens,
                    "tokens_per_second": round(tokens / seconds, 1) if tokens and seconds > 0 else None,
                    "peak_memory_mib": peak_memory_mib(),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": ctx.precision.record(),
                    "versions": versions(), "code": provenance.source_state(), "content": content,
                    "summary": summary, "summary_line": line}
        (partial / ".key").unlink()
        _install(partial, final, manifest)
        log(f"[done] {stage.name} in {seconds:.0f}s: {line}")
        for gate_line in summary.get("gate_lines", []) if isinstance(summary, dict) else []:
            log(f"[gate] {stage.name}: {gate_line}")
        manifests[stage.name] = manifest
    return manifests
