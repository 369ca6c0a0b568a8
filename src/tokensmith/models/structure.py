"""Structure discovery: find the parts of a transformers model without a per-architecture table.

Lookup order (METHODS.md MOD-1):

1. transformers' own metadata: the decoder-layer class named in ``_can_record_outputs["hidden_states"]``
   or ``_no_split_modules``, and ``GradientCheckpointingLayer`` subclasses;
2. the ``nn.ModuleList`` whose length equals ``config.num_hidden_layers`` (also under ``text_config``);
3. name heuristics for the parts inside a layer (``self_attn``/``attn``/``attention``, ``mlp``/...);
4. an :class:`AdapterSpec` override given by the user, which always wins.

Nothing here rewrites weights. A part that cannot be found is recorded as missing; the adapter raises a
clear error only when a method actually needs it (and :meth:`ModelAdapter.capabilities` reports it).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from tokensmith.models.offload import execution_device, is_offloaded

__all__ = ["AdapterSpec", "ModelStructure", "discover", "StructureError"]


class StructureError(ValueError):
    """Raised when the model's structure cannot be discovered; the message says what to override."""


@dataclass
class AdapterSpec:
    """User override for structure discovery. Paths are dotted attribute paths.

    ``layers``, ``embed``, ``final_norm`` and ``lm_head`` are relative to the model given to the
    adapter; ``attn``, ``mlp``, ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and ``mlp_out`` are relative
    to one decoder layer.

    Examples:
        >>> from tokensmith.models import AdapterSpec
        >>> spec = AdapterSpec(layers="model.layers", final_norm="model.norm")
        >>> spec.layers
        'model.layers'
    """

    layers: str | None = None
    embed: str | None = None
    final_norm: str | None = None
    lm_head: str | None = None
    attn: str | None = None
    mlp: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    mlp_out: str | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    is_causal: bool | None = None
    """Force the causality decision (see :func:`decide_causal`); ``None`` = discover it."""


