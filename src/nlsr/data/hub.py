"""Where each data set lives on the Hugging Face hub, and how a hub row becomes a record.

The hub versions are the *original* sets, which can differ from the offline copies (e.g.
``harmful_eval`` is 502 SPARD prompts offline, the BeaverTails 30k_test unsafe prompts of the
paper on the hub); each :class:`HubSource` says how in its ``note``. Loading from the hub needs
the ``datasets`` package and network access; the offline path never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nlsr.data.tasks import AG_NEWS_INSTRUCTION, AG_NEWS_LABELS, SST2_INSTRUCTION, SST2_LABELS, gsm8k_record
from nlsr.errors import NlsrError


@dataclass(frozen=True)
class HubSource:
    """Where a data set lives on the Hugging Face hub and how a hub row becomes a record.

    ``convert`` maps one hub row to a record of the data set's kind, or to None to skip the row.
    """

    path: str
    split: str
    convert: Callable[[dict], dict | None]
    name: str | None = None
    note: str = ""

    @property
    def call(self) -> str:
        """The ``datasets.load_dataset`` call, as text."""
        config = f", {self.name!r}" if self.name else ""
        return f"datasets.load_dataset({self.path!r}{config}, split={self.split!r})"



def load_hub(hub: HubSource, limit: int | None) -> list[dict]:
    """The records of ``hub`` (``datasets.load_dataset``; needs network), at most ``limit``."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise NlsrError("source='hub' needs the 'datasets' package: pip install datasets") from err
    config = (hub.name,) if hub.name else ()
    rows = load_dataset(hub.path, *config, split=hub.split)
    records = []
    for row in rows:
        record = hub.convert(dict(row))
        if record is not None:
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


# ---- converters: one hub row -> one record (or None to skip the row) ---------------------------

def beavertails_unsafe(row: dict) -> dict | None:
    return None if row["is_safe"] else {"prompt": row["prompt"], "response": row["response"]}


def beavertails_prompt(row: dict) -> dict | None:
    return None if row["is_safe"] else {"prompt": row["prompt"], "source": "beavertails"}


def pku_safe_index(row: dict) -> int | None:
    """The index of the one safe response of a PKU-SafeRLHF pair (None unless exactly one is safe:
    the NLSR paper's filter)."""
    safe0, safe1 = row["is_response_0_safe"], row["is_response_1_safe"]
    return None if safe0 == safe1 else (0 if safe0 else 1)


def pku_preference(row: dict) -> dict | None:
    safe = pku_safe_index(row)
    if safe is None:
        return None
    return {"prompt": row["prompt"], "chosen": row[f"response_{safe}"],
            "rejected": row[f"response_{1 - safe}"]}


def pku_sft(row: dict) -> dict | None:
    safe = pku_safe_index(row)
    return None if safe is None else {"prompt": row["prompt"], "response": row[f"response_{safe}"]}


def sst2(row: dict) -> dict:
    label = SST2_LABELS[row["label"]]
    return {"instruction": SST2_INSTRUCTION, "input": row["sentence"], "output": label, "label": label}


def ag_news(row: dict) -> dict:
    label = AG_NEWS_LABELS[row["label"]]
    return {"instruction": AG_NEWS_INSTRUCTION, "input": row["text"], "output": label, "label": label}


def gsm8k(row: dict) -> dict | None:
    return gsm8k_record(row["question"], row["answer"])


def prompt_field(field_name: str, source: str) -> Callable[[dict], dict]:
    """A converter taking the prompt from ``field_name``, tagged with ``source``."""
    return lambda row: {"prompt": row[field_name], "source": source}


def xstest(row: dict) -> dict:
    return {"prompt": row["prompt"], "label": row["label"], "type": row["type"]}
