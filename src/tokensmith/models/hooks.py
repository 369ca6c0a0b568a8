"""Hooks over canonical names (METHODS.md MOD-4, MOD-6).

Canonical names (TransformerLens-style, independent of the architecture's attribute names)::

    embed                      output of the token-embedding module (scaled for Gemma)
    layers.{i}.resid_pre       input hidden states of decoder layer i
    layers.{i}.resid_post      output hidden states of decoder layer i
    layers.{i}.attn.q|k|v      outputs of the q/k/v projections (when separate projections exist)
    layers.{i}.attn.z          per-head attention outputs before the output projection ([B, T, H*d])
    layers.{i}.attn.out        output of the attention block (before the residual add)
    layers.{i}.attn.probs      attention probabilities [B, H, Tq, Tk] (cache only; see attention.py)
    layers.{i}.mlp.in|act|out  MLP input, input of its down projection, output
    final_norm                 output of the final norm
    logits                     output of the LM head (only the positions the forward computed)

Wildcards use shell patterns: ``layers.*.resid_post``, ``layers.1?.attn.out``.

A hook function has the signature ``fn(tensor, ctx) -> tensor | None`` where ``ctx`` is a
:class:`HookContext` giving the layer, the forward step, absolute positions (left padding removed),
whether this is prefill or a decode step, and the pad offsets. Returning a tensor replaces the
activation. Hooks are removed in ``finally`` — also when the block raises.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "HookContext",
    "HookSession",
    "ActivationCache",
    "StopForward",
    "steer_fn",
    "patch_fn",
    "ablate_fn",
    "hook_names",
]

HookFn = Callable[[torch.Tensor, "HookContext"], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end the forward early (``stop_after=``); caught by the adapter."""


@dataclass
class HookContext:
    """What a hook function knows about the call it runs in.

    Attributes:
        name: canonical hook name.
        layer: decoder layer index, or None for ``embed``/``final_norm``/``logits``.
        step: 0 for the first forward inside the ``with`` block, then 1, 2, ... (one per decode step).
        positions: ``[B, T]`` absolute positions of the tokens in this call (left padding not counted).
        is_prefill: True when no KV cache was filled before this call.
        pad_offsets: ``[B]`` number of left-pad tokens (from the attention mask) or None.
        attention_mask: the 2D attention mask given to the model, or None.
    """

    name: str
    layer: int | None
    step: int
    positions: torch.Tensor | None
    is_prefill: bool
    pad_offsets: torch.Tensor | None
    attention_mask: torch.Tensor | None


@dataclass
class _ForwardState:
    step: int = -1
    positions: torch.Tensor | None = None
    is_prefill: bool = True
    pad_offsets: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def hook_names(adapter: ModelAdapter) -> list[str]:
    """All canonical names available on this model."""
    s = adapter.structure
    names = ["embed"]
    for i in range(s.num_layers):
        p = f"layers.{i}."
        names += [p + "resid_pre", p + "resid_post"]
        if s.attn[i] is not None:
            names.append(p + "attn.out")
            names.append(p + "attn.probs")
        for part, mods in (("q", s.q_proj), ("k", s.k_proj), ("v", s.v_proj)):
            if mods[i] is not None and mods[i] is not s.o_proj[i]:
                names.append(p + f"attn.{part}")
        if s.o_proj[i] is not None:
            names.append(p + "attn.z")
        if s.mlp[i] is not None:
            names += [p + "mlp.in", p + "mlp.out"]
            if s.mlp_out[i] is not None:
                names.append(p + "mlp.act")
    if s.final_norm is not None:
        names.append("final_norm")
    if s.lm_head is not None:
        names.append("logits")
    return names