@dataclass
class ModelStructure:
    """What discovery found. Module references plus the numbers methods need."""

    layers: nn.ModuleList
    layers_path: str
    embed: nn.Module
    embed_path: str
    lm_head: nn.Module | None
    lm_head_path: str | None
    final_norm: nn.Module | None
    final_norm_path: str | None
    attn: list[nn.Module | None]
    attn_name: str | None
    mlp: list[nn.Module | None]
    mlp_name: str | None
    q_proj: list[nn.Module | None]
    k_proj: list[nn.Module | None]
    v_proj: list[nn.Module | None]
    o_proj: list[nn.Module | None]
    mlp_out: list[nn.Module | None]
    num_layers: int
    hidden_size: int
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int
    tied: bool
    embed_scale: float = 1.0
    is_encoder_decoder: bool = False
    is_causal: bool = True
    layer_returns_tuple: bool = False
    found_by: dict[str, str] = field(default_factory=dict)
    head_modules: list[nn.Module] = field(default_factory=list)
    head_paths: list[str] = field(default_factory=list)
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    layer_output_shape: tuple[int, ...] | None = None
    layer_output_type: str | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary (module paths and numbers, no modules)."""
        return {
            "layers": self.layers_path,
            "num_layers": self.num_layers,
            "embed": self.embed_path,
            "lm_head": self.lm_head_path,
            "final_norm": self.final_norm_path,
            "head": list(self.head_paths),
            "logit_scale": self.logit_scale,
            "logit_softcap": self.logit_softcap,
            "attn": self.attn_name,
            "mlp": self.mlp_name,
            "q_proj": _first_name(self.q_proj, self.layers[0] if self.num_layers else None),
            "o_proj": _first_name(self.o_proj, self.layers[0] if self.num_layers else None),
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied,
            "embed_scale": self.embed_scale,
            "is_causal": self.is_causal,
            "found_by": dict(self.found_by),
        }


def _first_name(mods: list[nn.Module | None], layer: nn.Module | None) -> str | None:
    if not mods or mods[0] is None or layer is None:
        return None
    for name, m in layer.named_modules():
        if m is mods[0]:
            return name
    return None


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _text_config(config: Any) -> Any:
    for attr in ("text_config", "decoder"):
        sub = getattr(config, attr, None)
        if sub is not None and getattr(sub, "num_hidden_layers", None):
            return sub
    return config


def safe_getattr(obj: Any, name: str, default: Any = None) -> Any:
    """``getattr`` that treats any error as "absent": some configs raise on attributes that vary per layer
    (Gemma-4's ``head_dim`` raises ``AmbiguousGlobalPerLayerAttributeError``, not an AttributeError)."""
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 - a property that refuses a global value
        return default


def _cfg(config: Any, *names: str) -> Any:
    for cfg in (config, _text_config(config)):
        for n in names:
            v = safe_getattr(cfg, n)
            if v is not None:
                return v
    return None


def _layer_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    rec = getattr(model, "_can_record_outputs", None) or {}
    hs = rec.get("hidden_states") if isinstance(rec, dict) else None
    if hs is not None:
        targets = hs if isinstance(hs, (list, tuple)) else [hs]
        for t in targets:
            cls = getattr(t, "target_class", t)
            if isinstance(cls, type):
                names.add(cls.__name__)
    for n in getattr(model, "_no_split_modules", None) or []:
        names.add(n)
    return names


def _find_layers(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList, str]:
    metadata = _layer_class_names(model)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except Exception:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    candidates: list[tuple[int, str, nn.ModuleList, str]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        first = mod[0]
        score, how = 0, "length"
        if type(first).__name__ in metadata:
            score, how = 3, "transformers metadata (_can_record_outputs/_no_split_modules)"
        elif GradientCheckpointingLayer and isinstance(first, GradientCheckpointingLayer):
            score, how = 2, "GradientCheckpointingLayer"
        if n_layers is not None and len(mod) == n_layers:
            score += 1
        elif score == 0:
            continue
        if "encoder" in name.split(".") and "decoder" not in name:
            score -= 0.5  # prefer the decoder stack of encoder-decoder models
        candidates.append((score, name, mod, how))
    if not candidates:
        raise StructureError(
            "could not find the decoder layers: no nn.ModuleList matches transformers' metadata or "
            "config.num_hidden_layers. Pass AdapterSpec(layers='path.to.layers') to ModelAdapter(..., spec=...)."
        )
    candidates.sort(key=lambda c: (-c[0], len(c[1])))
    _, name, mod, how = candidates[0]
    return name, mod, how


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "SelfAttention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "ff")
_Q_NAMES = ("q_proj", "query", "q", "wq")
_K_NAMES = ("k_proj", "key", "k", "wk")
_V_NAMES = ("v_proj", "value", "v", "wv")
_O_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "o", "wo")
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "wo", "fc_out")


def _child_by_names(parent: nn.Module, names: tuple[str, ...], override: str | None) -> tuple[nn.Module | None, str | None]:
    if override:
        return get_path(parent, override), override
    for n in names:
        sub = getattr(parent, n, None)
        if isinstance(sub, nn.Module):
            return sub, n
    return None, None


def _find_attn(layer: nn.Module, override: str | None) -> tuple[nn.Module | None, str | None]:
    mod, name = _child_by_names(layer, _ATTN_NAMES, override)
    if mod is not None:
        # BERT-style wrappers: BertAttention(self=BertSelfAttention, output=...); the wrapper's output is
        # the attention block output, which is what `attn.out` means.
        return mod, name
    for n, sub in layer.named_children():
        if "attention" in type(sub).__name__.lower():
            return sub, n
    return None, None


def _find_proj(attn: nn.Module | None, names: tuple[str, ...], override: str | None, layer: nn.Module) -> nn.Module | None:
    if override:
        return get_path(layer, override)
    if attn is None:
        return None
    for scope in (attn, getattr(attn, "self", None)):
        if scope is None:
            continue
        for n in names:
            sub = getattr(scope, n, None)
            if isinstance(sub, nn.Linear) or (isinstance(sub, nn.Module) and hasattr(sub, "weight")):
                return sub
    # BERT: attention.output.dense
    out = getattr(attn, "output", None)
    if out is not None and names is _O_NAMES:
        dense = getattr(out, "dense", None)
        if isinstance(dense, nn.Module):
            return dense
    return None


