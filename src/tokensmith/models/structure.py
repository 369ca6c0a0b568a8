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

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

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

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary (module paths and numbers, no modules)."""
        return {
            "layers": self.layers_path,
            "num_layers": self.num_layers,
            "embed": self.embed_path,
            "lm_head": self.lm_head_path,
            "final_norm": self.final_norm_path,
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


def _cfg(config: Any, *names: str) -> Any:
    for cfg in (config, _text_config(config)):
        for n in names:
            v = getattr(cfg, n, None)
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
        lm_head = get_path(model, spec.lm_head)
        found_by["lm_head"] = "AdapterSpec"
    else:
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found_by["lm_head"] = "get_output_embeddings()"
    lm_head_path = _module_path(model, lm_head)

    final_norm, final_norm_path = _find_final_norm(model, layers_path, spec.final_norm)
    found_by["final_norm"] = "AdapterSpec" if spec.final_norm else "last norm after the layer stack"

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

    hidden = int(embed.weight.shape[1])
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

    is_causal = True
    if config is not None and (getattr(config, "is_decoder", None) is False) and not _is_causal_lm(model):
        is_causal = False

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
    )


def _is_causal_lm(model: nn.Module) -> bool:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    name = type(model).__name__
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in [*archs, name])


def measure_embed_scale(embed: nn.Module) -> float:
    """Ratio between the embedding module's output and the raw weight row (e.g. Gemma's sqrt(d))."""
    w = embed.weight
    norms = w.detach().float().norm(dim=-1)
    idx = int(torch.argmax(norms).item())
    ids = torch.tensor([[idx]], device=w.device)
    with torch.no_grad():
        out = embed(ids)[0, 0].float()
    row = w[idx].detach().float()
    return float((out @ row) / (row @ row).clamp_min(1e-30))


def spec_fields() -> list[str]:
    return [f.name for f in fields(AdapterSpec)]
