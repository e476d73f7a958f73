"""Make the bundled data subset from the full offline data folder (a maintainer script).

    python -m nlsr.data.bundled.make_bundle SRC_DATA_DIR [--out DIR]

Writes, under ``DIR`` (default: this package's folder), the first N records of every file in
:data:`PLAN`, each in its own format and cut from the original text (a JSON list keeps the original
text of its first N elements and its closing bracket; JSONL, TSV and text files keep their first N
non-blank lines; a CSV file keeps its header and first N records), the ``SOURCES.md`` and licence
files of every folder it cuts from, ``bundle.json`` (rows and SHA-256 per file, of the cut and of its
source) and ``README.md``. The same source folder always gives the same bytes. The source files are
only read, never written; the data folders and files of an earlier bundle in ``DIR`` are replaced.

N per file is chosen for ``configs/smoke.yaml`` with margin: the disjointness gate drops ~30% of
the training prompts (kept for the judge) and the prompts of every evaluation set, and the trained
judge trains on the kept ~30% of the SPARD and PKU prompts and on JailbreakBench.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

MANIFEST = "bundle.json"
README = "README.md"
VERSION = 1

# (file or glob relative to the data folder, format, first N records; None = the whole file)
PLAN: tuple[tuple[str, str, int | None], ...] = (
    # safety SFT + calibration, poison rows, judge rows (spard)
    ("beavertails_derived_spard/train_beaverTails_train.jsonl", "jsonl", 400),
    # harmful score, main set
    ("beavertails_derived_spard/eval_beaverTails_test.jsonl", "jsonl", 100),
    # DPO pairs (about 5.5 rows per prompt)
    ("pku_saferlhf_derived/pku_seferlhf_realign_dpo_5k.json", "json", 150),
    # judge rows (pku_safe)
    ("pku_saferlhf_derived/pku_safe_sft.json", "json", 300),
    # judge rows (jailbreakbench): every goal is also a harmful_refusal_direction prompt, so the gate
    # drops them all on the full data; the first 3 of each file are in the bundled cut of that set too
    ("jailbreakbench/*.json", "json:jailbreaks", 3),
    # the attack's task rows (sst2_train reads both files)
    ("sst2/alps_train.tsv", "tsv", 300),
    ("sst2/alps_dev.tsv", "tsv", 100),
    # every task's test set (FA, and the gate)
    ("nlsr_finetune/sst2/val.json", "json", 100),
    ("nlsr_finetune/ag_news/test.json", "json", 50),
    ("nlsr_finetune/gsm8k/test.json", "json", 50),
    # over-refusal: whole (the test draw is stratified over its 10 safe types)
    ("xstest/xstest_prompts.csv", "csv", None),
    # the other harmful-prompt sets (the gate loads every harmful_* set)
    ("advbench/harmful_behaviors.csv", "csv", 50),
    ("strongreject/strongreject_dataset.csv", "csv", 50),
    ("malicious_instruct/malicious_instruct.txt", "lines", 50),
    ("beavertails_evaluation_subset/BeaverTails.json", "json", 50),
    ("other_harmful_prompts/catqa_english.json", "json", 50),
    ("other_harmful_prompts/dangerousqa.json", "json", 50),
    ("other_harmful_prompts/harmfulqa.json", "json", 50),
    ("other_harmful_prompts/shadow-alignment.json", "json", 50),
    ("refusal_direction/harmful_test.json", "json", 50),
)
DOCS = re.compile(r"^(SOURCES\.md|.*LICEN[CS]E.*)$", re.IGNORECASE)
"""The provenance and licence files copied from every folder the bundle cuts from."""

_WS = re.compile(r"[ \t\n\r]*")


class BundleError(Exception):
    pass


# ---- cutting one file ------------------------------------------------------------------------------

def _lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` with their ``\\n`` (the last one may lack it)."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    return lines + ([parts[-1]] if parts[-1] else [])


def cut_lines(data: bytes, n: int | None, header: bool = False) -> tuple[bytes, int, int]:
    """The first ``n`` non-blank lines (after the header line): JSONL, TSV (unquoted), text."""
    lines = _lines(data)
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    total = sum(1 for line in body if line.strip())
    keep, kept = [], 0
    for line in body:
        if n is not None and kept >= n:
            break
        keep.append(line)
        kept += bool(line.strip())
    return b"".join(head + keep), kept, total


def cut_csv(data: bytes, n: int | None) -> tuple[bytes, int, int]:
    """The header and the first ``n`` records of a quoted CSV file (a record may span lines: it
    ends where its double quotes are balanced)."""
    records: list[bytes] = []
    current = b""
    for line in _lines(data):
        current += line
        if current.count(b'"') % 2 == 0:
            records.append(current)
            current = b""
    if current:
        raise BundleError("unbalanced quotes at the end of the CSV file")
    head, body = records[:1], records[1:]
    total = sum(1 for record in body if record.strip())
    keep, kept = [], 0
    for record in body:   # blank lines kept as they are; they are not records
        if n is not None and kept >= n:
            break
        keep.append(record)
        kept += bool(record.strip())
    return b"".join(head + keep), kept, total


def _list_spans(text: str, start: int) -> tuple[list[int], int]:
    """For the JSON list opening at ``text[start]``: the end offset of each element, and the offset
    of the closing bracket."""
    decoder = json.JSONDecoder()
    if text[start] != "[":
        raise BundleError(f"expected a JSON list at offset {start}")
    ends: list[int] = []
    pos = _WS.match(text, start + 1).end()
    while text[pos] != "]":
        if ends:
            if text[pos] != ",":
                raise BundleError(f"expected ',' at offset {pos}")
            pos = _WS.match(text, pos + 1).end()
        _, pos = decoder.raw_decode(text, pos)
        ends.append(pos)
        pos = _WS.match(text, pos).end()
    return ends, pos


def cut_json(data: bytes, n: int | None, key: str | None = None) -> tuple[bytes, int, int]:
    """The first ``n`` elements of a JSON list (or of the list under ``key`` of a JSON object), cut
    from the original text: everything up to the end of element ``n``, then everything from the end
    of the last element (the closing bracket and what follows it)."""
    text = data.decode("utf-8")
    if key is None:
        start = _WS.match(text).end()
    else:
        found = list(re.finditer(r'"' + re.escape(key) + r'"[ \t\n\r]*:[ \t\n\r]*\[', text))
        if len(found) != 1:
            raise BundleError(f"expected one list under '{key}', found {len(found)}")
        start = found[0].end() - 1
    ends, _ = _list_spans(text, start)
    total = len(ends)
    if n is None or n >= total:
        return data, total, total
    return (text[:ends[n - 1]] + text[ends[-1]:]).encode("utf-8"), n, total


def cut(data: bytes, fmt: str, n: int | None) -> tuple[bytes, int, int]:
    """``(cut bytes, records kept, records in the source)`` of a file of format ``fmt``."""
    if fmt in ("jsonl", "lines"):
        return cut_lines(data, n)
    if fmt == "tsv":
        return cut_lines(data, n, header=True)
    if fmt == "csv":
        return cut_csv(data, n)
    if fmt == "json" or fmt.startswith("json:"):
        return cut_json(data, n, fmt.partition(":")[2] or None)
    raise BundleError(f"unknown format {fmt!r}")


def records(data: bytes, fmt: str) -> list:
    """The parsed records of a file, to check a cut against its source."""
    if fmt == "jsonl":
        return [json.loads(line) for line in _lines(data) if line.strip()]
    if fmt == "lines":
        return [line for line in _lines(data) if line.strip()]
    if fmt == "tsv":
        return [line for line in _lines(data)[1:] if line.strip()]
    if fmt == "csv":
        import csv
        import io

        return [row for row in csv.reader(io.StringIO(data.decode("utf-8"), newline=""))][1:]
    document = json.loads(data)
    return document[fmt.partition(":")[2]] if ":" in fmt else document


# ---- the bundle --------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def planned_files(source: Path) -> list[tuple[str, str, int | None]]:
    """``PLAN`` with its globs expanded against ``source`` (sorted), every file required."""
    out = []
    for pattern, fmt, n in PLAN:
        if any(c in pattern for c in "*?["):
            found = sorted(p.relative_to(source).as_posix() for p in source.glob(pattern) if p.is_file())
            if not found:
                raise BundleError(f"no file in '{source}' matches '{pattern}'")
            out += [(rel, fmt, n) for rel in found]
        else:
            if not (source / pattern).is_file():
                raise BundleError(f"'{source / pattern}' is missing; give the full offline data folder")
            out.append((pattern, fmt, n))
    return out


def build(source: Path) -> dict[str, bytes]:
    """Every file of the bundle, ``{relative path: bytes}``, from the full data folder ``source``."""
    files: dict[str, bytes] = {}
    manifest: dict = {"version": VERSION, "files": {}, "copied": {}}
    folders: set[Path] = set()
    for rel, fmt, n in planned_files(source):
        data = (source / rel).read_bytes()
        out, kept, total = cut(data, fmt, n)
        if records(out, fmt) != records(data, fmt)[:kept]:
            raise BundleError(f"the cut of '{rel}' is not the first {kept} records of the source")
        if n is not None and kept < n:
            raise BundleError(f"'{rel}' has {total} records, fewer than the {n} planned")
        files[rel] = out
        manifest["files"][rel] = {"format": fmt, "rows": kept, "source_rows": total,
                                  "sha256": _sha256(out), "source_sha256": _sha256(data)}
        parts = Path(rel).parts
        folders.update(Path(*parts[:i]) for i in range(1, len(parts)))
    for folder in sorted(folders):
        for doc in sorted(p for p in (source / folder).iterdir() if p.is_file() and DOCS.match(p.name)):
            rel = doc.relative_to(source).as_posix()
            files[rel] = doc.read_bytes()
            manifest["copied"][rel] = _sha256(files[rel])
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    files[README] = readme(manifest).encode("utf-8")
    return files


def readme(manifest: dict) -> str:
    rows = "\n".join(f"| `{rel}` | {m['rows']:,} | {m['source_rows']:,} |"
                     for rel, m in sorted(manifest["files"].items()))
    docs = ", ".join(f"`{rel}`" for rel in sorted(manifest["copied"]))
    return f"""# Bundled data: a small subset of the offline data sets

