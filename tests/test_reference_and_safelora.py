import pytest
import torch

from conftest import perturbed, random_adapter
from nlsr.errors import NlsrError
from nlsr.method.extrapolate import extrapolate
from nlsr.method.safelora import safelora


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


def test_dense_alignment_direction_gives_the_same_projection_as_the_adapter_one(shapes):
    aligned = random_adapter(shapes, seed=0)
    finetuned = perturbed(aligned, noise=0.5, seed=2)
    low_rank = safelora(aligned, finetuned, num_modules=3)
    dense = safelora(aligned, finetuned, num_modules=3,
                     dense_directions={n: f.delta() for n, f in aligned})
    assert [d.projected for d in dense.decisions] == [d.projected for d in low_rank.decisions]
    for a, b in zip(dense.decisions, low_rank.decisions, strict=True):
        assert a.similarity == pytest.approx(b.similarity, abs=1e-6)
        torch.testing.assert_close(dense.adapter.modules[a.module].delta(),
                                   low_rank.adapter.modules[a.module].delta(), atol=1e-5, rtol=1e-4)
    # a direction that adds a merged dense part (the SFT) changes the projection
    extra = {n: f.delta() + 0.5 * torch.randn_like(f.delta()) for n, f in aligned}
    other = safelora(aligned, finetuned, num_modules=3, dense_directions=extra)
    assert any(abs(a.similarity - b.similarity) > 1e-3 for a, b in zip(other.decisions, low_rank.decisions,
                                                                      strict=True))
    with pytest.raises(NlsrError, match="no alignment direction"):
        safelora(aligned, finetuned, num_modules=3, dense_directions={})


def test_ibm_conventions_round_project_ties_and_use_less_or_equal():
    from nlsr.method.safelora import select_modules

    sims = torch.tensor([0.300001, 0.3000004, 0.5, 0.6, 0.2], dtype=torch.float64)
    assert select_modules(sims, None, 1, ibm_conventions=False).tolist() == [False, False, False, False, True]
    # top-2: 0.2 and 0.3000004; IBM rounds 0.300001 -> 0.30000 too, a tie with the 2nd: projected
    assert select_modules(sims, None, 2).tolist() == [False, True, False, False, True]
    assert select_modules(sims, None, 2, ibm_conventions=True).tolist() == [True, True, False, False, True]
    assert select_modules(sims, 0.6, None).tolist() == [True, True, True, False, True]
    assert select_modules(sims, 0.6, None, ibm_conventions=True).tolist() == [True, True, True, True, True]
