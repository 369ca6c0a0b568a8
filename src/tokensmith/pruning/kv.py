"""KV-cache target: score and evict cached tokens per layer and KV head during prefill and/or decode.

How (no per-architecture code): a :class:`KVSession` registers

- a forward pre-hook on the model: it notes the input ids, the padding mask and the cache of every forward
  (and gives a cache-less forward with ``use_cache`` a fresh ``DynamicCache`` it can prune);
- a forward hook on every attention module that is pruned: right after layer ``l``'s attention has written
  its keys/values for this forward, it builds a :class:`~tokensmith.pruning.scores.ScoreContext` (keys,
  values, the attention rows the scorer asked for through ``adapter.capture_attention(rows=...)``, the
  layer's input hidden states, ids, logical positions), scores, selects and evicts that layer
  (``kvcache.evict``, per KV head: the cache keeps ``num_kv_heads``). Later layers of the same forward are
  unaffected, exactly as in kvpress's "compress during prefill" protocol; the *next* forward sees the
  reduced cache;
- a forward hook on the model that applies the position policy after a forward that evicted
  (``"rerotate"``: :func:`tokensmith.models.rerotate.rerotate_cache`, compacting the kept slots to
  ``0..K−1``).

``action="mask"`` evicts nothing: it records the dropped columns per layer and KV head and removes them
as keys from every later query with :func:`tokensmith.models.masking.attention_override` (simulated
pruning: the same attention for the kept tokens, no memory saved; the report says so).

The session works in *slot* coordinates (what each layer holds) and keeps, per layer, the original column
of every slot, so scorers see the original token ids, logical positions and padding of what is cached,
also after several evictions and re-rotations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import kvcache
from tokensmith.models.hooks import internal_forward_running
from tokensmith.pruning.report import ReductionReport, cache_bytes
from tokensmith.pruning.scores import ScoreContext

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter
    from tokensmith.pruning.reducer import Reducer

__all__ = ["KVSession"]


def _rows_arg(rows: list[Any]) -> Any:
    """The union of the scorers' attention rows as a ``capture_attention(rows=...)`` argument."""
    if not rows:
        return None
    if any(r == "all" for r in rows):
        return None
    w = max(1 if r == "last" else int(r) for r in rows)
    return slice(-w, None)


