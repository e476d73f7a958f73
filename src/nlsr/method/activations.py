"""Step 2's data pass: one streaming forward pass of the reference over the calibration rows.

* Entry granularity (:func:`accumulate_grams`): forward hooks on every ``lora_A`` of the reference
  adapter accumulate the ``r x r`` Gram matrix of ``z = A_e x`` over response tokens only.
* Neuron granularity (:func:`accumulate_input_covariances`): forward pre-hooks on every target module
  accumulate the covariance ``C = XᵀX`` of its inputs (modules reading the same input share one).

Memory is O(r²) (entries) or O(d_in²) (rows) per module; the pass skips the LM head when no adapted
module lives there, and runs on models spread over devices by accelerate (entries).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nlsr.errors import NlsrError
from nlsr.method.calibration import CalibrationRow, make_batches
from nlsr.method.projection import GramAccumulator, InputCovariance
from nlsr.progress import track
from nlsr.weights.adapters import LoraAdapter, attach_adapter


def _has_offloaded_weights(model) -> bool:
    """True when accelerate's big-model loading left weights on the meta device (offloaded to CPU or
    disk and brought to the execution device layer by layer during the forward pass)."""
    return any(p.device.type == "meta" for p in model.parameters())


def _hook_reference_lora(model, reference: LoraAdapter, on_z) -> list:
    """Add ``s B_e A_e x`` to every adapted module's output by forward hooks, without PEFT.

    For a model dispatched by accelerate with offloaded layers, where PEFT would place the new LoRA
    weights on the meta device. It computes what PEFT's LoRA layer computes (``A`` and ``B`` in
    float32, the output cast back to the module's dtype), on the device of each module's output,
    and hands ``z = A_e x`` to ``on_z(name, rank, z)``. Returns the hook handles.
    """
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    handles = []
    try:
        for name, f in reference:
            module = modules.get(name)
            if module is None or not hasattr(module, "in_features"):
                raise NlsrError(f"the adapter does not fit the model: '{name}' "
                                f"{'matches no module' if module is None else 'is not a linear layer'}; "
                                "is it an adapter of this base model?")
            if (module.in_features, module.out_features) != (f.A.shape[1], f.B.shape[0]):
                raise NlsrError(f"the adapter does not fit the model: '{name}' is "
                                f"{module.in_features} -> {module.out_features}, the adapter "
                                f"{f.A.shape[1]} -> {f.B.shape[0]}; is it an adapter of this base model?")
            placed: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

            def hook(_module, inputs, output, name=name, f=f, placed=placed):
                device = output.device
                if device not in placed:
                    placed[device] = (f.A.to(device, torch.float32), f.B.to(device, torch.float32))
                a, b = placed[device]
                z = F.linear(inputs[0].to(device, a.dtype), a)
                on_z(name, f.rank, z)
                return (output + F.linear(z, b) * f.scale).to(output.dtype)
            handles.append(module.register_forward_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@torch.inference_mode()
def accumulate_grams(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                     batch_size: int = 8, max_length: int = 1024, progress: bool = True,
                     template: str | None = None, stats: dict | None = None
                     ) -> tuple[dict[str, GramAccumulator], int]:
    """One forward pass of the reference model over ``rows``; Gram matrices of every ``A_e`` output.

    ``model`` is the base (weak) model ``W_0``; the reference adapter is attached for the pass and
    removed afterwards, leaving ``model`` as it was. Returns the accumulators by module name and
    the number of response tokens seen.

    ``model`` may be spread over several devices by accelerate's big-model loading
    (``device_map``, ``max_memory``, ``offload_folder``; see :func:`nlsr.weights.models.load_model`): each
    Gram matrix accumulates on the device of its module's output (move it with ``.gram.cpu()``).
    Where layers are offloaded to CPU or disk, the adapter is applied by forward hooks instead of
    PEFT, with the same arithmetic.
    """
    grams: dict[str, GramAccumulator] = {}
    current: dict[str, torch.Tensor] = {}
    masks_by_device: dict[torch.device, torch.Tensor] = {}

    def on_z(name: str, rank: int, z: torch.Tensor) -> None:
        acc = grams.get(name)
        if acc is None:
            acc = grams[name] = GramAccumulator(rank, device=z.device)
        if z.device != acc.gram.device:
            z = z.to(acc.gram.device)
        if z.device not in masks_by_device:
            masks_by_device[z.device] = current["mask"].to(z.device)
        acc.update(z[masks_by_device[z.device]])

    handles = []
    peft_model = None
    try:
        if _has_offloaded_weights(model):
            handles = _hook_reference_lora(model, reference, on_z)
            forward = _body(model, list(reference.modules))
            device = next((p.device for p in model.parameters() if p.device.type != "meta"),
                          torch.device("cpu"))
        else:
            peft_model = attach_adapter(model, reference, adapter_name="nlsr_reference")
            device = next(model.parameters()).device
            modules = dict(peft_model.named_modules())
            compute_dtype = next(model.parameters()).dtype
            for name, f in reference:
                layer = modules[f"base_model.model.{name}"]
                lora_a = layer.lora_A["nlsr_reference"]
                if compute_dtype != torch.float32:
                    # The whole reference model runs in the model's precision (PEFT would keep the
                    # adapter in float32 and cast every adapted activation there and back).
                    lora_a.to(compute_dtype)
                    layer.lora_B["nlsr_reference"].to(compute_dtype)

                def hook(_module, _inputs, output, name=name, rank=f.rank):
                    on_z(name, rank, output)
                handles.append(lora_a.register_forward_hook(hook))
            forward = _body(peft_model, list(reference.modules))
        batches = list(make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length,
                                    template=template))
        tokens = 0
        for batch in track(batches, "calibration pass", progress):
            current["mask"] = batch.response_mask
            masks_by_device.clear()
            tokens += int(batch.response_mask.sum())
            if stats is not None:
                stats["calibration_tokens"] = stats.get("calibration_tokens", 0) + int(batch.attention_mask.sum())
            forward(input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if peft_model is not None:
            peft_model.unload()
    if tokens == 0:
        raise NlsrError("the calibration rows have no response tokens (all truncated?); raise "
                        "--max-length or give rows with responses")
    # in the adapter's order; a module the pass never reached contributes nothing
    return {name: grams.get(name) or GramAccumulator(f.rank) for name, f in reference}, tokens


def _body(model, names: Sequence[str]):
    """The transformer body without the LM head, when every target module lives in it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is not None and body is not base and all(n.startswith(prefix + ".") for n in names):
        return body
    return base


