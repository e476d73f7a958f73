"""The data layer: named offline data sets, prompt templates, poisoned fine-tuning sets, task scorers.

::

    from nlsr.data import load_records, split_records, format_prompt, build_poisoned, accuracy
    sft, calib = split_records(load_records("safety_sft"), [2000, 2000], seed=0)
    attack = build_poisoned(load_records("sst2_train"), load_records("poison_nlsr"), n=1000, p=0.05, seed=0)
    prompt = format_prompt(row["instruction"], "alpaca", input=row["input"])
    fa = accuracy("sst2", outputs, [r["label"] for r in load_records("sst2_eval")])
"""

# the data sets register themselves on import, by role
from nlsr.data import datasets_evaluation, datasets_helpful, datasets_judge, datasets_safety, datasets_tasks  # noqa: F401
from nlsr.data.hub import HubSource
from nlsr.data.poison import (
                              FLAG_POISON,
                              FLAG_TASK,
                              available_ready_made,
                              build_poisoned,
                              load_ready_made,
                              read_merged,
)
from nlsr.data.registry import (
                              DATASETS,
                              KINDS,
                              DatasetSpec,
                              check_records,
                              dataset_files,
                              get_dataset,
                              list_datasets,
                              load_records,
                              register_dataset,
                              split_records,
)
from nlsr.data.tasks import (
                              TASKS,
                              TaskSpec,
                              accuracy,
                              canonical_number,
                              extract_gsm8k_answer,
                              get_task,
                              is_correct,
)
from nlsr.data.templates import (
                              ALPACA_NO_INPUT,
                              ALPACA_WITH_INPUT,
                              TEMPLATES,
                              alpaca_prompt,
                              format_prompt,
                              split_alpaca,
)

__all__ = [
    "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "DATASETS", "FLAG_POISON", "FLAG_TASK", "KINDS", "TASKS",
    "TEMPLATES", "DatasetSpec", "HubSource", "TaskSpec", "accuracy", "alpaca_prompt",
    "available_ready_made", "build_poisoned", "canonical_number", "check_records", "dataset_files",
    "extract_gsm8k_answer",
    "format_prompt", "get_dataset", "get_task", "is_correct", "list_datasets", "load_ready_made",
    "load_records", "read_merged", "register_dataset", "split_alpaca", "split_records",
]