class KVSession:
    """The hooks of one ``with reducer.apply(adapter)`` block on the KV cache (see the module docstring)."""

    def __init__(self, reducer: Reducer, adapter: ModelAdapter, report: ReductionReport):
        self.r = reducer
        self.adapter = adapter
        self.report = report
        s = adapter.structure
        if not adapter.is_causal:
            raise ValueError(
                "target='kv' prunes the KV cache of a causal LM; for encoders use target='encoder' (ToMe)"
            )
        self.num_layers = s.num_layers
        have = [i for i in range(s.num_layers) if s.attn[i] is not None]
        layers = have if reducer.layers is None else [int(i) % s.num_layers for i in reducer.layers]
        bad = [i for i in layers if i not in have]
        if bad:
            raise ValueError(f"layer(s) {bad} have no attention / KV cache; layers with attention: {have}")
        self.layers = sorted(set(layers))
        self.ratios = reducer.layer_ratios(self.layers)
        self.needs = reducer.scorer.all_needs()
        self.rows = _rows_arg(reducer.scorer.all_rows())
        self.H = s.num_heads
        self.Hkv = s.num_kv_heads or s.num_heads
        self._handles: list[Any] = []
        self._probe: Any = None
        self._override: Any = None
        self.cache: Any = None
        self.state: dict[int, dict[str, Any]] = {i: {} for i in self.layers}
        self.orig: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, S] original column of each slot
        self.dropped: dict[int, torch.Tensor] = {}  # mask action: layer -> [B, H_kv, N] dropped columns
        self.col_valid: torch.Tensor | None = None  # [B, N] real columns
        self.col_ids: torch.Tensor | None = None  # [B, N] token ids (-1 unknown)
        self.col_pos: torch.Tensor | None = None  # [B, N] logical positions
        self.col_special: torch.Tensor | None = None
        self.spans: dict[str, torch.Tensor] = {}
        self.next_pos: torch.Tensor | None = None  # [B] next logical position
        self.step = 0
        self._evicted_this_forward = False
        self._hidden: dict[int, torch.Tensor] = {}
        self._q = 0
        self._busy = False

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> KVSession:
        ad = self.adapter
        try:
            self._handles.append(ad.model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(ad.model.register_forward_hook(self._post, with_kwargs=True))
            for i in self.layers:
                self._handles.append(ad.structure.attn[i].register_forward_hook(self._attn_hook(i)))
                if "hidden" in self.needs:
                    layer_mod = ad.structure.layers[i]
                    self._handles.append(
                        layer_mod.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True)
                    )
            if "attention" in self.needs:
                impl = getattr(ad.model.config, "_attn_implementation", None)
                if impl not in (None, "sdpa", "eager") and not str(impl).startswith("tokensmith"):
                    raise ValueError(
                        f"scorer {self.r.scorer!r} needs attention probabilities, which the {impl!r} kernel does not "
                        "expose; reload the model with attn_implementation='sdpa' (or 'eager'), or use an "
                        "attention-free scorer (KeyNorm, SinksRecent, Separators, Redundancy(on='keys'))"
                    )
                self._probe = ad.capture_attention(layers=self.layers, rows=self.rows)
                self._probe.__enter__()
            if self.r.action == "mask":
                from tokensmith.models.masking import attention_override

                self._override = attention_override(ad, {i: self._mask_fn(i) for i in self.layers})
                self._override.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._override is not None:
            self._override.__exit__(None, None, None)
            self._override = None
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
        self._finish_report()

    # ------------------------------------------------------------------ model hooks
    def _pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._busy or internal_forward_running():
            return None
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            return None
        B, Q = int(x.shape[0]), int(x.shape[1])
        key = "cache" if "cache" in kwargs or "cache" in self.adapter._fwd_params else "past_key_values"
        cache = kwargs.get(key)
        changed = False
        use_cache = kwargs.get("use_cache", getattr(self.adapter.model.config, "use_cache", True))
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.adapter.model.config)
            kwargs[key] = cache
            kwargs["use_cache"] = True
            changed = True
        self.cache = cache
        self._q = Q
        seen = 0 if cache is None else _seen(cache, self.orig)
        dev = x.device
        new_ids = ids.long() if ids is not None else torch.full((B, Q), -1, dtype=torch.long, device=dev)
        am = kwargs.get("attention_mask")
        if seen == 0 or self.col_valid is None:  # a prefill: everything starts over
            valid = (
                am.bool()
                if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == Q
                else torch.ones(B, Q, dtype=torch.bool, device=dev)
            )
            self.col_valid = valid.to(dev)
            self.col_ids = new_ids
            pid = (valid.long().cumsum(-1) - 1).clamp_min(0)
            self.col_pos = pid
            self.next_pos = valid.long().sum(-1)
            self.orig = {}
            self.dropped = {}
            self.state = {i: {} for i in self.layers}
            self.r.scorer.reset()
            self.step = 0
            self.report.tokens_in = valid.long().sum(-1).cpu()
            self.col_special = self._special(new_ids)
            self.spans = {k: v.to(dev) for k, v in self.r._spans.items() if v.shape == (B, Q)}
            self.report.extra["columns_seen"] = Q
        else:
            if self.col_valid.shape[0] != B:
                raise ValueError(
                    f"a forward with batch {B} continues a pruned cache of batch {self.col_valid.shape[0]}; "
                    "use one cache per batch inside the block"
                )
            newpos = self.next_pos[:, None] + torch.arange(Q, device=dev)  # type: ignore[index]
            self.col_valid = torch.cat([self.col_valid, torch.ones(B, Q, dtype=torch.bool, device=dev)], 1)
            self.col_ids = torch.cat([self.col_ids, new_ids], 1)  # type: ignore[list-item]
            self.col_pos = torch.cat([self.col_pos, newpos], 1)  # type: ignore[list-item]
            self.col_special = torch.cat([self.col_special, self._special(new_ids)], 1)  # type: ignore[list-item]
            self.next_pos = self.next_pos + Q  # type: ignore[operator]
            self.step += 1
            self.report.extra["columns_seen"] = int(self.col_valid.shape[1])
            for k in list(self.dropped):
                d = self.dropped[k]
                self.dropped[k] = torch.cat(
                    [d, torch.zeros(*d.shape[:2], Q, dtype=torch.bool, device=d.device)], -1
                )
        self._evicted_this_forward = False
        return (args, kwargs) if changed else None

    def _special(self, ids: torch.Tensor) -> torch.Tensor:
        sp = getattr(self.adapter.tokenizer, "all_special_ids", None) or []
        if not sp:
            return torch.zeros_like(ids, dtype=torch.bool)
        return torch.isin(ids, torch.as_tensor(sp, dtype=torch.long, device=ids.device))

    def _post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy or internal_forward_running():
            return
        if self._probe is not None:
            for i in self.layers:
                self._probe.records[i].clear()
        self._hidden.clear()
        if self._evicted_this_forward and self.r.positions == "rerotate" and self.r.action == "drop":
            from tokensmith.models.rerotate import rerotate_cache

            mask = self.slot_mask()
            self._busy = True
            try:
                res = rerotate_cache(self.adapter, self.cache, attention_mask=mask, sliding="skip")
            finally:
                self._busy = False
            self.next_pos = res.next_position.to(self.next_pos.device).long()  # type: ignore[union-attr]
            # logical positions of the kept slots are now 0..r_b-1: record them for the scorers
            for o in self.orig.values():
                valid = self.col_valid.gather(1, o[:, 0])  # type: ignore[union-attr]
                newp = (valid.long().cumsum(-1) - 1).clamp_min(0)
                self.col_pos = self.col_pos.scatter(1, o[:, 0], newp)  # type: ignore[union-attr]
                break
        if self._evicted_this_forward and self.r.positions == "reindex":
            kept = [self.report.kept[i].amax(-1) for i in self.layers if i in self.report.kept]
            if kept:
                self.next_pos = torch.stack(kept).amax(0).to(self.next_pos.device).long()  # type: ignore[union-attr]
        if self.next_pos is not None:
            self.report.extra["next_position"] = self.next_pos.detach().cpu().clone()

    def _layer_pre(self, i: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(h, torch.Tensor):
                self._hidden[i] = h.detach()

        return hook

    # ------------------------------------------------------------------ the pruning step
    def _attn_hook(self, i: int):
        def hook(module: Any, args: tuple, output: Any) -> None:
            if self.cache is None or self._busy or internal_forward_running():
                return
            self._prune_layer(i)

        return hook

    def _slots_orig(self, i: int, S: int, B: int) -> torch.Tensor:
        o = self.orig.get(i)
        N = int(self.col_valid.shape[1])  # type: ignore[union-attr]
        if o is None:
            o = torch.arange(N - S, N, device=self.col_valid.device).expand(B, self.Hkv, S)  # type: ignore[union-attr]
        elif o.shape[-1] < S:  # columns appended since the last eviction
            n_new = S - o.shape[-1]
            o = torch.cat([o, torch.arange(N - n_new, N, device=o.device).expand(B, o.shape[1], n_new)], -1)
        self.orig[i] = o
        return o

    def _prune_layer(self, i: int) -> None:
        cache = self.cache
        kind = kvcache.layer_kind(cache, i)
        if kind != "full":
            if kind == "sliding":
                self.report.note("sliding-window layers are left whole (already bounded by their window)")
            return
        phase = "prefill" if self.step == 0 else "decode"
        k, v = kvcache.layer_kv(cache, i)
        B, Hkv, S = k.shape[:3]
        orig = self._slots_orig(i, S, B)
        if self.r.action == "mask" and i in self.dropped:
            held = ~self.dropped[i].gather(-1, orig)  # [B, Hkv, S]
        else:
            held = torch.ones(B, Hkv, S, dtype=torch.bool, device=k.device)
        col_valid = self.col_valid.gather(1, orig[:, 0])  # type: ignore[union-attr]
        n_real = (held & col_valid[:, None, :]).sum(-1)  # [B, Hkv]
        budget = self._budget(i, phase, n_real)
        if budget is None:
            self._record(i, n_real)
            return
        per_head_cols = not bool((orig == orig[:, :1]).all())
        if self.r.action == "mask":
            per_head_cols = True
        valid = col_valid if not per_head_cols else col_valid
        if self.r.action == "mask":
            # already-dropped slots are invalid for scoring in mask mode
            valid_h = held & col_valid[:, None, :]
        else:
            valid_h = None
        ctx = self._context(i, phase, k, v, orig, valid, per_head_cols)
        scores = self.r.scorer(ctx).float()
        if valid_h is not None:
            scores = scores.expand(B, Hkv, S).masked_fill(~valid_h, -math.inf)
        protect = self.r.protect_mask(ctx)
        if self.r.action == "mask":
            keep = self._select_mask(scores, valid_h, protect, budget)
        else:
            keep = self.r.select_keep(scores, valid, protect, budget)  # [B, h, K] slot indices
        if keep.shape[1] == 1 and Hkv > 1:
            keep = keep.expand(B, Hkv, keep.shape[-1])
        K = keep.shape[-1]
        kept_valid = col_valid[:, None, :].expand(B, Hkv, S).gather(-1, keep)
        if self.r.action == "mask":
            new_held = torch.zeros_like(held).scatter(-1, keep, True) & held
            drop_cols = torch.zeros(B, Hkv, int(self.col_valid.shape[1]), dtype=torch.bool, device=k.device)  # type: ignore[union-attr]
            drop_cols.scatter_(-1, orig, ~new_held)
            prev = self.dropped.get(i)
            self.dropped[i] = drop_cols if prev is None else (prev | drop_cols)
            after = (new_held & col_valid[:, None, :]).sum(-1)
        else:
            if K == S:
                self._record(i, n_real)
                return
            cols = kvcache.stored_positions(cache, i).gather(-1, keep)
            kvcache.evict(cache, {i: cols})
            self.orig[i] = orig.gather(-1, keep)
            st = self.state.get(i, {})
            if "h2o" in st and "h2o_cols" in st:
                pass  # HeavyHitter remaps its totals by columns (ctx.columns)
            after = kept_valid.sum(-1)
            self._evicted_this_forward = True
        self.report.events.append(
            {
                "layer": i,
                "phase": phase,
                "step": self.step,
                "before": n_real.float().mean().item(),
                "after": after.float().mean().item(),
            }
        )
        self._record(i, after)

    def _select_mask(
        self, scores: torch.Tensor, valid_h: torch.Tensor, protect: torch.Tensor | None, budget: Any
    ) -> torch.Tensor:
        # per head, keep the best `budget` of the held real slots; returns slot indices [B, Hkv, K] (K may
        # include held pads as fillers, which stay masked by the model's own padding mask)
        from tokensmith.pruning.select import topk_keep

        B, H, S = valid_h.shape
        out = []
        for h in range(H):
            p = None
            if protect is not None:
                p = protect if protect.dim() == 2 else protect[:, h if protect.shape[1] > 1 else 0]
            sh = scores[:, h : h + 1] if scores.shape[1] > 1 else scores
            out.append(topk_keep(sh, budget, valid_h[:, h], p))
        K = max(o.shape[-1] for o in out)
        out = [torch.cat([o, o[..., -1:].expand(*o.shape[:2], K - o.shape[-1])], -1) for o in out]
        return torch.cat(out, 1)

    def _budget(self, i: int, phase: str, n_real: torch.Tensor) -> torch.Tensor | None:
        """Real tokens to keep per row, or None when this layer/phase does not prune now."""
        r = self.r
        nmax = n_real.amax(-1)  # [B]
        if phase == "prefill":
            if r.phase not in ("prefill", "both"):
                return None
            if r.capacity is not None:
                k = torch.clamp(torch.full_like(nmax, int(r.capacity)), max=nmax)
            elif r.budget is not None:
                k = torch.clamp(torch.full_like(nmax, int(r.budget)), max=nmax)
                if bool((nmax <= int(r.budget)).all()):
                    self.report.note("budget >= length: nothing pruned at prefill")
            else:
                ratio = self.ratios.get(i, r.ratio)
                if ratio is None or ratio == 0:
                    return None
                k = torch.floor(nmax.double() * (1.0 - ratio) + 1e-9).long().clamp_min(1)
        else:
            if r.phase not in ("decode", "both") or r.capacity is None:
                return None
            if self.step % max(1, r.every) != 0:
                return None
            if bool((nmax <= int(r.capacity)).all()):
                return None
            k = torch.clamp(torch.full_like(nmax, int(r.capacity)), max=nmax)
        if bool((k >= nmax).all()):
            return None
        return k

    def _context(self, i: int, phase: str, k, v, orig, valid, per_head_cols: bool) -> ScoreContext:
        B, Hkv, S = k.shape[:3]
        o = orig if per_head_cols else orig[:, :1]
        flat = o.reshape(B, -1)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            x = t.gather(1, flat).reshape(o.shape)
            return x if per_head_cols else x[:, 0]

        attn = rows = None
        if self._probe is not None:
            recs = self._probe.records[i]
            if recs:
                attn = recs[-1]
                recs.clear()
                R = attn.shape[2]
                rows = torch.arange(S - R, S)
        spans = {}
        for name, m in self.spans.items():
            spans[name] = take(m)  # type: ignore[assignment]
        return ScoreContext(
            layer=i,
            phase=phase,
            valid=valid,
            attn=attn,
            attn_rows=rows,
            keys=k,
            values=v,
            hidden=self._hidden.get(i),
            input_ids=take(self.col_ids),
            positions=take(self.col_pos),
            columns=orig,
            spans=spans,  # type: ignore[arg-type]
            special=take(self.col_special),
            num_heads=self.H,
            num_kv_heads=Hkv,
            adapter=self.adapter,
            state=self.state.setdefault(i, {}),
        )

    def _record(self, i: int, kept: torch.Tensor) -> None:
        self.report.kept[i] = kept.detach().cpu()

    # ------------------------------------------------------------------ mask action
    def _mask_fn(self, i: int):
        def fn(ctx: Any) -> torch.Tensor:
            d = self.dropped.get(i)
            if d is None or ctx.is_prefill:
                return torch.ones(1, 1, 1, 1, dtype=torch.bool)
            cols = ctx.key_columns  # [B, 1 | H_kv, K]
            B = cols.shape[0]
            c = cols.expand(B, d.shape[1], cols.shape[-1]).clamp(max=d.shape[-1] - 1)
            allowed = ~d.gather(-1, c)
            allowed = allowed | (cols.expand_as(c) >= d.shape[-1])
            return allowed[:, :, None, :]

        return fn

    # ------------------------------------------------------------------ decode helpers
    def slot_mask(self) -> torch.Tensor | None:
        """``[B, S]`` real-slot mask of the (uniform) pruned cache, or None when no pad slot is held."""
        cache = self.cache
        masks = []
        for i in range(kvcache.num_cache_layers(cache)):
            if kvcache.layer_kind(cache, i) != "full":
                continue
            k, _ = kvcache.layer_kv(cache, i)
            S = k.shape[2]
            o = self._slots_orig(i, S, k.shape[0]) if (i in self.orig or i in self.layers) else None
            if o is None:
                N = int(self.col_valid.shape[1])  # type: ignore[union-attr]
                o = torch.arange(N - S, N, device=k.device).expand(k.shape[0], 1, S)
            masks.append(self.col_valid.gather(1, o[:, 0]))  # type: ignore[union-attr]
        if not masks or all(bool(m.all()) for m in masks):
            return None
        first = masks[0]
        if any(m.shape != first.shape or not bool((m == first).all()) for m in masks):
            raise ValueError(
                "the pruned cache holds padding slots that differ between layers (per-layer budgets with a "
                "left-padded batch); run the rows separately, or use one ratio for every layer"
            )
        return first

    def _finish_report(self) -> None:
        cache = self.cache
        if cache is None or not hasattr(cache, "layers"):
            return
        try:
            after = cache_bytes(cache)
        except Exception:  # pragma: no cover - foreign cache types
            return
        N = int(self.report.extra.get("columns_seen", 0))
        if self.col_valid is not None:
            self.report.extra["tokens_seen"] = self.col_valid.long().sum(-1).cpu()
        before = 0
        for i in range(kvcache.num_cache_layers(cache)):
            kind = kvcache.layer_kind(cache, i)
            if kind not in ("full", "sliding"):
                continue
            k, v = kvcache.layer_kv(cache, i)
            per_col = (k.numel() * k.element_size() + v.numel() * v.element_size()) / max(1, k.shape[2])
            cols = N if kind == "full" else k.shape[2]
            before += int(round(per_col * cols))
        self.report.kv_bytes_before = before
        self.report.kv_bytes_after = after if self.r.action == "drop" else before


def _seen(cache: Any, orig: dict[int, torch.Tensor]) -> int:
    """Columns a cache has seen (0: empty, a prefill)."""
    if not hasattr(cache, "layers"):
        return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    n = kvcache.num_cache_layers(cache)
    best = 0
    for i in range(n):
        kind = kvcache.layer_kind(cache, i)
        if kind == "sliding":
            best = max(best, int(cache.layers[i].cumulative_length))
        elif kind == "full":
            k, _ = kvcache.layer_kv(cache, i)
            best = max(best, int(k.shape[2]))
    return best
