"""Extra heads at hook points (METHODS.md MOD-15): trainable modules beside the model, never inside it.

``add_head(adapter, name, module, at)`` attaches an ``nn.Module`` to a canonical hook point (``final_norm``,
``layers.{i}.resid_post``, ``layers.{i}.mlp.out``, ...; see :mod:`tokensmith.models.hooks`). Inside
``with capture(adapter) as out:`` every forward (and every step of ``generate``) computes

    out[name] = module(x_at)

from the tensor ``x_at`` the model produces at that point, without changing it: the model's own outputs are
bit-for-bit those of the plain forward. Outside ``capture`` the heads cost nothing.

Where the heads live. The modules are kept in one ``nn.ModuleDict`` held by the *adapter* object
(:func:`head_modules`), not inserted into the HF model: ``adapter.model.state_dict()``, ``named_modules()`` and
``save_pretrained`` are unchanged, and the heads' parameters are ordinary trainable parameters (pass
``head_modules(adapter).parameters()`` to an optimizer). The hooked tensor is the live activation, so a loss
on a head output backpropagates into the head *and* into the model below the hook point (freeze the model's
parameters to train the heads alone, as Medusa-1 does).

Saving. :func:`save_heads` writes a directory with ``heads.safetensors`` (every head's ``state_dict``, keys
``"{name}.{param}"``) and ``heads.json`` (per head: the hook point, the module's class path and, when known,
the keyword arguments that construct it). :func:`load_heads` loads weights into heads already attached under
the same names, and rebuilds the others as ``cls(**config)`` when a config was saved (``add_head(config=...)``
or a ``head_config`` dict attribute on the module, as :class:`~tokensmith.optimization.training.mtp.MTPHead`
has). A head saved without a config is not guessed: construct it, ``add_head`` it, then ``load_heads``.
Rebuilding imports the saved class path, so load head directories you trust, as with any checkpoint.

Examples:
    >>> import torch, tokensmith as ts
    >>> from tokensmith.models import heads as H
    >>> ad = ts.tiny("llama")
    >>> probe = H.add_head(ad, "probe", torch.nn.Linear(ad.structure.hidden_size, 3), at="layers.-1.resid_post")
    >>> with H.capture(ad) as out:
    ...     _ = ad.forward("Hello there")
    >>> list(out["probe"].shape)[-1]
    3
    >>> list(H.heads(ad))
    ['probe']
    >>> _ = H.remove_head(ad, "probe")
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokensmith.models.hooks import hook_names

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "Head",
    "HeadOutputs",
    "add_head",
    "remove_head",
    "heads",
    "list_heads",
    "head_modules",
    "capture",
    "forward_with_heads",
    "save_heads",
    "load_heads",
    "resolve_hook_point",
]

_ATTR = "_tokensmith_heads"
_SPEC_FILE = "heads.json"
_WEIGHTS_FILE = "heads.safetensors"
_FORMAT = "tokensmith-heads"


@dataclass(frozen=True)
class Head:
    """One attached head.

    Attributes:
        name: its name (a key of :func:`head_modules`).
        module: the ``nn.Module``; called as ``module(x_at)``.
        at: the canonical hook point it reads (negative layer indices already resolved).
        config: keyword arguments that rebuild the module as ``type(module)(**config)`` on
            :func:`load_heads`, or None (then the module must be constructed by the caller before loading).
    """

    name: str
    module: nn.Module
    at: str
    config: dict[str, Any] | None


class _Registry:
    def __init__(self) -> None:
        self.modules = nn.ModuleDict()
        self.meta: dict[str, tuple[str, dict[str, Any] | None]] = {}


def _registry(adapter: ModelAdapter, create: bool = True) -> _Registry | None:
    reg = adapter.__dict__.get(_ATTR)
    if reg is None and create:
        reg = _Registry()
        adapter.__dict__[_ATTR] = reg
    return reg


def resolve_hook_point(adapter: ModelAdapter, at: str) -> str:
    """The canonical hook name for ``at``, with a negative layer index counted from the end.

    ``"layers.-1.resid_post"`` on a 2-layer model is ``"layers.1.resid_post"``. Wildcards are refused (a head
    reads one tensor), and so is ``attn.probs`` (it can be cached, not read by an edit).

    Examples:
        >>> import tokensmith as ts
        >>> resolve_hook_point(ts.tiny("llama"), "layers.-1.resid_post")
        'layers.1.resid_post'
    """
    if not isinstance(at, str) or not at:
        raise TypeError(
            f"at must be a canonical hook name such as 'final_norm' or 'layers.3.resid_post', got {at!r}"
        )
    if any(c in at for c in "*?[]"):
        raise ValueError(f"at={at!r} is a pattern; a head reads one hook point, e.g. 'layers.3.resid_post'")
    parts = at.split(".")
    if parts[0] == "layers" and len(parts) >= 3:
        try:
            i = int(parts[1])
        except ValueError:
            raise ValueError(f"at={at!r}: the layer index {parts[1]!r} is not an integer") from None
        L = adapter.structure.num_layers
        if not -L <= i < L:
            raise ValueError(f"at={at!r}: layer {i} is out of range for a model with {L} layers")
        parts[1] = str(i % L)
        at = ".".join(parts)
    if at.endswith("attn.probs"):
        raise ValueError(
            f"at={at!r}: attention probabilities can only be cached; attach the head at attn.z or attn.out"
        )
    names = hook_names(adapter)
    if at not in names:
        raise ValueError(
            f"no hook point {at!r} on this model; valid names include {names[:3] + names[-3:]} "
            "(see adapter.hook_names())"
        )
    return at


def add_head(
    adapter: ModelAdapter,
    name: str,
    module: nn.Module,
    at: str = "final_norm",
    *,
    config: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    replace: bool = False,
) -> nn.Module:
    """Attach ``module`` as head ``name`` reading hook point ``at`` (METHODS.md MOD-15).

    Inside :func:`capture`, every forward computes ``out[name] = module(x_at)`` where ``x_at`` is the tensor
    at ``at`` (e.g. ``[B, T, d]`` for ``final_norm`` and ``layers.{i}.resid_post``); the model's own outputs
    are unchanged. The module is kept beside the model (:func:`head_modules`), never inside it.

    Args:
        adapter: the model.
        name: a unique name without dots (an ``nn.ModuleDict`` key).
        module: any ``nn.Module`` taking the hooked tensor. The hooked tensor is cast to the module's
            parameter dtype and device, so an fp32 head on a bf16 model works.
        at: a canonical hook point (:meth:`ModelAdapter.hook_names`); ``layers.-1.resid_post`` counts from
            the end.
        config: keyword arguments rebuilding the module as ``type(module)(**config)`` in :func:`load_heads`
            (JSON-serialisable). Default: the module's ``head_config`` attribute if it has one, else None.
        device: where to put the module (default: the adapter's device; its dtype is left as it is unless
            ``dtype`` is given).
        dtype: optional dtype to cast the module to.
        replace: replace an existing head of the same name instead of raising.

    Returns:
        the module (moved to ``device``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``config`` is not a JSON-serialisable dict.
        ValueError: a bad name, an existing name without ``replace=True``, or an unknown hook point.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, capture, remove_head
        >>> ad = ts.tiny("llama")
        >>> keys = set(ad.model.state_dict())
        >>> lin = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 2))   # at final_norm
        >>> with capture(ad) as out:
        ...     _ = ad.forward("a b c")
        >>> out["lin"].shape[-1], set(ad.model.state_dict()) == keys     # the HF model is unchanged
        (2, True)
        >>> _ = remove_head(ad, "lin")
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise ValueError(
            f"head name must be a non-empty string without dots or surrounding spaces, got {name!r}"
        )
    point = resolve_hook_point(adapter, at)
    if config is None:
        config = getattr(module, "head_config", None)
    if config is not None:
        if not isinstance(config, dict):
            raise TypeError(
                f"config must be a dict of constructor keyword arguments, got {type(config).__name__}"
            )
        try:
            json.dumps(config)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"config of head {name!r} must be JSON-serialisable ({e}); pass plain numbers/strings"
            ) from None
        config = dict(config)
    reg = _registry(adapter)
    assert reg is not None
    if name in reg.modules and not replace:
        raise ValueError(
            f"a head named {name!r} is attached already; remove_head it first or pass replace=True"
        )
    module.to(device=torch.device(device) if device is not None else adapter.device)
    if dtype is not None:
        module.to(dtype=dtype)
    reg.modules[name] = module
    reg.meta[name] = (point, config)
    return module


