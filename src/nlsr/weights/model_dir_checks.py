"""Is this a safetensors model directory? A check that imports nothing heavy (for the CLI)."""

from __future__ import annotations

from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def model_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a safetensors model directory (None when it is). Imports nothing heavy."""
    if not path.exists():
        return f"model directory '{path}' does not exist"
    if not path.is_dir():
        return f"'{path}' is a file; give a model directory (config.json + safetensors weights)"
    if not (path / "config.json").is_file():
        return (f"'{path}' has no config.json; give a model directory written by save_pretrained "
                "(or an adapter directory with adapter_config.json)")
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file():
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
        what = f" (it has {', '.join(found[:3])})" if found else ""
        return (f"model directory '{path}' has no {SINGLE_FILE} or {INDEX_FILE}{what}; nlsr reads "
                "safetensors weights only: re-save it with `model.save_pretrained(DIR)` "
                "(safetensors is the default)")
    return None
