"""The model adapter: one object every tokensmith subpackage stands on.

``ModelAdapter(model, tokenizer)`` wraps any transformers model (causal LM, masked LM / encoder) without
rewriting weights. It discovers the structure (see :mod:`tokensmith.models.structure`), validates it once,
and provides the primitives of METHODS.md section 1: span-aware encoding, per-token log-probs with logits
only where needed, chunked KL, the embedding / one-hot path, hooks and steering, a scoped attention probe,
generation with hooks, and micro-batching with OOM back-off.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokensmith.models import logprobs as lp
from tokensmith.models.attention import AttentionProbe
from tokensmith.models.batching import MicroBatcher
from tokensmith.models.encoding import Encoded, EncodedBatch, encode, pad_batch
from tokensmith.models.hooks import HookSession, StopForward, hook_names, steer_fn
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
        validate: run the load-time self-check (layer i output ≈ ``hidden_states[i+1]``, attention rows
            sum to 1, GQA group sizes).

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
        self.structure.embed_scale = measure_embed_scale(self.structure.embed)
        self.batcher = MicroBatcher()
        self._fwd_params = set(inspect.signature(model.forward).parameters)
        self._validated: dict[str, Any] = {}
        self.pooling_config: Any = None  # set by ts.load for sentence encoders (pooling.PoolingConfig)
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
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
        return self.structure.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.structure.embed.weight.dtype

    @property
    def E(self) -> torch.Tensor:
        """Input embedding matrix ``[V, d]`` (unscaled weight; ``embed_scale`` is applied by :meth:`embed`)."""
        return self.structure.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix ``[V, d]``."""
        if self.structure.lm_head is None:
            raise ValueError("this model has no LM head (an encoder); load it as a masked/causal LM to unembed")
        return self.structure.lm_head.weight

    @property
    def tied(self) -> bool:
        return self.structure.tied

    @property
    def is_causal(self) -> bool:
        return self.structure.is_causal

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
            "attention_probe": all(a is not None for a in s.attn)
            and getattr(self.config, "_attn_implementation", "eager") in ("sdpa", "eager"),
            "generate": hasattr(self.model, "generate") and s.is_causal and s.lm_head is not None,
            "chat_template": getattr(self.tokenizer, "chat_template", None) is not None,
            "fast_tokenizer": bool(getattr(self.tokenizer, "is_fast", False)),
            "run_layers": self.is_causal and not s.is_encoder_decoder,
            "kv_cache_access": "use_cache" in self._fwd_params and self.is_causal,
            "resid_mid": False,
        }
        missing = [k for k, v in features.items() if not v]
        return {
            "name": self.name,
            "model_class": type(self.model).__name__,
            "attn_implementation": getattr(self.config, "_attn_implementation", None),
            "structure": s.summary(),
            "hook_points_per_layer": layer0,
            "features": features,
            "missing": missing,
            "validation": dict(self._validated),
        }

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any]:
        """Load-time self-check; raises :class:`StructureError` when discovery picked the wrong modules."""
        s = self.structure
        if s.num_heads and s.num_kv_heads and s.num_heads % s.num_kv_heads:
            raise StructureError(f"num_heads={s.num_heads} is not a multiple of num_kv_heads={s.num_kv_heads}")
        if s.is_encoder_decoder:
            self._validated = {"skipped": "encoder-decoder models are not validated by forward probes"}
            return self._validated
        ids = self._probe_ids(6)
        seen: list[bool] = []
        probe = s.layers[0].register_forward_hook(lambda m, a, o: seen.append(isinstance(o, tuple)))
        try:
            with torch.no_grad(), self.hooks(cache="layers.*.resid_post") as h:
                out = self.forward(ids, output_hidden_states=True, logits_to_keep=1 if s.lm_head is not None else None)
        finally:
            probe.remove()
        s.layer_returns_tuple = bool(seen and seen[0])
        hs = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
        report: dict[str, Any] = {"layers_match_hidden_states": None}
        never_ran = [i for i in range(s.num_layers) if f"layers.{i}.resid_post" not in h.cache]
        if never_ran:
            raise StructureError(
                f"layers {never_ran} of the discovered layer stack {s.layers_path!r} never ran during a forward; "
                "the stack is wrong — pass AdapterSpec(layers='path.to.decoder.layers')"
            )
        if hs is not None and len(hs) == s.num_layers + 1:
            worst = 0.0
            for i in range(s.num_layers):
                mine = h.cache[f"layers.{i}.resid_post"]
                ref = hs[i + 1]
                err = (mine - ref).abs().max().item()
                if i == s.num_layers - 1 and err > 1e-4 and s.final_norm is not None:
                    with torch.no_grad():
                        err = min(err, (s.final_norm(mine) - ref).abs().max().item())
                scale = ref.abs().max().item() + 1e-6
                worst = max(worst, err / scale)
                if err > 1e-3 * scale:
                    raise StructureError(
                        f"layer {i} output does not match hidden_states[{i + 1}] (max abs diff {err:.3g}); "
                        f"the discovered layer stack {s.layers_path!r} is wrong — pass AdapterSpec(layers=...)"
                    )
            report["layers_match_hidden_states"] = True
            report["max_rel_err"] = worst
        if self.capabilities_probe_ok():
            with torch.no_grad(), self.capture_attention(layers=[0]) as att:
                self.forward(ids, logits_to_keep=1 if s.lm_head is not None else None)
            rows = att[0].sum(-1)
            if not torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
                raise StructureError("attention probabilities of layer 0 do not sum to 1; attention probe is broken")
            if s.num_heads and att[0].shape[1] != s.num_heads:
                raise StructureError(f"attention has {att[0].shape[1]} heads, config says {s.num_heads}")
            report["attention_rows_sum_to_1"] = True
        self._validated = report
        return report

    def capabilities_probe_ok(self) -> bool:
        s = self.structure
        return (
            all(a is not None for a in s.attn)
            and getattr(self.config, "_attn_implementation", None) in ("sdpa", "eager")
            and not s.is_encoder_decoder
        )

    def _probe_ids(self, n: int) -> torch.Tensor:
        allowed = torch.nonzero(allowed_token_mask(self.tokenizer, self.structure.vocab_size)).flatten()
        if allowed.numel() == 0:
            allowed = torch.arange(min(self.structure.vocab_size, 100))
        step = max(1, allowed.numel() // (n + 1))
        return allowed[step : step * (n + 1) : step][:n].unsqueeze(0)

    # ------------------------------------------------------------------ encoding
    def encode(self, prompt: Any = None, target: str | None = None, **kwargs: Any) -> Encoded:
        """Span-aware joint encoding; see :func:`tokensmith.models.encoding.encode` for all options.

        Examples:
            >>> import tokensmith as ts
            >>> ad = ts.tiny("llama")
            >>> enc = ad.encode("Hi", target=" there", chat=True)
            >>> enc.target_mask.sum().item() >= 1
            True
        """
        return encode(self.tokenizer, prompt, target, **kwargs)

    def encode_batch(self, items: Sequence[Any], **kwargs: Any) -> EncodedBatch:
        """Encode several examples and left-pad them.

        Each item is a str (prompt), an :class:`Encoded`, a ``(prompt, target)`` tuple, or a dict of
        :meth:`encode` keyword arguments; ``kwargs`` apply to all.
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
        """The encoded target when there is one, else every real token that has a predicting position
        (all but the first real token of each left-padded row)."""
        ids, am = self._ids_and_mask(batch)
        if isinstance(batch, EncodedBatch) and batch.target_mask.any():
            return batch.target_mask
        first = (am.long().cumsum(-1) == 1) & am.bool()
        return am.bool() & ~first

    # ------------------------------------------------------------------ forward
    def _model_inputs(self, batch: EncodedBatch | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(batch, EncodedBatch):
            d = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        else:
            d = dict(batch)
        am = d.get("attention_mask")
        padded = am is not None and not bool(am.all())
        if "position_ids" not in self._fwd_params:
            d.pop("position_ids", None)
        elif padded and "position_ids" not in d:
            d["position_ids"] = (am.long().cumsum(-1) - 1).clamp_min(0)
        elif not padded and isinstance(batch, EncodedBatch):
            d.pop("position_ids")  # no padding: the model derives the same positions (exact HF path)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

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
        are not used. Position ids are derived from the attention mask, so left padding is safe.
        Returns the HF output object, or None when a hook's ``stop_after`` ended the forward early.
        """
        if inputs_embeds is not None:
            if not torch.isfinite(inputs_embeds).all():
                raise ValueError("inputs_embeds contains NaN or inf")
            B, T = inputs_embeds.shape[:2]
            am = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long)
            d: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": am.to(inputs_embeds.device)}
            if "position_ids" in self._fwd_params:
                pid = position_ids if position_ids is not None else (am.long().cumsum(-1) - 1).clamp_min(0)
                d["position_ids"] = pid.to(inputs_embeds.device)
        else:
            if inputs is None:
                raise ValueError("give inputs (text, Encoded, EncodedBatch or ids) or inputs_embeds")
            batch = self.as_batch(inputs)
            if attention_mask is not None and isinstance(batch, dict):
                batch["attention_mask"] = attention_mask
            d = self._model_inputs(batch)
            if position_ids is not None and "position_ids" in self._fwd_params:
                d["position_ids"] = position_ids.to(self.device)
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
            max_batch_size: micro-batch size (chunks halve on OOM; the adapter remembers what fit).

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
        if self.is_causal and tm[:, 0].any():
            raise ValueError("the first token cannot be scored by a causal LM (it has no context)")
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
        parts = mb.run(run, B, key=("token_logprobs", T), bytes_per_item=bytes_per_row)
        return torch.cat(parts, 0)

    def sequence_logprob(self, inputs: Inputs, target_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Σ_t log p(x_t | x_<t) over the target tokens: ``[B]``."""
        return self.token_logprobs(inputs, target_mask, **kw).sum(-1)

    def next_token_logprobs(self, inputs: Inputs) -> torch.Tensor:
        """Log-distribution of the next token after each (left-padded) sequence: ``[B, V]``."""
        with torch.no_grad():
            out = self.forward(inputs, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def kl(self, other: ModelAdapter, inputs: Inputs, mask: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Per-token KL(p_self ‖ p_other) of the next-token distributions, ``[B, T]``.

        Value at position t compares the distributions that predict token t (so it aligns with
        :meth:`token_logprobs`). Only the masked positions' logits are computed, and the KL is chunked.

        Raises:
            ValueError: when the two adapters' tokenizers differ (KL over different vocabularies is
                meaningless).
        """
        if self.tokenizer.get_vocab() != other.tokenizer.get_vocab():
            raise ValueError("KL needs the same tokenizer on both models; these vocabularies differ")
        batch = self.as_batch(inputs)
        ids, _ = self._ids_and_mask(batch)
        if mask is None:
            mask = self._default_scored_mask(batch).clone()
            mask[:, 0] = False
        keep = lp.shift_target_mask(mask)
        outs = []
        for ad in (self, other):
            d = ad._model_inputs(batch if isinstance(batch, EncodedBatch) else dict(batch))
            if ad._keep_mask_supported():
                d["logits_to_keep"] = keep.to(ad.device)
            with torch.no_grad():
                z = ad.model(**d).logits
            outs.append(z[keep.to(z.device)] if z.dim() == 3 else z)
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
        """Logits ``W_U · norm_f(h)`` for hidden states ``h`` (logit lens). Applies the config's final logit
        soft-capping when the model has one."""
        s = self.structure
        if s.lm_head is None:
            raise ValueError("this model has no LM head to unembed with")
        x = s.final_norm(h) if (final_norm and s.final_norm is not None) else h
        z = self._head_module()(x)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    def _head_module(self) -> nn.Module:
        """The module that maps final hidden states to logits: the model's top-level child that holds the
        output embeddings (``lm_head`` for causal LMs; BERT's ``cls`` prediction head with its transform)."""
        s = self.structure
        path = s.lm_head_path or ""
        top = path.split(".")[0] if path else ""
        head = getattr(self.model, top, None) if top else None
        return head if isinstance(head, nn.Module) else s.lm_head  # type: ignore[return-value]

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
    ) -> HookSession:
        """Context manager caching/editing activations at canonical names; see :class:`HookSession`."""
        return HookSession(self, cache, edit, grad, stop_after, detach, offload)

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

    def capture_attention(self, layers: Iterable[int] | None = None, rows: Any = None) -> AttentionProbe:
        """Record attention probabilities for ``layers`` only (others keep SDPA); see :class:`AttentionProbe`."""
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
        eos = getattr(self.tokenizer, "eos_token_id", None)
        kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": self.pad_token_id}
        if eos is not None:
            kw.setdefault("eos_token_id", eos)
        kw.update(gen_kwargs)
        with _maybe_seed(seed, self.device), torch.no_grad():
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


def _scatter_rows(base: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Replace ``base[pos]`` by ``rows`` (differentiable w.r.t. ``rows``)."""
    flat = base.reshape(-1, base.shape[-1])
    idx = torch.nonzero(pos.reshape(-1)).flatten()
    out = flat.index_copy(0, idx, rows.to(flat.dtype))
    return out.reshape(base.shape)


@contextmanager
def _maybe_seed(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
