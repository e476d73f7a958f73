"""PEFT LoRA adapters in and out, as a per-module view of their factors.

A LoRA module adds ``s * B @ A`` to a frozen weight (``A: r x d_in``, ``B: d_out x r``,
``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA). :class:`LoraAdapter` keeps one
:class:`LoraFactors` per module, keyed by the module's name in the base model
(``model.layers.0.self_attn.q_proj``), plus the ``adapter_config.json`` it came with. Every
adapter written here is a standard PEFT directory that ``PeftModel.from_pretrained`` loads;
per-module ranks and scales are expressed with ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nlsr.errors import NlsrError
from nlsr.io import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass
class LoraFactors:
    """The factors of one LoRA module: ``delta = scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense ``d_out x d_in`` weight delta (for tests and small modules only)."""
        return self.scale * (self.B.double() @ self.A.double())


@dataclass
class LoraAdapter:
    """A LoRA adapter: its PEFT config and its factors per module, in file order."""

    config: dict
    modules: dict[str, LoraFactors] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the directory it was loaded from
    # The dtype of the file it was loaded from (None: float32 or mixed); save_adapter writes it.
    dtype: torch.dtype | None = field(default=None, compare=False)

    def __iter__(self) -> Iterator[tuple[str, LoraFactors]]:
        return iter(self.modules.items())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def with_modules(self, modules: Mapping[str, LoraFactors], keep_dtype: bool = False) -> LoraAdapter:
        """A new adapter with the same config and the given factors (``keep_dtype``: written in this
        adapter's file dtype too, for a repair of it; else float32)."""
        return LoraAdapter(config=dict(self.config), modules=dict(modules),
                           dtype=self.dtype if keep_dtype else None)

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.modules.values())


def weight_key(module: str, factor: str) -> str:
    """The PEFT state-dict key of a module's factor, e.g. ``base_model.model.X.lora_A.weight``."""
    return f"{KEY_PREFIX}{module}.lora_{factor}.weight"


