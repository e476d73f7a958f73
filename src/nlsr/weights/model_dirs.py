"""Model directories (safetensors, sharded or not) read tensor by tensor and edited in place.

A model directory is what ``save_pretrained`` writes: ``config.json``, tokenizer files, and the
weights as ``model.safetensors`` or as shards named by ``model.safetensors.index.json``. nlsr never
loads a whole model here: it reads one tensor (or a block of its rows) at a time with safetensors'
``safe_open``/``get_slice``, so memory is bounded by the largest tensor.

Outputs (:func:`write_edited`) are a byte copy of a source directory in which only the edited
tensors' bytes are overwritten in place: every other tensor, the safetensors headers and metadata,
the index, the config and the tokenizer files are the source's bit for bit, and the result loads
with ``from_pretrained``. Edits keep each tensor's shape and dtype, so a tensor's bytes stay at the
offset the (unchanged) header gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.io import atomic_dir
from nlsr.weights.model_dir_checks import INDEX_FILE, SINGLE_FILE, model_dir_problem

MERGED_INFO = "nlsr_merged.json"      # written by merge_adapter: which adapter was merged into which base
ROW_BLOCK = 1 << 22                   # elements per block of rows read or written at once (16 MiB in float32)
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.\d+\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def _read_header(file: Path) -> dict[str, TensorInfo]:
    # safetensors' API reads tensors but does not expose byte offsets, which the in-place edit
    # needs: the format is an 8-byte little-endian header length, a JSON header, then the data.
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise NlsrError(f"'{file}' is not a readable safetensors file ({err}); it is truncated or "
                        "not safetensors: copy or save the model again") from None
    start = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise NlsrError(f"'{file}': tensor '{name}' has dtype {entry.get('dtype')}, which nlsr "
                            "does not edit")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(file.name, dtype, tuple(entry["shape"]), start + begin, start + end)
    size = file.stat().st_size
    if any(info.end > size for info in infos.values()):
        raise NlsrError(f"'{file}' is truncated ({size} bytes, its header names more); copy or save "
                        "the model again")
    return infos


class ModelDir:
    """A safetensors model directory, read one tensor or one block of rows at a time."""

    def __init__(self, path: str | os.PathLike, option: str = "model") -> None:
        self.path = Path(path)
        problem = model_dir_problem(self.path)
        if problem:
            raise NlsrError(f"{option}: {problem}")
        if (self.path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise NlsrError(f"{option}: '{self.path / INDEX_FILE}' is not a safetensors index "
                                f"({err}); save the model again") from None
            files = sorted(set(weight_map.values()))
        else:
            files = [SINGLE_FILE]
        self.infos: dict[str, TensorInfo] = {}
        for name in files:
            if not (self.path / name).is_file():
                raise NlsrError(f"{option}: shard '{name}' named by {INDEX_FILE} is missing from "
                                f"'{self.path}'; copy the whole model directory")
            self.infos.update(_read_header(self.path / name))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        from safetensors import safe_open

        with safe_open(self.path / self.infos[name].file, framework="pt") as handle:
            return handle.get_tensor(name)

    def row_blocks(self, name: str, block: int = ROW_BLOCK) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` blocks along the first axis, about ``block`` elements each."""
        import math

        from safetensors import safe_open

        rows, cols = self.shape(name)[0], math.prod(self.shape(name)[1:])
        step = max(1, block // max(cols, 1))
        with safe_open(self.path / self.infos[name].file, framework="pt") as handle:
            part = handle.get_slice(name)
            for start in range(0, rows, step):
                yield start, part[start:min(rows, start + step)]

    def layer_linear_weights(self) -> list[str]:
        """Names of the 2-D ``*.weight`` tensors inside numbered decoder layers (the projections a
        LoRA targets), in natural order; embeddings, norms and the LM head are left out."""
        from nlsr.weights.adapters import natural_key

        names = [n for n, info in self.infos.items() if n.endswith(".weight") and len(info.shape) == 2
                 and _LAYER_RE.search(f".{n}") and info.dtype.is_floating_point]
        return sorted(names, key=natural_key)


def module_of(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def model_fingerprint(model: ModelDir, modules: Iterable[str]) -> dict:
    """Identity of a model directory's ``modules`` (names without ``.weight``), like
    :func:`nlsr.weights.adapters.fingerprint`: ``layout`` hashes names, shapes and dtypes, ``content`` also
    the stored bytes (read block by block)."""
    from nlsr.weights.adapters import natural_key

    names = sorted(modules, key=natural_key)
    layout, content = hashlib.sha256(), hashlib.sha256()
    for module in names:
        info = model.infos[f"{module}.weight"]
        entry = f"{module}:{info.shape}:{info.dtype}\n".encode()
        layout.update(entry)
        content.update(entry)
        for _, rows in model.row_blocks(f"{module}.weight"):
            content.update(_bytes_of(rows))
    return {"kind": "model", "modules": len(names), "layout": layout.hexdigest()[:16],
            "content": content.hexdigest()[:16]}


def _bytes_of(tensor: torch.Tensor):
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def check_same_tensors(first: ModelDir, second: ModelDir, names: Iterable[str],
                       labels: tuple[str, str]) -> None:
    """Every tensor in ``names`` exists in both with the same shape; else an error naming it."""
    for name in names:
        for model, label in ((first, labels[0]), (second, labels[1])):
            if name not in model:
                raise NlsrError(f"tensor '{name}' is not in the {label} model '{model.path}'; both "
                                "models must have the same architecture (the same modules)")
        if first.shape(name) != second.shape(name):
            raise NlsrError(f"tensor '{name}' is {first.shape(name)} in the {labels[0]} model but "
                            f"{second.shape(name)} in the {labels[1]} model '{second.path}'; both "
                            "must be the same architecture")


Edit = Callable[[str], Iterator[tuple[int, torch.Tensor]]]


def write_edited(source: ModelDir, out: str | os.PathLike, edits: Mapping[str, Edit],
                 force: bool = False, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``source`` to ``out`` with the tensors in ``edits`` replaced, atomically.

    ``edits[name](name)`` yields ``(first row, rows)`` blocks covering the tensor (rows of the
    tensor's shape after the first axis, any float dtype; cast to the stored dtype). Everything
    else is copied byte for byte: every top-level file of ``source`` (config, tokenizer, index,
    shards), then the edited tensors' bytes are overwritten in place. Memory: one block.
    """
    with atomic_dir(out, force=force) as tmp:
        for file in sorted(source.path.iterdir()):
            if file.is_file():
                shutil.copyfile(file, tmp / file.name)
        for name, edit in edits.items():
            info = source.infos[name]
            row_bytes = (info.end - info.begin) // max(info.shape[0], 1)
            written = 0
            with open(tmp / info.file, "r+b") as handle:
                for start, block in edit(name):
                    block = block.to(info.dtype).contiguous()
                    if tuple(block.shape[1:]) != info.shape[1:]:
                        raise AssertionError(f"edit of {name} has rows {tuple(block.shape)}")
                    handle.seek(info.begin + start * row_bytes)
                    handle.write(_bytes_of(block))
                    written += block.shape[0]
            assert written == info.shape[0], (name, written, info.shape)
        for file_name, data in (extra_files or {}).items():
            (tmp / file_name).write_bytes(data)
    return Path(out)


def relative_change(model: ModelDir, base: ModelDir, names: Iterable[str]) -> float:
    """Median over ``names`` of ``||W - W_base||_F / ||W_base||_F``: about 0.01 for a fine-tune
    of ``base``, above 1 for an unrelated model."""
    ratios = []
    for name in names:
        diff = norm = 0.0
        blocks = zip(model.row_blocks(name), base.row_blocks(name), strict=True)
        for (_, w), (_, b) in blocks:
            w64, b64 = w.to(torch.float64), b.to(torch.float64)
            diff += float((w64 - b64).pow(2).sum())
            norm += float(b64.pow(2).sum())
        ratios.append((diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf")))
    ratios.sort()
    return ratios[len(ratios) // 2] if ratios else 0.0


def check_derived_from(model: ModelDir, base: ModelDir, names: list[str], label: str,
                       limit: float = 0.5) -> float:
    """Refuse a ``model`` whose weights are far from ``base``'s (median relative change above
    ``limit``): it was not fine-tuned (or extrapolated) from that base. Returns the median."""
    change = relative_change(model, base, names)
    if change > limit:
        raise NlsrError(f"the {label} model '{model.path}' does not look derived from --base "
                        f"'{base.path}' (median relative weight change {change:.2f} > {limit}); give "
                        "the model both were made from as --base (for a fine-tune of the merged "
                        "aligned model: that merged model), or pass --allow-base-mismatch")
    return change


# ---- whole-model operations ----------------------------------------------------------------

def _changed(first: ModelDir, second: ModelDir, name: str) -> bool:
    return any(not torch.equal(a, b) for (_, a), (_, b) in
               zip(first.row_blocks(name), second.row_blocks(name), strict=True))


def extrapolate_model(aligned: ModelDir, weak: ModelDir, beta: float, out: str | os.PathLike,
                      force: bool = False, extra_files: Mapping[str, bytes] | None = None) -> list[str]:
    """ExPO on full weights: ``W_e = W_a + β (W_a - W_0)`` for every floating tensor that differs
    between the aligned and the weak model; the others are copied bit for bit. Computed in float32
    (float64 for float64 tensors), stored in the aligned model's dtype. Returns the edited names."""
    if not beta >= 0:
        raise NlsrError(f"--beta must be >= 0 (got {beta})")
    names = [n for n, info in aligned.infos.items() if info.dtype.is_floating_point and info.shape]
    check_same_tensors(aligned, weak, names, ("aligned", "weak"))
    changed = [n for n in names if _changed(aligned, weak, n)]
    if not changed:
        raise NlsrError(f"the aligned model '{aligned.path}' equals the weak model '{weak.path}' in "
                        "every tensor; give the aligned model and the model it was aligned from")

    def edit(name: str) -> Iterator[tuple[int, torch.Tensor]]:
        wide = torch.float64 if aligned.infos[name].dtype == torch.float64 else torch.float32
        for (start, a), (_, w) in zip(aligned.row_blocks(name), weak.row_blocks(name), strict=True):
            a, w = a.to(wide), w.to(wide)
            yield start, a + beta * (a - w)
    write_edited(aligned, out, {n: edit for n in changed}, force=force, extra_files=extra_files)
    return changed


def merge_adapter(base: ModelDir, adapter, out: str | os.PathLike, force: bool = False) -> Path:
    """``base`` with a LoRA adapter merged (``W = W_base + s B A`` per module), as a model directory
    recording in ``nlsr_merged.json`` which adapter was merged into which base (``nlsr realign
    --granularity neuron`` reads it to express a reference on ``base`` relative to this model)."""
    from nlsr.weights.adapters import fingerprint

    for name, f in adapter:
        key = f"{name}.weight"
        if key not in base:
            raise NlsrError(f"adapter module '{name}' has no weight '{key}' in the model '{base.path}'; "
                            "is it an adapter of this model?")
        if base.shape(key) != (f.B.shape[0], f.A.shape[1]):
            raise NlsrError(f"adapter module '{name}' is {f.B.shape[0]}x{f.A.shape[1]} but '{key}' "
                            f"is {base.shape(key)} in '{base.path}'")

    def edit(key: str) -> Iterator[tuple[int, torch.Tensor]]:
        f = adapter.modules[module_of(key)]
        for start, rows in base.row_blocks(key):
            b = f.B[start:start + rows.shape[0]].double() * f.scale
            yield start, rows.double() + b @ f.A.double()
    record = {"base": str(base.path), "adapter": adapter.source, "adapter_fingerprint": fingerprint(adapter)}
    return write_edited(base, out, {f"{n}.weight": edit for n in adapter.modules}, force=force,
                        extra_files={MERGED_INFO: (json.dumps(record, indent=2) + "\n").encode()})


def merged_record(model: str | os.PathLike | None) -> dict | None:
    """The ``nlsr_merged.json`` of a model directory, or None."""
    if not model:
        return None
    path = Path(model) / MERGED_INFO
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
