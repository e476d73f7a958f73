"""NLSR itself: extrapolate, identify, select, transplant, realign (and SafeLoRA).

This module stays light (no torch): it declares the method's variation points, the transplant forms
(``--transplant``) and the selection rules (``--select``), so that the command line and the config
check names before anything heavy is imported. A new form or rule is a function plus one line here
(or ``TRANSPLANTS.register(name)`` on the function).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nlsr.registry import Registry

DEFAULT_TRANSPLANT = "block"
"""The transplant form of ``nlsr realign`` and of a config's variants when none is named (one place).
``block`` (only the masked-by-masked block of the update is swapped for the reference's, the fine-tune's
cross terms kept; a module that did not drift is left as it is; repaired modules become rank 3r) was
chosen on validation by the controls' frontier over three attack seeds and all five q of each form
(``results/method-controls-quick/summary.json``, ``default``); ``factor`` is the authors' code and
``exact`` the paper's formula."""
DEFAULT_Q = 0.3
"""The fraction of factor entries marked safety-critical by ``nlsr identify`` and a config's variants
when none is named: the frontier's choice with ``block`` (the paper's q is 0.2; the committed configs
name their q)."""

TRANSPLANTS: Registry[Callable[..., Any]] = Registry("transplant form")
"""``(A_e, B_e, A_t, B_t, M_A, M_B) -> (A, B)``: the repaired LoRA factors of one module."""
TRANSPLANTS.declare("exact", "nlsr.method.transplant:transplant_exact",
                    summary="the paper's formula: reference entries inside the masks, rank 2r",
                    reference="NLSR paper, Sec. 3.4")
TRANSPLANTS.declare("factor", "nlsr.method.transplant:transplant_factor",
                    summary="the authors' code: masks applied to each factor, rank r (cross terms mix)",
                    reference="NLSR authors' public code")
TRANSPLANTS.declare("block", "nlsr.method.transplant:transplant_block",
                    summary="the fine-tune with its masked block swapped for the reference's, cross terms kept "
                            "(rank 3r; an identity when nothing drifted)")

SELECTION_RULES: Registry[Callable[..., Any]] = Registry("selection rule")
"""``(similarity, *, p_base, epsilon, seed, threshold) -> (repair probability, repaired)`` per module."""
SELECTION_RULES.declare("paper", "nlsr.method.select:select_paper",
                        summary="least similar modules repaired most often (probability P_L ± ε by rank)",
                        reference="NLSR paper, Sec. 3.3")
SELECTION_RULES.declare("reverse", "nlsr.method.select:select_reverse",
                        summary="the authors' code's direction: most similar modules repaired most often",
                        reference="NLSR authors' public code")
SELECTION_RULES.declare("threshold", "nlsr.method.select:select_threshold",
                        summary="repair every module whose similarity is below a threshold")
SELECTION_RULES.declare("all", "nlsr.method.select:select_all",
                        summary="repair every module (ablation: no layer selection)")
SELECTION_RULES.declare("random", "nlsr.method.select:select_random",
                        summary="repair each module with probability P_L, whatever its similarity (a control "
                                "of the layer selection; vary the seed to measure the draw)")
