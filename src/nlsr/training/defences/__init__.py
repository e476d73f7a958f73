"""Baseline defences compared against NLSR, one module each, declared here by name.

This module stays light (no torch): the config check validates ``defences[].method`` against
:data:`DEFENCES` at once. ``meta["stage"]`` says where a defence hooks in: ``"alignment"`` (it changes
how the aligned model is trained) or ``"fine-tuning"`` (it changes the user's fine-tuning run);
``meta["single_process"]``: its own trainer (alternating optimizers, a reference model, perturbation
steps) has not been checked under DistributedDataParallel, so it trains in one process only.
A new defence is a module here, one declaration below, and its wiring in the stage it hooks into.
"""

from __future__ import annotations

from typing import Any

from nlsr.registry import Registry

DEFENCES: Registry[Any] = Registry("defence")
"""Defences by name: the object a stage swaps in (a trainer class, a mixin or a data transform)."""
_HERE = "nlsr.training.defences"
DEFENCES.declare("vaccine", f"{_HERE}.vaccine:VaccineMixin", stage="alignment", single_process=True,
                 summary="perturbation-aware alignment: SFT/DPO under worst-case hidden-state perturbations",
                 reference="Huang et al., 2024, Vaccine (NeurIPS 2024)")
DEFENCES.declare("lisa", f"{_HERE}.lisa:LisaTrainer", stage="fine-tuning", single_process=True,
                 summary="lazy safety alignment: alternate safety and task steps with a proximal term",
                 reference="Huang et al., 2024, Lisa (NeurIPS 2024)")
DEFENCES.declare("mixing", f"{_HERE}.mixing:mix_safety_rows", stage="fine-tuning", single_process=False,
                 summary="mix safety rows (harmful prompt -> refusal) into the fine-tuning data",
                 reference="Zong et al., 2024, VLGuard")
DEFENCES.declare("constrained_sft", f"{_HERE}.constrained_sft:ConstrainedSFTTrainer", stage="fine-tuning",
                 single_process=True,
                 summary="token-wise constrained fine-tuning against the aligned model",
                 reference="Qi et al., 2024, Safety Alignment Should Be Made More Than Just a Few Tokens Deep")