@torch.inference_mode()
def accumulate_input_covariances(model, targets: Mapping[str, torch.nn.Module],
                                 rows: Sequence[CalibrationRow], tokenizer, batch_size: int = 8,
                                 max_length: int = 1024, template: str | None = None,
                                 progress: bool = True, dtype: torch.dtype = torch.float32,
                                 stats: dict | None = None
                                 ) -> tuple[dict[str, InputCovariance], dict[str, str], int]:
    """One forward pass of ``model``; the input covariance of every module in ``targets``.

    ``targets`` maps a module name to the module whose *input* is recorded. Modules of one parent
    that are called on the same tensor (q/k/v on the attention input, gate/up on the MLP input)
    share one accumulator: ``owner[name]`` names the module that holds it. Returns the
    accumulators (by owner), the owner of every target, and the number of response tokens.
    """
    covs: dict[str, InputCovariance] = {}
    owner: dict[str, str] = {}
    state: dict = {"parent": None, "held": [], "first": True, "mask": None, "masks": {}}

    def hook(_module, args, name: str) -> None:
        x = args[0]
        parent = name.rsplit(".", 1)[0]
        if state["parent"] != parent:          # hold inputs only while their parent runs
            state["parent"], state["held"] = parent, []
        same = next((held_name for t, held_name in state["held"] if t is x), None)
        if state["first"]:
            owner[name] = same or name
        elif owner.get(name, name) != (same or name):
            raise NlsrError(f"module '{name}' read a different input from the one it shared in the "
                            "first batch; this model's modules cannot share input covariances")
        if same is not None:
            return
        state["held"].append((x, name))
        acc = covs.get(name)
        if acc is None:
            acc = covs[name] = InputCovariance(x.shape[-1], dtype=dtype, device=x.device)
        mask = state["masks"].get(x.device)
        if mask is None:
            mask = state["masks"][x.device] = state["mask"].to(x.device)
        acc.update(x[mask])

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name, module in targets.items()]
    device = next(p.device for p in model.parameters())
    forward = _body(model, list(targets))
    tokens = 0
    try:
        batches = list(make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length,
                                    template=template))
        for batch in track(batches, "calibration pass (neurons)", progress):
            state["mask"], state["masks"], state["held"], state["parent"] = batch.response_mask, {}, [], None
            tokens += int(batch.response_mask.sum())
            if stats is not None:
                stats["calibration_tokens"] = stats.get("calibration_tokens", 0) + int(batch.attention_mask.sum())
            forward(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False)
            state["first"] = False
    finally:
        for handle in handles:
            handle.remove()
        state["held"] = []
    if tokens == 0:
        raise NlsrError("the calibration rows have no response tokens (all truncated?); raise "
                        "--max-length or give rows with responses")
    unseen = [n for n in targets if n not in owner]
    if unseen:
        raise NlsrError(f"{len(unseen)} target modules saw no calibration input (e.g. '{unseen[0]}'); "
                        "are they used by this model's forward pass?")
    return covs, owner, tokens