def expand(adapter: ModelAdapter, patterns: Iterable[str] | str) -> list[str]:
    """Expand wildcard patterns to canonical names, raising a helpful error for unknown names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    available = hook_names(adapter)
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in available if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(
                f"no hook point matches {pat!r} on this model. Examples of valid names: "
                f"{available[:3] + available[-3:]}; see ModelAdapter.hook_names()"
            )
        out.extend(h for h in hits if h not in out)
    return out


def _resolve(adapter: ModelAdapter, name: str) -> tuple[torch.nn.Module, str, int | None]:
    """Return (module, 'out' | 'in', layer)."""
    s = adapter.structure
    if name == "embed":
        return s.embed, "out", None
    if name == "final_norm":
        return s.final_norm, "out", None  # type: ignore[return-value]
    if name == "logits":
        return s.lm_head, "out", None  # type: ignore[return-value]
    parts = name.split(".")
    i = int(parts[1])
    rest = ".".join(parts[2:])
    table: dict[str, tuple[Any, str]] = {
        "resid_pre": (s.layers[i], "in"),
        "resid_post": (s.layers[i], "out"),
        "attn.out": (s.attn[i], "out"),
        "attn.q": (s.q_proj[i], "out"),
        "attn.k": (s.k_proj[i], "out"),
        "attn.v": (s.v_proj[i], "out"),
        "attn.z": (s.o_proj[i], "in"),
        "mlp.in": (s.mlp[i], "in"),
        "mlp.out": (s.mlp[i], "out"),
        "mlp.act": (s.mlp_out[i], "in"),
    }
    mod, kind = table[rest]
    return mod, kind, i


class ActivationCache(dict):
    """``name -> list of tensors`` (one per forward). Indexing returns the single tensor, or the
    concatenation along the sequence dimension over decode steps (``[B, T_total, ...]``)."""

    def __getitem__(self, name: str) -> torch.Tensor:  # type: ignore[override]
        steps = self.steps(name)
        if len(steps) == 1:
            return steps[0]
        try:
            return torch.cat(steps, dim=1)
        except RuntimeError as e:  # pragma: no cover - shapes that cannot be concatenated
            raise ValueError(f"{name} has {len(steps)} steps of different shapes; use .steps({name!r})") from e

    def steps(self, name: str) -> list[torch.Tensor]:
        if not dict.__contains__(self, name):
            raise KeyError(f"{name!r} was not cached; cached names: {sorted(self.keys())}")
        return dict.__getitem__(self, name)


class HookSession:
    """Context manager that caches and edits activations at canonical hook names.

    Prefer :meth:`ModelAdapter.hooks`. Arguments:
        cache: names/patterns to record (detached unless ``detach=False``).
        edit: ``{name_or_pattern: fn}`` or a list of ``(pattern, fn)`` pairs; ``fn(tensor, ctx)`` returns a
            replacement tensor or None.
        grad: names whose gradients to record during ``backward`` (``session.grads[name]``).
        stop_after: a name after which the forward stops (saves compute when only early activations
            are needed); the adapter's ``forward`` returns None in that case.
        offload: device to move cached tensors to (e.g. ``"cpu"``).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> with ad.hooks(cache=["layers.*.resid_post"]) as h:
        ...     _ = ad.forward("Hello")
        >>> h.cache["layers.0.resid_post"].shape[-1] == ad.structure.hidden_size
        True
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: Iterable[str] | str = (),
        edit: dict[str, HookFn] | Sequence[tuple[str, HookFn]] | None = None,
        grad: Iterable[str] | str = (),
        stop_after: str | None = None,
        detach: bool = True,
        offload: str | torch.device | None = None,
    ):
        self.adapter = adapter
        self.cache = ActivationCache()
        self.grads = ActivationCache()
        self.state = _ForwardState()
        self.detach = detach
        self.offload = offload
        cache_names = expand(adapter, cache) if cache else []
        self._probe_layers = [int(n.split(".")[1]) for n in cache_names if n.endswith("attn.probs")]
        self._cache_names = [n for n in cache_names if not n.endswith("attn.probs")]
        self._probe_names = [n for n in cache_names if n.endswith("attn.probs")]
        items = list(edit.items()) if isinstance(edit, dict) else list(edit or [])
        self._edits: dict[str, list[HookFn]] = {}
        for pat, fn in items:
            if not callable(fn):
                raise TypeError(f"edit for {pat!r} must be callable fn(tensor, ctx), got {type(fn).__name__}")
            for n in expand(adapter, pat):
                if n.endswith("attn.probs"):
                    raise ValueError("attn.probs can be cached, not edited; edit attn.z or attn.out instead")
                self._edits.setdefault(n, []).append(fn)
        self._grad_names = expand(adapter, grad) if grad else []
        self._stop_after = expand(adapter, stop_after)[0] if stop_after else None
        self._handles: list[Any] = []
        self._probe = None

    # -- registration -------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        try:
            self._handles.append(
                self.adapter.model.register_forward_pre_hook(self._state_hook, with_kwargs=True)
            )
            names = set(self._cache_names) | set(self._edits) | set(self._grad_names)
            if self._stop_after:
                names.add(self._stop_after)
            for name in sorted(names):
                mod, kind, layer = _resolve(self.adapter, name)
                if kind == "out":
                    self._handles.append(mod.register_forward_hook(self._out_hook(name, layer)))
                else:
                    self._handles.append(
                        mod.register_forward_pre_hook(self._in_hook(name, layer), with_kwargs=True)
                    )
            if self._probe_layers:
                from tokensmith.models.attention import AttentionProbe

                self._probe = AttentionProbe(self.adapter, self._probe_layers).__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.__exit__(None, None, None)
            for name in self._probe_names:
                layer = int(name.split(".")[1])
                dict.__setitem__(self.cache, name, list(probe.records[layer]))

    # -- forward state ------------------------------------------------------------------------
    def _state_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        st = self.state
        st.step += 1
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("decoder_input_ids")
        if x is None:
            return
        B, T = x.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                past = int(cache.get_seq_length())
            except Exception:  # pragma: no cover
                past = 0
        am = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if pos is None and am is not None and am.dim() == 2:
            pos = (am.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        if pos is None:
            pos = torch.arange(past, past + T, device=x.device).expand(B, T)
        st.positions = pos.expand(B, T) if pos.shape[0] == 1 else pos
        st.is_prefill = past == 0
        st.attention_mask = am
        st.pad_offsets = (am == 0).long().sum(-1) if am is not None and am.dim() == 2 else None

    def _ctx(self, name: str, layer: int | None) -> HookContext:
        st = self.state
        return HookContext(name, layer, max(st.step, 0), st.positions, st.is_prefill, st.pad_offsets, st.attention_mask)

    def _apply(self, name: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        ctx = None
        for fn in self._edits.get(name, ()):
            ctx = ctx or self._ctx(name, layer)
            new = fn(t, ctx)
            if new is not None:
                if not isinstance(new, torch.Tensor) or new.shape != t.shape:
                    raise ValueError(
                        f"edit at {name} must return a tensor of shape {tuple(t.shape)} or None, got "
                        f"{getattr(new, 'shape', type(new).__name__)}"
                    )
                t = new
        if name in self._cache_names:
            c = t.detach() if self.detach else t
            if self.offload is not None:
                c = c.to(self.offload)
            self.cache.setdefault(name, []).append(c)
        if name in self._grad_names and t.requires_grad:
            store = self.grads.setdefault(name, [])
            t.register_hook(lambda g: store.append(g.detach()))
        if name == self._stop_after:
            raise StopForward(name)
        return t

    def _out_hook(self, name: str, layer: int | None):
        def hook(module, args, output):
            if isinstance(output, tuple):
                new = self._apply(name, layer, output[0])
                return (new, *output[1:]) if new is not output[0] else None
            if hasattr(output, "last_hidden_state") and not isinstance(output, torch.Tensor):
                new = self._apply(name, layer, output.last_hidden_state)
                output.last_hidden_state = new
                return output
            new = self._apply(name, layer, output)
            return new if new is not output else None

        return hook

    def _in_hook(self, name: str, layer: int | None):
        def hook(module, args, kwargs):
            if args:
                new = self._apply(name, layer, args[0])
                if new is not args[0]:
                    return (new, *args[1:]), kwargs
                return None
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = self._apply(name, layer, kwargs[key])
            if new is not kwargs[key]:
                kwargs = {**kwargs, key: new}
                return args, kwargs
            return None

        return hook


# -- ready-made edit functions ----------------------------------------------------------------------
def _position_mask(positions: Any, ctx: HookContext, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """[B, T] boolean selection from absolute positions, or None for all."""
    if positions is None:
        return None
    if callable(positions):
        sel = positions(ctx)
        return sel.to(device=device, dtype=torch.bool)
    pos = ctx.positions
    if pos is None:
        pos = torch.arange(shape[1], device=device).expand(shape[0], shape[1])
    pos = pos.to(device)
    if isinstance(positions, int):
        positions = [positions]
    wanted = torch.as_tensor(list(positions), device=device)
    return torch.isin(pos, wanted)


def steer_fn(
    vector: torch.Tensor,
    alpha: float = 1.0,
    positions: Any = None,
    renorm: bool = False,
) -> HookFn:
    """Edit function adding ``alpha * vector`` to the hidden states (GrAInS-style steering, MOD-6).

    With ``renorm=True``: h ← (h + αv)·‖h‖/‖h + αv‖ (norm-preserving, GrAInS).

    Args:
        vector: ``[d]`` (or broadcastable to the activation).
        alpha: strength; 0 leaves the activation untouched.
        positions: None (all), absolute position(s) (int or list), or ``fn(ctx) -> [B, T] bool``.
        renorm: keep each token's norm.
    """
    v = torch.as_tensor(vector)
    if not torch.isfinite(v).all():
        raise ValueError("steering vector contains NaN or inf")

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        if alpha == 0:
            return None
        new = h + alpha * v.to(device=h.device, dtype=h.dtype)
        if renorm:
            new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return new if sel is None else torch.where(sel[..., None], new, h)

    return fn


def patch_fn(value: torch.Tensor, positions: Any = None) -> HookFn:
    """Edit function replacing the activation by ``value`` (e.g. from another run's cache)."""

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        v = value.to(device=h.device, dtype=h.dtype).expand_as(h)
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return v.clone() if sel is None else torch.where(sel[..., None], v, h)

    return fn


def ablate_fn(kind: str = "zero", positions: Any = None, value: torch.Tensor | None = None) -> HookFn:
    """Edit function for ablation: ``'zero'``, ``'mean'`` (mean over this call's real tokens, or ``value``
    if given, e.g. a dataset mean)."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"ablation kind must be 'zero' or 'mean' (resample = patch_fn with another run), got {kind!r}")

    def fn(h: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if kind == "zero":
            rep = torch.zeros_like(h)
        elif value is not None:
            rep = value.to(h).expand_as(h)
        else:
            if ctx.attention_mask is not None and ctx.attention_mask.shape[:2] == h.shape[:2]:
                m = ctx.attention_mask.to(h.dtype)[..., None]
                mean = (h * m).sum((0, 1)) / m.sum((0, 1)).clamp_min(1)
            else:
                mean = h.mean(dim=(0, 1))
            rep = mean.expand_as(h)
        sel = _position_mask(positions, ctx, h.shape, h.device)
        return rep if sel is None else torch.where(sel[..., None], rep, h)

    return fn
