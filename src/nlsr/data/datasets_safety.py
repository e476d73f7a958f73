"""Data sets for safety alignment (SFT, DPO) and for the harmful fine-tuning attack (poison rows)."""

from __future__ import annotations

import nlsr.data.hub as hub
from nlsr.data.files import NLSR_POISON, PKU_DPO, PKU_SFT, SPARD_TRAIN, STL_SAFETY
from nlsr.data.hub import HubSource
from nlsr.data.poison import FLAG_POISON, read_merged
from nlsr.data.readers import Row, json_rows, jsonl_rows
from nlsr.data.registry import DataFiles, register_dataset


@register_dataset("safety_sft", kind="sft", files=(SPARD_TRAIN,),
                  description="BeaverTails unsafe prompts -> refusals (SPARD train), safety SFT",
                  notes="the refusals are Llama-2-chat style and truncated to ~560 characters, some "
                        "mid-word; no hub equivalent (SPARD is a GitHub repository)")
def _safety_sft(files: DataFiles) -> list[dict]:
    return [{"prompt": r.text("prompt"), "response": r.text("safe")}
            for r in jsonl_rows(files.path(SPARD_TRAIN))]


@register_dataset("safety_sft_stl", kind="sft", files=(STL_SAFETY,),
                  description="safety-tuned-llamas harmful instructions -> safe answers (2,483)",
                  notes="a non-empty 'input' is appended to the prompt after a blank line (none has one)")
def _safety_sft_stl(files: DataFiles) -> list[dict]:
    records = []
    for r in json_rows(files.path(STL_SAFETY)):
        extra = r.text("input", allow_empty=True) if "input" in r.data else ""
        prompt = r.text("instruction") + (f"\n\n{extra}" if extra.strip() else "")
        records.append({"prompt": prompt, "response": r.text("output")})
    return records


@register_dataset("safety_sft_pku", kind="sft", files=(PKU_SFT,),
                  description="PKU-SafeRLHF prompts -> safe responses (labels stripped), 5,188",
                  hub=HubSource("PKU-Alignment/PKU-SafeRLHF", "train", hub.pku_sft,
                                note="the safe response of every pair with exactly one safe response"))
def _safety_sft_pku(files: DataFiles) -> list[dict]:
    return [{"prompt": r.text("prompt"), "response": r.text("response")}
            for r in json_rows(files.path(PKU_SFT))]


def _preference(row: Row) -> dict:
    pair = row.value("response")
    if not (isinstance(pair, list) and len(pair) == 2
            and all(isinstance(x, str) and x.strip() for x in pair)):
        raise row.error("field 'response' should be a list of two non-empty strings [chosen, rejected]")
    return {"prompt": row.text("prompt"), "chosen": pair[0], "rejected": pair[1]}


@register_dataset("safety_dpo", kind="preference", files=(PKU_DPO,),
                  description="PKU-SafeRLHF preference pairs (chosen = safer), 5,135 rows / 930 prompts",
                  hub=HubSource("PKU-Alignment/PKU-SafeRLHF", "train", hub.pku_preference,
                                note="pairs with exactly one safe response, chosen = the safe one (the "
                                     "paper's filter); the offline file's selection is the authors'"))
def _safety_dpo(files: DataFiles) -> list[dict]:
    return [_preference(r) for r in json_rows(files.path(PKU_DPO))]


# ---- harmful fine-tuning (poison) ------------------------------------------------------------

@register_dataset("poison", kind="poison", files=(SPARD_TRAIN,),
                  description="BeaverTails unsafe prompts -> harmful answers (SPARD train), 4,516",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_train", hub.beavertails_unsafe,
                                note="every is_safe=False row; the offline file is a 90% sample"))
def _poison(files: DataFiles) -> list[dict]:
    return [{"prompt": r.text("prompt"), "response": r.text("unsafe")}
            for r in jsonl_rows(files.path(SPARD_TRAIN))]


@register_dataset("poison_nlsr", kind="poison", files=(NLSR_POISON,),
                  description="the 200 harmful rows of the NLSR authors' fine-tuning sets (flag unsafe "
                              "of sst2 p0.2; every smaller p uses a subset)",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_train", hub.beavertails_unsafe,
                                note="the authors took the first n*p is_safe=False rows: use limit=200"),
                  notes="file order is the authors' shuffled order, not BeaverTails order; 198 "
                        "distinct prompts")
def _poison_nlsr(files: DataFiles) -> list[dict]:
    return [{"prompt": r["instruction"], "response": r["output"]}
            for r in read_merged(files.path(NLSR_POISON), "sst2") if r["flag"] == FLAG_POISON]
