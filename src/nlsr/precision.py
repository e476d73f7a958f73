"""One precision policy for every stage that runs a model: chosen by the hardware, recorded.

``auto`` picks bfloat16 where the hardware computes it natively (a CUDA device that supports it,
or a CPU with AVX512-BF16 / AMX / Arm BF16) and float32 everywhere else. On a CPU without native
bf16 every bf16 matrix product is emulated (about 70x slower than float32 on an AVX2 machine),
so guessing wrong there costs far more than it saves anywhere. The choice, its reason and the CPU
are printed when a run starts and stored in every stage manifest.

``NLSR_PRECISION`` (``auto``, ``float32`` or ``bfloat16``) overrides the ``auto`` default for a
whole process, e.g. to time the float32 path on a machine that has native bf16.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from nlsr.errors import NlsrError

PrecisionName = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}

# CPU flags (Linux /proc/cpuinfo, x86 and Arm) that mean bf16 matrix products run natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
_REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What the processor offers for matrix products."""

    model: str
    cores: int
    flags: tuple[str, ...]        # the flags of interest that are present
    torch_capability: str         # torch's SIMD dispatch level, e.g. AVX2, AVX512

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a process: what was asked, what was chosen, and why."""

    requested: str
    dtype: str                    # float32 or bfloat16
    device: str                   # cpu or cuda
    reason: str
    cpu: CpuInfo
    gpu: str | None = None

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    def line(self) -> str:
        """One line for logs and reports."""
        where = self.gpu or f"{self.cpu.model} ({self.cpu.cores} cores, {self.cpu.torch_capability})"
        return f"precision {self.dtype} ({self.reason}) on {self.device}: {where}"

    def record(self) -> dict:
        """JSON-ready, for manifests and reports."""
        out = asdict(self)
        out["cpu"]["native_bf16"] = self.cpu.native_bf16
        return out


def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The processor's model name, bf16-relevant flags and torch's dispatch level."""
    import torch

    text = _read_cpuinfo()
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return CpuInfo(model=model, cores=os.cpu_count() or 1,
                   flags=tuple(f for f in _REPORTED_FLAGS if f in flags),
                   torch_capability=str(torch.backends.cpu.get_cpu_capability()))


def _normalise(requested: str | None) -> str:
    name = (requested or "auto").strip().lower()
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise NlsrError(f"unknown precision '{requested}'; use one of {', '.join(PRECISIONS)}")
    return name


def resolve_precision(requested: str | None = None, device: str | None = None) -> Precision:
    """Resolve ``auto`` / ``float32`` / ``bfloat16`` for ``device`` (default: cuda if present, else cpu).

    Raises:
        NlsrError: an unknown name, or bfloat16 asked of a CUDA device that lacks it.
    """
    import torch

    name = _normalise(requested)
    asked = "asked for"
    if name == "auto" and os.environ.get("NLSR_PRECISION"):
        name = _normalise(os.environ["NLSR_PRECISION"])
        asked = "set by NLSR_PRECISION"
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = cpu_info()
    gpu = torch.cuda.get_device_name() if kind == "cuda" and torch.cuda.is_available() else None
    if kind == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if name == "bfloat16" and not supported:
            raise NlsrError("this CUDA device has no bfloat16; use --precision float32 (or auto)")
        if name == "auto":
            chosen = "bfloat16" if supported else "float32"
            reason = "auto: the GPU " + ("supports bf16" if supported else "has no bf16")
        else:
            chosen, reason = name, asked
    elif name == "auto":
        chosen = "bfloat16" if cpu.native_bf16 else "float32"
        reason = ("auto: the CPU has native bf16 (" + ", ".join(f for f in cpu.flags if f in NATIVE_BF16_FLAGS) + ")"
                  if cpu.native_bf16 else
                  "auto: the CPU has no native bf16, where bf16 matrix products are emulated and far slower")
    else:
        chosen = name
        reason = asked
        if name == "bfloat16" and not cpu.native_bf16:
            reason = f"{asked}; this CPU has no native bf16, so expect it to be much slower than float32"
    return Precision(requested=name, dtype=chosen, device=kind, reason=reason, cpu=cpu, gpu=gpu)


def check_device(device: str | None, what: str = "device") -> None:
    """Refuse a device this machine does not have, naming the devices it has (``cuda`` without a GPU,
    ``cuda:3`` on a one-GPU machine, a name torch does not know). Imports torch only for a CUDA name."""
    if device is None or device == "cpu":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise NlsrError(f"{what} '{device}' is not a device ({err}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        present = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise NlsrError(f"{what} '{device}' is not on this machine (devices present: {present}); use one of "
                            "those, or leave the device out to pick cuda when present, else cpu")
        return
    raise NlsrError(f"{what} '{device}' is not supported; use cpu, cuda or cuda:N")
