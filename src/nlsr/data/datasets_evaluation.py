"""Evaluation data sets: harmful prompts (harmful score) and XSTest (over-refusal)."""

from __future__ import annotations

from collections.abc import Iterable

import nlsr.data.hub as hub
from nlsr.data.files import SPARD_TEST
from nlsr.data.hub import HubSource
from nlsr.data.readers import Row, csv_rows, json_rows, jsonl_rows, line_rows
from nlsr.data.registry import XSTEST_LABELS, DataFiles, register_dataset


def _prompts(rows: Iterable[Row], field_name: str, source: str) -> list[dict]:
    return [{"prompt": r.text(field_name), "source": source} for r in rows]


@register_dataset("harmful_eval", kind="prompts", files=(SPARD_TEST,),
                  description="502 BeaverTails unsafe prompts (SPARD test, disjoint from the train "
                              "file): the main harmful-score set",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_test", hub.beavertails_prompt,
                                note="the paper's set: the first 1,000 is_safe=False rows (limit=1000); "
                                     "prompts repeat there"))
def _harmful_eval(files: DataFiles) -> list[dict]:
    return _prompts(jsonl_rows(files.path(SPARD_TEST)), "prompt", "beavertails")


ADVBENCH = "advbench/harmful_behaviors.csv"


@register_dataset("harmful_advbench", kind="prompts", files=(ADVBENCH,),
                  description="AdvBench harmful behaviours, 520",
                  hub=HubSource("walledai/AdvBench", "train", hub.prompt_field("prompt", "advbench")),
                  notes="the file's header says 'target,goal' but column 1 is the goal: read by position")
def _harmful_advbench(files: DataFiles) -> list[dict]:
    return _prompts(csv_rows(files.path(ADVBENCH), fieldnames=("goal", "target")), "goal", "advbench")


STRONGREJECT = "strongreject/strongreject_dataset.csv"


@register_dataset("harmful_strongreject", kind="prompts", files=(STRONGREJECT,),
                  description="StrongREJECT forbidden prompts, 313",
                  hub=HubSource("walledai/StrongREJECT", "train", hub.prompt_field("prompt", "strongreject")))
def _harmful_strongreject(files: DataFiles) -> list[dict]:
    return _prompts(csv_rows(files.path(STRONGREJECT)), "forbidden_prompt", "strongreject")


MALICIOUS = "malicious_instruct/malicious_instruct.txt"


@register_dataset("harmful_malicious_instruct", kind="prompts", files=(MALICIOUS,),
                  description="MaliciousInstruct, 100 prompts",
                  hub=HubSource("walledai/MaliciousInstruct", "train",
                                hub.prompt_field("prompt", "malicious_instruct")))
def _harmful_malicious_instruct(files: DataFiles) -> list[dict]:
    return _prompts(line_rows(files.path(MALICIOUS), "prompt"), "prompt", "malicious_instruct")


def _register_prompt_json(name: str, relative: str, field_name: str, source: str, description: str) -> None:
    @register_dataset(name, kind="prompts", files=(relative,), description=description,
                      notes="a subset copied from another repository; no exact hub equivalent")
    def _load(files: DataFiles) -> list[dict]:
        return _prompts(json_rows(files.path(relative)), field_name, source)


_register_prompt_json("harmful_beavertails_subset", "beavertails_evaluation_subset/BeaverTails.json",
                      "prompt", "beavertails_evaluation",
                      "140 prompts of BeaverTails-Evaluation (probably 10 per category)")
_register_prompt_json("harmful_catqa", "other_harmful_prompts/catqa_english.json", "prompt", "catqa",
                      "CatQA (English), 110-prompt subset")
_register_prompt_json("harmful_dangerousqa", "other_harmful_prompts/dangerousqa.json", "prompt",
                      "dangerousqa", "DangerousQA, 200 prompts")
_register_prompt_json("harmful_harmfulqa", "other_harmful_prompts/harmfulqa.json", "prompt", "harmfulqa",
                      "HarmfulQA, 196-prompt subset")
_register_prompt_json("harmful_shadow_alignment", "other_harmful_prompts/shadow-alignment.json", "prompt",
                      "shadow_alignment", "Shadow Alignment evaluation prompts, 200")
_register_prompt_json("harmful_refusal_direction", "refusal_direction/harmful_test.json", "instruction",
                      "refusal_direction", "harmful test split of Arditi et al. (AdvBench, "
                      "MaliciousInstruct, TDC, HarmBench, JBB...), 572")


# ---- over-refusal --------------------------------------------------------------------------------

XSTEST = "xstest/xstest_prompts.csv"


@register_dataset("xstest", kind="xstest", files=(XSTEST,),
                  description="XSTest: 250 safe prompts that look unsafe + 200 unsafe contrast prompts",
                  hub=HubSource("walledai/XSTest", "test", hub.xstest))
def _xstest(files: DataFiles) -> list[dict]:
    records = []
    for r in csv_rows(files.path(XSTEST)):
        label = r.text("label")
        if label not in XSTEST_LABELS:
            raise r.error(f"field 'label' is {label!r}, not one of {', '.join(XSTEST_LABELS)}")
        records.append({"prompt": r.text("prompt"), "label": label, "type": r.text("type")})
    return records
