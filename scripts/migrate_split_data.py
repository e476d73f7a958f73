"""One-off migration of a run folder made before the data stage was split in two (data-align, data).

Finished stages keep their outputs; only their manifest keys are recomputed under the new stage
graph. That is sound only if the new data stages write byte-identical files to the old single
data stage, and if every stage's parameters are unchanged: both are checked, and any difference
stops the migration before a manifest is rewritten.

    python scripts/migrate_split_data.py configs/compare.yaml [--set name=...]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from nlsr.experiment.config import load_config
from nlsr.experiment.pipeline import MANIFEST, RunContext, read_manifest, run_stages, stage_key
from nlsr.experiment.plan import build_stages
from nlsr.paths import data_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(config: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.runs_dir) / cfg.name
    old_data = run_dir / "data"
    if read_manifest(run_dir / "data-align") is not None:
        sys.exit(f"{run_dir} already has a data-align stage: nothing to migrate")
    stages = build_stages(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "old-data"
        shutil.copytree(old_data, saved)
        manifests = run_stages(RunContext(cfg, run_dir, data_dir(cfg.data_dir)), stages[:2])
        for name in ("sft", "calibration", "dpo", "attack", "harmful_eval", "task_eval", "xstest_safe"):
            new = run_dir / ("data-align" if name in ("sft", "calibration", "dpo") else "data") / f"{name}.jsonl"
            if _digest(new) != _digest(saved / f"{name}.jsonl"):
                shutil.rmtree(run_dir / "data")
                shutil.copytree(saved, run_dir / "data")
                sys.exit(f"{name}.jsonl differs from the old data stage: not migrating")
    updates = []
    for stage in stages[2:]:
        manifest = read_manifest(run_dir / stage.name)
        if manifest is None or not set(stage.inputs) <= set(manifests):
            continue
        if json.loads(json.dumps(stage.params, default=str)) != manifest["params"]:
            sys.exit(f"stage {stage.name}: parameters changed since it ran: not migrating")
        inputs = {i: manifests[i]["key"] for i in stage.inputs}
        manifest.update(key=stage_key(stage, inputs), inputs=inputs, migrated="data stage split; keys recomputed")
        manifests[stage.name] = manifest
        updates.append((run_dir / stage.name / MANIFEST, manifest))
    for path, manifest in updates:
        path.unlink()                       # never write through a hard link into another run
        path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"re-keyed {len(updates)} stages of {run_dir}")


if __name__ == "__main__":
    args = sys.argv[1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    main(args[0], sets)