def _find_final_norm(model: nn.Module, layers_path: str, override: str | None) -> tuple[nn.Module | None, str | None]:
    if override:
        return get_path(model, override), override
    owner_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    owner = get_path(model, owner_path) if owner_path else model
    layers_attr = layers_path.rsplit(".", 1)[-1]
    found = None
    # the last norm-like direct child of the module that owns the layer list (registration order)
    for n, sub in owner.named_children():
        if n == layers_attr:
            found = None  # only norms registered after the layers count
            continue
        if "norm" in type(sub).__name__.lower() or n in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            found = (sub, f"{owner_path}.{n}" if owner_path else n)
    if found is None:
        return None, None
    return found


_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# config fields that hold a scalar multiplying (or dividing) the logits; the fitted scale is matched against them
_LOGIT_SCALE_FIELDS = (
    "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logit_multiplier",
    "output_logits_scale", "final_logit_scale",
)
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")


@dataclass
class HeadTrace:
    """What one traced forward says about the path from the last layer's output to the logits.

    Attributes:
        chain: ``(path, module)`` pairs run in order on the last layer's output to produce the logits: the
            outermost modules that start after the last decoder layer finished and end with the call of
            the output embeddings (``[final_norm, lm_head]`` for a causal LM, the whole prediction head of a
            masked LM, ``[lm_head]`` for a post-LN decoder).
        layer_output: the last decoder layer's first output (``None`` when it returned no tensor).
        layer_output_type: type name of that layer's output (``Tensor``, ``tuple``, ``list``, ...).
        head_output: the output of the last module of ``chain``.
        logits: the model's returned logits.
    """

    chain: list[tuple[str, nn.Module]]
    layer_output: torch.Tensor | None
    layer_output_type: str
    head_output: torch.Tensor | None
    logits: torch.Tensor | None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    for attr in ("last_hidden_state", "hidden_states", "logits"):
        v = getattr(x, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    return None


def _input_device(emb: nn.Module) -> torch.device:
    """Where input ids go: the embedding weight's device, or, when accelerate offloaded the embedding (its
    weight is a meta tensor), the device its hook computes on (:mod:`tokensmith.models.offload`)."""
    w = emb.weight
    return execution_device(emb, "") if is_offloaded(w) else w.device


def is_norm_module(mod: nn.Module) -> bool:
    """A normalisation layer: ``nn.LayerNorm``/``nn.GroupNorm``/``nn.RMSNorm`` or a class named ``*Norm*``."""
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or "norm" in type(
        mod
    ).__name__.lower()


def trace_head(model: nn.Module, layers: nn.ModuleList, lm_head: nn.Module | None, n_tokens: int = 6) -> HeadTrace:
    """Run one forward with a pre/post hook on every module and read the path from the last layer to the logits.

    Execution order, not registration order, decides: the final norm of OPT is registered before the
    layers, BART's ``layernorm_embedding`` after them but runs before, Gemma-4's per-layer projection norm
    runs on the embeddings. The chain is the list of outermost module calls that start after the last
    decoder layer returned and finish no later than the outermost call that contains the output-embedding
    call, keeping only calls whose first input and output are ``[B, T, ...]`` (a pooler's ``[B, d]`` is not
    on the token path).

    Raises:
        RuntimeError: when the forward fails or the layer stack / output embeddings never run.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = _input_device(emb) if isinstance(weight, torch.Tensor) else torch.device("cpu")
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 100
    ids = torch.linspace(1, max(vocab - 2, 2), n_tokens).long().clamp_max(vocab - 1).unsqueeze(0).to(device)
    B, T = ids.shape
    layer_ids = {id(m) for m in layers}
    events: list[list[Any]] = []  # [path, module, start, end, in_shape, out_shape, output]
    open_calls: dict[int, list[list[Any]]] = {}
    clock = [0]
    handles = []

    def pre(path: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            clock[0] += 1
            x = _first_tensor(args) if args else None
            if x is None:
                x = _first_tensor(kwargs.get("hidden_states", kwargs.get("input", list(kwargs.values()))))
            ev = [path, mod, clock[0], None, tuple(x.shape) if x is not None else None, None, None]
            events.append(ev)
            open_calls.setdefault(id(mod), []).append(ev)

        return hook

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        clock[0] += 1
        stack = open_calls.get(id(mod))
        if not stack:
            return
        ev = stack.pop()
        ev[3] = clock[0]
        t = _first_tensor(output)
        ev[5] = tuple(t.shape) if t is not None else None
        ev[6] = output

    try:
        for path, mod in model.named_modules():
            if mod is model:
                continue
            handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
        params = set(inspect.signature(model.forward).parameters)
        kw: dict[str, Any] = {"input_ids": ids}
        if "use_cache" in params:
            kw["use_cache"] = False
        if "decoder_input_ids" in params:
            kw["decoder_input_ids"] = ids
        with torch.no_grad():
            out = model(**kw)
    finally:
        for h in handles:
            h.remove()
    layer_calls = [e for e in events if id(e[1]) in layer_ids and e[3] is not None]
    if not layer_calls:
        raise RuntimeError("the layer stack never ran")
    last_layer = max(layer_calls, key=lambda e: e[3])
    anchor = last_layer[3]
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        logits = _first_tensor(out) if lm_head is not None else None
    head_calls = [e for e in events if lm_head is not None and e[1] is lm_head and e[2] > anchor and e[3] is not None]
    chain: list[tuple[str, nn.Module]] = []
    head_output = None
    if head_calls:
        hc = head_calls[-1]
        outer = min((e for e in events if e[2] > anchor and e[3] is not None and e[2] <= hc[2] and e[3] >= hc[3]),
                    key=lambda e: e[2])
        end = outer[3]
        cands = [e for e in events if e[3] is not None and e[2] > anchor and e[3] <= end]
        top = [e for e in cands if not any(o is not e and o[2] < e[2] and o[3] > e[3] for o in cands)]
        for e in sorted(top, key=lambda e: e[2]):
            if e[4] is None or e[5] is None or e[4][:2] != (B, T) or e[5][:2] != (B, T):
                continue
            chain.append((e[0], e[1]))
            head_output = _first_tensor(e[6])
    return HeadTrace(
        chain=chain,
        layer_output=_first_tensor(last_layer[6]),
        layer_output_type=type(last_layer[6]).__name__,
        head_output=head_output,
        logits=logits,
    )


def _replay_head(h: torch.Tensor | None, modules: list[nn.Module]) -> torch.Tensor | None:
    """Apply ``modules`` in order to ``h`` (no grad); None when any step fails or returns no tensor."""
    if h is None:
        return None
    try:
        with torch.no_grad():
            for m in modules:
                h = _first_tensor(m(h))
                if h is None:
                    return None
    except Exception:  # noqa: BLE001 - a module that needs more than one input: no replay
        return None
    return h


def fit_logit_transform(head_output: torch.Tensor, logits: torch.Tensor, config: Any) -> tuple[float, float | None, str]:
    """Scalars applied to the head output ``z`` to give the model's logits: ``logits = c·tanh(s·z / c)``.

    ``c`` is the config's final soft-capping (``final_logit_softcapping``, ``logits_soft_cap``) or none. ``s``
    is 1 or a config field (``logit_scale``, ``1/logits_scaling``, ``output_multiplier``, ...) when that
    reproduces the logits to 1e-4 relative; otherwise it is fitted by least squares on
    ``atanh(logits / c)·c ≈ s·z`` over the entries the cap does not saturate. Returns ``(s, c, how)``;
    load-time validation checks the result.
    """
    z = head_output.detach().double().reshape(-1)
    y = logits.detach().double().reshape(-1)
    cap = _cfg(config, *_SOFTCAP_FIELDS) if config is not None else None
    cap = float(cap) if cap else None

    def apply(sc: float) -> torch.Tensor:
        x = z * sc
        return torch.tanh(x / cap) * cap if cap is not None else x

    ymax = float(y.abs().max()) or 1.0
    candidates: list[tuple[float, str]] = [(1.0, "none")]
    for name in _LOGIT_SCALE_FIELDS:
        v = _cfg(config, name) if config is not None else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
            candidates += [(float(v), f"config.{name}"), (1.0 / float(v), f"1 / config.{name}")]
    for sc, how in candidates:
        if float((apply(sc) - y).abs().max()) <= 1e-4 * ymax:
            return sc, cap, how
    keep = torch.ones_like(y, dtype=torch.bool)
    if cap is not None:
        keep = (y / cap).abs() < 0.9  # atanh is ill-conditioned where the cap saturates
        y = torch.atanh((y / cap).clamp(-1 + 1e-12, 1 - 1e-12)) * cap
    zz = float(z[keep] @ z[keep])
    sc = float(z[keep] @ y[keep]) / zz if zz > 0 else 1.0
    return sc, cap, "fitted (no config field matches)"


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for n, m in model.named_modules():
        if m is target:
            return n
    return None


def discover(model: nn.Module, spec: AdapterSpec | None = None) -> ModelStructure:
    """Discover layers, embeddings, head, norms and attention geometry of ``model``.

    Args:
        model: a transformers ``PreTrainedModel`` (causal LM, masked LM or encoder).
        spec: optional :class:`AdapterSpec` whose non-``None`` fields override discovery.

    Returns:
        A :class:`ModelStructure`.

    Raises:
        StructureError: when the layer stack or the input embeddings cannot be found. The message names
            the missing part and the ``AdapterSpec`` field to set.

    Examples:
        >>> import tokensmith as ts
        >>> s = ts.tiny("llama").structure
        >>> (s.layers_path, s.num_layers, s.num_kv_heads)
        ('model.layers', 2, 2)
    """
    spec = spec or AdapterSpec()
    config = getattr(model, "config", None)
    found_by: dict[str, str] = {}
    n_layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers") if config is not None else None

    if spec.layers:
        try:
            layers = get_path(model, spec.layers)
        except (AttributeError, IndexError) as e:
            raise StructureError(f"AdapterSpec.layers={spec.layers!r} does not exist on the model: {e}") from e
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
            raise StructureError(
                f"AdapterSpec.layers={spec.layers!r} is a {type(layers).__name__}, not a non-empty nn.ModuleList of "
                "decoder layers; point it at the layer stack (e.g. 'model.layers')"
            )
        layers_path, how = spec.layers, "AdapterSpec"
    else:
        layers_path, layers, how = _find_layers(model, n_layers)
    found_by["layers"] = how

    if spec.embed:
        try:
            embed = get_path(model, spec.embed)
        except (AttributeError, IndexError) as e:
            raise StructureError(f"AdapterSpec.embed={spec.embed!r} does not exist on the model: {e}") from e
        found_by["embed"] = "AdapterSpec"
    else:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found_by["embed"] = "get_input_embeddings()"
    if embed is None or not hasattr(embed, "weight"):
        raise StructureError(
            "could not find the input embedding matrix (get_input_embeddings() returned nothing usable). "
            "Pass AdapterSpec(embed='path.to.embed_tokens')."
        )
    embed_path = _module_path(model, embed) or (spec.embed or "?")

    if spec.lm_head:
        try:
            lm_head = get_path(model, spec.lm_head)
        except (AttributeError, IndexError) as e:
            raise StructureError(f"AdapterSpec.lm_head={spec.lm_head!r} does not exist on the model: {e}") from e
        if not isinstance(lm_head, nn.Module):
            raise StructureError(f"AdapterSpec.lm_head={spec.lm_head!r} is a {type(lm_head).__name__}, not a module")
        found_by["lm_head"] = "AdapterSpec"
    else:
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found_by["lm_head"] = "get_output_embeddings()"
    lm_head_path = _module_path(model, lm_head)

    # the path from the last layer's output to the logits, read from one traced forward (execution order)
    trace: HeadTrace | None = None
    try:
        trace = trace_head(model, layers, lm_head)
    except Exception as e:  # noqa: BLE001 - any model error: fall back to registration order, validation checks
        found_by["head_trace"] = f"failed ({type(e).__name__}: {str(e)[:120]})"
    chain = trace.chain if trace is not None else []
    chain_norm = chain[0] if len(chain) >= 2 and is_norm_module(chain[0][1]) else None
    if spec.final_norm:
        try:
            final_norm, final_norm_path = get_path(model, spec.final_norm), spec.final_norm
        except (AttributeError, IndexError) as e:
            raise StructureError(f"AdapterSpec.final_norm={spec.final_norm!r} does not exist on the model: {e}") from e
        found_by["final_norm"] = "AdapterSpec"
    elif trace is not None and chain:
        final_norm, final_norm_path = (chain_norm[1], chain_norm[0]) if chain_norm else (None, None)
        found_by["final_norm"] = "traced forward: the norm run on the last layer's output before the head"
    else:
        final_norm, final_norm_path = _find_final_norm(model, layers_path, None)
        found_by["final_norm"] = "last norm registered after the layer stack"
    head_chain = chain[1:] if chain_norm else list(chain)
    if lm_head is not None and not any(m is lm_head or any(x is lm_head for x in m.modules()) for _, m in head_chain):
        head_chain = [(lm_head_path or spec.lm_head or "lm_head", lm_head)]
        found_by["head"] = "the output embeddings alone"
    elif head_chain:
        found_by["head"] = "traced forward: modules between the final norm and the logits"
    logit_scale, logit_softcap = 1.0, None
    if (
        trace is not None
        and head_chain
        and chain
        and head_chain[-1][1] is chain[-1][1]
        and trace.head_output is not None
        and trace.logits is not None
        and trace.head_output.shape == trace.logits.shape
    ):
        # fit against what unembed will compute (norm + head chain on the last layer's output), so a scale
        # applied between modules (T5's d_model**-0.5, MiniCPM's 1/(d/d_base) before lm_head) is found too
        z = _replay_head(trace.layer_output, [m for m in (chain_norm[1] if chain_norm else None,) if m is not None]
                         + [m for _, m in head_chain])
        if z is None or z.shape != trace.logits.shape or model.training:
            z = trace.head_output
        logit_scale, logit_softcap, how = fit_logit_transform(z, trace.logits, config)
        found_by["logit_scale"] = how

    attn, mlp, q, k, v, o, mo = [], [], [], [], [], [], []
    attn_name = mlp_name = None
    for layer in layers:
        a, an = _find_attn(layer, spec.attn)
        m, mn = _child_by_names(layer, _MLP_NAMES, spec.mlp)
        attn.append(a)
        mlp.append(m)
        attn_name = attn_name or an
        mlp_name = mlp_name or mn
        q.append(_find_proj(a, _Q_NAMES, spec.q_proj, layer))
        k.append(_find_proj(a, _K_NAMES, spec.k_proj, layer))
        v.append(_find_proj(a, _V_NAMES, spec.v_proj, layer))
        o.append(_find_proj(a, _O_NAMES, spec.o_proj, layer))
        if spec.mlp_out:
            mo.append(get_path(layer, spec.mlp_out))
        else:
            mo.append(_child_by_names(m, _MLP_OUT_NAMES, None)[0] if m is not None else None)

    out_shape = tuple(trace.layer_output.shape) if trace is not None and trace.layer_output is not None else None
    if out_shape is not None and len(out_shape) == 3:
        hidden = int(out_shape[-1])  # the residual width (factorised embeddings are narrower, e.g. RemBERT)
    else:
        hidden = int(_cfg(config, "hidden_size", "d_model", "n_embd") or embed.weight.shape[1])
    num_heads = spec.num_heads or _cfg(config, "num_attention_heads", "n_head", "num_heads")
    num_kv = spec.num_kv_heads or _cfg(config, "num_key_value_heads", "num_kv_heads", "multi_query_group_num")
    if num_kv is None and num_heads is not None:
        num_kv = num_heads
    head_dim = spec.head_dim or _cfg(config, "head_dim")
    if head_dim is None and num_heads:
        head_dim = hidden // int(num_heads)

    tied = False
    if lm_head is not None and getattr(lm_head, "weight", None) is not None:
        tied = lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr()
        if "meta" in (lm_head.weight.device.type, embed.weight.device.type):
            # accelerate offloaded one of them (device_map "cpu"/"disk"): a meta tensor has no storage (its
            # data_ptr is 0, equal for any two), so the pointers say nothing; the config's tying flag does.
            text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
            tied = bool(getattr(text_cfg, "tie_word_embeddings", False)) and lm_head.weight.shape == embed.weight.shape

    measured = None
    if spec.is_causal is None and not bool(getattr(config, "is_encoder_decoder", False)):
        measured = measure_causal(model, layers)
    is_causal, found_by["is_causal"] = decide_causal(model, layers, spec.is_causal, measured)

    return ModelStructure(
        layers=layers,
        layers_path=layers_path,
        embed=embed,
        embed_path=embed_path,
        lm_head=lm_head,
        lm_head_path=lm_head_path,
        final_norm=final_norm,
        final_norm_path=final_norm_path,
        attn=attn,
        attn_name=attn_name,
        mlp=mlp,
        mlp_name=mlp_name,
        q_proj=q,
        k_proj=k,
        v_proj=v,
        o_proj=o,
        mlp_out=mo,
        num_layers=len(layers),
        hidden_size=hidden,
        num_heads=int(num_heads) if num_heads else None,
        num_kv_heads=int(num_kv) if num_kv else None,
        head_dim=int(head_dim) if head_dim else None,
        vocab_size=int(embed.weight.shape[0]),
        tied=bool(tied),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        is_causal=is_causal,
        found_by=found_by,
        head_modules=[m for _, m in head_chain],
        head_paths=[n for n, _ in head_chain],
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        layer_output_shape=out_shape,
        layer_output_type=trace.layer_output_type if trace is not None else None,
    )


def _layer_causal_flag(layer: nn.Module) -> bool | None:
    """The ``is_causal`` attribute of the layer's self-attention: the first module (in registration order,
    so self-attention before cross-attention) that carries a boolean ``is_causal``; None when none does."""
    for mod in layer.modules():
        flag = getattr(mod, "is_causal", None)
        if isinstance(flag, bool):
            return flag
    return None


def _auto_class_names(mapping_name: str) -> set[str]:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers always ships it
        return set()
    names: set[str] = set()
    for v in getattr(modeling_auto, mapping_name, {}).values():
        names.update([v] if isinstance(v, str) else list(v))
    return names


def measure_causal(model: nn.Module, layers: Sequence[nn.Module], n_tokens: int = 6) -> bool | None:
    """Whether the last layer's outputs at positions ``< T-1`` stay the same when the last token changes
    (max relative change ≤ 1e-6): True (causal), False (bidirectional), None (the forward failed)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if model.training or not isinstance(weight, torch.Tensor) or not len(layers):
        return None  # dropout would make every model look bidirectional
    vocab = int(weight.shape[0])
    ids = torch.linspace(1, max(vocab - 2, 2), n_tokens).long().clamp_max(vocab - 1).unsqueeze(0).to(_input_device(emb))
    alt = ids.clone()
    alt[0, -1] = ids[0, 1]
    outs: list[torch.Tensor] = []
    handle = layers[-1].register_forward_hook(lambda m, a, o: outs.append(_first_tensor(o)))
    params = set(inspect.signature(model.forward).parameters)
    kw: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    try:
        with torch.no_grad():
            for x in (ids, alt):
                model(input_ids=x, **kw)
    except Exception:  # noqa: BLE001 - cannot measure
        return None
    finally:
        handle.remove()
    if len(outs) != 2 or any(o is None or o.dim() != 3 or o.shape[:2] != ids.shape for o in outs):
        return None
    a, b = outs[0][:, :-1].double(), outs[1][:, :-1].double()
    return bool((a - b).abs().max() <= 1e-6 * a.abs().max().clamp_min(1e-30))