def remove_head(adapter: ModelAdapter, name: str) -> nn.Module:
    """Detach head ``name`` and return its module (the model is untouched either way).

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, remove_head, heads
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "h", torch.nn.Identity())
        >>> _ = remove_head(ad, "h"); heads(ad)
        {}
    """
    reg = _registry(adapter, create=False)
    if reg is None or name not in reg.modules:
        have = sorted(reg.modules) if reg is not None else []
        raise ValueError(f"no head named {name!r} is attached (attached: {have})")
    module = reg.modules[name]
    del reg.modules[name]
    del reg.meta[name]
    return module


def heads(adapter: ModelAdapter) -> dict[str, Head]:
    """The attached heads, by name, in the order they were added.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, heads
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "h", torch.nn.Identity(), at="layers.0.resid_post")
        >>> heads(ad)["h"].at
        'layers.0.resid_post'
    """
    reg = _registry(adapter, create=False)
    if reg is None:
        return {}
    return {n: Head(n, m, *reg.meta[n]) for n, m in reg.modules.items()}


list_heads = heads  # alias that does not shadow the module name when re-exported from tokensmith.models


def head_modules(adapter: ModelAdapter) -> nn.ModuleDict:
    """The ``nn.ModuleDict`` holding every attached head: its ``parameters()`` are what an optimizer trains.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, head_modules
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 4))
        >>> sum(p.numel() for p in head_modules(ad).parameters()) == ad.structure.hidden_size * 4 + 4
        True
    """
    reg = _registry(adapter)
    assert reg is not None
    return reg.modules


