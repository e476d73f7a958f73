"""SafeLoRA (Hsu et al., NeurIPS 2024): project fine-tuned LoRA updates onto the alignment direction.

Per module, ``V = W_aligned - W_unaligned`` and ``C = V Vᵀ / ||V||_F`` (the official code's
normalisation). If ``cos(C ΔW, ΔW)`` is low, the update is replaced by ``C ΔW``, i.e. ``B ← C B``.
Here ``V = P Q`` is itself low rank (a difference of LoRA deltas), so ``C B`` and the cosine are
computed without any ``d_out x d_out`` or ``d_out x d_in`` matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nlsr.errors import NlsrError
from nlsr.method.realign import layer_and_kind
from nlsr.method.similarity import product_cosine, product_inner
from nlsr.paths import portable_path
from nlsr.weights.adapters import LoraAdapter, LoraFactors


def projected_B(P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``C B`` with ``C = V Vᵀ / ||V||_F`` and ``V = P Q`` (``P: d_out x m``, ``Q: m x d_in``)."""
    P64, Q64, B64 = P.double(), Q.double(), B.double()
    norm = product_inner(Q64, P64, Q64, P64).clamp_min(0).sqrt().clamp_min(1e-30)
    return (P64 @ ((Q64 @ Q64.T) @ (P64.T @ B64)) / norm).to(B.dtype)