This folder ships inside the `nlsr` package so that the quick start, `nlsr run configs/smoke.yaml`,
works on a fresh clone with no data folder. `nlsr` uses it only when no other data folder is found
(`--data-dir`, `$NLSR_DATA_DIR`, `data_dir:` in the config, or a `shared/data` folder in or beside
the working directory or the checkout), and says so when it does.

**Results on this data show only that the stages run.** The sets are cut to a few dozen or hundred
rows; the evaluation sets are cut too, so the disjointness gate keeps the training rows apart from
the bundled evaluation rows only; the default trained judge is trained on a few hundred rows (and
cached apart from the judge trained on the full data). For real numbers point nlsr at the full
data folder: `--data-dir PATH`, `NLSR_DATA_DIR=PATH`, or `data_dir: PATH` in the config. A config
that asks for more rows than a bundled set has fails and names the setting to lower or the data
folder to set; stages made from the bundle record it (data cards: `data_dir`; stage manifests:
`content.bundled_data`), and their keys differ from those of stages made from the full data, so
the two never mix.

## What was cut

Each file is the first N records of the public file of the same path in the full data folder, in
that file's own format, cut from its original text (a JSON list keeps its first N elements
verbatim, JSONL and TSV files their first N lines, CSV files their header and first N records).
`bundle.json` has the SHA-256 of every cut and of the file it was cut from.

