"""The model adapter: one object every tokensmith subpackage stands on.

``ModelAdapter(model, tokenizer)`` wraps any transformers model (causal LM, masked LM / encoder) without
rewriting weights. It discovers the structure (see :mod:`tokensmith.models.structure`), validates it once,
and provides the primitives of METHODS.md section 1: span-aware encoding, per-token log-probs with logits
only where needed, chunked KL, the embedding / one-hot path, hooks and steering, a scoped attention probe,
generation with hooks, and micro-batching with OOM back-off.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokensmith.models import logprobs as lp
from tokensmith.models.attention import AttentionProbe
from tokensmith.models.batching import BatchCall, MicroBatcher
from tokensmith.models.encoding import Encoded, EncodedBatch, encode, pad_batch, reencode
from tokensmith.models.hooks import HookSession, StopForward, hook_names, steer_fn
from tokensmith.models.offload import execution_device, is_offloaded, offloaded_value
from tokensmith.models.padding import (
    PositionScheme,
    has_left_padding,
    logical_positions,
    padding_error,
    probe_position_scheme,
)
from tokensmith.models.positions import PositionLimit, discover_position_limit
from tokensmith.models.structure import (
    AdapterSpec,
    ModelStructure,
    StructureError,
    discover,
    measure_embed_scale,
)
from tokensmith.models.vocab import allowed_token_mask, nearest_tokens, soft_embed

__all__ = ["ModelAdapter", "GenerationResult"]

Inputs = Any  # str | list[str] | Encoded | list[Encoded] | EncodedBatch | Tensor | dict


@dataclass
class GenerationResult:
    """Output of :meth:`ModelAdapter.generate`.

    Attributes:
        sequences: ``[B, T_prompt + T_new]`` ids (left-padded prompt + new tokens).
        new_tokens: list of per-example new-token id tensors (generation stops at EOS, EOS kept).
        texts: decoded new text per example (special tokens skipped).
        prompt: the :class:`EncodedBatch` that was generated from.
    """

    sequences: torch.Tensor
    new_tokens: list[torch.Tensor]
    texts: list[str]
    prompt: EncodedBatch


class ModelAdapter:
    """Architecture-agnostic access to a transformers model and its tokenizer.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (or any ``nn.Module`` with a HF-style forward).
        tokenizer: its (fast) tokenizer.
        spec: optional :class:`AdapterSpec` overriding structure discovery.
        name: a display name.
        validate: run the load-time self-check (see :meth:`validate`).
        max_positions: the longest input (in positions) the adapter accepts; ``"auto"`` (default) takes the
            model's limit (:attr:`position_limit`: the config's context length, or the rows of a learned
            position table if fewer). An int raises or lowers it (e.g. a rotary model run with RoPE scaling),
            ``None`` removes it (models that extrapolate). It can never exceed a learned position table.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> lps = ad.token_logprobs(ad.encode("The cat", target=" sat"))
        >>> lps.shape[0]
        1
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        spec: AdapterSpec | None = None,
        *,
        name: str | None = None,
        validate: bool = True,
        max_positions: int | None | str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("tokenizer must be a transformers tokenizer (callable), got None or a non-callable")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self._spec = spec
        self.structure: ModelStructure = discover(model, spec)
        # the weight is read through the offload store when accelerate offloaded the embedding (meta tensor)
        self.structure.embed_scale = measure_embed_scale(self.structure.embed, weight=self.E)
        self.batcher = MicroBatcher()
        self._fwd_params = _forward_params(model)
        self._validated: dict[str, Any] = {}
        self.pooling_config: Any = None  # set by ts.load for sentence encoders (pooling.PoolingConfig)
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.positions: PositionScheme = probe_position_scheme(
            model, self._fwd_params, self._probe_ids(6).to(self.device), self.pad_token_id,
            width=self.structure.hidden_size, depth=self.structure.num_layers,
        )
        self.position_limit: PositionLimit = discover_position_limit(model, self.structure.embed)
        self._max_positions: int | None = self.position_limit.default
        if max_positions != "auto":
            self.max_positions = max_positions  # type: ignore[assignment]
        if validate:
            self.validate()

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        s = self.structure
        return f"ModelAdapter({self.name!r}, layers={s.num_layers}, d={s.hidden_size}, vocab={s.vocab_size})"

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs go; a dispatched model is never moved)."""
        w = self.structure.embed.weight
        if w.device.type != "meta":
            return w.device
        # offloaded by accelerate (device_map "cpu"/"disk"): the embedding computes on its hook's device
        return execution_device(self.model, self.structure.embed_path)

    @property
    def dtype(self) -> torch.dtype:
        return self.structure.embed.weight.dtype

    @property
    def E(self) -> torch.Tensor:
        """Input embedding matrix ``[V, d]`` (unscaled weight; ``embed_scale`` is applied by :meth:`embed`).

        When accelerate offloaded the embedding (``device_map`` value ``"cpu"`` beside a GPU, or ``"disk"``),
        this is a copy loaded from the offload store at each access, not the parameter.
        """
        w = self.structure.embed.weight
        return offloaded_value(self.model, self.structure.embed_path) if is_offloaded(w) else w

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix ``[V, d]`` (a copy from the offload store when accelerate offloaded the head, as
        for :attr:`E`)."""
        s = self.structure
        if s.lm_head is None:
            raise ValueError("this model has no LM head (an encoder); load it as a masked/causal LM to unembed")
        if is_offloaded(s.lm_head.weight) and s.lm_head_path is not None:
            return offloaded_value(self.model, s.lm_head_path)
        return s.lm_head.weight

    @property
    def tied(self) -> bool:
        return self.structure.tied

    @property
    def is_causal(self) -> bool:
        return self.structure.is_causal

    @property
    def max_positions(self) -> int | None:
        """The longest input, in positions, that the adapter accepts (``None``: no limit).

        Inputs past it raise a ValueError instead of indexing out of a learned position table (GPT-2: a raw
        ``IndexError``) or running silently beyond a rotary model's context length (Llama). Set it to opt
        out for a model that extrapolates: ``adapter.max_positions = 32768`` or ``= None``. It cannot be
        raised past a learned absolute position table (:attr:`position_limit`).

        Examples:
            >>> import tokensmith as ts
            >>> ad = ts.tiny("gpt2")
            >>> ad.max_positions == ad.config.n_positions
            True
        """
        return self._max_positions

    @max_positions.setter
    def max_positions(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TypeError(f"max_positions must be a positive int or None, got {value!r}")
        table = self.position_limit.table_limit
        if table is not None and (value is None or value > table):
            raise ValueError(
                f"max_positions={value!r} exceeds the learned position table {self.position_limit.table_name!r}, "
                f"which indexes {table} positions: this model cannot take longer inputs"
            )
        self._max_positions = value

    def check_length(self, n: int, what: str = "the input") -> None:
        """Raise a ValueError when ``n`` positions exceed :attr:`max_positions` (``what`` names them in the
        message). The adapter calls it on every forward; methods that build sequences call it up front."""
        limit = self._max_positions
        if limit is not None and n > limit:
            fix = (
                "this model's learned position table cannot be extended"
                if self.position_limit.table_limit is not None and limit >= self.position_limit.table_limit
                else "if the model extrapolates (e.g. RoPE scaling), raise the limit with adapter.max_positions = N "
                "or remove it with adapter.max_positions = None"
            )
            raise ValueError(
                f"{what} needs {n} positions but {self.name!r} takes at most {limit} "
                f"({self.position_limit.describe()}). Truncate or split it; {fix}"
            )

    @property
    def pad_token_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        return int(pid) if pid is not None else 0

    def hook_names(self) -> list[str]:
        """All canonical hook names on this model (see :mod:`tokensmith.models.hooks`)."""
        return hook_names(self)

    def capabilities(self) -> dict[str, Any]:
        """What discovery found and which primitives work on this model.

        Examples:
            >>> import tokensmith as ts
            >>> caps = ts.tiny("gpt2").capabilities()
            >>> caps["structure"]["num_layers"], caps["features"]["token_logprobs"]
            (2, True)
        """
        s = self.structure
        layer0 = [n.split(".", 2)[2] for n in self.hook_names() if n.startswith("layers.0.")]
        features = {
            "token_logprobs": s.lm_head is not None and self.is_causal,
            "logits_at_positions": "logits_to_keep" in self._fwd_params,
            "inputs_embeds": "inputs_embeds" in self._fwd_params,
            "unembed": s.lm_head is not None,
            "final_norm": s.final_norm is not None,
            "attention_probe": any(a is not None for a in s.attn)
            and getattr(self.config, "_attn_implementation", "eager") in ("sdpa", "eager")
            and self._validated.get("attention_probe_ok", True),  # False when validation saw it fail
            "generate": hasattr(self.model, "generate") and s.is_causal and s.lm_head is not None,
            "chat_template": getattr(self.tokenizer, "chat_template", None) is not None,
            "fast_tokenizer": bool(getattr(self.tokenizer, "is_fast", False)),
            "run_layers": self.is_causal and not s.is_encoder_decoder,
            "kv_cache_access": "use_cache" in self._fwd_params and self.is_causal,
            "resid_mid": False,
            "left_padding": self.positions.left_padding,
        }
        missing = [k for k, v in features.items() if not v]
        return {
            "name": self.name,
            "model_class": type(self.model).__name__,
            "attn_implementation": getattr(self.config, "_attn_implementation", None),
            # layers with an attention module (hybrids interleave recurrent/SSM blocks); capture_attention
            # accepts exactly these
            "attention_layers": [i for i, a in enumerate(s.attn) if a is not None],
            "structure": s.summary(),
            "hook_points_per_layer": layer0,
            "features": features,
            "missing": missing,
            "validation": dict(self._validated),
            "positions": self.positions.summary(),
        }

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any]:
        """Load-time self-check: raises :class:`StructureError` when discovery (or an :class:`AdapterSpec`)
        picked the wrong modules. Every check can fail; one that does not apply to the model is skipped and
        the reason recorded in ``capabilities()["validation"]["skipped"]`` (a correct model is never refused).

        On one 6-token forward (ε = fp32 machine epsilon, d = hidden size):

        1. ``num_heads`` is a multiple of ``num_kv_heads``;
        2. every layer of the stack runs and returns one ``[B, T, d]`` residual stream (a tuple, a list or a
           tensor), else the error names ``AdapterSpec.layers``;
        3. layer i's output equals ``hidden_states[i + o]`` (relative error ≤ 1e-3; ``o = 1``, or ``o = 0`` for
           state-space models whose ``hidden_states`` omit the embedding output; the last one may be
           final-normed) — else ``AdapterSpec.layers``;
        4. ``unembed(h_L)`` of the last layer's output reproduces the model's own logits:
           ``max|Δz| ≤ 32·ε·√d · max|z|`` — else the error names ``AdapterSpec.final_norm`` / ``lm_head``;
        5. attention, on the first layer that has it: the model is re-run once with eager attention and the
           module returning the attention weights must be the discovered ``attn`` module (else the error
           names ``AdapterSpec.attn``); then ``capture_attention`` must record that layer once and match the
           eager weights to ``64·ε·√head_dim``. A probe that cannot see the layer (attention computed
           outside transformers' attention interface, or called twice per layer) or disagrees with the
           eager weights (e.g. attention sinks) is recorded, not raised: ``features["attention_probe"]``
           is then False. A head count other than ``AdapterSpec.num_heads`` raises; one other than the
           config's is recorded (per-layer head counts).
        """
        s = self.structure
        if s.num_heads and s.num_kv_heads and s.num_heads % s.num_kv_heads:
            raise StructureError(f"num_heads={s.num_heads} is not a multiple of num_kv_heads={s.num_kv_heads}")
        if s.is_encoder_decoder:
            self._validated = {"skipped": "encoder-decoder models are not validated by forward probes"}
            return self._validated
        ids = self._probe_ids(6)
        B, T = ids.shape
        keep = 1 if s.lm_head is not None else None
        seen: list[bool] = []
        order: list[int] = []
        probes = [s.layers[0].register_forward_hook(lambda m, a, o: seen.append(isinstance(o, (tuple, list))))]
        for i, layer in enumerate(s.layers):
            probes.append(layer.register_forward_pre_hook(lambda m, a, i=i: order.append(i)))
        try:
            with torch.no_grad(), self.hooks(cache="layers.*.resid_post") as h:
                out = self.forward(ids, output_hidden_states=True, logits_to_keep=keep)
        finally:
            for p in probes:
                p.remove()
        s.layer_returns_tuple = bool(seen and seen[0])
        hs = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
        report: dict[str, Any] = {"layers_match_hidden_states": None}
        skipped: dict[str, str] = {}
        never_ran = [i for i in range(s.num_layers) if f"layers.{i}.resid_post" not in h.cache]
        if never_ran:
            raise StructureError(
                f"layers {never_ran} of the discovered layer stack {s.layers_path!r} never ran during a forward; "
                "the stack is wrong — pass AdapterSpec(layers='path.to.decoder.layers')"
            )
        calls = {i: order.count(i) for i in set(order)}
        shared = {i: c for i, c in calls.items() if c > 1}
        if shared:
            raise StructureError(
                f"layer module(s) {sorted(shared)} of {s.layers_path!r} run {sorted(set(shared.values()))} times in one "
                "forward: the model shares one block's weights across depth (e.g. ALBERT) or loops over it. Hooks, "
                "steering and run_layers address modules, so a shared block has no per-depth hook point; this "
                "architecture is not supported (pass validate=False to use only forward / token_logprobs, or "
                "AdapterSpec(layers=...) if a stack of distinct blocks exists)"
            )
        if len(order) == s.num_layers and order != sorted(order):
            raise StructureError(
                f"the layers of {s.layers_path!r} run in the order {order}, not in stack order: the stack is wrong — "
                "pass AdapterSpec(layers='path.to.decoder.layers')"
            )
        for i in range(s.num_layers):
            shape = tuple(h.cache[f"layers.{i}.resid_post"].shape)
            if len(shape) == 3 and shape[0] == B and shape[1] != T:
                raise StructureError(
                    f"layer {i} of {s.layers_path!r} returns {shape[1]} positions for an input of {T} tokens: the "
                    "model adds or removes positions inside the stack (e.g. learned prompt tokens), so hook "
                    "positions would not be token positions. Not supported; pass AdapterSpec(layers=...) or "
                    "validate=False to use only forward / token_logprobs"
                )
            if len(shape) != 3 or shape[:2] != (B, T):
                raise StructureError(
                    f"layer {i} of {s.layers_path!r} returns a hidden state of shape {list(shape)}, not one "
                    f"[batch={B}, seq={T}, hidden] residual stream (several residual streams, e.g. AltUp or "
                    "hyper-connections): hooks, steering and run_layers address one [B, T, d] stream. Pass "
                    "AdapterSpec(layers=...) pointing at blocks that return [B, T, d], or validate=False to use "
                    "only forward / token_logprobs"
                )
        self._validate_hidden_states(h, hs, report, skipped)
        self._validate_unembed(h, out, report, skipped)
        self._validate_attention(ids, out, report, skipped)
        if skipped:
            report["skipped"] = skipped
        self._validated = report
        return report

    def _validate_hidden_states(self, h: Any, hs: Any, report: dict[str, Any], skipped: dict[str, str]) -> None:
        s = self.structure
        L = s.num_layers
        if hs is None or len(hs) not in (L, L + 1):
            skipped["layers_match_hidden_states"] = (
                "the model returns no hidden_states" if hs is None
                else f"hidden_states has {len(hs)} entries for {L} layers (nothing to align with)"
            )
            return

        def rel_err(i: int, j: int) -> float:
            mine, ref = h.cache[f"layers.{i}.resid_post"], hs[j]
            if mine.shape != ref.shape:
                return float("inf")
            err = (mine - ref).abs().max().item()
            if i == L - 1 and s.final_norm is not None and err > 0:
                with torch.no_grad():
                    err = min(err, (s.final_norm(mine) - ref).abs().max().item())
            return err / (ref.abs().max().item() + 1e-6)

        offsets = [o for o in (1, 0) if L - 1 + o < len(hs)]
        tried: dict[int, list[float]] = {}
        for o in offsets:
            errs = [rel_err(i, i + o) for i in range(L)]
            tried[o] = errs
            if max(errs) <= 1e-3:
                report["layers_match_hidden_states"] = True
                report["max_rel_err"] = max(errs)
                report["hidden_states_offset"] = o
                return
        errs = tried[1] if 1 in tried else tried[offsets[0]]
        bad = next(i for i, e in enumerate(errs) if e > 1e-3)
        if bad == L - 1 and L > 1 and s.final_norm is not None:
            # every other layer matches: the last hidden state is final-normed by a norm that is not ours
            raise StructureError(
                f"layers 0..{L - 2} match hidden_states, but the last layer's output matches hidden_states[{L}] "
                f"neither as it is nor through the discovered final norm {s.final_norm_path!r} (relative max diff "
                f"{errs[bad]:.3g}): the final norm is wrong — pass AdapterSpec(final_norm='path.to.final_norm')"
            )
        raise StructureError(
            f"layer {bad} output does not match hidden_states[{bad + 1}] (relative max diff {errs[bad]:.3g}; nor "
            f"hidden_states[{bad}], as for models whose hidden_states omit the embedding output); the discovered "
            f"layer stack {s.layers_path!r} is wrong — pass AdapterSpec(layers=...)"
        )

    def _validate_unembed(self, h: Any, out: Any, report: dict[str, Any], skipped: dict[str, str]) -> None:
        s = self.structure
        logits = getattr(out, "logits", None)
        if s.lm_head is None or not isinstance(logits, torch.Tensor):
            skipped["unembed_matches_logits"] = "the model has no LM head / returns no logits"
            return
        last = h.cache[f"layers.{s.num_layers - 1}.resid_post"]
        last = last[:, -logits.shape[1]:]
        fix = (
            f"the final norm ({s.final_norm_path!r}) or the LM head ({s.lm_head_path!r}; head chain {s.head_paths}) "
            "is wrong. Pass AdapterSpec(final_norm='path.to.final_norm', lm_head='path.to.lm_head') (final_norm "
            "only if the model has one)"
        )
        try:
            with torch.no_grad():
                z = self.unembed(last)
        except Exception as e:  # noqa: BLE001 - any failure means the head modules are wrong
            raise StructureError(f"unembed(final layer output) failed ({type(e).__name__}: {e}): {fix}") from e
        if z.shape != logits.shape:
            raise StructureError(
                f"unembed(final layer output) has shape {list(z.shape)}, the model's logits {list(logits.shape)}: {fix}"
            )
        scale = logits.abs().max().item()
        err = (z.float() - logits.float()).abs().max().item()
        tol = 32 * torch.finfo(torch.float32).eps * math.sqrt(s.hidden_size) * max(scale, 1e-30)
        if not err <= tol:
            raise StructureError(
                f"unembed(final layer output) does not reproduce the model's logits (max |Δ| {err:.3g}, logit scale "
                f"{scale:.3g}, tolerance {tol:.3g}): {fix}"
            )
        report["unembed_matches_logits"] = True
        report["unembed_max_rel_err"] = err / max(scale, 1e-30)

    def _validate_attention(self, ids: torch.Tensor, out: Any, report: dict[str, Any], skipped: dict[str, str]) -> None:
        s = self.structure
        report["attention_probe_ok"] = False
        have = [i for i, a in enumerate(s.attn) if a is not None]
        impl = getattr(self.config, "_attn_implementation", None)
        if not have:
            skipped["attention"] = "no attention module discovered (attention-free model)"
            return
        if impl not in ("sdpa", "eager"):
            skipped["attention"] = f"attention implementation {impl!r} (the probe supports 'sdpa' and 'eager')"
            return
        i = have[0]
        B, T = ids.shape
        attn = s.attn[i]
        ref, elsewhere = None, None
        try:
            found = self._eager_attention_weights(ids, i)
        except Exception as e:  # noqa: BLE001 - the model cannot run eager: no reference
            found = []
            skipped["attention_eager_reference"] = f"eager re-run failed ({type(e).__name__}: {str(e)[:120]})"
        inside = {id(m) for m in attn.modules()}
        for path, mod, w in found:
            if id(mod) in inside:
                ref = w if ref is None else ref
            elif elsewhere is None:
                elsewhere = (path, mod)
        if ref is None and elsewhere is not None:
            path = elsewhere[0]
            raise StructureError(
                f"the attention module of layer {i} ({s.attn_name!r}, a {type(attn).__name__}) does not compute the "
                f"attention: under eager attention the weights come from {path!r} (a {type(elsewhere[1]).__name__}). "
                f"Pass AdapterSpec(attn={path!r})"
            )
        if ref is None and "attention_eager_reference" not in skipped:
            skipped["attention_eager_reference"] = "eager attention returns no weights on this model"
        rep: dict[str, Any] = {"layer": i}
        report["attention"] = rep
        try:
            with torch.no_grad(), self.capture_attention(layers=[i]) as att:
                probed = self.forward(ids, logits_to_keep=1 if s.lm_head is not None else None)
            recs = att.steps(i)
        except Exception as e:  # noqa: BLE001 - the probe cannot run on this model: record, do not refuse
            rep["status"] = f"probe failed ({type(e).__name__}: {str(e)[:160]})"
            return
        if len(recs) != 1:
            rep["status"] = (
                "the probe does not see this layer's attention (computed outside transformers' attention interface)"
                if not recs else f"the attention interface runs {len(recs)} times per forward in this layer"
            )
            return
        P = recs[0]
        rep["heads"] = int(P.shape[1])
        if s.num_heads and P.shape[1] != s.num_heads:
            if self._spec is not None and self._spec.num_heads:
                raise StructureError(
                    f"layer {i}'s attention has {P.shape[1]} heads, AdapterSpec.num_heads={s.num_heads}; fix num_heads"
                )
            rep["note"] = f"layer {i} has {P.shape[1]} heads, the config says {s.num_heads} (per-layer head counts)"
        if ref is not None:
            if ref.shape != P.shape:
                rep["status"] = f"probe shape {list(P.shape)} != eager weights {list(ref.shape)}"
                return
            err = (P - ref.float()).abs().max().item()
            tol = 64 * torch.finfo(torch.float32).eps * math.sqrt(s.head_dim or 64)
            rep["max_abs_err_vs_eager"] = err
            if not err <= tol:
                rep["status"] = f"the probe disagrees with the model's eager attention (max |Δ| {err:.3g} > {tol:.3g})"
                return
        z0, z1 = getattr(out, "logits", None), getattr(probed, "logits", None)
        if isinstance(z0, torch.Tensor) and isinstance(z1, torch.Tensor) and z0.shape == z1.shape:
            scale = z0.abs().max().item()
            err = (z0 - z1).abs().max().item()
            if not err <= 32 * torch.finfo(torch.float32).eps * math.sqrt(s.hidden_size * s.num_layers) * max(scale, 1e-30):
                rep["status"] = f"the forward under the probe changes the logits (max |Δ| {err:.3g})"
                return
        rep["status"] = "matches eager attention" if ref is not None else "ok (no eager reference)"
        report["attention_probe_ok"] = True

    def _eager_attention_weights(self, ids: torch.Tensor, layer: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
        """Re-run the model once with eager attention; return the submodules of ``layer`` whose output carries
        attention weights ``[B, H, T, T]`` as its second element, with those weights (call order)."""
        B, T = ids.shape
        block = self.structure.layers[layer]
        found: list[tuple[str, nn.Module, torch.Tensor]] = []

        def grab(path: str):
            def hook(mod: nn.Module, args: Any, output: Any) -> None:
                if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                    w = output[1]
                    if w.dim() == 4 and w.shape[0] == B and w.shape[-2:] == (T, T):
                        found.append((path, mod, w.detach().float()))

            return hook

        configs = {id(c): c for c in (getattr(m, "config", None) for m in self.model.modules()) if c is not None}
        configs = {k: c for k, c in configs.items() if hasattr(c, "_attn_implementation")}
        saved = {k: c._attn_implementation for k, c in configs.items()}
        handles = [m.register_forward_hook(grab(n)) for n, m in block.named_modules() if m is not block]
        try:
            for c in configs.values():
                c._attn_implementation = "eager"
            with torch.no_grad():
                self.forward(ids, logits_to_keep=1 if self.structure.lm_head is not None else None)
        finally:
            for hd in handles:
                hd.remove()
            for k, c in configs.items():
                c._attn_implementation = saved[k]
        return found  # paths relative to the layer, as AdapterSpec.attn expects

    def _probe_ids(self, n: int) -> torch.Tensor:
        allowed = torch.nonzero(allowed_token_mask(self.tokenizer, self.structure.vocab_size)).flatten()
        if allowed.numel() == 0:
            allowed = torch.arange(min(self.structure.vocab_size, 100))
        step = max(1, allowed.numel() // (n + 1))
        return allowed[step : step * (n + 1) : step][:n].unsqueeze(0)

    # ------------------------------------------------------------------ encoding
    def encode(self, prompt: Any = None, target: str | None = None, **kwargs: Any) -> Encoded:
        """Span-aware joint encoding; see :func:`tokensmith.models.encoding.encode` for all options
        (``boundary=`` "error" | "split" | "allow" for pieces that merge into one token,
        ``allow_special=`` to let content text produce special tokens, ``score_eot=`` to score the
        closing end-of-turn tokens of a chat answer).

        Examples:
            >>> import tokensmith as ts
            >>> ad = ts.tiny("llama")
            >>> enc = ad.encode("Hi", target=" there", chat=True)
            >>> enc.target_mask.sum().item() >= 1
            True
        """
        return encode(self.tokenizer, prompt, target, **kwargs)

    def reencode(self, enc: Encoded, texts: dict[str, str], **overrides: Any) -> Encoded:
        """``enc`` rendered again with new slot texts through the same recipe
        (:func:`tokensmith.models.encoding.reencode`)."""
        return reencode(self.tokenizer, enc, texts, **overrides)

    def encode_batch(self, items: Sequence[Any], **kwargs: Any) -> EncodedBatch:
        """Encode several examples and left-pad them.

        Each item is a str (prompt), an :class:`Encoded`, a ``(prompt, target)`` tuple, or a dict of
        :meth:`encode` keyword arguments; ``kwargs`` apply to all. Every example keeps its own target
        mask (:attr:`EncodedBatch.target_mask`), so scoring the batch equals scoring each item alone.
        """
        if isinstance(items, (str, Encoded)):
            items = [items]
        if len(items) == 0:
            raise ValueError("encode_batch got an empty list")
        encs = []
        for it in items:
            if isinstance(it, Encoded):
                encs.append(it)
            elif isinstance(it, str):
                encs.append(self.encode(it, **kwargs))
            elif isinstance(it, tuple) and len(it) == 2:
                encs.append(self.encode(it[0], it[1], **kwargs))
            elif isinstance(it, dict):
                encs.append(self.encode(**{**kwargs, **it}))
            else:
                raise TypeError(f"cannot encode an item of type {type(it).__name__}")
        return pad_batch(encs, self.pad_token_id)

    def as_batch(self, inputs: Inputs) -> EncodedBatch | dict[str, torch.Tensor]:
        """Normalise inputs: strings/Encoded -> :class:`EncodedBatch`; id tensors -> a dict with a full mask."""
        if isinstance(inputs, EncodedBatch):
            return inputs
        if isinstance(inputs, (str, Encoded)):
            return self.encode_batch([inputs])
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            if ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise TypeError("token id tensors must be integer; pass embeddings with inputs_embeds=")
            if ids.numel() == 0:
                raise ValueError("empty input ids")
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if isinstance(inputs, dict):
            if "input_ids" not in inputs:
                raise ValueError("a dict input needs 'input_ids'")
            d = dict(inputs)
            d.setdefault("attention_mask", torch.ones_like(d["input_ids"]))
            return d
        if isinstance(inputs, Sequence):
            return self.encode_batch(list(inputs))
        raise TypeError(f"unsupported input type {type(inputs).__name__}")

    @staticmethod
    def _ids_and_mask(batch: EncodedBatch | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, EncodedBatch):
            return batch.input_ids, batch.attention_mask
        return batch["input_ids"], batch["attention_mask"]

    def _default_scored_mask(self, batch: EncodedBatch | dict[str, torch.Tensor]) -> torch.Tensor:
        """Decided per row, exactly as for the row alone: the row's encoded target when it has one
        (:attr:`Encoded.target_mask`), else every real token that has a predicting position (all but the
        row's first real token)."""
        ids, am = self._ids_and_mask(batch)
        first = (am.long().cumsum(-1) == 1) & am.bool()
        out = am.bool() & ~first
        if isinstance(batch, EncodedBatch):
            tm = batch.target_mask
            has = tm.any(-1)
            out[has] = tm[has]
        return out

    @staticmethod
    def _check_scored_mask(tm: torch.Tensor, am: torch.Tensor, what: str = "target_mask") -> None:
        """Per row, in unpadded coordinates: a causal LM cannot score a row's first real token (nothing
        predicts it) nor a padding position. Raises the same error for a row alone and inside a batch."""
        real = am.to(tm.device).bool()
        first = (real.long().cumsum(-1) == 1) & real
        for bad, why in ((tm & first, "its first real token, which a causal LM cannot score (it has no context)"),
                         (tm & ~real, "padding positions")):
            rows = torch.nonzero(bad.any(-1)).flatten().tolist()
            if rows:
                raise ValueError(
                    f"{what} marks {why} in row(s) {rows}; a scored token needs at least one real token before "
                    "it (e.g. give the target a prompt, or keep BOS with add_special_tokens=True)"
                )

    # ------------------------------------------------------------------ forward
    def _model_inputs(self, batch: EncodedBatch | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(batch, EncodedBatch):
            d = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        else:
            d = dict(batch)
        ids = d.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            self.check_length(int(ids.shape[-1]))
        pid = self._position_ids(d.get("attention_mask"), d.pop("position_ids", None))
        if pid is not None:
            d["position_ids"] = pid
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

    def _position_ids(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ``position_ids`` to pass to the model, or None to let the model derive its own.

        ``position_ids`` given to the adapter are *logical*: 0 for the first real token of a row (default
        ``(cumsum(mask) - 1).clamp_min(0)``). The model's own first position (``positions.offset``: 0, or
        ``padding_idx + 1`` for RoBERTa-family models) is added here. Unpadded rows with default positions
        pass nothing (the exact HF path). Raises ValueError for a left-padded batch when the load-time probe
        found that this model cannot take one (see :mod:`tokensmith.models.padding`).
        """
        scheme = self.positions
        if attention_mask is not None and not scheme.left_padding and has_left_padding(attention_mask):
            raise padding_error(self.name, scheme)
        if "position_ids" not in self._fwd_params:
            return None
        padded = attention_mask is not None and not bool(attention_mask.all())
        default = position_ids is None or (
            attention_mask is not None
            and position_ids.shape == attention_mask.shape
            and torch.equal(position_ids.to(attention_mask.device), logical_positions(attention_mask))
        )
        if default and (not padded or not scheme.pass_position_ids):
            return None
        if position_ids is None:
            position_ids = logical_positions(attention_mask)  # type: ignore[arg-type]
        return position_ids + (scheme.offset or 0)

    def forward(
        self,
        inputs: Inputs = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model's forward. ``inputs`` may be text, :class:`Encoded`/:class:`EncodedBatch` or ids.

        With ``inputs_embeds`` (``[B, T, d]``, e.g. from :meth:`embed` or :meth:`onehot_embeds`) the ids
        are not used. Position ids are derived from the attention mask (``position_ids``, when given, are
        logical: 0 for each row's first real token; the model's own offset is added), so left padding is
        exact; a model whose load-time probe showed that it cannot take left padding (its positions are
        not driven by ``position_ids``, e.g. BART, DistilBERT) raises a ValueError on left-padded input.
        Returns the HF output object, or None when a hook's ``stop_after`` ended the forward early.
        """
        if inputs_embeds is not None:
            if not torch.isfinite(inputs_embeds).all():
                raise ValueError("inputs_embeds contains NaN or inf")
            B, T = inputs_embeds.shape[:2]
            self.check_length(T)
            am = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long)
            d: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": am.to(inputs_embeds.device)}
            pid = self._position_ids(am, position_ids)
            if pid is not None:
                d["position_ids"] = pid.to(inputs_embeds.device)
        else:
            if inputs is None:
                raise ValueError("give inputs (text, Encoded, EncodedBatch or ids) or inputs_embeds")
            batch = self.as_batch(inputs)
            if attention_mask is not None and isinstance(batch, dict):
                batch["attention_mask"] = attention_mask
            d = self._model_inputs(batch)
            if position_ids is not None and "position_ids" in self._fwd_params:
                pid = self._position_ids(d.get("attention_mask"), position_ids.to(self.device))
                if pid is not None:
                    d["position_ids"] = pid
        if logits_to_keep is not None and "logits_to_keep" in self._fwd_params:
            d["logits_to_keep"] = logits_to_keep
        if "use_cache" in self._fwd_params:
            d.setdefault("use_cache", False)
        d.update(kwargs)
        try:
            return self.model(**d)
        except StopForward:
            return None

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """Full ``[B, T, V]`` logits (convenience; prefer :meth:`token_logprobs` for scoring)."""
        with torch.no_grad():
            return self.forward(inputs).logits

    # ------------------------------------------------------------------ log-probs
    def _keep_mask_supported(self) -> bool:
        return "logits_to_keep" in self._fwd_params

    def token_logprobs(
        self,
        inputs: Inputs,
        target_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        grad: bool = False,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Per-token log-probabilities ``[B, T]`` — the universal currency.

        ``out[b, t] = log p(x_t | x_<t)`` at target positions and 0 elsewhere, aligned with the (left-padded)
        input ids. The LM head runs only at the positions that predict a target token (``logits_to_keep``
        with a boolean mask), never over the full ``B×T×V`` when only a span is scored.

        Args:
            inputs: text, :class:`Encoded`, :class:`EncodedBatch`, or ``[B, T]`` ids.
            target_mask: ``[B, T]`` boolean of scored tokens. Default: the encoded ``target`` segment when
                present, otherwise every real token after the first.
            inputs_embeds: optional ``[B, T, d]`` embeddings to run from instead of the ids (ids are still
                needed for the targets). Gradients flow when ``grad=True``.
            grad: keep the autograd graph (for the one-hot/embedding path); default no_grad.
            max_batch_size: micro-batch size (chunks halve on OOM; the adapter remembers what fit). Active
                hook sessions see each chunk's rows and assemble their records per call
                (:meth:`micro_batch`).

        Raises:
            ValueError: while a hook session with ``stop_after`` is active (the forward would end before the
                logits exist; use :meth:`forward`, which returns None and leaves the cache filled).

        Examples:
            >>> import tokensmith as ts
            >>> ad = ts.tiny("gpt2")
            >>> out = ad.token_logprobs(ad.encode("Hello", target=" world"))
            >>> bool((out <= 0).all())
            True
        """
        batch = self.as_batch(inputs)
        ids, am = self._ids_and_mask(batch)
        if target_mask is None:
            tm = self._default_scored_mask(batch)
        else:
            tm = target_mask.to(torch.bool)
            if tm.shape != ids.shape:
                raise ValueError(f"target_mask shape {tuple(tm.shape)} != input ids shape {tuple(ids.shape)}")
        if not self.is_causal:
            raise ValueError(
                "token_logprobs needs a causal LM; for a masked LM use forward() and mask tokens explicitly"
            )
        if self.structure.lm_head is None:
            raise ValueError("this model has no LM head; load it with a causal-LM class to score tokens")
        self._check_scored_mask(tm, am)
        stopping = [h.stop_after for h in getattr(self, "_row_listeners", ()) if getattr(h, "stop_after", None)]
        if stopping:
            raise ValueError(
                f"token_logprobs needs the logits, but an active hook session stops the forward after "
                f"{stopping[0]!r} (stop_after=); call adapter.forward(...) inside that session instead (it returns "
                "None and fills the cache), or drop stop_after"
            )
        B, T = ids.shape
        V = self.structure.vocab_size
        bytes_per_row = 4 * (T * self.structure.hidden_size * 24 + int(tm.sum(1).max()) * V * 3)
        bs = max_batch_size or self.batcher.max_batch_size

        def run(s: int, e: int) -> torch.Tensor:
            keep = lp.shift_target_mask(tm[s:e])
            sub: dict[str, Any] = {"input_ids": ids[s:e], "attention_mask": am[s:e]}
            if isinstance(batch, EncodedBatch):
                sub["position_ids"] = batch.position_ids[s:e]
            d = self._model_inputs(sub)
            if inputs_embeds is not None:
                d.pop("input_ids")
                d["inputs_embeds"] = inputs_embeds[s:e]
            use_keep = self._keep_mask_supported()
            if use_keep:
                d["logits_to_keep"] = keep.to(self.device)
            if "use_cache" in self._fwd_params:
                d["use_cache"] = False
            with torch.set_grad_enabled(grad):
                logits = self.model(**d).logits
                if not use_keep or logits.dim() == 3:
                    logits = logits[keep.to(logits.device)]
                tgt = ids[s:e][tm[s:e]].to(logits.device)
                vals = lp.gather_logprobs(logits, tgt)
                out = torch.zeros(e - s, T, dtype=torch.float32, device=vals.device)
                out = out.masked_scatter(tm[s:e].to(vals.device), vals)
            return out

        mb = MicroBatcher(bs) if bs and bs != self.batcher.max_batch_size else self.batcher
        with self.micro_batch(B) as call:
            parts = mb.run(run, B, key=("token_logprobs", T), bytes_per_item=bytes_per_row, call=call)
        return torch.cat(parts, 0)

    def sequence_logprob(self, inputs: Inputs, target_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Σ_t log p(x_t | x_<t) over the target tokens: ``[B]``."""
        return self.token_logprobs(inputs, target_mask, **kw).sum(-1)

    def next_token_logprobs(self, inputs: Inputs) -> torch.Tensor:
        """Log-distribution of the next token after each (left-padded) sequence: ``[B, V]``."""
        with torch.no_grad():
            out = self.forward(inputs, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def same_vocab(self, other: ModelAdapter) -> bool:
        """Whether ``other`` has exactly this tokenizer's vocabulary (token strings and ids). The comparison is
        remembered per pair of tokenizers and their lengths (``add_tokens`` changes the length)."""
        if other.tokenizer is self.tokenizer:
            return True
        memo = self.__dict__.setdefault("_vocab_memo", {})
        sizes = (len(self.tokenizer), len(other.tokenizer))
        hit = memo.get(id(other.tokenizer))
        if hit is None or hit[0] is not other.tokenizer or hit[1] != sizes:  # (the object is kept: ids stay unique)
            hit = (other.tokenizer, sizes, self.tokenizer.get_vocab() == other.tokenizer.get_vocab())
            memo[id(other.tokenizer)] = hit
        return hit[2]

    def kl(
        self,
        other: ModelAdapter,
        inputs: Inputs,
        mask: torch.Tensor | None = None,
        chunk: int = 256,
        *,
        grad: bool = False,
        grad_other: bool = False,
    ) -> torch.Tensor:
        """Per-token KL(p_self ‖ p_other) of the next-token distributions, ``[B, T]``.

        ``out[b, t] = Σ_v p_self(v | x_<t) (log p_self(v | x_<t) − log p_other(v | x_<t))`` at masked
        positions, 0 elsewhere. Position t compares the distributions that predict token t (so it aligns
        with :meth:`token_logprobs`). Only the masked positions' logits are computed, and the KL is chunked.

        Args:
            other: the second model (same tokenizer).
            inputs: text, :class:`Encoded`, :class:`EncodedBatch` or ids.
            mask: ``[B, T]`` positions to compare; default as :meth:`token_logprobs` (per row: the
                target, else every real token after the first).
            chunk: positions per KL chunk.
            grad: keep the autograd graph through ``self`` (e.g. a KL penalty against a frozen reference in
                alignment); default no_grad.
            grad_other: also keep the graph through ``other`` (e.g. distillation into ``other``).

        Raises:
            ValueError: when the two adapters' tokenizers differ (KL over different vocabularies is
                meaningless), or the mask marks a row's first real token or padding.
        """
        if not self.same_vocab(other):
            raise ValueError("KL needs the same tokenizer on both models; these vocabularies differ")
        batch = self.as_batch(inputs)
        ids, am = self._ids_and_mask(batch)
        if mask is None:
            mask = self._default_scored_mask(batch)
        else:
            mask = mask.to(torch.bool)
            if mask.shape != ids.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != input ids shape {tuple(ids.shape)}")
        self._check_scored_mask(mask, am, "mask")
        keep = lp.shift_target_mask(mask)
        outs = []
        for ad, g in ((self, grad), (other, grad_other)):
            d = ad._model_inputs(batch if isinstance(batch, EncodedBatch) else dict(batch))
            if ad._keep_mask_supported():
                d["logits_to_keep"] = keep.to(ad.device)
            if "use_cache" in ad._fwd_params:
                d["use_cache"] = False
            with torch.set_grad_enabled(g):
                z = ad.model(**d).logits
                outs.append(z[keep.to(z.device)] if z.dim() == 3 else z)
        with torch.set_grad_enabled(grad or grad_other):
            vals = lp.token_kl(outs[0], outs[1].to(outs[0].device), chunk=chunk)
            out = torch.zeros(ids.shape, dtype=torch.float32, device=vals.device)
            return out.masked_scatter(mask.to(vals.device), vals)

    # ------------------------------------------------------------------ hidden states / embeddings
    def hidden_states(self, inputs: Inputs) -> torch.Tensor:
        """Stacked residual stream ``[L + 1, B, T, d]``: ``embed`` output (plus positions where the model
        adds them) then each layer's output (as transformers reports it; the last may be final-normed)."""
        with torch.no_grad():
            out = self.forward(inputs, output_hidden_states=True, logits_to_keep=1 if self.structure.lm_head else None)
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            raise ValueError("this model does not return hidden_states")
        return torch.stack(list(hs), 0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the model computes them (including any embedding scale): ``[..., d]``."""
        return self.structure.embed(ids.to(self.device))

    def onehot_embeds(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-hot embedding path for token gradients (GCG, HotFlip).

        ``e = onehot @ E · scale`` at the selected positions; other positions use the (detached) lookup.
        ∂L/∂onehot then gives, per position, a first-order estimate of the loss change for every token.

        Args:
            input_ids: ``[B, T]`` ids.
            positions: ``[B, T]`` boolean mask of positions to make differentiable.

        Returns:
            ``(inputs_embeds [B, T, d], onehot [N, V])`` where ``onehot`` requires grad and N is the number of
            selected positions (row-major order).
        """
        ids = input_ids.to(self.device)
        pos = positions.to(self.device, torch.bool)
        if pos.shape != ids.shape:
            raise ValueError("positions must be a boolean mask with the shape of input_ids")
        W = self.E
        onehot = torch.zeros(int(pos.sum()), W.shape[0], device=W.device, dtype=W.dtype)
        onehot.scatter_(1, ids[pos][:, None], 1.0)
        onehot.requires_grad_(True)
        with torch.no_grad():
            base = self.embed(ids)
        sel = (onehot @ W) * self.structure.embed_scale
        embeds = _scatter_rows(base, pos, sel)
        return embeds, onehot

    def unembed(self, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Logits from hidden states ``h`` (logit lens), computed the way the model computes its own:

        ``z = c · tanh(s · head(norm_f(h)) / c)``

        where ``norm_f`` is the final norm (skipped with ``final_norm=False`` or when the model has none),
        ``head`` the chain of modules the model runs between the final norm and its logits (``lm_head``
        for a causal LM; the whole prediction head, transform + decoder, of a masked LM; OPT's
        ``project_out`` + ``lm_head``), ``s`` the logit scale (Cohere's ``logit_scale``, Granite's
        ``1/logits_scaling``, ...; fitted at load and matched to the config field) and ``c`` the final
        soft-capping (Gemma-2/3; omitted when the model has none). Load-time validation checks that
        ``unembed(last layer output)`` reproduces the model's logits.
        """
        s = self.structure
        if s.lm_head is None:
            raise ValueError("this model has no LM head to unembed with")
        z = s.final_norm(h) if (final_norm and s.final_norm is not None) else h
        for mod in self._head_modules():
            z = mod(z)
            if not isinstance(z, torch.Tensor):
                z = _first_tensor_of(z)
        if s.logit_scale != 1.0:
            z = z * s.logit_scale
        if s.logit_softcap:
            z = torch.tanh(z / s.logit_softcap) * s.logit_softcap
        return z

    def _head_modules(self) -> list[nn.Module]:
        """The modules mapping final-normed hidden states to logits, in call order (see :meth:`unembed`)."""
        s = self.structure
        return list(s.head_modules) if s.head_modules else [s.lm_head]  # type: ignore[list-item]

    def _head_module(self) -> nn.Module:
        """The head chain of :meth:`_head_modules` as one module (``nn.Sequential`` when there are several)."""
        mods = self._head_modules()
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def allowed_token_mask(self, **kwargs: Any) -> torch.Tensor:
        """Ids a token-space search may use (see :func:`tokensmith.models.vocab.allowed_token_mask`)."""
        return allowed_token_mask(self.tokenizer, self.structure.vocab_size, **kwargs)

    def nearest_tokens(self, embeds: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine-nearest token ids for embedding vectors (scale-free)."""
        return nearest_tokens(embeds, self.E.detach(), allowed)

    def soft_embed(self, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """softmax(z/τ)·E · scale."""
        return soft_embed(logits, self.E, tau) * self.structure.embed_scale

    # ------------------------------------------------------------------ hooks
    def hooks(
        self,
        cache: Iterable[str] | str = (),
        edit: Any = None,
        grad: Iterable[str] | str = (),
        stop_after: str | None = None,
        detach: bool = True,
        offload: Any = None,
        cache_positions: Any = None,
    ) -> HookSession:
        """Context manager caching/editing activations at canonical names; see :class:`HookSession`.

        ``cache_positions`` keeps only some tokens of each cached tensor: ``"last"`` (the last real token of
        each row, padding read from the attention mask) -> ``[B, d]``; an int -> ``[B, d]`` or a list of ints
        -> ``[B, k, d]`` (absolute positions, left padding not counted; negative from the end of each row); a
        ``[B, T]`` bool mask or ``fn(ctx) -> mask`` -> ``[N_selected, d]`` (row-major). The records are small
        copies (not views of the full activation); micro-batching, OOM retries, ``grad=``, ``offload=`` and
        generation's decode steps compose with it (see :class:`HookSession`).

        Examples:
            >>> import tokensmith as ts
            >>> ad = ts.tiny("llama")
            >>> with ad.hooks(cache="layers.0.resid_post", cache_positions=[0, -1]) as h:
            ...     _ = ad.forward(ad.encode_batch(["a b c", "d e"]))
            >>> list(h.cache["layers.0.resid_post"].shape) == [2, 2, ad.structure.hidden_size]
            True
        """
        return HookSession(self, cache, edit, grad, stop_after, detach, offload, cache_positions)

    def micro_batch(self, n: int) -> BatchCall:
        """One logical call over ``n`` rows that you split into micro-batches yourself.

        Active hook sessions then see, in every forward run inside ``call.rows(start, end)``, which rows of
        the full batch it covers (``ctx.rows``, ``ctx.batch_size``); they assemble their caches and gradients
        by rows (one ``[n, ...]`` record per call, as if unsplit) and drop what an attempt that raised
        recorded. :meth:`MicroBatcher.run` takes the call as ``call=`` and does the ``rows`` part, OOM
        back-off included.

        Examples:
            >>> import tokensmith as ts
            >>> from tokensmith.models import MicroBatcher
            >>> ad = ts.tiny("llama")
            >>> ids = ad.encode_batch(["a b c", "d e f", "g h i"]).input_ids
            >>> with ad.hooks(cache="layers.0.resid_post") as h:
            ...     with ad.micro_batch(3) as call:
            ...         _ = MicroBatcher(2).run(lambda s, e: ad.forward(ids[s:e]), 3, call=call)
            >>> h.cache["layers.0.resid_post"].shape[0]
            3
        """
        return BatchCall(n, list(getattr(self, "_row_listeners", ())))

    def steer(
        self,
        name: str,
        vector: torch.Tensor,
        alpha: float = 1.0,
        positions: Any = None,
        renorm: bool = False,
    ) -> HookSession:
        """Add ``alpha * vector`` at hook point(s) ``name`` inside a ``with`` block (MOD-6).

        ``renorm=True`` preserves each token's norm: h ← (h + αv)·‖h‖/‖h + αv‖ (GrAInS).
        ``positions`` are absolute (valid in prefill and in decode steps).

        Examples:
            >>> import torch, tokensmith as ts
            >>> ad = ts.tiny("llama")
            >>> v = torch.randn(ad.structure.hidden_size)
            >>> with ad.steer("layers.0.resid_post", v, alpha=4.0):
            ...     steered = ad.next_token_logprobs("Hello")
        """
        v = torch.as_tensor(vector)
        if v.shape[-1] != self.structure.hidden_size and not any(x in name for x in (".attn.q", ".attn.k", ".attn.v", ".attn.z", "mlp.act", "logits")):
            raise ValueError(f"steering vector has size {v.shape[-1]}, the residual stream has {self.structure.hidden_size}")
        return self.hooks(edit=[(name, steer_fn(v, alpha, positions, renorm))])

    def attention_override(self, mask: Any, layers: Iterable[int] | None = None) -> Any:
        """Context manager ANDing an attention-mask override into every forward and ``generate`` (see
        :func:`tokensmith.models.masking.attention_override`)."""
        from tokensmith.models.masking import attention_override

        return attention_override(self, mask, layers)

    def rerotate_cache(self, cache: Any, new_positions: Any = "compact", **kw: Any) -> Any:
        """Re-apply RoPE to cached keys for new positions (see :func:`tokensmith.models.rerotate.rerotate_cache`)."""
        from tokensmith.models.rerotate import rerotate_cache

        return rerotate_cache(self, cache, new_positions, **kw)

    def capture_attention(self, layers: Iterable[int] | None = None, rows: Any = None) -> AttentionProbe:
        """Record attention probabilities ``softmax(q kᵀ·s + mask)`` for ``layers`` only (others keep SDPA).

        ``layers`` defaults to every attention layer (``capabilities()['attention_layers']``; a layer without
        attention raises a ValueError listing them). ``rows`` (e.g. ``[-1]``) computes only those query rows,
        in ``O(B·H·|rows|·T)`` memory. Probes may be nested and exited in any order. See :class:`AttentionProbe`.
        """
        return AttentionProbe(self, layers, rows)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        inputs: Inputs,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        seed: int | None = None,
        **gen_kwargs: Any,
    ) -> GenerationResult:
        """Generate continuations (hooks active in an enclosing ``with adapter.hooks(...)`` apply to every
        step; hook functions see ``ctx.is_prefill`` and absolute ``ctx.positions``).

        Args:
            inputs: prompts (text, :class:`Encoded`, list, or :class:`EncodedBatch`); use
                ``adapter.encode(prompt, chat=True)`` for a chat turn.
            max_new_tokens: budget.
            do_sample: sampling instead of greedy; ``seed`` makes it reproducible without touching the
                global RNG state after the call.
        """
        if not (self.is_causal and self.structure.lm_head is not None):
            raise ValueError("generate needs a causal LM with an LM head")
        batch = self.as_batch(inputs)
        if not isinstance(batch, EncodedBatch):
            raise TypeError("generate takes text or encoded inputs")
        d = {"input_ids": batch.input_ids.to(self.device), "attention_mask": batch.attention_mask.to(self.device)}
        self.check_length(int(batch.input_ids.shape[1]) + int(max_new_tokens), "the prompt plus max_new_tokens")
        if not self.positions.left_padding and has_left_padding(batch.attention_mask):
            raise padding_error(self.name, self.positions)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": self.pad_token_id}
        if eos is not None:
            kw.setdefault("eos_token_id", eos)
        kw.update(gen_kwargs)
        with _maybe_seed(seed, self.device), torch.no_grad(), _position_offset(self.model, self.positions.offset):
            seqs = self.model.generate(**d, **kw)
        T0 = batch.input_ids.shape[1]
        new, texts = [], []
        for b in range(seqs.shape[0]):
            row = seqs[b, T0:]
            if eos is not None and (row == eos).any():
                row = row[: int((row == eos).nonzero()[0]) + 1]
            new.append(row.cpu())
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return GenerationResult(seqs.cpu(), new, texts, batch)

    # ------------------------------------------------------------------ layer ops / mid-forward
    def skip_layers(self, layers: Iterable[int]):
        """Context manager physically skipping decoder layers (reversible delete, MOD-9)."""
        from tokensmith.models.layers import skip_layers

        return skip_layers(self, layers)

    def truncate_layers(self, n: int):
        """Context manager keeping only the first ``n`` layers (final norm and head still run)."""
        from tokensmith.models.layers import truncate_layers

        return truncate_layers(self, n)

    def swap_layers(self, i: int, j: int):
        """Context manager exchanging layers ``i`` and ``j`` (MOD-9)."""
        from tokensmith.models.layers import swap_layers

        return swap_layers(self, i, j)

    def skip_layer_for_tokens(self, token_mask: torch.Tensor, layers: Iterable[int], part: str = "block"):
        """Context manager: ``layers`` leave masked tokens unchanged (MOD-10)."""
        from tokensmith.models.layers import skip_layer_for_tokens

        return skip_layer_for_tokens(self, token_mask, layers, part)

    def run_layers(self, hidden: torch.Tensor, start: int, end: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Continue the forward from layer ``start`` on new hidden states (MOD-7); see
        :func:`tokensmith.models.layers.run_layers`."""
        from tokensmith.models.layers import run_layers

        return run_layers(self, hidden, start, end, **kwargs)

    def insert_embeddings(
        self, inputs: Inputs, vectors: torch.Tensor, positions: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Insert non-vocabulary vectors into the embedded sequence (MOD-13; soft prompts, latent tokens).

        Args:
            inputs: one example or a batch (left-padded).
            vectors: ``[k, d]`` vectors (already in the embedding space, i.e. including any embedding scale).
            positions: for each vector, the index *in the unpadded original sequence* before which it is
                inserted (``0`` = prefix, ``len`` = append).

        Returns:
            dict with ``inputs_embeds [B, T+k, d]``, ``attention_mask``, ``position_ids`` and
            ``virtual_mask`` (True at inserted vectors: exclude them from losses and outputs) and
            ``input_ids`` (pad id at the virtual positions, for target bookkeeping).
        """
        from tokensmith.models.embeddings import insert_embeddings

        ids, am = self._ids_and_mask(self.as_batch(inputs))
        emb = self.embed(ids)
        return insert_embeddings(emb, am.to(emb.device), ids.to(emb.device), vectors.to(emb), positions, self.pad_token_id)

    # ------------------------------------------------------------------ vocabulary surgery
    def add_tokens(self, tokens: Sequence[str], init: Any = "mean", special: bool = False, **kw: Any) -> list[int]:
        """Add tokens to tokenizer and embeddings (MOD-14); see :func:`tokensmith.models.surgery.add_tokens`."""
        from tokensmith.models.surgery import add_tokens

        return add_tokens(self, tokens, init, special, **kw)

    def set_embeddings(self, ids: Any, E_in: torch.Tensor, E_out: torch.Tensor | None = None) -> None:
        """Write embedding rows, tied or untied (MOD-14); see :func:`tokensmith.models.surgery.set_embeddings`."""
        from tokensmith.models.surgery import set_embeddings

        set_embeddings(self, ids, E_in, E_out)

    def add_head(self, name: str, module: nn.Module, at: str = "final_norm") -> nn.Module:
        """Attach a trainable extra head at a hook point (MOD-15); see :func:`tokensmith.models.heads.add_head`."""
        from tokensmith.models.heads import add_head

        return add_head(self, name, module, at)

    def _rediscover(self) -> None:
        spec_scale = self.structure.embed_scale
        tup = self.structure.layer_returns_tuple
        self.structure = discover(self.model, self._spec)
        self.structure.embed_scale = spec_scale
        self.structure.layer_returns_tuple = tup

    # ------------------------------------------------------------------ pooling
    def pool(
        self,
        inputs: Inputs,
        method: str | None = None,
        layers: Sequence[int] | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings ``[B, d]`` by pooling hidden states over real tokens (MOD-12).

        Defaults come from ``self.pooling_config`` (for ``ts.load("minilm-l6")``: sentence-transformers'
        mean pooling + L2 normalisation, max length 256), else mean pooling without normalisation.

        Args:
            inputs: a string, a list of strings (tokenized with truncation, as sentence-transformers
                does), or encoded inputs.
            method: ``'mean'``, ``'cls'``, ``'last'`` or ``'max'``.
            layers: hidden-state layers to average first (WhiteningBERT: ``(1, -1)``; index 0 is the
                embedding output).
            normalize: L2-normalise.

        Examples:
            >>> import tokensmith as ts
            >>> ts.tiny("bert").pool(["a sentence", "another one"]).shape[0]
            2
        """
        from tokensmith.models import pooling

        cfg = self.pooling_config
        method = method or (cfg.method if cfg else "mean")
        if layers is None and cfg is not None:
            layers = cfg.layers
        normalize = normalize if normalize is not None else (cfg.normalize if cfg else False)
        if isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)):
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            with torch.no_grad():
                return pooling.sentence_embedding(
                    self.model, self.tokenizer, texts, normalize, method=method, layers=layers,
                    max_length=cfg.max_length if cfg else None,
                )
        batch = self.as_batch(inputs)
        _, am = self._ids_and_mask(batch)
        hs = self.hidden_states(batch)
        out = pooling.pool(list(hs), am.to(hs.device), method=method, layers=layers if layers is not None else -1)
        return pooling.l2_normalize(out) if normalize else out

    def sentence_embedding(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Embed texts with the adapter's pooling configuration (see :meth:`pool`)."""
        return self.pool(texts)

    @contextmanager
    def eval_mode(self):
        """Temporarily put the model in eval mode."""
        was = self.model.training
        self.model.eval()
        try:
            yield self
        finally:
            self.model.train(was)


def _forward_params(model: nn.Module) -> set[str]:
    """Names ``model.forward`` accepts. A wrapper whose forward takes ``**kwargs`` and passes them on to a wrapped
    model (PEFT's ``PeftModel``: ``get_base_model()``) also accepts the wrapped model's names (``position_ids``,
    ``logits_to_keep``, ...)."""
    sig = inspect.signature(model.forward)
    names = set(sig.parameters)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    base = getattr(model, "get_base_model", None)
    if var_kw and callable(base):
        inner = base()
        if inner is not model:
            names |= set(inspect.signature(inner.forward).parameters)
    return names


def _first_tensor_of(x: Any) -> torch.Tensor:
    """The first tensor of a module output (tuple, list or ``ModelOutput``)."""
    if isinstance(x, torch.Tensor):
        return x
    vals = x.values() if hasattr(x, "values") and callable(x.values) else x
    for v in vals:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"a head module returned {type(x).__name__} without a tensor")


def _scatter_rows(base: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Replace ``base[pos]`` by ``rows`` (differentiable w.r.t. ``rows``)."""
    flat = base.reshape(-1, base.shape[-1])
    idx = torch.nonzero(pos.reshape(-1)).flatten()
    out = flat.index_copy(0, idx, rows.to(flat.dtype))
    return out.reshape(base.shape)


@contextmanager
def _position_offset(model: nn.Module, offset: int):
    """During ``model.generate``: add ``offset`` to the ``position_ids`` that generation computes.

    Generation derives ``position_ids = cumsum(attention_mask) - 1`` (counted from 0) for every model whose
    forward takes them; RoBERTa-family models count from ``padding_idx + 1`` (the offset the load-time probe
    measured, :class:`~tokensmith.models.padding.PositionScheme`), so without it every generated token would
    be predicted from shifted positions.
    """
    if not offset:
        yield
        return

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor):
            kwargs["position_ids"] = pid + offset
        return args, kwargs

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _maybe_seed(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