def projection_cosine(P: torch.Tensor, Q: torch.Tensor, A: torch.Tensor,
                      B: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(cos(C ΔW, ΔW), C B)`` for an update ``ΔW ∝ B A``."""
    cb = projected_B(P, Q, B)
    return product_cosine(A, cb, A, B), cb


def projected_dense(V: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``C ΔW`` with ``C = V Vᵀ / ||V||_F`` for dense ``V`` and ``ΔW`` (``d_out x d_in``), float64.

    Multiplies in the cheaper order: ``(V Vᵀ) ΔW`` (``4 d_out² d_in`` flops) when ``d_out <= d_in``,
    else ``V (Vᵀ ΔW)`` (``4 d_out d_in²``); no ``d_out x d_out`` matrix in the second case.
    """
    V64, D64 = V.to(torch.float64), delta.to(torch.float64)
    norm = V64.norm().clamp_min(1e-30)
    if V.shape[0] <= V.shape[1]:
        return (V64 @ V64.T) @ D64 / norm
    return V64 @ (V64.T @ D64) / norm



@dataclass
class SafeLoraDecision:
    module: str
    layer: int | None
    kind: str
    similarity: float
    projected: bool


@dataclass
class SafeLoraResult:
    adapter: LoraAdapter | None  # None for the full-parameter form (written to a model directory)
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


def select_modules(similarities: torch.Tensor, threshold: float | None, num_modules: int | None,
                   ibm_conventions: bool = False) -> torch.Tensor:
    """Which modules SafeLoRA projects, as a boolean mask over ``similarities``.

    Default: cosine ``< threshold``, or exactly the ``num_modules`` least similar (stable order).
    ``ibm_conventions`` follows IBM's reference code instead: cosines rounded to 5 decimals,
    projected at ``<= threshold``, and at top-k every module tied with the k-th is projected too."""
    sims = torch.round(similarities * 1e5) / 1e5 if ibm_conventions else similarities
    if threshold is not None:
        return sims <= threshold if ibm_conventions else sims < threshold
    chosen = torch.zeros(len(sims), dtype=torch.bool)
    order = torch.argsort(sims, stable=True)[:num_modules]
    chosen[order] = True
    if ibm_conventions:
        chosen |= sims <= sims[order[-1]]
    return chosen


def dense_projected_B(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``C B`` with ``C = V Vᵀ / ||V||_F`` for a dense alignment direction ``V`` (``d_out x d_in``)."""
    V64 = V.to(torch.float64)
    return (V64 @ (V64.T @ B.to(torch.float64)) / V64.norm().clamp_min(1e-30)).to(B.dtype)


def safelora(aligned: LoraAdapter, finetuned: LoraAdapter, unaligned: LoraAdapter | None = None,
             threshold: float | None = None, num_modules: int | None = None,
             dense_directions: dict[str, torch.Tensor] | None = None,
             ibm_conventions: bool = False) -> SafeLoraResult:
    """SafeLoRA (Hsu et al., 2024) with the alignment direction taken from adapters.

    ``V = ΔW_aligned - ΔW_unaligned`` per module (``ΔW_unaligned = 0``, i.e. the base model, when
    ``unaligned`` is not given); ``C = V Vᵀ / ||V||_F``. Modules with ``cos(C ΔW, ΔW) < threshold``,
    or the ``num_modules`` least similar, get ``B ← C B``. Exactly one of the two must be given.

    ``dense_directions`` (module name -> dense ``V``) replaces the adapters' low-rank direction, for
    an alignment that is not (only) a LoRA: with SFT merged into the weights, the whole alignment is
    ``V = (W_0 - W_base) + ΔW_aligned``. ``ibm_conventions``: see :func:`select_modules`.
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
        f = finetuned.modules[name]
        if dense_directions is not None:
            if name not in dense_directions:
                raise NlsrError(f"module '{name}' has no alignment direction; give one for every module")
            cb = dense_projected_B(dense_directions[name], f.B)
            cos = product_cosine(f.A, cb, f.A, f.B)
        else:
            P, Q = _alignment_direction(name, aligned, unaligned)
            cos, cb = projection_cosine(P, Q, f.A, f.B)
        cosines.append(cos)
        projected_bs.append(cb)
    chosen = select_modules(torch.tensor(cosines, dtype=torch.float64), threshold, num_modules, ibm_conventions)
    modules, decisions = {}, []
    for i, name in enumerate(names):
        f = finetuned.modules[name]
        modules[name] = LoraFactors(A=f.A, B=projected_bs[i], scale=f.scale) if chosen[i] else f
        layer, kind = layer_and_kind(name)
        decisions.append(SafeLoraDecision(name, layer, kind, cosines[i], bool(chosen[i])))
    settings = {"threshold": threshold, "num_modules": num_modules,
                "unaligned": unaligned is not None,
                "direction": "dense (given)" if dense_directions is not None else "adapters",
                "ibm_conventions": ibm_conventions}
    return SafeLoraResult(finetuned.with_modules(modules), decisions, settings)


def safelora_models(aligned, unaligned, finetuned, out, threshold: float | None = None,
                    num_modules: int | None = None, force: bool = False) -> SafeLoraResult:
    """SafeLoRA's full-parameter form on model directories (:class:`nlsr.weights.model_dirs.ModelDir`).

    Per module (the 2-D weights of the decoder layers): ``V = W_aligned - W_unaligned``,
    ``C = V Vᵀ / ||V||_F`` and the fine-tune's update ``ΔW = W_ft - W_aligned`` (the fine-tune
    must start from the aligned model). Modules with ``cos(C ΔW, ΔW) < threshold``, or the
    ``num_modules`` least similar, become ``W_aligned + C ΔW``; every other tensor is the
    fine-tune's bit for bit. Modules where ``V`` or ``ΔW`` is zero are left as they are (no
    alignment direction, or nothing to project). Writes a model directory with
    ``safelora_report.json``; memory: a few copies of the largest weight.
    """
    import json

    from nlsr.method.safelora import projected_dense
    from nlsr.method.similarity import cosine_of_sums
    from nlsr.weights.model_dirs import check_same_tensors, module_of, write_edited

    if (threshold is None) == (num_modules is None):
        raise NlsrError("give exactly one of --threshold T (project modules with cosine < T) or "
                        "--num-modules K (project the K least similar modules)")
    weights = finetuned.layer_linear_weights()
    check_same_tensors(finetuned, aligned, weights, ("fine-tuned", "aligned"))
    check_same_tensors(finetuned, unaligned, weights, ("fine-tuned", "unaligned"))

    def parts(key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_a = aligned.tensor(key).to(torch.float64)
        return w_a, w_a - unaligned.tensor(key).to(torch.float64), finetuned.tensor(key).to(torch.float64) - w_a

    names, cosines, skipped = [], [], 0
    for key in weights:
        _, V, delta = parts(key)
        if not V.any() or not delta.any():
            skipped += 1
            continue
        cd = projected_dense(V, delta)
        cosines.append(cosine_of_sums(torch.stack([(cd * delta).sum(), (cd * cd).sum(), (delta * delta).sum()])))
        names.append(key)
    if not names:
        raise NlsrError(f"no module has both an alignment direction (aligned != unaligned) and a "
                        f"fine-tuning update (fine-tuned '{finetuned.path}' != aligned '{aligned.path}'); "
                        "give the aligned model the fine-tune started from and the unaligned model "
                        "it was aligned from")
    if num_modules is not None and not 1 <= num_modules <= len(names):
        raise NlsrError(f"--num-modules must be between 1 and {len(names)}, the number of modules with "
                        f"an update (got {num_modules})")
    sims = torch.tensor(cosines, dtype=torch.float64)
    if threshold is not None:
        chosen = sims < threshold
    else:
        chosen = torch.zeros(len(names), dtype=torch.bool)
        chosen[torch.argsort(sims, stable=True)[:num_modules]] = True
    decisions = []
    for i, key in enumerate(names):
        layer, kind = layer_and_kind(module_of(key))
        decisions.append(SafeLoraDecision(module_of(key), layer, kind, cosines[i], bool(chosen[i])))

    def edit(key: str):
        w_a, V, delta = parts(key)
        yield 0, w_a + projected_dense(V, delta)

    settings = {"threshold": threshold, "num_modules": num_modules, "form": "full-parameter",
                "aligned": portable_path(aligned.path), "unaligned": portable_path(unaligned.path),
                "finetuned": portable_path(finetuned.path), "modules_without_update": skipped}
    result = SafeLoraResult(None, decisions, settings)
    write_edited(finetuned, out, {key: edit for i, key in enumerate(names) if chosen[i]}, force=force,
                 extra_files={"safelora_report.json": (json.dumps(result.report(), indent=2) + "\n").encode()})
    return result