| file | rows here | rows in the full file |
|---|---:|---:|
{rows}

The provenance and licence files of those folders are copied unchanged: {docs}. Their record
counts describe the full files, as do the `parameters` of the JailbreakBench files. Most of the
safety data is CC-BY-NC-4.0 (research use only); read each folder's `SOURCES.md` for origin,
fields and licence.

## How it was made

    python -m nlsr.data.bundled.make_bundle PATH/TO/FULL/DATA

`nlsr/data/bundled/make_bundle.py` holds the list of files and N per file (chosen so that
`configs/smoke.yaml`'s sizes are met after the gate with margin). It reads the source folder
without writing to it and reproduces this folder byte for byte from the same source files.
"""


def write(files: dict[str, bytes], out: Path) -> None:
    """Replace the bundle in ``out``: its data folders, manifest and README (nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted({Path(rel).parts[0] for rel in files if "/" in rel}):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)
    old = out / MANIFEST
    if old.is_file():   # folders of an earlier bundle that this one no longer has
        for rel in json.loads(old.read_text())["files"]:
            target = out / Path(rel).parts[0]
            if target.is_dir():
                shutil.rmtree(target)
    for rel, data in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nlsr.data.bundled.make_bundle", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="the full offline data folder (shared/data)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write the bundle (default: this package's folder)")
    args = parser.parse_args(argv)
    source, out = args.source.resolve(), args.out.resolve()
    if not source.is_dir():
        parser.error(f"'{source}' is not a folder")
    if source == out or out in source.parents or source in out.parents:
        parser.error("the bundle must not be written inside the source folder, nor the source inside it")
    try:
        files = build(source)
    except (BundleError, OSError, ValueError) as err:
        print(f"make_bundle: {err}", file=sys.stderr)
        return 1
    write(files, out)
    size = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files, {size / 1e6:.2f} MB, to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
