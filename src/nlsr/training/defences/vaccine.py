"""Vaccine: perturbation-aware alignment (an alignment-stage baseline).

Huang et al., 2024, "Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful
Fine-tuning Attack" (NeurIPS 2024). Alignment is made robust to the embedding drift that later harmful
fine-tuning causes by training under the worst-case bounded perturbation of every layer's hidden output
(a SAM-style min-max on activations instead of weights). For each batch:

1. clean pass: ``L(w)`` and the gradients ``g_l = ∂L/∂e_l`` w.r.t. the output ``e_l`` of every decoder layer l
   (no parameter gradient is accumulated in this pass);
2. ``ε_l = ρ g_l / ||g||`` with ONE norm over all layers' gradients concatenated, ``||g||² = Σ_l ||g_l||²``
   (ρ = 2 by default);
3. perturbed pass: forward hooks replace each layer output ``e_l`` by ``e_l + ε_l`` during one forward (so
   ``ε_l`` also flows into the later layers), and the optimiser steps on the gradient of this perturbed
   loss w.r.t. the trainable weights: ``w ← w - η ∇_w L(w; e + ε)``.

:class:`VaccineSFTTrainer` and :class:`VaccineDPOTrainer` apply this inside ``compute_loss`` of
:class:`trl.SFTTrainer` / :class:`trl.DPOTrainer` (training only; evaluation is unperturbed). For DPO only the
policy forward passes are hooked: TRL 1.16 computes the reference log-probs inside ``torch.no_grad()``
(with a PEFT adapter: the same model with the adapter disabled, or the "ref" adapter), and the hooks act
only when gradients are enabled, so the reference pass is neither captured nor perturbed.

Gradient checkpointing (on by default in TRL configs) is supported in its non-reentrant form (the
transformers 5 default; a test checks that the step's gradients equal those without checkpointing):
transformers 5 checkpoints a layer's ``forward``, not its ``__call__``, so the hooks run outside the
checkpoint, once, and the backward's recomputation does not involve them. Reentrant checkpointing is refused
(older transformers versions run the hooks inside a reentrant checkpoint, under ``no_grad``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from trl import DPOTrainer, SFTTrainer

from nlsr.errors import NlsrError


def vaccine_perturbations(grads: Sequence[torch.Tensor], rho: float = 2.0) -> list[torch.Tensor]:
    """``ε_l = ρ g_l / ||g||`` with one L2 norm over all the gradients concatenated (zeros if ``g = 0``).

    The result has global norm ρ and, layer by layer, the direction of the gradient; each ``ε_l`` has the
    dtype and device of ``g_l``. The norm is accumulated in float32.
    """
    if not grads:
        raise NlsrError("vaccine_perturbations needs at least one gradient")
    norm = torch.sqrt(sum(g.detach().float().pow(2).sum().to(grads[0].device) for g in grads))
    if norm.item() == 0:
        return [torch.zeros_like(g) for g in grads]
    scale = rho / norm
    return [(g.detach().float() * scale.to(g.device)).to(g.dtype) for g in grads]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder (transformer) layers of a causal LM, a ``PeftModel`` around one, or an accelerate wrapper."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if hasattr(inner, "get_decoder"):
        decoder = inner.get_decoder()
        if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            return list(decoder.layers)
    candidates = [(name, m) for name, m in inner.named_modules()
                  if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
    if not candidates:
        raise NlsrError(f"no decoder layers (a ModuleList named layers, h or blocks) in {type(inner).__name__}")
    return list(max(candidates, key=lambda item: len(item[1]))[1])


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _grad_enabled() -> bool:
    return torch.is_grad_enabled()


@contextlib.contextmanager
def capture_layer_outputs(layers: Sequence[nn.Module],
                          active: Callable[[], bool] = _grad_enabled) -> Iterator[list[list[torch.Tensor]]]:
    """Record each layer's output hidden state (per layer, one entry per call while ``active()``)."""
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, output, index=index):
            if active():
                captured[index].append(_hidden(output))
        handles.append(layer.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def perturb_layer_outputs(layers: Sequence[nn.Module], perturbations: Sequence[torch.Tensor],
                          active: Callable[[], bool] = _grad_enabled) -> Iterator[None]:
    """Forward hooks that return ``output + ε_l`` from layer l while ``active()`` (default: grad enabled)."""
    if len(layers) != len(perturbations):
        raise NlsrError(f"{len(layers)} layers but {len(perturbations)} perturbations")
    handles = []
    for layer, eps in zip(layers, perturbations, strict=True):
        def hook(module, args, output, eps=eps):
            if not active():
                return None
            hidden = _hidden(output)
            if hidden.shape != eps.shape:
                raise NlsrError(f"Vaccine perturbation of shape {tuple(eps.shape)} does not fit a layer output of "
                                f"shape {tuple(hidden.shape)} (the perturbed pass must see the same batch)")
            return _replace_hidden(output, hidden + eps.to(hidden.dtype))
        handles.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class VaccineMixin:
    """Two-pass Vaccine ``compute_loss`` for a TRL trainer (put it before the trainer in the bases).

    Args:
        vaccine_rho: ρ, the global norm of the hidden-state perturbation (the paper: 2). 0 = plain training.
    """

    def __init__(self, *args, vaccine_rho: float = 2.0, **kwargs):
        if vaccine_rho < 0:
            raise NlsrError(f"vaccine_rho must be >= 0, got {vaccine_rho}")
        super().__init__(*args, **kwargs)
        checkpointing = getattr(self.args, "activation_checkpointing", None) or self.args.gradient_checkpointing
        checkpoint_kwargs = (getattr(self.args, "activation_checkpointing_kwargs", None)
                             or self.args.gradient_checkpointing_kwargs or {})
        if checkpointing and checkpoint_kwargs.get("use_reentrant"):
            raise NlsrError("Vaccine needs non-reentrant gradient checkpointing (reentrant checkpoints run the "
                            "forward without gradients, so the hooks cannot act); set "
                            "gradient_checkpointing_kwargs={'use_reentrant': False} or turn checkpointing off")
        self.vaccine_rho = float(vaccine_rho)
        self._vaccine_layers: list[nn.Module] | None = None

    @property
    def vaccine_layers(self) -> list[nn.Module]:
        if self._vaccine_layers is None:
            self._vaccine_layers = decoder_layers(self.model)
        return self._vaccine_layers

    def vaccine_perturbation(self, model, inputs, num_items_in_batch=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The clean pass: ``(ε_l for every layer, clean loss)``; leaves no parameter gradient behind."""
        mode = "train"
        metrics = getattr(self, "_metrics", None)
        saved = {k: list(v) for k, v in metrics[mode].items()} if metrics is not None else None
        tokens = getattr(self, "_total_train_tokens", None)
        layers = self.vaccine_layers
        with capture_layer_outputs(layers) as captured:
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        if saved is not None:  # the clean pass must not count in the logged metrics
            metrics[mode].clear()
            metrics[mode].update(saved)
        if tokens is not None:
            self._total_train_tokens = tokens
        for index, outputs in enumerate(captured):
            if len(outputs) != 1:
                raise NlsrError(f"decoder layer {index} ran {len(outputs)} times with gradients in one Vaccine pass; "
                                "expected exactly once")
        hidden = [outputs[0] for outputs in captured]
        wanted = [i for i, h in enumerate(hidden) if h.requires_grad]
        if not wanted:
            raise NlsrError("no decoder layer output depends on a trainable parameter; nothing to perturb")
        found = torch.autograd.grad(loss, [hidden[i] for i in wanted], allow_unused=True)
        grads = [torch.zeros_like(h) for h in hidden]
        for i, g in zip(wanted, found, strict=True):
            if g is not None:
                grads[i] = g
        return vaccine_perturbations(grads, self.vaccine_rho), loss.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled() and self.vaccine_rho > 0):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        perturbations, clean_loss = self.vaccine_perturbation(model, inputs, num_items_in_batch)
        with perturb_layer_outputs(self.vaccine_layers, perturbations):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics["train"]["vaccine/clean_loss"].append(clean_loss.item())
        return result


class VaccineSFTTrainer(VaccineMixin, SFTTrainer):
    """:class:`trl.SFTTrainer` with Vaccine's perturbation-aware loss (``vaccine_rho``, default 2)."""


class VaccineDPOTrainer(VaccineMixin, DPOTrainer):
    """:class:`trl.DPOTrainer` with Vaccine's perturbation-aware loss on the policy passes (``vaccine_rho``,
    default 2); the reference forward (run under ``torch.no_grad``) is never perturbed."""