class HeadOutputs(Mapping):
    """What :func:`capture` recorded: ``out[name]`` is the head's output in the most recent forward,
    ``out.steps(name)`` the outputs of every forward in the block (one per ``generate`` step; one per chunk of
    a micro-batched call, with ``out.rows(name)`` giving the rows each chunk covered).
    """

    def __init__(self) -> None:
        self._steps: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[str, list[slice | None]] = {}

    def _record(self, name: str, value: Any, rows: slice | None) -> None:
        self._steps.setdefault(name, []).append(value)
        self._rows.setdefault(name, []).append(rows)

    def __getitem__(self, name: str) -> Any:
        if name not in self._steps:
            raise KeyError(
                f"head {name!r} produced no output in this block (did a forward run? recorded: {list(self)})"
            )
        return self._steps[name][-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def steps(self, name: str) -> list[Any]:
        """Every output of head ``name`` in this block, in forward order."""
        return list(self._steps.get(name, []))

    def rows(self, name: str) -> list[slice | None]:
        """For each recorded output, the rows of the logical batch its forward covered."""
        return list(self._rows.get(name, []))

    def __repr__(self) -> str:
        return f"HeadOutputs({ {n: len(v) for n, v in self._steps.items()} })"


def _select(adapter: ModelAdapter, names: Iterable[str] | str | None) -> list[Head]:
    attached = heads(adapter)
    if names is None:
        return list(attached.values())
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in attached]
    if missing:
        raise ValueError(f"no heads named {missing} are attached (attached: {list(attached)})")
    return [attached[n] for n in names]


