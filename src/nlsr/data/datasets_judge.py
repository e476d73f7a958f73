"""Labelled responses (prompt, response, harmful) for measuring judges."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nlsr.data.files import SPARD_LAT, SPARD_TEST, SPARD_TRAIN
from nlsr.data.readers import json_rows, jsonl_rows
from nlsr.data.registry import DataFiles, register_dataset


@register_dataset("judge_jailbreakbench", kind="labelled", files=("jailbreakbench/*.json",),
                  description="JailbreakBench attack artifacts: (goal, response, jailbroken) from 18 "
                              "attack/model files",
                  notes="163 of the 1,800 rows have no response and are skipped; 'jailbroken' is "
                        "JailbreakBench's own judge (Llama-3-70B), not a human label; prompt = the goal "
                        "(the behaviour), not the attack prompt")
def _judge_jailbreakbench(files: DataFiles) -> list[dict]:
    records = []
    for path in files.glob("jailbreakbench/*.json"):
        for r in json_rows(path, key="jailbreaks"):
            response = r.value("response")
            if response is None or (isinstance(response, str) and not response.strip()):
                continue
            harmful = r.value("jailbroken")
            if not isinstance(harmful, bool):
                raise r.error(f"field 'jailbroken' should be true or false, got {harmful!r}")
            records.append({"prompt": r.text("goal"), "response": r.text("response"), "harmful": harmful,
                            "source": f"jailbreakbench:{path.stem}"})
    return records


def _spard_pairs(files: DataFiles, relatives: Sequence[str]) -> list[dict]:
    records = []
    for relative in relatives:
        source = "spard:" + Path(relative).stem.split("_", 1)[1]
        for r in jsonl_rows(files.path(relative)):
            prompt = r.text("prompt")
            for response_field, harmful in (("safe", False), ("unsafe", True)):
                records.append({"prompt": prompt, "response": r.text(response_field), "harmful": harmful,
                                "source": source})
    return records


@register_dataset("judge_spard", kind="labelled", files=(SPARD_TEST, SPARD_LAT),
                  description="SPARD eval pairs: per prompt a refusal (harmful=False) and a harmful "
                              "answer (harmful=True); BeaverTails test (502) + LatHarmful (495) prompts",
                  notes="labels by construction, not by annotators; the BeaverTails half shares its "
                        "prompts with harmful_eval; eval_I_beaverTails_test and eval_MergeFourData_test "
                        "are left out (they repeat these responses)")
def _judge_spard(files: DataFiles) -> list[dict]:
    return _spard_pairs(files, (SPARD_TEST, SPARD_LAT))


@register_dataset("judge_spard_train", kind="labelled", files=(SPARD_TRAIN,),
                  description="SPARD train pairs (refusal / harmful answer per prompt) for training a "
                              "judge; disjoint in prompts from harmful_eval and judge_spard",
                  notes="the very rows of safety_sft and poison (a judge trained here has seen the "
                        "safety SFT and poison answers)")
def _judge_spard_train(files: DataFiles) -> list[dict]:
    return _spard_pairs(files, (SPARD_TRAIN,))