def module_name(key: str) -> str:
    """Inverse of :func:`weight_key` for the module part."""
    match = _KEY_RE.match(key)
    assert match, key
    name = match["module"]
    return name[len(KEY_PREFIX):] if name.startswith(KEY_PREFIX) else name


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _pattern_value(patterns: Mapping[str, object], name: str, default):
    # The same matching rule PEFT applies to rank_pattern / alpha_pattern keys.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not path.is_dir():
        raise NlsrError(f"adapter directory '{path}' does not exist")
    if not config_file.exists():
        raise NlsrError(f"'{path}' has no {CONFIG_NAME}; an adapter is a PEFT directory with "
                        f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NlsrError(f"'{config_file}' is not valid JSON ({err}); restore the {CONFIG_NAME} that "
                        "PEFT wrote with the adapter") from err
    except OSError as err:
        raise NlsrError(f"cannot read '{config_file}': {err.strerror or err}") from err
    if not isinstance(config, dict):
        raise NlsrError(f"'{config_file}' holds a JSON {type(config).__name__}, not the object of a "
                        "PEFT adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise NlsrError(f"'{path}' is a {config.get('peft_type')} adapter; nlsr works on LoRA "
                        "adapters only")
    if config.get("use_dora"):
        raise NlsrError(f"'{path}' is a DoRA adapter (use_dora=true); its magnitude vectors have "
                        "no neuron-level counterpart here, so only plain LoRA is supported")
    if "r" not in config or "lora_alpha" not in config:
        raise NlsrError(f"'{config_file}' lacks 'r' or 'lora_alpha'")
    return config


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if weights.exists():
        return read_safetensors(weights, "adapter weights file",
                                "re-save the adapter or copy the file again")
    pickled = path / PICKLE_WEIGHTS_NAME
    if pickled.exists():
        if not allow_pickle:
            raise NlsrError(f"'{pickled}' is a pickle file, which can run code when loaded; "
                            "convert it to safetensors, or pass --allow-pickle if you trust it")
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign pickles raise many kinds of errors
            detail = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
            raise NlsrError(f"'{pickled}' could not be read as a torch state dict "
                            f"({type(err).__name__}: {detail[:200]}): it is truncated or not a "
                            "state dict; re-save the adapter as safetensors") from err
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise NlsrError(f"'{pickled}' is not a state dict of tensors")
        return tensors
    raise NlsrError(f"'{path}' has no {WEIGHTS_NAME}")


def read_safetensors(file: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or foreign file is an :class:`NlsrError`
    naming ``file``, ``what`` it should be and the ``fix``."""
    from safetensors import SafetensorError

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NlsrError(f"'{file}' is not a readable safetensors {what} ({detail}): it is truncated "
                        f"or not a safetensors file; {fix}") from err


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False,
                 dtype: torch.dtype | None = torch.float32) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory into a :class:`LoraAdapter`.

    ``dtype``: the factors' dtype in memory (default float32); None keeps the file's (a bf16 file
    then stays bf16, and :func:`save_adapter` writes its unchanged factors as they came). The file's
    dtype is recorded as ``adapter.dtype`` either way.

    Raises:
        NlsrError: not a LoRA adapter, a pickle file without ``allow_pickle``, unsupported
            tensors, a factor without its partner, inconsistent shapes or ranks, NaN or Inf.
    """
    path = Path(path)
    config = _read_config(path)
    tensors = _read_tensors(path, allow_pickle)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if not match:
            raise NlsrError(f"'{path}': tensor '{key}' is not a LoRA A/B weight (embedding LoRA, "
                            "biases and modules_to_save are not supported)")
        pairs.setdefault(module_name(key), {})[match["factor"]] = tensor
    if not pairs:
        raise NlsrError(f"'{path}' holds no LoRA weights")
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraFactors] = {}
    for name, pair in sorted(pairs.items(), key=lambda item: natural_key(item[0])):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise NlsrError(f"'{path}': module '{name}' has no lora_{missing} weight")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise NlsrError(f"'{path}': module '{name}' has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}; expected A (r, d_in) and B (d_out, r)")
        rank = a.shape[0]
        expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if rank != expected:
            raise NlsrError(f"'{path}': module '{name}' has rank {rank} in its weights but "
                            f"{expected} in {CONFIG_NAME}")
        for factor, tensor in (("A", a), ("B", b)):
            if not all_finite(tensor):
                raise NlsrError(f"'{path}': {weight_key(name, factor)} contains NaN or Inf")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        modules[name] = LoraFactors(A=a, B=b, scale=_scale(alpha, rank, rslora))
    stored = {t.dtype for t in tensors.values()}
    file_dtype = stored.pop() if len(stored) == 1 else None
    return LoraAdapter(config=config, modules=modules, source=str(path),
                       dtype=None if file_dtype == torch.float32 else file_dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. The sum of its entries (one read, no temporary) is finite when
    every entry is; only a non-finite sum (a NaN or Inf, or an overflow) runs the exact test."""
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def fingerprint(adapter: LoraAdapter) -> dict:
    """A JSON-ready identity of an adapter, recorded in the masks made from it.

    ``modules``: how many; ``rank``: the rank (a sorted list when ranks differ); ``layout``: a hash
    of the module names and factor shapes; ``content``: a hash of the names, shapes, scales and
    float32 factor values. Equal adapters have equal fingerprints, whatever their file or order.
    """
    layout, content = hashlib.sha256(), hashlib.sha256()
    for name in sorted(adapter.modules, key=natural_key):
        f = adapter.modules[name]
        entry = f"{name}:{tuple(f.A.shape)}:{tuple(f.B.shape)}\n".encode()
        layout.update(entry)
        content.update(entry + struct.pack("<d", float(f.scale)))
        for tensor in (f.A, f.B):
            content.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    ranks = sorted({f.rank for f in adapter.modules.values()})
    return {"modules": len(adapter), "rank": ranks[0] if len(ranks) == 1 else ranks,
            "layout": layout.hexdigest()[:16], "content": content.hexdigest()[:16]}


def describe_fingerprint(fp: Mapping) -> str:
    """``'210 modules, rank 16, layout 1a2b.., content 3c4d..'`` for messages."""
    return (f"{fp.get('modules', '?')} modules, rank {fp.get('rank', '?')}, layout "
            f"{str(fp.get('layout', '?'))[:8]}, content {str(fp.get('content', '?'))[:8]}")


def loadable_base(base: str | None) -> str | None:
    """A base model path as an adapter config must record it to load from any directory: a relative
    path to an existing model folder becomes absolute; hub ids and absolute paths stay as they are."""
    if not base or os.path.isabs(base) or not (Path(base) / "config.json").is_file():
        return base
    return str(Path(base).resolve())


def adapter_config_for(adapter: LoraAdapter) -> dict:
    """The ``adapter_config.json`` that describes ``adapter``'s per-module ranks and scales.

    The most common (rank, scale) pair becomes ``r`` / ``lora_alpha``; every other module gets an
    exact (regex-escaped) ``rank_pattern`` / ``alpha_pattern`` entry.
    """
    config = dict(adapter.config)
    config["base_model_name_or_path"] = loadable_base(config.get("base_model_name_or_path"))
    rslora = bool(config.get("use_rslora", False))

    def alpha_of(f: LoraFactors) -> float:
        alpha = f.scale * (math.sqrt(f.rank) if rslora else f.rank)
        return int(alpha) if float(alpha).is_integer() else alpha

    (rank, scale), _ = Counter((f.rank, f.scale) for f in adapter.modules.values()).most_common(1)[0]
    config["r"] = rank
    config["lora_alpha"] = alpha_of(LoraFactors(torch.empty(rank, 0), torch.empty(0, rank), scale))
    rank_pattern, alpha_pattern = {}, {}
    for name, f in adapter.modules.items():
        if (f.rank, f.scale) != (rank, scale):
            rank_pattern[re.escape(name)] = f.rank
            alpha_pattern[re.escape(name)] = alpha_of(f)
    config["rank_pattern"] = rank_pattern
    config["alpha_pattern"] = alpha_pattern
    return config


def save_adapter(adapter: LoraAdapter, path: str | os.PathLike, force: bool = False,
                 extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``adapter`` as a PEFT directory, atomically (nothing appears on failure).

    Factors are written in ``adapter.dtype`` (the dtype of the file a repaired adapter came from;
    None: float32); a factor already in that dtype is written as it is, without a copy.
    ``extra_files`` (name -> bytes) are written into the same directory, e.g. a report.
    """
    dtype = adapter.dtype or torch.float32
    tensors = {}
    for name, f in adapter.modules.items():
        tensors[weight_key(name, "A")] = f.A.detach().to("cpu", dtype).contiguous()
        tensors[weight_key(name, "B")] = f.B.detach().to("cpu", dtype).contiguous()
    with atomic_dir(path, force=force) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config_for(adapter), indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def check_comparable(first: LoraAdapter, second: LoraAdapter,
                     names: tuple[str, str] = ("reference", "finetuned"),
                     check_base: bool = True) -> None:
    """Raise :class:`NlsrError` unless the two adapters cover the same modules with equal shapes.

    Compares target modules, ranks, factor shapes and (unless ``check_base`` is false) the base
    model; the message names the first offending module.
    """
    a_name, b_name = names
    for x, y, xn, yn in ((first, second, a_name, b_name), (second, first, b_name, a_name)):
        missing = [m for m in x.modules if m not in y.modules]
        if missing:
            raise NlsrError(f"module '{missing[0]}' is in the {xn} adapter but not in the {yn} "
                            f"adapter ({len(missing)} such modules); both must target the same "
                            "modules")
    for name, fa in first.modules.items():
        fb = second.modules[name]
        if fa.rank != fb.rank:
            raise NlsrError(f"module '{name}' has rank {fa.rank} in the {a_name} adapter but "
                            f"{fb.rank} in the {b_name} adapter; both must have the same ranks "
                            "(for a fine-tune of another rank, use `nlsr realign --granularity neuron`)")
        if fa.A.shape != fb.A.shape or fa.B.shape != fb.B.shape:
            raise NlsrError(f"module '{name}' has A {tuple(fa.A.shape)}, B {tuple(fa.B.shape)} "
                            f"in the {a_name} adapter but A {tuple(fb.A.shape)}, B "
                            f"{tuple(fb.B.shape)} in the {b_name} adapter")
    if check_base and first.base_model and second.base_model:
        base_a, base_b = _normalize_base(first.base_model), _normalize_base(second.base_model)
        if base_a != base_b:
            raise NlsrError(f"the {a_name} adapter was trained on base model '{first.base_model}' "
                            f"but the {b_name} adapter on '{second.base_model}'; pass "
                            "--allow-base-mismatch if they are the same model under two names")


def _normalize_base(base: str) -> str:
    path = Path(base)
    return str(path.resolve()) if path.exists() else base.rstrip("/")


def same_base(recorded: str, given: str) -> bool:
    """Whether the base model an adapter records names the model spec ``given``.

    Equal after resolving paths; the embedded ``smollm2`` equals its hub id and its cached copy;
    a relative path recorded from another working directory equals a path ending in it.
    """
    a, b = _normalize_base(recorded), _normalize_base(given)
    if a == b:
        return True
    from nlsr.weights.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, cache_dir, embedded_gguf_path

    def embedded_copy(path: Path) -> bool:
        """``path`` is the cached safetensors copy of the embedded model (see nlsr.weights.models)."""
        try:
            return path.resolve() == (cache_dir() / "models" / embedded_gguf_path().stem).resolve()
        except NlsrError:
            return False

    for x, y in ((recorded, given), (given, recorded)):
        if x == EMBEDDED_NAME:
            y_path = Path(y)
            if y.rstrip("/") == EMBEDDED_HUB_ID or embedded_copy(y_path) or (
                    y_path.exists() and (y_path / "config.json").is_file()
                    and EMBEDDED_HUB_ID in (y_path / "config.json").read_text()):
                return True
    rel = Path(recorded)
    if not rel.is_absolute() and not rel.exists() and Path(given).exists():
        parts = Path(given).resolve().parts
        return len(rel.parts) <= len(parts) and parts[-len(rel.parts):] == rel.parts
    return False


def attach_adapter(model, adapter: LoraAdapter, adapter_name: str = "default"):
    """Wrap a transformers model with ``adapter`` as a PEFT model (inference mode).

    The base model's modules are wrapped in place; call ``.unload()`` on the result to get the
    untouched base model back.
    """
    import dataclasses

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = adapter_config_for(adapter)
    # The caller has checked the adapter against this model (the CLI compares the base names);
    # naming the model here keeps PEFT from warning that the base was "renamed".
    if getattr(model, "name_or_path", None):
        config["base_model_name_or_path"] = model.name_or_path
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in known})
    lora_config.inference_mode = True
    try:
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    except ValueError as err:  # PEFT's "target modules not found" and friends
        raise NlsrError(f"the adapter does not fit the model: {err}") from err
    state = {}
    for name, f in adapter:
        state[weight_key(name, "A")] = f.A
        state[weight_key(name, "B")] = f.B
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if unexpected or missing:
        peft_model.unload()
        key = (unexpected or missing)[0]
        raise NlsrError(f"the adapter does not fit the model: '{key}' "
                        f"{'matches no module' if unexpected else 'was not loaded'}; is it an "
                        "adapter of this base model?")
    return peft_model.eval()