def _param_like(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def _call_head(module: nn.Module, x: torch.Tensor) -> Any:
    ref = _param_like(module)
    if ref is not None and (x.dtype != ref.dtype or x.device != ref.device):
        x = x.to(device=ref.device, dtype=ref.dtype)
    return module(x)


@contextmanager
def capture(
    adapter: ModelAdapter, names: Iterable[str] | str | None = None, *, detach: bool = False
) -> Iterator[HeadOutputs]:
    """Compute the heads (all, or ``names``) in every forward inside the block; yields :class:`HeadOutputs`.

    The heads run in a hook session (:meth:`ModelAdapter.hooks`) whose edit functions compute
    ``module(x_at)`` and return None, so the model's activations and outputs are unchanged. Gradients follow
    the ambient grad mode: under ``torch.no_grad()`` nothing is recorded for autograd; otherwise the outputs
    are differentiable in the heads' parameters and in the model below the hook point (``detach=True``
    stores detached outputs). The hooks are removed when the block ends, also on an exception.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, capture
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "copy", torch.nn.Identity(), at="final_norm")
        >>> with ad.hooks(cache="final_norm") as h, capture(ad) as out:
        ...     _ = ad.forward("The cat sat")
        >>> bool(torch.equal(out["copy"].detach(), h.cache["final_norm"]))
        True
    """
    selected = _select(adapter, names)
    out = HeadOutputs()
    if not selected:
        yield out
        return

    def make(head: Head):
        def fn(t: torch.Tensor, ctx: Any) -> None:
            y = _call_head(head.module, t)
            if detach and isinstance(y, torch.Tensor):
                y = y.detach()
            out._record(head.name, y, getattr(ctx, "rows", None))
            return None

        return fn

    with adapter.hooks(edit=[(h.at, make(h)) for h in selected]):
        yield out


def forward_with_heads(
    adapter: ModelAdapter, inputs: Any = None, names: Iterable[str] | str | None = None, **forward_kw: Any
) -> tuple[Any, dict[str, Any]]:
    """One :meth:`ModelAdapter.forward` with the heads computed: ``(model output, {name: head output})``.

    Examples:
        >>> import torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, forward_with_heads
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 2))
        >>> o, hs = forward_with_heads(ad, "Hello")
        >>> hs["lin"].shape[:2] == o.logits.shape[:2]
        True
    """
    with capture(adapter, names) as out:
        res = adapter.forward(inputs, **forward_kw)
    return res, {n: out[n] for n in out}


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    mod_name, _, qual = path.partition(":")
    if not mod_name or not qual:
        raise ValueError(f"bad class path {path!r} in {_SPEC_FILE} (expected 'package.module:ClassName')")
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        if part == "<locals>":
            raise ValueError(
                f"class {path!r} was defined inside a function and cannot be imported; construct the head, "
                "add_head it, then load_heads"
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TypeError(f"{path!r} is not an nn.Module subclass")
    return obj


def save_heads(
    adapter: ModelAdapter, path: str | os.PathLike, names: Iterable[str] | str | None = None
) -> Path:
    """Write the heads (all, or ``names``) to directory ``path``: ``heads.safetensors`` + ``heads.json``.

    The weights file holds every head's ``state_dict`` under keys ``"{name}.{key}"``; the JSON spec holds,
    per head, its hook point, class path (``package.module:Class``), config (constructor kwargs, or null) and
    the ``state_dict`` dtypes. The base model is not saved (``adapter.model.save_pretrained`` stays the plain
    HF checkpoint).

    Examples:
        >>> import tempfile, torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, save_heads
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 2))
        >>> d = save_heads(ad, tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['heads.json', 'heads.safetensors']
    """
    from safetensors.torch import save_file

    selected = _select(adapter, names)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    spec = []
    for h in selected:
        sd = h.module.state_dict()
        for k, v in sd.items():
            tensors[f"{h.name}.{k}"] = v.detach().to("cpu").contiguous().clone()
        spec.append(
            {
                "name": h.name,
                "at": h.at,
                "class": _class_path(h.module),
                "config": h.config,
                "keys": sorted(sd),
            }
        )
    save_file(tensors, str(out / _WEIGHTS_FILE), metadata={"format": _FORMAT})
    (out / _SPEC_FILE).write_text(json.dumps({"format": _FORMAT, "version": 1, "heads": spec}, indent=2))
    return out


def load_heads(
    adapter: ModelAdapter,
    path: str | os.PathLike,
    names: Iterable[str] | str | None = None,
    *,
    device: str | torch.device | None = None,
) -> list[str]:
    """Load heads saved by :func:`save_heads` into ``adapter``; returns the names loaded.

    A head already attached under a saved name receives the saved weights (its class must match; its hook
    point is left as attached). Any other head is rebuilt as ``cls(**config)`` from the saved class path and
    config, attached at the saved hook point, and given the weights. A head saved without a config raises a
    ValueError asking you to construct and attach it first. Everything is checked (files, classes, weight
    keys and shapes) before anything is attached, so a failed load leaves the adapter as it was.

    Examples:
        >>> import tempfile, torch, tokensmith as ts
        >>> from tokensmith.models.heads import add_head, remove_head, save_heads, load_heads
        >>> ad = ts.tiny("llama")
        >>> _ = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 2))
        >>> d = save_heads(ad, tempfile.mkdtemp())
        >>> saved = remove_head(ad, "lin")
        >>> fresh = add_head(ad, "lin", torch.nn.Linear(ad.structure.hidden_size, 2))  # no config: build it
        >>> load_heads(ad, d)
        ['lin']
        >>> bool(torch.equal(fresh.weight, saved.weight))
        True
    """
    from safetensors.torch import load_file

    root = Path(path)
    spec_path, weights_path = root / _SPEC_FILE, root / _WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{root} does not hold {_SPEC_FILE} and {_WEIGHTS_FILE} (written by save_heads)"
        )
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != _FORMAT:
        raise ValueError(f"{spec_path} is not a tokensmith heads spec (format {spec.get('format')!r})")
    entries = {e["name"]: e for e in spec["heads"]}
    wanted = list(entries) if names is None else ([names] if isinstance(names, str) else list(names))
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise ValueError(f"{root} holds no heads named {missing} (saved: {list(entries)})")
    tensors = load_file(str(weights_path))
    attached = heads(adapter)
    plan: list[tuple[str, nn.Module, str, dict[str, Any] | None, bool]] = []
    for n in wanted:
        e = entries[n]
        if n in attached:
            module = attached[n].module
            if _class_path(module) != e["class"]:
                raise TypeError(
                    f"head {n!r} is attached as {_class_path(module)} but was saved as {e['class']}; "
                    "remove_head it or attach the saved class"
                )
            new = False
        elif e.get("config") is not None:
            module = _import_class(e["class"])(**e["config"])
            new = True
        else:
            raise ValueError(
                f"head {n!r} ({e['class']}) was saved without a config (its constructor arguments), so it cannot be "
                f"rebuilt: construct it, add_head(adapter, {n!r}, module, at={e['at']!r}), then call load_heads "
                "again (or give the module a head_config dict / pass add_head(config=...) before saving)"
            )
        sd = {k[len(n) + 1 :]: v for k, v in tensors.items() if k.startswith(n + ".")}
        own = module.state_dict()
        if set(sd) != set(own):
            raise ValueError(f"head {n!r}: saved keys {sorted(sd)} do not match the module's {sorted(own)}")
        bad = [k for k in sd if sd[k].shape != own[k].shape]
        if bad:
            raise ValueError(
                f"head {n!r}: shapes differ at {bad[:4]} (saved {[tuple(sd[k].shape) for k in bad[:4]]}, module "
                f"{[tuple(own[k].shape) for k in bad[:4]]})"
            )
        plan.append((n, module, e["at"], e.get("config"), new))
    for n, module, at, config, new in plan:
        sd = {k[len(n) + 1 :]: v for k, v in tensors.items() if k.startswith(n + ".")}
        if new:
            floating = [v.dtype for v in sd.values() if v.is_floating_point()]
            add_head(
                adapter, n, module, at, config=config, device=device, dtype=floating[0] if floating else None
            )
            module.load_state_dict(sd)
        else:
            module.load_state_dict(sd)
            if device is not None:
                module.to(device)
    return [p[0] for p in plan]
