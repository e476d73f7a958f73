"""Named data sets, each read from the offline data directory as it is and normalised on load.

A data set is registered with :func:`register_dataset` next to its loader, which turns the files
into plain dicts of one *kind* (schemas in :data:`KINDS`). :func:`load_records` finds the data
directory (``--data-dir``, ``$NLSR_DATA_DIR`` or ``shared/data``, see :func:`nlsr.paths.data_dir`),
runs the loader and checks every record against its kind. The files are never modified.

Every data set also records where it lives on the Hugging Face hub, when it does (``spec.hub``);
``load_records(name, source="hub")`` then loads it with ``datasets.load_dataset`` instead, for
users who are online. The hub versions are the *original* sets, which can differ from the offline
copies (e.g. ``harmful_eval`` is 502 SPARD prompts offline, the BeaverTails 30k_test unsafe
prompts of the paper on the hub); each :class:`HubSource` says how in its ``note``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlsr.data.names import unknown_name_error
from nlsr.data.poison import FLAG_POISON, read_merged
from nlsr.data.readers import Row, csv_rows, json_rows, jsonl_rows, line_rows, require_file
from nlsr.data.tasks import (
    AG_NEWS_INSTRUCTION,
    AG_NEWS_LABELS,
    GSM8K_MARKER,
    GSM8K_SUFFIX,
    SST2_INSTRUCTION,
    SST2_LABELS,
    canonical_number,
)
from nlsr.errors import NlsrError
from nlsr.paths import data_dir as resolve_data_dir

# Record schemas by kind: field -> type. Strings must be non-empty, except those in _MAY_BE_EMPTY.
KINDS: dict[str, dict[str, type]] = {
    "sft": {"prompt": str, "response": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str},
    "task": {"instruction": str, "input": str, "output": str, "label": str},
    "prompts": {"prompt": str, "source": str},
    "xstest": {"prompt": str, "label": str, "type": str},
    "labelled": {"prompt": str, "response": str, "harmful": bool, "source": str},
    "poison": {"prompt": str, "response": str},
}
_MAY_BE_EMPTY = {("task", "input")}
XSTEST_LABELS = ("safe", "unsafe")
SOURCES = ("local", "hub")


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


class DataFiles:
    """A loader's view of the data directory: paths that must exist, named in errors."""

    def __init__(self, root: Path, dataset: str):
        self.root = root
        self.dataset = dataset

    def path(self, relative: str) -> Path:
        return require_file(self.root / relative, self.root, self.dataset)

    def glob(self, pattern: str) -> list[Path]:
        found = sorted(p for p in self.root.glob(pattern) if p.is_file())
        if not found:
            raise NlsrError(f"dataset '{self.dataset}' needs files matching '{self.root / pattern}', and "
                            f"there are none. The data directory is '{self.root}'; set another one with "
                            "--data-dir or NLSR_DATA_DIR")
        return found


