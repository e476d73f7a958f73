"""Figures written next to results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nlsr.method.realign import ModuleDecision


def plot_similarity_by_layer(decisions: Sequence[ModuleDecision], path: Path,
                             title: str = "Safety-region similarity by layer") -> Path:
    """Scatter of ``S_j`` against layer, one colour per module kind, repaired modules filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 4.5))
    kinds = sorted({d.kind for d in decisions})
    colours = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        rows = [d for d in decisions if d.kind == kind]
        xs = [d.layer if d.layer is not None else -1 for d in rows]
        ys = [d.similarity for d in rows]
        faces = [colours(i % 10) if d.repaired else "none" for d in rows]
        ax.scatter(xs, ys, s=36, facecolors=faces, edgecolors=[colours(i % 10)] * len(rows),
                   linewidths=1.2)
    ax.set_xlabel("layer")
    ax.set_ylabel("similarity S (masked cosine)")
    n_rep = sum(d.repaired for d in decisions)
    ax.set_title(f"{title}\nfilled = repaired ({n_rep} of {len(decisions)} modules)")
    ax.grid(alpha=0.3)
    # Legend markers drawn by hand: a scatter's own legend entry takes the face of its first point,
    # which showed some kinds filled although filled means repaired. Kinds: hollow, in their colour.
    marker = dict(marker="o", linestyle="none", markersize=6, markeredgewidth=1.2)
    handles = [Line2D([], [], markerfacecolor="none", markeredgecolor=colours(i % 10), label=kind, **marker)
               for i, kind in enumerate(kinds)]
    handles += [Line2D([], [], markerfacecolor="grey", markeredgecolor="grey", label="repaired", **marker),
                Line2D([], [], markerfacecolor="none", markeredgecolor="grey", label="kept", **marker)]
    ax.legend(handles=handles, fontsize=8, ncol=min(len(handles), 9), loc="upper center",
              bbox_to_anchor=(0.5, -0.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
