import math

import torch

from conftest import CALIBRATION_ROWS, random_adapter
from nlsr.method import DEFAULT_Q
from nlsr.method.activations import accumulate_grams
from nlsr.method.calibration import CalibrationRow, encode_row, make_batches
from nlsr.method.identify import identify
from nlsr.method.masks import load_masks, save_masks
from nlsr.method.projection import subspace_rank
from nlsr.weights.adapters import attach_adapter, weight_key

ROWS = [CalibrationRow(r["prompt"], r["response"]) for r in CALIBRATION_ROWS]


def test_response_mask_marks_response_and_eos_only(tiny_tokenizer):
    batch = next(make_batches(tiny_tokenizer, ROWS[:2], batch_size=2))
    for i, row in enumerate(sorted(ROWS[:2], key=lambda r: len(encode_row(tiny_tokenizer, r, 999)[0]))):
        ids = batch.input_ids[i][batch.response_mask[i]].tolist()
        assert ids[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(ids[:-1]) == row.response
    assert not (batch.response_mask & (batch.attention_mask == 0)).any()


def _stored_inputs(model, reference, tokenizer):
    """Every module input on response tokens, one unpadded sequence at a time."""
    peft_model = attach_adapter(model, reference, adapter_name="check")
    modules = dict(peft_model.named_modules())
    stored = {name: [] for name in reference.modules}
    current = {}
    handles = [modules[f"base_model.model.{name}"].lora_A["check"].register_forward_hook(
        lambda m, inp, out, name=name: stored[name].append(inp[0][current["mask"]]))
        for name in reference.modules]
    with torch.no_grad():
        for row in ROWS:
            ids, start = encode_row(tokenizer, row, 1024)
            mask = torch.zeros(1, len(ids), dtype=torch.bool)
            mask[0, start:] = True
            current["mask"] = mask
            peft_model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    peft_model.unload()
    return {name: torch.cat(xs).double() for name, xs in stored.items()}


def test_streaming_pass_equals_stored_activations_and_direct_svd(tiny_model, tiny_tokenizer, shapes):
    reference = random_adapter(shapes, rank=6)
    grams, tokens = accumulate_grams(tiny_model, reference, ROWS, tiny_tokenizer, batch_size=3,
                                     progress=False)
    stored = _stored_inputs(tiny_model, reference, tiny_tokenizer)
    assert tokens == next(iter(stored.values())).shape[0]
    masks = identify(tiny_model, reference, ROWS, tiny_tokenizer, rho=0.5, q=0.25, batch_size=2,
                     progress=False)
    k = subspace_rank(6, 0.5)
    agree = total = 0
    for name, f in reference:
        A, B = f.A.double(), f.B.double()
        z_a = A @ stored[name].T
        torch.testing.assert_close(grams[name].gram, z_a @ z_a.T, rtol=1e-4, atol=1e-4)
        u_a = torch.linalg.svd(z_a, full_matrices=False)[0][:, :k]
        u_b = torch.linalg.svd(B @ z_a, full_matrices=False)[0][:, :k]
        for factor, hat in (("A", u_a @ u_a.T @ A), ("B", u_b @ u_b.T @ B)):
            mask = masks.masks[weight_key(name, factor)]
            assert mask.sum() == math.ceil(0.25 * hat.numel())
            direct = torch.zeros(hat.numel(), dtype=torch.bool)
            direct[torch.topk(hat.abs().flatten(), int(mask.sum())).indices] = True
            agree += int((direct.view_as(mask) & mask).sum())
            total += int(mask.sum())
    assert agree == total


def test_identify_leaves_the_model_unchanged(tiny_model, tiny_tokenizer, shapes):
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    names_before = [n for n, _ in tiny_model.named_modules()]
    identify(tiny_model, random_adapter(shapes), ROWS, tiny_tokenizer, progress=False)
    assert [n for n, _ in tiny_model.named_modules()] == names_before
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n])


def test_masks_file_round_trip(tmp_path, tiny_model, tiny_tokenizer, shapes):
    masks = identify(tiny_model, random_adapter(shapes), ROWS, tiny_tokenizer, progress=False)
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.metadata["keep_fraction"] == str(DEFAULT_Q)
    assert set(loaded.masks) == set(masks.masks)
    for key, value in masks.masks.items():
        assert torch.equal(loaded.masks[key], value)


def test_bf16_identification_runs_the_reference_in_bf16_and_leaves_the_model(tiny_model, tiny_tokenizer, shapes):
    """A bf16 model gets its reference adapter in bf16 too (no float32 detour); the Gram matrices
    stay close to the float32 pass and the model comes back as it was."""
    adapter = random_adapter(shapes)
    full, _ = accumulate_grams(tiny_model, adapter, ROWS, tiny_tokenizer, progress=False)
    model = tiny_model.to(torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    seen = []
    original = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(weight.dtype)
        return original(x, weight, bias)

    torch.nn.functional.linear = spy
    try:
        half, _ = accumulate_grams(model, adapter, ROWS, tiny_tokenizer, progress=False)
    finally:
        torch.nn.functional.linear = original
    assert seen and set(seen) == {torch.bfloat16}
    for name in full:
        reference = full[name].gram
        assert torch.allclose(half[name].gram, reference, rtol=0.1, atol=0.1 * reference.abs().max())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