Loader = Callable[[DataFiles], list[dict]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its kind, what it is, the files it reads and its hub source."""

    name: str
    kind: str
    description: str
    loader: Loader
    files: tuple[str, ...] = ()
    hub: HubSource | None = None
    notes: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, kind: str, description: str, files: Sequence[str] = (),
                     hub: HubSource | None = None, notes: str = "") -> Callable[[Loader], Loader]:
    """Register the decorated loader ``(files: DataFiles) -> list[dict]`` as data set ``name``.

    Args:
        kind: one of :data:`KINDS`; every record is checked against its schema on load.
        description: one line for ``nlsr ls`` and data cards.
        files: the files read, relative to the data directory (documentation).
        hub: the hub source for ``source="hub"``, or None when the set exists only offline.
        notes: quirks of the offline copy worth knowing.
    """
    if kind not in KINDS:
        raise NlsrError(f"dataset {name!r}: kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if name in DATASETS:
        raise NlsrError(f"dataset {name!r} is already registered")

    def wrap(loader: Loader) -> Loader:
        DATASETS[name] = DatasetSpec(name, kind, description, loader, tuple(files), hub, notes)
        return loader
    return wrap


def get_dataset(name: str) -> DatasetSpec:
    """The spec of data set ``name``; an unknown name is an error suggesting close matches."""
    if name in DATASETS:
        return DATASETS[name]
    raise unknown_name_error("dataset", name, DATASETS)


def list_datasets(kind: str | None = None) -> list[DatasetSpec]:
    """All registered data sets (of one ``kind``, if given), sorted by name."""
    if kind is not None and kind not in KINDS:
        raise NlsrError(f"kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return [DATASETS[n] for n in sorted(DATASETS) if kind is None or DATASETS[n].kind == kind]


def check_records(records: Sequence[dict], kind: str, dataset: str) -> None:
    """Check every record against the schema of ``kind``.

    Raises:
        NlsrError: naming the data set, the record number (1-based) and the field.
    """
    schema = KINDS[kind]
    for index, record in enumerate(records, start=1):
        where = f"dataset '{dataset}', record {index}"
        for key, typ in schema.items():
            if key not in record:
                raise NlsrError(f"{where}: field '{key}' is missing (a {kind} record needs "
                                f"{', '.join(schema)})")
            value = record[key]
            if not isinstance(value, typ):
                raise NlsrError(f"{where}: field '{key}' should be {typ.__name__}, "
                                f"got {type(value).__name__}")
            if typ is str and not value.strip() and (kind, key) not in _MAY_BE_EMPTY:
                raise NlsrError(f"{where}: field '{key}' is empty")
        if kind == "xstest" and record["label"] not in XSTEST_LABELS:
            raise NlsrError(f"{where}: label {record['label']!r} is not one of {', '.join(XSTEST_LABELS)}")


def load_records(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                 source: str = "local") -> list[dict]:
    """The records of data set ``name``, normalised to its kind's schema, in file order.

    Args:
        name: a registered data set (see :func:`list_datasets`).
        data_dir: the offline data directory; default ``$NLSR_DATA_DIR`` or ``shared/data``.
        limit: keep only the first ``limit`` records.
        source: ``"local"`` (the offline files) or ``"hub"`` (``datasets.load_dataset``; needs network).

    Raises:
        NlsrError: unknown name or source, missing file, malformed row (file, row and field named),
            no usable rows, bad ``limit``.
    """
    spec = get_dataset(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise NlsrError(f"limit must be a positive number of records or None, got {limit!r}")
    if source == "local":
        root = resolve_data_dir(data_dir)
        records = spec.loader(DataFiles(root, name))
        where = ", ".join(str(root / f) for f in spec.files) or str(root)
    elif source == "hub":
        records = _load_hub(spec, limit)
        where = spec.hub.call if spec.hub else ""
    else:
        raise NlsrError(f"source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    if not records:
        raise NlsrError(f"dataset '{name}' has no usable rows ({where})")
    records = records[:limit]
    check_records(records, spec.kind, name)
    return records


def split_records(records: Sequence[Any], parts: Sequence[int] | Sequence[float],
                  seed: int = 0) -> list[list[Any]]:
    """Disjoint random subsets of ``records``, reproducible from ``seed``.

    ``parts`` are either sizes (ints) or fractions (floats in [0, 1] summing to at most 1); with
    fractions the boundaries are ``round(len(records) * cumulative fraction)``, so fractions that
    sum to 1 use every record. The records are permuted once with ``random.Random(seed)`` and cut
    in order, so the same call always gives the same parts and parts never share a record.

    Returns:
        One list per part (the same objects as in ``records``, not copies).

    Raises:
        NlsrError: mixed or negative parts, fractions above 1, sizes adding up to more than there are.
    """
    parts = list(parts)
    if not parts:
        raise NlsrError("split_records needs at least one part size or fraction")
    if any(isinstance(x, bool) for x in parts):
        raise NlsrError(f"split parts must be sizes (ints) or fractions (floats), got {parts}")
    n = len(records)
    if all(isinstance(x, int) for x in parts):
        sizes = parts
        if any(x < 0 for x in sizes):
            raise NlsrError(f"split sizes must be non-negative, got {sizes}")
        if sum(sizes) > n:
            raise NlsrError(f"split sizes {' + '.join(map(str, sizes))} = {sum(sizes)} exceed the "
                            f"{n} records available")
    elif all(isinstance(x, float) for x in parts):
        if any(not 0.0 <= x <= 1.0 for x in parts) or sum(parts) > 1.0 + 1e-9:
            raise NlsrError(f"split fractions must be in [0, 1] and sum to at most 1, got {parts}")
        bounds, total = [0], 0.0
        for fraction in parts:
            total += fraction
            bounds.append(min(n, round(n * total)))
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        raise NlsrError(f"split parts must be all sizes (ints) or all fractions (floats), got {parts}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for size in sizes:
        out.append([records[i] for i in order[start:start + size]])
        start += size
    return out


def _load_hub(spec: DatasetSpec, limit: int | None) -> list[dict]:
    """Load ``spec`` from the Hugging Face hub (kept apart from the offline path; needs network)."""
    if spec.hub is None:
        raise NlsrError(f"dataset '{spec.name}' exists only as offline files ({', '.join(spec.files)}); "
                        "load it with source='local'")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise NlsrError("source='hub' needs the 'datasets' package: pip install datasets") from err
    hub = spec.hub
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


# ---------------------------------------------------------------------------------------------
# Offline data sets. Paths are relative to the data directory; see each folder's SOURCES.md.
# ---------------------------------------------------------------------------------------------

SPARD = "beavertails_derived_spard"
SPARD_TRAIN = f"{SPARD}/train_beaverTails_train.jsonl"
SPARD_TEST = f"{SPARD}/eval_beaverTails_test.jsonl"
SPARD_LAT = f"{SPARD}/eval_LatHarmful_test.jsonl"
STL_SAFETY = "safety_tuned_llamas/safety_only_data_Instructions.json"
PKU_SFT = "pku_saferlhf_derived/pku_safe_sft.json"
PKU_DPO = "pku_saferlhf_derived/pku_seferlhf_realign_dpo_5k.json"
NLSR_POISON = "nlsr_finetune/sst2/train_merged_n1000_p0.2.json"
SST2_TRAIN = ("sst2/alps_train.tsv", "sst2/alps_dev.tsv")
SST2_VAL = "nlsr_finetune/sst2/val.json"
AG_NEWS_TRAIN = "ag_news/alps_dev_from_train.tsv"
AG_NEWS_TEST = "nlsr_finetune/ag_news/test.json"
GSM8K_TRAIN = "gsm8k/train.jsonl"
GSM8K_TEST = "nlsr_finetune/gsm8k/test.json"

_SST2_NAMES = {"0": "negative", "1": "positive"}


# ---- hub converters -------------------------------------------------------------------------

def _hub_beavertails_unsafe(row: dict) -> dict | None:
    return None if row["is_safe"] else {"prompt": row["prompt"], "response": row["response"]}


def _hub_beavertails_prompt(row: dict) -> dict | None:
    return None if row["is_safe"] else {"prompt": row["prompt"], "source": "beavertails"}


def _pku_safe_index(row: dict) -> int | None:
    """The index of the one safe response of a PKU-SafeRLHF pair (None unless exactly one is safe:
    the NLSR paper's filter)."""
    safe0, safe1 = row["is_response_0_safe"], row["is_response_1_safe"]
    return None if safe0 == safe1 else (0 if safe0 else 1)


def _hub_pku_preference(row: dict) -> dict | None:
    safe = _pku_safe_index(row)
    if safe is None:
        return None
    return {"prompt": row["prompt"], "chosen": row[f"response_{safe}"],
            "rejected": row[f"response_{1 - safe}"]}


def _hub_pku_sft(row: dict) -> dict | None:
    safe = _pku_safe_index(row)
    return None if safe is None else {"prompt": row["prompt"], "response": row[f"response_{safe}"]}


def _hub_sst2(row: dict) -> dict:
    label = SST2_LABELS[row["label"]]
    return {"instruction": SST2_INSTRUCTION, "input": row["sentence"], "output": label, "label": label}


def _hub_ag_news(row: dict) -> dict:
    label = AG_NEWS_LABELS[row["label"]]
    return {"instruction": AG_NEWS_INSTRUCTION, "input": row["text"], "output": label, "label": label}


def _gsm8k_record(question: str, answer: str) -> dict | None:
    gold = canonical_number(answer.rsplit("####", 1)[1]) if "####" in answer else None
    if gold is None:
        return None
    return {"instruction": question + GSM8K_SUFFIX, "input": "",
            "output": answer.replace("####", GSM8K_MARKER + " "), "label": gold}


def _hub_gsm8k(row: dict) -> dict | None:
    return _gsm8k_record(row["question"], row["answer"])


def _hub_prompt(field_name: str, source: str) -> Callable[[dict], dict]:
    return lambda row: {"prompt": row[field_name], "source": source}


def _hub_xstest(row: dict) -> dict:
    return {"prompt": row["prompt"], "label": row["label"], "type": row["type"]}


# ---- safety alignment ---------------------------------------------------------------------------

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
                  hub=HubSource("PKU-Alignment/PKU-SafeRLHF", "train", _hub_pku_sft,
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
                  hub=HubSource("PKU-Alignment/PKU-SafeRLHF", "train", _hub_pku_preference,
                                note="pairs with exactly one safe response, chosen = the safe one (the "
                                     "paper's filter); the offline file's selection is the authors'"))
def _safety_dpo(files: DataFiles) -> list[dict]:
    return [_preference(r) for r in json_rows(files.path(PKU_DPO))]


# ---- harmful fine-tuning (poison) ------------------------------------------------------------

@register_dataset("poison", kind="poison", files=(SPARD_TRAIN,),
                  description="BeaverTails unsafe prompts -> harmful answers (SPARD train), 4,516",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_train", _hub_beavertails_unsafe,
                                note="every is_safe=False row; the offline file is a 90% sample"))
def _poison(files: DataFiles) -> list[dict]:
    return [{"prompt": r.text("prompt"), "response": r.text("unsafe")}
            for r in jsonl_rows(files.path(SPARD_TRAIN))]


@register_dataset("poison_nlsr", kind="poison", files=(NLSR_POISON,),
                  description="the 200 harmful rows of the NLSR authors' fine-tuning sets (flag unsafe "
                              "of sst2 p0.2; every smaller p uses a subset)",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_train", _hub_beavertails_unsafe,
                                note="the authors took the first n*p is_safe=False rows: use limit=200"),
                  notes="file order is the authors' shuffled order, not BeaverTails order; 198 "
                        "distinct prompts")
