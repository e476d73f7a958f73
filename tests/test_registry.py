"""The one registry mechanism behind every variation point: names are checked without importing
anything, unknown names get a suggestion, and every declared built-in resolves to a callable."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from nlsr.data import DATASETS, TASKS
from nlsr.errors import NlsrError
from nlsr.evaluation.judges import JUDGES
from nlsr.method import SELECTION_RULES, TRANSPLANTS
from nlsr.registry import Registry
from nlsr.training.defences import DEFENCES

REGISTRIES = {"transplants": TRANSPLANTS, "selection rules": SELECTION_RULES, "judges": JUDGES,
              "defences": DEFENCES, "datasets": DATASETS, "tasks": TASKS}
HEAVY = ("torch", "numpy", "sklearn", "transformers", "peft", "trl", "datasets")


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(NlsrError) as err:
        TRANSPLANTS.check("exakt")
    assert str(err.value) == "unknown transplant form 'exakt'; did you mean 'exact'? (known: block, exact, factor)"
    with pytest.raises(NlsrError, match=r"^unknown --select 'best' \(known: all, paper, random, reverse, threshold\)$"):
        SELECTION_RULES.check("best", "--select")
    with pytest.raises(NlsrError, match="unknown judge 'nope'"):
        JUDGES.get("nope")
    assert DEFENCES.check("lisa") == "lisa"


def test_duplicate_and_malformed_names_are_refused():
    registry: Registry = Registry("widget")
    registry.declare("one", "math:sqrt")
    with pytest.raises(NlsrError, match=r"widget 'one' is already registered, by math:sqrt; register "
                                        r"math:floor under another name"):
        registry.declare("one", "math:floor")
    with pytest.raises(NlsrError, match="widget 'one' is already registered, by math:sqrt"):
        registry.register("one")
    for bad in ("One", "two words", "", "-x"):
        with pytest.raises(NlsrError, match="name .* is not allowed"):
            registry.register(bad)
    with pytest.raises(NlsrError, match="should read 'package.module:attr'"):
        registry.declare("two", "math.sqrt")
    assert registry.names() == ("one",)


def test_a_declaration_that_cannot_be_imported_names_itself():
    registry: Registry = Registry("widget")
    registry.declare("gone", "nlsr.no_such_module:thing")
    assert "gone" in registry and registry.info("gone").target == "nlsr.no_such_module:thing"
    with pytest.raises(NlsrError, match="widget 'gone' is declared as nlsr.no_such_module:thing"):
        registry.get("gone")


def test_names_and_checks_import_nothing_heavy():
    code = f"""
import json, sys
from nlsr.method import SELECTION_RULES, TRANSPLANTS
from nlsr.evaluation.judges import JUDGES
from nlsr.training.defences import DEFENCES
from nlsr.data import DATASETS, TASKS
from nlsr.experiment.config import ExperimentConfig
seen = {{}}
for r in (SELECTION_RULES, TRANSPLANTS, JUDGES, DEFENCES, DATASETS, TASKS):
    seen[r.kind] = [r.info(n).summary for n in r.names()]
    r.check(r.names()[0])
ExperimentConfig.model_validate({{"defences": [{{"name": "v", "method": "vaccine"}}],
                                 "evaluate": {{"judges": ["hidden", {{"name": "beaverdam", "model": "m"}}]}}}})
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "kinds": sorted(seen)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"naming and checking imported {result['heavy']}"
    assert len(result["kinds"]) == len(REGISTRIES)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registered_name_resolves(kind):
    registry = REGISTRIES[kind]
    assert len(registry) > 0 and list(registry) == list(registry.names())
    for name in registry:
        entry = registry.info(name)
        assert entry.name == name and entry.summary, f"{kind} '{name}' has no summary"
        target = registry.get(name)
        assert target is registry.get(name)                   # imported once
        if kind in ("datasets", "tasks"):
            assert target.name == name
        else:
            assert callable(target), f"{kind} '{name}' -> {entry.target} is not callable"


def test_the_builtin_names():
    assert TRANSPLANTS.names() == ("exact", "factor", "block")
    assert SELECTION_RULES.names() == ("paper", "reverse", "threshold", "all", "random")
    assert set(JUDGES) == {"trained", "beaverdam", "llamaguard", "refusal", "refusal-v2", "hidden"}
    assert {n: (DEFENCES.info(n).meta["stage"], DEFENCES.info(n).meta["single_process"]) for n in DEFENCES} == {
        "vaccine": ("alignment", True), "lisa": ("fine-tuning", True), "mixing": ("fine-tuning", False),
        "constrained_sft": ("fine-tuning", True)}


def test_needs_model_is_exactly_the_judges_whose_factory_requires_a_model():
    def requires_model(factory) -> bool:
        parameter = inspect.signature(factory).parameters.get("model")
        return parameter is not None and parameter.default is inspect.Parameter.empty

    declared = {n for n in JUDGES if JUDGES.info(n).meta["needs_model"]}
    assert declared == {n for n in JUDGES if requires_model(JUDGES.get(n))} == {"beaverdam", "llamaguard"}


@pytest.mark.parametrize("registry", [TRANSPLANTS, JUDGES, DEFENCES], ids=lambda r: r.kind)
def test_a_new_registration_is_found_and_listed(registry):
    @registry.register("scratch-test", summary="a test's", stage="fine-tuning")
    def scratch(*args, **kwargs):
        return "scratch"

    try:
        assert registry.get("scratch-test") is scratch and registry.names()[-1] == "scratch-test"
        assert registry.info("scratch-test").meta == {"stage": "fine-tuning"}
        assert registry.info("scratch-test").target.endswith(":" + scratch.__qualname__)
    finally:
        registry.unregister("scratch-test")
    assert "scratch-test" not in registry.names()
    with pytest.raises(NlsrError, match="unknown"):
        registry.get("scratch-test")


def test_a_registered_judge_is_built_by_make_judge():
    from nlsr.evaluation.judges import Judge, make_judge, register_judge

    @register_judge("scratch-judge", summary="flags everything")
    class Everything(Judge):
        def judge(self, prompts, responses):
            return [True] * len(responses)

    try:
        assert make_judge("scratch-judge").judge(["p"], ["r"]) == [True]
        assert JUDGES.info("scratch-judge").meta == {"needs_model": False}
    finally:
        JUDGES.unregister("scratch-judge")
