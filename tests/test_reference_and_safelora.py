import pytest
import torch

from conftest import perturbed, random_adapter
from nlsr.defences.safelora import safelora
from nlsr.errors import NlsrError
from nlsr.reference import extrapolate


def test_extrapolate_scales_every_delta(shapes):
    aligned = random_adapter(shapes)
    reference = extrapolate(aligned, beta=0.9)
    for name, f in aligned:
        torch.testing.assert_close(reference.modules[name].delta(), 1.9 * f.delta())
        torch.testing.assert_close(reference.modules[name].A, f.A)
    with pytest.raises(NlsrError, match="beta must be >= 0"):
        extrapolate(aligned, beta=-1)


def _dense_projection(aligned, name, unaligned=None):
    v = aligned.modules[name].delta()
    if unaligned is not None:
        v = v - unaligned.modules[name].delta()
    return v @ v.T / torch.linalg.norm(v)


def _cos(x, y):
    return float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))


@pytest.mark.parametrize("with_unaligned", [False, True])
def test_safelora_projection_equals_c_delta_w_on_projected_modules(shapes, with_unaligned):
    aligned = random_adapter(shapes, seed=0)
    unaligned = random_adapter(shapes, seed=9, rank=2) if with_unaligned else None
    finetuned = perturbed(aligned, noise=0.5, seed=2)
    result = safelora(aligned, finetuned, unaligned=unaligned, num_modules=3)
    projected = [d for d in result.decisions if d.projected]
    assert len(projected) == 3
    assert max(d.similarity for d in projected) <= min(
        d.similarity for d in result.decisions if not d.projected)
    for d in result.decisions:
        ft = finetuned.modules[d.module]
        C = _dense_projection(aligned, d.module, unaligned)
        assert d.similarity == pytest.approx(_cos(C @ ft.delta(), ft.delta()), abs=1e-6)
        out = result.adapter.modules[d.module]
        expected = C @ ft.delta() if d.projected else ft.delta()
        torch.testing.assert_close(out.delta(), expected, atol=1e-5, rtol=1e-4)


def test_safelora_threshold_and_arguments(shapes):
    aligned = random_adapter(shapes)
    finetuned = perturbed(aligned, noise=0.5)
    result = safelora(aligned, finetuned, threshold=0.6)
    assert all(d.projected == (d.similarity < 0.6) for d in result.decisions)
    with pytest.raises(NlsrError, match="exactly one of"):
        safelora(aligned, finetuned)
    with pytest.raises(NlsrError, match="exactly one of"):
        safelora(aligned, finetuned, threshold=0.5, num_modules=2)
    fewer = aligned.with_modules(dict(list(aligned.modules.items())[1:]))
    with pytest.raises(NlsrError, match="not in the aligned adapter"):
        safelora(fewer, finetuned, threshold=0.5)
