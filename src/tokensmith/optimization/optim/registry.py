"""Optimizer registry: ``create(name, params, **kw)`` over ours, ``torch.optim`` and ``pytorch-optimizer``.

Resolution order for a plain name (case-, ``-``- and ``_``-insensitive):

1. **ours** (:data:`OURS`: ``lion``, ``ademamix``, ``spam``, ``adagc``, ``adagc-lion``, ``galore-adamw``,
   ``frugal``):
   ours always wins for these names. Each is pinned by a golden-trajectory test against the paper's
   update rule; the ``pytorch-optimizer`` classes of the same names are measured against the same rule
   in ``benchmarks/optim_bench.py`` (they differ in defaults and details: see the optimizers guide), so
   forwarding them under our names would change results silently.
2. **torch.optim** built-ins (``adamw``, ``adam``, ``sgd``, ...).
3. **pytorch-optimizer** (optional: ``pip install pytorch_optimizer``), any name its
   ``get_supported_optimizers()`` lists, through its ``load_optimizer``.

A prefix forces a backend: ``"torch:adamw"``, ``"pytorch_optimizer:lion"`` (also ``"po:lion"``),
``"ours:lion"``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from tokensmith.optimization.optim.adagc import AdaGC
from tokensmith.optimization.optim.ademamix import AdEMAMix
from tokensmith.optimization.optim.frugal import FRUGAL
from tokensmith.optimization.optim.galore import GaLoreAdamW
from tokensmith.optimization.optim.lion import Lion, Params
from tokensmith.optimization.optim.spam import SPAM

__all__ = ["OURS", "available_optimizers", "create", "has_pytorch_optimizer"]

#: Our optimizers by canonical name.
OURS: dict[str, Callable[..., Optimizer]] = {
    "lion": Lion,
    "ademamix": AdEMAMix,
    "spam": SPAM,
    "adagc": AdaGC,
    "adagc-lion": functools.partial(AdaGC, base="lion"),
    "galore-adamw": GaLoreAdamW,
    "frugal": FRUGAL,
}

_TORCH = ("adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "asgd", "lbfgs", "muon", "nadam",
          "radam", "rmsprop", "rprop", "sgd", "sparseadam")
_PREFIXES = {"ours": "ours", "torch": "torch", "pytorch_optimizer": "pytorch_optimizer",
             "pytorch-optimizer": "pytorch_optimizer", "po": "pytorch_optimizer"}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


def has_pytorch_optimizer() -> bool:
    """Whether the optional ``pytorch_optimizer`` package is importable."""
    return importlib.util.find_spec("pytorch_optimizer") is not None


def _torch_classes() -> dict[str, type[Optimizer]]:
    out = {}
    for cls_name in dir(torch.optim):
        cls = getattr(torch.optim, cls_name)
        if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer and _key(cls_name) in _TORCH:
            out[_key(cls_name)] = cls
    return out


def _po_names() -> list[str]:
    if not has_pytorch_optimizer():
        return []
    import pytorch_optimizer

    return sorted(pytorch_optimizer.get_supported_optimizers())


def available_optimizers() -> dict[str, list[str]]:
    """The names ``create`` accepts, per backend: ``{"ours": [...], "torch": [...], "pytorch_optimizer": [...]}``.

    Examples:
        >>> available_optimizers()["ours"]
        ['lion', 'ademamix', 'spam', 'adagc', 'adagc-lion', 'galore-adamw', 'frugal']
    """
    return {"ours": list(OURS), "torch": sorted(_torch_classes()), "pytorch_optimizer": _po_names()}


def _unknown(name: str, backend: str | None) -> ValueError:
    av = available_optimizers()
    po = av["pytorch_optimizer"]
    po_txt = (f"pytorch_optimizer: {len(po)} names (see available_optimizers()['pytorch_optimizer'])" if po
              else "pytorch_optimizer: not installed (pip install pytorch_optimizer for 100+ more)")
    where = f" in backend {backend!r}" if backend else ""
    return ValueError(f"unknown optimizer {name!r}{where}. ours: {', '.join(av['ours'])}; torch: "
                      f"{', '.join(av['torch'])}; {po_txt}")


def create(name: str, params: Params, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name: ours first, then ``torch.optim``, then ``pytorch-optimizer`` (see the module doc).

    Args:
        name: an optimizer name, optionally prefixed with a backend (``"torch:adamw"``, ``"po:lion"``).
        params: parameters or parameter groups.
        **kwargs: the optimizer's own options (``lr``, ``betas``, ...).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> type(create("Lion", [w], lr=1e-4)).__name__, type(create("adamw", [w])).__module__
        ('Lion', 'torch.optim.adamw')
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    backend = None
    if ":" in name:
        prefix, name = name.split(":", 1)
        if prefix.strip().lower() not in _PREFIXES:
            raise ValueError(f"unknown backend prefix {prefix!r}: use one of {sorted(set(_PREFIXES))}")
        backend = _PREFIXES[prefix.strip().lower()]
    key = _key(name)
    params = list(params)
    if backend in (None, "ours"):
        for n, factory in OURS.items():
            if _key(n) == key:
                return factory(params, **kwargs)
        if backend == "ours":
            raise _unknown(name, backend)
    if backend in (None, "torch"):
        cls = _torch_classes().get(key)
        if cls is not None:
            return cls(params, **kwargs)
        if backend == "torch":
            raise _unknown(name, backend)
    if backend == "pytorch_optimizer" and not has_pytorch_optimizer():
        raise ImportError("the pytorch_optimizer backend is not installed: pip install pytorch_optimizer")
    for n in _po_names():
        if _key(n) == key:
            import pytorch_optimizer

            return pytorch_optimizer.load_optimizer(n)(params, **kwargs)
    raise _unknown(name, backend)
