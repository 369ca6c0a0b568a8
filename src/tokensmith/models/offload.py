"""Weights of models dispatched by accelerate (``device_map=...``, ``accelerate.dispatch_model``).

A dispatched model keeps its modules where the device map put them and moves activations between devices
with accelerate's ``AlignDevicesHook`` (``module._hf_hook``), which wraps each module's ``forward``. Calling a
module therefore works wherever it lives, and tokensmith never moves such a model with ``.to()``.

Reading a weight directly is different for **offloaded** modules (device map value ``"cpu"`` next to a GPU,
or ``"disk"``): their parameters are replaced by tensors on the ``meta`` device (shape and dtype, no data),
and the values live in the hook's ``weights_map`` (a CPU state dict or a memory-mapped offload folder) until
a forward loads them onto the hook's ``execution_device``. Code that needs a weight itself (the embedding
matrix ``adapter.E``, the unembedding ``adapter.W_U``) or the device inputs must go to reads it here:

* :func:`offloaded_value` -- the real value of ``module.<name>`` (a copy on the execution device when it is
  offloaded; the parameter itself otherwise);
* :func:`execution_device` -- where the module computes (its weights' device, or the hook's execution device).

Both walk from the module up to the root, because accelerate hooks either each offloaded leaf
(``transformers``' ``from_pretrained(device_map=...)``) or one block per device-map entry with
``place_submodules=True`` (``dispatch_model``), whose ``weights_map`` keys are relative to that block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["offloaded_value", "execution_device", "is_offloaded"]


def _align_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` that place weights (``AlignDevicesHook``, also inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None)  # accelerate.hooks.SequentialHook
    return [h for h in (hooks if hooks is not None else [hook]) if hasattr(h, "execution_device")]


def _governing_hook(model: nn.Module, path: str, name: str) -> tuple[Any, str] | None:
    """``(hook, key)``: the offloading hook (on the module at ``path`` or an ancestor) whose ``weights_map``
    holds ``path.name`` under ``key``; None when no hook offloads it."""
    parts = path.split(".") if path else []
    for k in range(len(parts), -1, -1):
        mod = model.get_submodule(".".join(parts[:k]))
        for h in _align_hooks(mod):
            if k < len(parts) and not getattr(h, "place_submodules", False):
                continue  # a hook on an ancestor that does not manage its submodules' tensors
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                return h, ".".join([*parts[k:], name])
    return None


def is_offloaded(tensor: Any) -> bool:
    """True for a parameter accelerate offloaded (it sits on the ``meta`` device until a forward loads it).

    Examples:
        >>> import torch
        >>> is_offloaded(torch.empty(2, device="meta")), is_offloaded(torch.zeros(2))
        (True, False)
    """
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"


def offloaded_value(model: nn.Module, path: str, name: str = "weight") -> Any:
    """The value of tensor ``name`` of the module at ``path``, also when accelerate offloaded it.

    A tensor that is not offloaded is returned as it is (the live parameter: writes change the model). An
    offloaded one is read from its hook's ``weights_map`` and moved to the hook's execution device: a
    **copy**, so writing into it does not change the model.

    Args:
        model: the root module (the model the device map was applied to).
        path: dotted module path inside ``model`` (``"lm_head"``, ``"model.embed_tokens"``).
        name: the tensor's attribute name on that module.

    Raises:
        ValueError: the tensor is on the meta device but no accelerate hook holds its value (a model built
            with ``init_empty_weights`` and never loaded), or the offload store lacks it (e.g. a tied weight
            that was offloaded apart from the tensor it is tied to).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> offloaded_value(ad.model, "lm_head") is ad.model.lm_head.weight   # not offloaded: the parameter
        True
    """
    t = getattr(model.get_submodule(path), name, None)
    if not is_offloaded(t):
        return t
    found = _governing_hook(model, path, name)
    if found is None:
        raise ValueError(
            f"{path}.{name} is on the meta device and no accelerate offload hook holds its value: the weights "
            "were never loaded (load the model with from_pretrained or dispatch it with accelerate)"
        )
    hook, key = found
    try:
        value = hook.weights_map[key]
    except KeyError as e:
        raise ValueError(
            f"{path}.{name} is offloaded but its hook's offload store has no entry {key!r} (a tied weight "
            "offloaded apart from the tensor it is tied to?); put tied modules on the same device"
        ) from e
    return value.to(hook.execution_device)


def execution_device(model: nn.Module, path: str, name: str = "weight") -> torch.device:
    """The device the module at ``path`` computes on: the device of its tensor ``name``, or, when accelerate
    offloaded it, the execution device of the hook that loads it.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> execution_device(ad.model, "model.embed_tokens")
        device(type='cpu')
    """
    t = getattr(model.get_submodule(path), name, None)
    if isinstance(t, torch.Tensor) and not is_offloaded(t):
        return t.device
    found = _governing_hook(model, path, name)
    if found is not None:
        return torch.device(found[0].execution_device)  # a str, a device, or an accelerator index
    if isinstance(t, torch.Tensor):
        return t.device
    raise ValueError(f"{path} has no tensor {name!r}")