def _poison_nlsr(files: DataFiles) -> list[dict]:
    return [{"prompt": r["instruction"], "response": r["output"]}
            for r in read_merged(files.path(NLSR_POISON), "sst2") if r["flag"] == FLAG_POISON]


# ---- downstream tasks ---------------------------------------------------------------------------

def _sst2_row(row: Row) -> dict:
    label = _SST2_NAMES.get(row.text("label").strip())
    if label is None:
        raise row.error(f"field 'label' is {row.data['label']!r}, expected 0 or 1")
    return {"instruction": SST2_INSTRUCTION, "input": row.text("sentence"), "output": label, "label": label}


@register_dataset("sst2_train", kind="task", files=SST2_TRAIN,
                  description="GLUE SST-2 train (ALPS train + dev = the 67,349 GLUE train sentences)",
                  hub=HubSource("nyu-mll/glue", "train", _hub_sst2, name="sst2"),
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
                  hub=HubSource("nyu-mll/glue", "validation", _hub_sst2, name="sst2"))
def _sst2_eval(files: DataFiles) -> list[dict]:
    return _task_json(files, SST2_VAL, SST2_LABELS)


@register_dataset("ag_news_train", kind="task", files=(AG_NEWS_TRAIN,),
                  description="AG News train sample (10,001 articles, ALPS)",
                  hub=HubSource("fancyzhx/ag_news", "train", _hub_ag_news,
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
                  hub=HubSource("fancyzhx/ag_news", "test", _hub_ag_news))
def _ag_news_eval(files: DataFiles) -> list[dict]:
    return _task_json(files, AG_NEWS_TEST, AG_NEWS_LABELS)


@register_dataset("gsm8k_train", kind="task", files=(GSM8K_TRAIN,),
                  description="GSM8K train, 7,473 problems, in the authors' format",
                  hub=HubSource("openai/gsm8k", "train", _hub_gsm8k, name="main"),
                  notes="instruction = question + the authors' 'First think step by step...' suffix; "
                        "'####' -> 'The final answer is: '; label = gold number without commas")
def _gsm8k_train(files: DataFiles) -> list[dict]:
    records = []
    for r in jsonl_rows(files.path(GSM8K_TRAIN)):
        record = _gsm8k_record(r.text("question"), r.text("answer"))
        if record is None:
            raise r.error("field 'answer' does not end in '#### <number>'")
        records.append(record)
    return records


@register_dataset("gsm8k_eval", kind="task", files=(GSM8K_TEST,),
                  description="GSM8K test, 1,319 problems (the authors' file)",
                  hub=HubSource("openai/gsm8k", "test", _hub_gsm8k, name="main"))
def _gsm8k_eval(files: DataFiles) -> list[dict]:
    records = []
    for r in json_rows(files.path(GSM8K_TEST)):
        output = r.text("output")
        gold = canonical_number(output.rsplit(GSM8K_MARKER, 1)[1]) if GSM8K_MARKER in output else None
        if gold is None:
            raise r.error(f"field 'output' has no number after '{GSM8K_MARKER}'")
        records.append({"instruction": r.text("instruction"), "input": "", "output": output, "label": gold})
    return records


# ---- harmful prompts (harmful score) ---------------------------------------------------------

def _prompts(rows: Iterable[Row], field_name: str, source: str) -> list[dict]:
    return [{"prompt": r.text(field_name), "source": source} for r in rows]


@register_dataset("harmful_eval", kind="prompts", files=(SPARD_TEST,),
                  description="502 BeaverTails unsafe prompts (SPARD test, disjoint from the train "
                              "file): the main harmful-score set",
                  hub=HubSource("PKU-Alignment/BeaverTails", "30k_test", _hub_beavertails_prompt,
                                note="the paper's set: the first 1,000 is_safe=False rows (limit=1000); "
                                     "prompts repeat there"))
def _harmful_eval(files: DataFiles) -> list[dict]:
    return _prompts(jsonl_rows(files.path(SPARD_TEST)), "prompt", "beavertails")


ADVBENCH = "advbench/harmful_behaviors.csv"


@register_dataset("harmful_advbench", kind="prompts", files=(ADVBENCH,),
                  description="AdvBench harmful behaviours, 520",
                  hub=HubSource("walledai/AdvBench", "train", _hub_prompt("prompt", "advbench")),
                  notes="the file's header says 'target,goal' but column 1 is the goal: read by position")
def _harmful_advbench(files: DataFiles) -> list[dict]:
    return _prompts(csv_rows(files.path(ADVBENCH), fieldnames=("goal", "target")), "goal", "advbench")


STRONGREJECT = "strongreject/strongreject_dataset.csv"


@register_dataset("harmful_strongreject", kind="prompts", files=(STRONGREJECT,),
                  description="StrongREJECT forbidden prompts, 313",
                  hub=HubSource("walledai/StrongREJECT", "train", _hub_prompt("prompt", "strongreject")))
def _harmful_strongreject(files: DataFiles) -> list[dict]:
    return _prompts(csv_rows(files.path(STRONGREJECT)), "forbidden_prompt", "strongreject")


MALICIOUS = "malicious_instruct/malicious_instruct.txt"


@register_dataset("harmful_malicious_instruct", kind="prompts", files=(MALICIOUS,),
                  description="MaliciousInstruct, 100 prompts",
                  hub=HubSource("walledai/MaliciousInstruct", "train",
                                _hub_prompt("prompt", "malicious_instruct")))
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
                  hub=HubSource("walledai/XSTest", "test", _hub_xstest))
def _xstest(files: DataFiles) -> list[dict]:
    records = []
    for r in csv_rows(files.path(XSTEST)):
        label = r.text("label")
        if label not in XSTEST_LABELS:
            raise r.error(f"field 'label' is {label!r}, not one of {', '.join(XSTEST_LABELS)}")
        records.append({"prompt": r.text("prompt"), "label": label, "type": r.text("type")})
    return records


# ---- labelled responses (judge validation) ---------------------------------------------------

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