def decide_causal(
    model: nn.Module,
    layers: Sequence[nn.Module] | None = None,
    override: bool | None = None,
    measured: bool | None = None,
) -> tuple[bool, str]:
    """Whether ``model`` predicts token t from tokens < t only (a causal LM), and why.

    The adapter scores ``log p(x_t | x_<t)`` only for causal models, so a wrong "yes" silently scores a
    bidirectional encoder as if it were a language model. The decision never defaults to causal; the
    first rule that applies wins:

    1. ``AdapterSpec(is_causal=...)`` (user override);
    2. encoder-decoder configs (``config.is_encoder_decoder``): ``False`` — the adapter's causal primitives
       operate on decoder-only stacks;
    3. the self-attention modules of the layer stack: transformers marks each with a boolean
       ``is_causal`` (``True`` in decoders, ``False`` in BERT-style encoders, and set from
       ``config.is_decoder`` in the BERT family); causal iff every layer that has one says ``True``;
    4. an explicit boolean config flag ``is_decoder`` or ``causal`` (XLM) when the attention modules carry
       no flag;
    5. the model class is registered as a causal LM (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and not as a
       masked LM (state-space and recurrent LMs: Mamba, RWKV, ...);
    6. otherwise ``False`` (unknown encoders such as DeBERTa or MPNet are not scored causally).

    The measured behaviour (``measured``, from :func:`measure_causal`) then corrects rules 3-6 in the safe
    direction and for registered causal LMs: a model that rules 3-6 call causal but whose earlier outputs
    change with a later token is bidirectional (ALBERT-style configs); a class registered as a causal LM
    that the rules call bidirectional but that measures causal is causal (BigBird-Pegasus's decoder marks
    its self-attention ``is_causal=False`` and applies a causal mask itself).

    Returns:
        ``(is_causal, reason)``; the reason is recorded in ``structure.found_by["is_causal"]``.
    """
    if override is not None:
        return bool(override), "AdapterSpec(is_causal=...)"
    config = getattr(model, "config", None)
    if bool(getattr(config, "is_encoder_decoder", False)):
        return False, "encoder-decoder config"
    val, why = _causal_by_rules(model, layers)
    cls = type(model).__name__
    if measured is False and val:
        return False, f"{why}, but a later token changes earlier outputs (measured): bidirectional"
    if measured is True and not val and _registered_causal_lm(cls):
        return True, f"{why}, but {cls} is a registered causal LM and measures causal"
    return val, why


