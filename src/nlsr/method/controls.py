"""Controls of NLSR's neuron identification: masks chosen without the safety data.

``magnitude``: the top ``q`` fraction of ``|A_e|`` and ``|B_e|`` of every module, with no projection
on the calibration activations (does the projection matter, or only the reference's largest
entries?). The random masks of the same density live with the pipeline's identification stage
(:func:`nlsr.experiment.stages.realign.random_masks`).
"""
from __future__ import annotations

from dataclasses import dataclass

from nlsr.method.masks import SafetyMasks, provenance
from nlsr.method.projection import top_fraction_mask
from nlsr.weights.adapters import LoraAdapter, weight_key


@dataclass
class EditResult:
    """What a post-hoc peer (RESTA, Antidote) returns: the edited adapter, its settings and summary
    (``modules``, ``repaired``, ``relative_change`` and the method's own counts)."""

    adapter: LoraAdapter
    settings: dict
    summary: dict

    @property
    def relative_change(self) -> float:
        return self.summary["relative_change"]

    def report(self) -> dict:
        return {"settings": dict(self.settings), "summary": dict(self.summary)}


def magnitude_masks(reference: LoraAdapter, q: float, **metadata: object) -> SafetyMasks:
    """Masks of the ``ceil(q · numel)`` largest-magnitude entries of each factor of ``reference``
    (the same count per matrix as identified masks), recorded like identified ones
    (:func:`~nlsr.method.masks.provenance`, with ``magnitude: true``)."""
    masks = {}
    for name, f in reference:
        masks[weight_key(name, "A")] = top_fraction_mask(f.A, q)
        masks[weight_key(name, "B")] = top_fraction_mask(f.B, q)
    return SafetyMasks(masks, provenance(reference, magnitude="true", keep_fraction=q, **metadata))
