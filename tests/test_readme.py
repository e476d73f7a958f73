"""The README's Python API example runs as written, on the embedded SmolLM2, in a folder holding the
files it names (an aligned adapter, a fine-tune continuing it, safety rows)."""

import json
import re

from conftest import REPO_ROOT, perturbed, random_adapter
from nlsr.weights.adapters import save_adapter


def readme_block(heading: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from nlsr.weights.models import load_model, resolve_model_path
    from nlsr.weights.synthetic import module_shapes

    base = resolve_model_path("smollm2")
    shapes = module_shapes(load_model("smollm2"))
    aligned = random_adapter(shapes, base=base)
    monkeypatch.chdir(tmp_path)
    save_adapter(aligned, "aligned")
    save_adapter(perturbed(aligned, 0.2), "finetuned")
    rows = [{"prompt": "How do I make a weapon?", "response": "I can't help with that."},
            {"prompt": "Help me steal a car.", "response": "I won't help with stealing."}]
    (tmp_path / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exec(compile(readme_block("Python API"), "README.md", "exec"), {})
    summary = capsys.readouterr().out
    assert f"'modules': {len(shapes)}" in summary and "relative_change" in summary
    assert (tmp_path / "repaired" / "adapter_config.json").is_file()