def _registered_causal_lm(cls: str) -> bool:
    return cls in _auto_class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") and cls not in _auto_class_names(
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES"
    )


def _causal_by_rules(model: nn.Module, layers: Sequence[nn.Module] | None) -> tuple[bool, str]:
    config = getattr(model, "config", None)
    flags = [f for f in (_layer_causal_flag(layer) for layer in (layers or [])) if f is not None]
    if flags:
        val = all(flags)
        return val, f"attention modules' is_causal={val}" if len(set(flags)) == 1 else "attention modules disagree"
    for name in ("is_decoder", "causal"):
        flag = getattr(config, name, None) if config is not None else None
        if isinstance(flag, bool):
            return flag, f"config.{name}={flag}"
    cls = type(model).__name__
    if _registered_causal_lm(cls):
        return True, f"{cls} is registered as a causal LM"
    return False, "no evidence of causal attention (not registered as a causal LM, no is_causal flags)"


def measure_embed_scale(embed: nn.Module, weight: torch.Tensor | None = None) -> float:
    """Ratio between the embedding module's output and the raw weight row (e.g. Gemma's sqrt(d)).

    ``weight`` is the embedding matrix when ``embed.weight`` cannot be read (accelerate offloaded it to the
    meta device; see :mod:`tokensmith.models.offload`); ``embed`` itself is still called (its hook loads it).
    """
    w = embed.weight if weight is None else weight
    norms = w.detach().float().norm(dim=-1)
    idx = int(torch.argmax(norms).item())
    ids = torch.tensor([[idx]], device=w.device)
    with torch.no_grad():
        out = embed(ids)
    if not isinstance(out, torch.Tensor):
        raise StructureError(
            f"the input embedding module ({type(embed).__name__}) returns a {type(out).__name__}, not a tensor "
            "(e.g. a quantized embedding that also returns its scale): the embedding path (embed, inputs_embeds, "
            "one-hot gradients) cannot use it. Not supported; pass AdapterSpec(embed='path.to.nn.Embedding') if "
            "the model has a plain embedding table"
        )
    out = out[0, 0].float()
    row = w[idx].detach().float()
    return float((out @ row) / (row @ row).clamp_min(1e-30))


def spec_fields() -> list[str]:
    return [f.name for f in fields(AdapterSpec)]
