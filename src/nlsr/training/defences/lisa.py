"""Lisa: lazy safety alignment by bi-state optimisation with a proximal term (a fine-tuning-stage baseline).

Huang et al., 2024, "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning
Attack" (NeurIPS 2024). Fine-tuning alternates between two states, cycling over optimizer steps:

* alignment state, ``K_a`` steps on the safety (alignment) data ``f``;
* fine-tuning state, ``K_f`` steps on the user's task data ``h``.

At each switch the trainable weights are snapshotted: ``w̃`` is the weights at the end of the other state.
Every step of the current state minimises its loss plus a proximal term towards that snapshot,

    w ← w - η ∇ [ L_state(w) + (ρ/2) ||w - w̃||² ],      ∇ of the term = ρ (w - w̃)     (ρ = 1 by default).

Implementation (:class:`LisaTrainer`, a :class:`trl.SFTTrainer`): the phase of optimizer step ``s`` is
:func:`phase_schedule` ``(s, K_a, K_f)`` (alignment first by default). The trainer's own dataloader serves the
task data; during an alignment step its batches are *skipped* and the micro-batches come from the
alignment dataset instead (cycled, reshuffled every pass), with the token count for the loss scaling
recomputed on them. So with ``num_train_epochs`` the task data gets ``K_f / (K_a + K_f)`` of the steps (the
total number of steps is unchanged, as in the paper); set ``max_steps`` to fix the budget instead.
The first state has no "other state": with ``anchor_first_phase=True`` (default) its anchor is the weights
at the start of training (the aligned model), otherwise it trains without the term until the first switch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from trl import SFTTrainer

from nlsr.errors import NlsrError

PHASES = ("align", "finetune")
STATE_FILE = "lisa_state.pt"


def phase_schedule(step: int, k_align: int, k_finetune: int, first: str = "align") -> str:
    """``"align"`` or ``"finetune"``: the state of optimizer step ``step`` (0-based) in the Lisa cycle.

    The cycle is ``k_align`` alignment steps then ``k_finetune`` fine-tuning steps (``first="align"``), or
    the reverse (``first="finetune"``), repeated.
    """
    if k_align < 1 or k_finetune < 1:
        raise NlsrError(f"Lisa needs k_align >= 1 and k_finetune >= 1 (got {k_align}, {k_finetune})")
    if first not in PHASES:
        raise NlsrError(f"first must be one of {PHASES}, got {first!r}")
    position = step % (k_align + k_finetune)
    if first == "align":
        return "align" if position < k_align else "finetune"
    return "finetune" if position < k_finetune else "align"


def proximal_term(params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                  snapshot: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """``(ρ/2) Σ ||w - w̃||²`` over matching tensors (by name for mappings, by order for sequences).

    Differentiable in ``params`` (gradient ``ρ (w - w̃)``); ``snapshot`` is treated as a constant. Summed in
    float32.
    """
    if isinstance(params, Mapping) != isinstance(snapshot, Mapping):
        raise NlsrError("params and snapshot must both be mappings or both be sequences")
    if isinstance(params, Mapping):
        if set(params) != set(snapshot):
            raise NlsrError(f"params and snapshot name different tensors: {sorted(set(params) ^ set(snapshot))[:5]}")
        pairs = [(params[name], snapshot[name]) for name in params]
    else:
        if len(params) != len(snapshot):
            raise NlsrError(f"{len(params)} params but {len(snapshot)} snapshot tensors")
        pairs = list(zip(params, snapshot, strict=True))
    if not pairs:
        raise NlsrError("proximal_term needs at least one tensor")
    total = sum(((w.float() - s.detach().to(w.device).float()) ** 2).sum() for w, s in pairs)
    return 0.5 * rho * total


class LisaTrainer(SFTTrainer):
    """:class:`trl.SFTTrainer` running Lisa's bi-state optimisation with a proximal term (see the module docstring).

    Args:
        alignment_dataset: the safety (alignment) rows, in the same format as ``train_dataset`` (e.g.
            ``{"prompt", "completion"}`` with a refusal as completion); prepared like the train dataset.
        k_align: ``K_a``, optimizer steps per alignment state.
        k_finetune: ``K_f``, optimizer steps per fine-tuning state.
        rho: ``ρ`` of the proximal term ``(ρ/2)||w - w̃||²`` (0 disables it: plain alternation).
        first: the state the cycle starts with, ``"align"`` or ``"finetune"``.
        anchor_first_phase: anchor the first state at the initial weights (otherwise no term before the
            first switch).
        Everything else goes to :class:`trl.SFTTrainer` (``train_dataset`` is the task data).

    Attributes (for inspection): ``lisa_phase`` (state of the current step), ``lisa_anchor`` (the snapshot
    ``w̃``, name -> tensor, or None), ``lisa_switches`` (``(step, new_state)`` of every switch seen).
    The anchor and state are saved in checkpoints (``lisa_state.pt``) and restored on resume; the
    alignment dataloader restarts its shuffle on resume.
    """

    def __init__(self, *args, alignment_dataset, k_align: int = 100, k_finetune: int = 900, rho: float = 1.0,
                 first: str = "align", anchor_first_phase: bool = True, **kwargs):
        phase_schedule(0, k_align, k_finetune, first)  # validates
        if rho < 0:
            raise NlsrError(f"rho must be >= 0, got {rho}")
        super().__init__(*args, **kwargs)
        self.k_align, self.k_finetune, self.rho, self.first = k_align, k_finetune, float(rho), first
        self.anchor_first_phase = anchor_first_phase
        if not self._skip_prepare_dataset:
            alignment_dataset = self._prepare_dataset(alignment_dataset, self.processing_class, self.args,
                                                      self.args.packing, self._formatting_func, "alignment")
        self.alignment_dataset = alignment_dataset
        self.lisa_phase: str | None = None
        self.lisa_anchor: dict[str, torch.Tensor] | None = None
        self.lisa_switches: list[tuple[int, str]] = []
        self._lisa_step: int | None = None
        self._lisa_loader = None
        self._lisa_iterator = None
        self._lisa_queue: list = []
        self._lisa_num_items = None
        self._lisa_in_step = False

    # -- state -------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    def _next_alignment_batch(self):
        if self._lisa_loader is None:
            self._lisa_loader = self._get_dataloader(dataset=self.alignment_dataset, description="Alignment",
                                                     batch_size=self._train_batch_size,
                                                     sampler_fn=self._get_train_sampler, is_training=True)
        for _ in range(2):
            if self._lisa_iterator is None:
                self._lisa_iterator = iter(self._lisa_loader)
            try:
                return next(self._lisa_iterator)
            except StopIteration:
                self._lisa_iterator = None
        raise NlsrError("the Lisa alignment dataset yields no batches")

    def _begin_step(self, step: int) -> None:
        phase = phase_schedule(step, self.k_align, self.k_finetune, self.first)
        if phase != self.lisa_phase:
            if self.lisa_phase is not None or self.anchor_first_phase:
                self.lisa_anchor = self._snapshot()
            self.lisa_switches.append((step, phase))
            self.lisa_phase = phase
        self._lisa_queue = []
        if phase == "align":
            n = max(1, self.current_gradient_accumulation_steps)
            self._lisa_queue = [self._next_alignment_batch() for _ in range(n)]
            self._lisa_num_items = self._get_num_items_in_batch(self._lisa_queue, self.args.device)

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if step != self._lisa_step:
            self._lisa_step = step
            self._begin_step(step)
        if self.lisa_phase == "align":
            if not self._lisa_queue:  # more micro-batches than announced: draw one more
                self._lisa_queue.append(self._next_alignment_batch())
            inputs = self._lisa_queue.pop(0)
            num_items_in_batch = self._lisa_num_items
        self._lisa_in_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._lisa_in_step = False

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of :meth:`transformers.Trainer.training_step`'s test: is the loss already divided over GA?"""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not (self._lisa_in_step and self.lisa_anchor is not None and self.rho > 0):
            return result
        loss = result[0] if return_outputs else result
        prox = proximal_term(self.trainable_parameters(), self.lisa_anchor, self.rho)
        self._metrics["train"]["lisa/proximal"].append(prox.item())
        self._metrics["train"]["lisa/align_phase"].append(float(self.lisa_phase == "align"))
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # the Trainer will not divide by the accumulation steps: the term must count once per optimizer step
            prox = prox / self.current_gradient_accumulation_steps
        loss = loss + prox.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder) and self.args.should_save:
            anchor = None if self.lisa_anchor is None else {k: v.cpu() for k, v in self.lisa_anchor.items()}
            torch.save({"phase": self.lisa_phase, "anchor": anchor, "switches": self.lisa_switches},
                       os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.args.device, weights_only=True)
            self.lisa_phase, self.lisa_anchor = state["phase"], state["anchor"]
            self.lisa_switches = [tuple(s) for s in state["switches"]]
