"""Safety calibration data: ``{"prompt", "response"}`` rows, chat-formatted, response tokens marked."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nlsr.data.readers import jsonl_rows
from nlsr.data.templates import model_prompt
from nlsr.errors import NlsrError


@dataclass(frozen=True)
class CalibrationRow:
    prompt: str
    response: str
    input: str = ""      # a task's input (SST-2 sentence, news article), shown after the instruction


def read_calibration_jsonl(path: str | os.PathLike, limit: int | None = None,
                           prompt_field: str = "prompt",
                           response_field: str = "response") -> list[CalibrationRow]:
    """Read a JSONL file of ``{"prompt": ..., "response": ...}`` rows (extra fields ignored).

    Other field names can be given, e.g. ``response_field="safe"`` for the SPARD BeaverTails file.

    Raises:
        NlsrError: missing or empty file, a line that is not JSON, a row without a non-empty
            string ``prompt`` and ``response``.
    """
    path = Path(path)
    if not path.is_file():
        raise NlsrError(f"calibration file '{path}' does not exist")
    if limit is not None and limit < 1:
        raise NlsrError(f"--limit must be >= 1 (got {limit}); leave it out to use every row")
    rows: list[CalibrationRow] = []
    for row in jsonl_rows(path):
        for key in (prompt_field, response_field):
            value = row.data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise NlsrError(f"{path}:{row.number} has no non-empty string field '{key}'; "
                                f"each row needs '{prompt_field}' and '{response_field}' "
                                "(see --prompt-field / --response-field)")
        rows.append(CalibrationRow(row.data[prompt_field], row.data[response_field]))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise NlsrError(f"calibration file '{path}' has no rows; give at least one "
                        '{"prompt", "response"} line')
    return rows


def resolve_template(tokenizer, template: str | None = None) -> str:
    """``template``, or by default the paper's Alpaca template (the pipeline's default too)."""
    from nlsr.weights.records import DEFAULT_TEMPLATE

    return template or DEFAULT_TEMPLATE


def prompt_text(tokenizer, prompt: str, template: str | None = None, input: str = "") -> str:
    """The prompt as the model sees it before its answer, in ``template`` ("alpaca" or "chat");
    by default the paper's Alpaca template.
    ``input``: a task's input, as in the fine-tuning rows."""
    return model_prompt(prompt, resolve_template(tokenizer, template), tokenizer, input)


def encode_row(tokenizer, row: CalibrationRow, max_length: int,
               template: str | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + response + eos, and the index where the response starts.

    Prompt and response are tokenized separately so that the boundary is exact.
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, row.prompt, template, row.input),
                           add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(row.response, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_length]
    return ids, min(len(prompt_ids), len(ids))


@dataclass
class Batch:
    input_ids: torch.Tensor       # batch x seq
    attention_mask: torch.Tensor  # batch x seq
    response_mask: torch.Tensor   # batch x seq, True on response tokens


def make_batches(tokenizer, rows: Sequence[CalibrationRow], batch_size: int = 8,
                 max_length: int = 1024, template: str | None = None) -> Iterator[Batch]:
    """Right-padded batches of similar length (sorted by length to minimise padding)."""
    encoded = [encode_row(tokenizer, row, max_length, template) for row in rows]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        response = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (ids, boundary) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            response[row, boundary:len(ids)] = True
        yield Batch(input_ids, attention, response)

