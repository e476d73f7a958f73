"""Harmless instructions (no answers): the prompts the base model answers itself for the helpful
half of the SFT set (``align.helpful``)."""

from __future__ import annotations

import nlsr.data.hub as hub
from nlsr.data.hub import HubSource
from nlsr.data.readers import json_rows
from nlsr.data.registry import DataFiles, register_dataset

HARMLESS = ("refusal_direction/harmless_val.json", "refusal_direction/harmless_test.json")


@register_dataset("harmless_instructions", kind="prompts", files=HARMLESS,
                  description="Alpaca harmless instructions of Arditi et al.'s refusal-direction splits "
                              "(val + test files, 12,000+), no answers",
                  hub=HubSource("tatsu-lab/alpaca", "train", hub.prompt_field("instruction", "alpaca"),
                                note="the same instructions, taken from Alpaca itself"))
def _harmless_instructions(files: DataFiles) -> list[dict]:
    rows = []
    for relative in HARMLESS:
        rows += [{"prompt": r.text("instruction"), "source": "alpaca_harmless"}
                 for r in json_rows(files.path(relative))]
    return rows
