"""Optimizers (METHODS.md 3C): Lion, AdEMAMix, SPAM, AdaGC, GaLore, FRUGAL, and ``create(name, params)``.

Each is a ``torch.optim.Optimizer`` pinned by a golden-trajectory test against its paper's update rule.
``create`` resolves our names first, then ``torch.optim``, then the optional ``pytorch-optimizer``.

    >>> import torch
    >>> from tokensmith.optimization.optim import create
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = create("lion", [w], lr=0.1)
    >>> w.grad = torch.tensor([1.0, -1.0]); _ = opt.step()
    >>> w.detach()
    tensor([0.9000, 1.1000])
"""

from tokensmith.optimization.optim.adagc import AdaGC, AdaGCClipper, adagc_clip
from tokensmith.optimization.optim.ademamix import AdEMAMix, ademamix_alpha, ademamix_beta3
from tokensmith.optimization.optim.frugal import FRUGAL
from tokensmith.optimization.optim.galore import GaLoreAdamW, GaLoreProjector
from tokensmith.optimization.optim.lion import Lion
from tokensmith.optimization.optim.registry import OURS, available_optimizers, create, has_pytorch_optimizer
from tokensmith.optimization.optim.spam import SPAM, spam_warmup_factor

__all__ = [
    "FRUGAL",
    "OURS",
    "SPAM",
    "AdaGC",
    "AdaGCClipper",
    "AdEMAMix",
    "GaLoreAdamW",
    "GaLoreProjector",
    "Lion",
    "adagc_clip",
    "ademamix_alpha",
    "ademamix_beta3",
    "available_optimizers",
    "create",
    "has_pytorch_optimizer",
    "spam_warmup_factor",
]
