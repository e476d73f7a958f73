"""Random LoRA adapters shaped for a model: for tests, benchmarks and examples, never for results."""

from __future__ import annotations

import torch

from nlsr.weights.adapters import LoraAdapter, LoraFactors

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(model: torch.nn.Module,
                  targets: tuple[str, ...] = LLAMA_TARGETS) -> dict[str, tuple[int, int]]:
    """``name -> (d_out, d_in)`` of every ``nn.Linear`` whose last name part is in ``targets``."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear)}


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int = 8, alpha: float = 16,
                   seed: int = 0, base: str | None = None, a_std: float = 0.3,
                   b_std: float = 0.3) -> LoraAdapter:
    """A LoRA adapter with Gaussian ``A`` and ``B`` (both non-zero) for the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    modules = {name: LoraFactors(A=torch.randn(rank, d_in, generator=gen) * a_std,
                                 B=torch.randn(d_out, rank, generator=gen) * b_std,
                                 scale=alpha / rank)
               for name, (d_out, d_in) in shapes.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": base,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}),
              "rank_pattern": {}, "alpha_pattern": {}}
    return LoraAdapter(config=config, modules=modules)


def perturbed(adapter: LoraAdapter, noise: float, seed: int = 1,
              relative: bool = False) -> LoraAdapter:
    """A stand-in 'fine-tuned' continuation: the same factors plus Gaussian noise.

    With ``relative`` the noise is scaled by each factor's RMS.
    """
    gen = torch.Generator().manual_seed(seed)

    def jitter(t: torch.Tensor) -> torch.Tensor:
        std = noise * (t.pow(2).mean().sqrt() if relative else 1.0)
        return t + std * torch.randn(t.shape, generator=gen)

    return adapter.with_modules({name: LoraFactors(A=jitter(f.A), B=jitter(f.B), scale=f.scale)
                                 for name, f in adapter})
