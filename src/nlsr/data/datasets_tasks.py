"""Data sets of the downstream tasks (fine-tuning and FA evaluation): SST-2, AG News, GSM8K."""

from __future__ import annotations

from collections.abc import Sequence

import nlsr.data.hub as hub
from nlsr.data.files import (
    AG_NEWS_TEST,
    AG_NEWS_TRAIN,
    GSM8K_TEST,
    GSM8K_TRAIN,
    SST2_TRAIN,
    SST2_VAL,
)
from nlsr.data.hub import HubSource
from nlsr.data.readers import Row, csv_rows, json_rows, jsonl_rows
from nlsr.data.registry import DataFiles, register_dataset
from nlsr.data.tasks import (
    AG_NEWS_INSTRUCTION,
    AG_NEWS_LABELS,
    GSM8K_MARKER,
    SST2_INSTRUCTION,
    SST2_LABELS,
    canonical_number,
    gsm8k_record,
)

_SST2_NAMES = {"0": "negative", "1": "positive"}


def _sst2_row(row: Row) -> dict:
    label = _SST2_NAMES.get(row.text("label").strip())
    if label is None:
        raise row.error(f"field 'label' is {row.data['label']!r}, expected 0 or 1")
    return {"instruction": SST2_INSTRUCTION, "input": row.text("sentence"), "output": label, "label": label}


@register_dataset("sst2_train", kind="task", files=SST2_TRAIN,
                  description="GLUE SST-2 train (ALPS train + dev = the 67,349 GLUE train sentences)",
                  hub=HubSource("nyu-mll/glue", "train", hub.sst2, name="sst2"),
                  notes="sentences keep GLUE's trailing space, as in the authors' files")
def _sst2_train(files: DataFiles) -> list[dict]:
    return [_sst2_row(r) for relative in SST2_TRAIN for r in csv_rows(files.path(relative), "\t")]


def _task_json(files: DataFiles, relative: str, labels: Sequence[str]) -> list[dict]:
    records = []
    for r in json_rows(files.path(relative)):
        output = r.text("output")
        if output not in labels:
            raise r.error(f"field 'output' is {output!r}, not one of {', '.join(labels)}")
        records.append({"instruction": r.text("instruction"), "input": r.text("input"),
                        "output": output, "label": output})
    return records


@register_dataset("sst2_eval", kind="task", files=(SST2_VAL,),
                  description="GLUE SST-2 validation, 872 sentences (the paper's FA set)",
                  hub=HubSource("nyu-mll/glue", "validation", hub.sst2, name="sst2"))
def _sst2_eval(files: DataFiles) -> list[dict]:
    return _task_json(files, SST2_VAL, SST2_LABELS)


@register_dataset("ag_news_train", kind="task", files=(AG_NEWS_TRAIN,),
                  description="AG News train sample (10,001 articles, ALPS)",
                  hub=HubSource("fancyzhx/ag_news", "train", hub.ag_news,
                                note="the full 120,000 training articles, title + description"),
                  notes="description only, no title: the hub/eval text is title + ' ' + description")
def _ag_news_train(files: DataFiles) -> list[dict]:
    records = []
    for r in csv_rows(files.path(AG_NEWS_TRAIN), "\t", fieldnames=("text", "label"), header=False):
        label = r.text("label")
        if label not in AG_NEWS_LABELS:
            raise r.error(f"field 'label' is {label!r}, not one of {', '.join(AG_NEWS_LABELS)}")
        records.append({"instruction": AG_NEWS_INSTRUCTION, "input": r.text("text"), "output": label,
                        "label": label})
    return records


@register_dataset("ag_news_eval", kind="task", files=(AG_NEWS_TEST,),
                  description="AG News test, 7,600 articles (title + description)",
                  hub=HubSource("fancyzhx/ag_news", "test", hub.ag_news))
def _ag_news_eval(files: DataFiles) -> list[dict]:
    return _task_json(files, AG_NEWS_TEST, AG_NEWS_LABELS)


@register_dataset("gsm8k_train", kind="task", files=(GSM8K_TRAIN,),
                  description="GSM8K train, 7,473 problems, in the authors' format",
                  hub=HubSource("openai/gsm8k", "train", hub.gsm8k, name="main"),
                  notes="instruction = question + the authors' 'First think step by step...' suffix; "
                        "'####' -> 'The final answer is: '; label = gold number without commas")
def _gsm8k_train(files: DataFiles) -> list[dict]:
    records = []
    for r in jsonl_rows(files.path(GSM8K_TRAIN)):
        record = gsm8k_record(r.text("question"), r.text("answer"))
        if record is None:
            raise r.error("field 'answer' does not end in '#### <number>'")
        records.append(record)
    return records


@register_dataset("gsm8k_eval", kind="task", files=(GSM8K_TEST,),
                  description="GSM8K test, 1,319 problems (the authors' file)",
                  hub=HubSource("openai/gsm8k", "test", hub.gsm8k, name="main"))
def _gsm8k_eval(files: DataFiles) -> list[dict]:
    records = []
    for r in json_rows(files.path(GSM8K_TEST)):
        output = r.text("output")
        gold = canonical_number(output.rsplit(GSM8K_MARKER, 1)[1]) if GSM8K_MARKER in output else None
        if gold is None:
            raise r.error(f"field 'output' has no number after '{GSM8K_MARKER}'")
        records.append({"instruction": r.text("instruction"), "input": "", "output": output, "label": gold})
    return records
