"""SafeLoRA on whole adapters: project the least aligned modules of a fine-tuned adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nlsr.adapters import LoraAdapter, LoraFactors
from nlsr.errors import NlsrError
from nlsr.ops.safelora import projection_cosine
from nlsr.realignment import layer_and_kind


@dataclass
class SafeLoraDecision:
    module: str
    layer: int | None
    kind: str
    similarity: float
    projected: bool


@dataclass
class SafeLoraResult:
    adapter: LoraAdapter
    decisions: list[SafeLoraDecision]
    settings: dict

    def report(self) -> dict:
        return {"settings": self.settings,
                "summary": {"modules": len(self.decisions),
                            "projected": sum(d.projected for d in self.decisions)},
                "modules": [asdict(d) for d in self.decisions]}


def _alignment_direction(name: str, aligned: LoraAdapter, unaligned: LoraAdapter | None):
    """``V = P Q = ΔW_aligned - ΔW_unaligned`` as low-rank factors."""
    fa = aligned.modules[name]
    if unaligned is None:
        return fa.scale * fa.B, fa.A
    fu = unaligned.modules[name]
    return torch.cat([fa.scale * fa.B, -fu.scale * fu.B], dim=1), torch.cat([fa.A, fu.A], dim=0)


def safelora(aligned: LoraAdapter, finetuned: LoraAdapter, unaligned: LoraAdapter | None = None,
             threshold: float | None = None, num_modules: int | None = None) -> SafeLoraResult:
    """SafeLoRA (Hsu et al., 2024) with the alignment direction taken from adapters.

    ``V = ΔW_aligned - ΔW_unaligned`` per module (``ΔW_unaligned = 0``, i.e. the base model, when
    ``unaligned`` is not given); ``C = V Vᵀ / ||V||_F``. Modules with ``cos(C ΔW, ΔW) < threshold``,
    or the ``num_modules`` least similar, get ``B ← C B``. Exactly one of the two must be given.
    """
    if (threshold is None) == (num_modules is None):
        raise NlsrError("give exactly one of --threshold T (project modules with cosine < T) or "
                        "--num-modules K (project the K least similar modules)")
    for other, label in ((aligned, "aligned"), (unaligned, "unaligned")):
        if other is None:
            continue
        for name, f in finetuned:
            g = other.modules.get(name)
            if g is None:
                raise NlsrError(f"module '{name}' of the fine-tuned adapter is not in the {label} "
                                "adapter; SafeLoRA needs the alignment direction of every module")
            if (g.A.shape[1], g.B.shape[0]) != (f.A.shape[1], f.B.shape[0]):
                raise NlsrError(f"module '{name}' is {g.B.shape[0]}x{g.A.shape[1]} in the {label} "
                                f"adapter but {f.B.shape[0]}x{f.A.shape[1]} in the fine-tuned one")
    if num_modules is not None and not 1 <= num_modules <= len(finetuned):
        raise NlsrError(f"--num-modules must be between 1 and {len(finetuned)}, the fine-tuned "
                        f"adapter's module count (got {num_modules}); 0 would return the input unchanged")
    names = list(finetuned.modules)
    cosines, projected_bs = [], []
    for name in names:
        P, Q = _alignment_direction(name, aligned, unaligned)
        cos, cb = projection_cosine(P, Q, finetuned.modules[name].A, finetuned.modules[name].B)
        cosines.append(cos)
        projected_bs.append(cb)
    sims = torch.tensor(cosines, dtype=torch.float64)
    if threshold is not None:
        chosen = sims < threshold
    else:
        chosen = torch.zeros(len(names), dtype=torch.bool)
        chosen[torch.argsort(sims, stable=True)[:num_modules]] = True
    modules, decisions = {}, []
    for i, name in enumerate(names):
        f = finetuned.modules[name]
        modules[name] = LoraFactors(A=f.A, B=projected_bs[i], scale=f.scale) if chosen[i] else f
        layer, kind = layer_and_kind(name)
        decisions.append(SafeLoraDecision(name, layer, kind, cosines[i], bool(chosen[i])))
    settings = {"threshold": threshold, "num_modules": num_modules,
                "unaligned": unaligned is not None}
    return SafeLoraResult(finetuned.with_modules(modules), decisions, settings)
