"""Architecture sweep: which transformers architectures the model adapter supports, feature by feature.

For every ``model_type`` of the installed transformers that has a causal-LM class
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), a masked-LM class (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``) or a
seq2seq-LM class (``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``), the sweep builds a tiny random model
from the default config class with every size field it knows shrunk (2 layers, width 64, 4 heads of 16,
2 key/value heads, FFN 128, 4 experts, vocabulary = the tokenizer's), perturbs every norm weight and bias
away from its initial value (so that picking the wrong final norm shows in the logit lens), wraps it in
``ModelAdapter(model, tokenizer)`` and runs a feature matrix:

=============  ============================================================================================
``load``       ``ModelAdapter(model, tok)`` including load-time validation (on failure the remaining
               features run on ``validate=False``)
``parity``     ``adapter.forward(ids).logits`` == plain ``model(input_ids, attention_mask)`` logits
``logprobs``   ``adapter.token_logprobs`` == ``log_softmax`` of the full plain logits, gathered
``hooks``      ``hooks(cache="layers.*.resid_post")`` gives one ``[B, T, d]`` tensor per layer, equal to
               ``hidden_states[i + 1]`` for every layer but the last (where the model may apply its final
               norm)
``attention``  ``capture_attention()`` gives ``[B, H, T, T]`` per layer, equal to the eager reference
               (``output_attentions=True`` under ``attn_implementation="eager"``) when the model has one,
               else rows that sum to <= 1 and (for causal models) no weight on future keys
``unembed``    ``adapter.unembed(resid_post of the last layer)`` == the model's logits (logit lens through
               the final norm, soft-capping and logit scaling)
``generate``   ``adapter.generate`` runs, and its first greedy token is the argmax of the plain logits
``left_pad``   a left-padded batch of two examples equals each example alone (token log-probs for causal
               models, logits at real positions otherwise); a loud ``ValueError`` refusing padding counts
               as "refused" (—), not as a failure
``causal``     the adapter's causality decision equals the model's measured behaviour (changing the last
               token does / does not change the plain logits at earlier positions)
=============  ============================================================================================

Each model runs in a forked child process with a timeout, so a hang or a crash costs one row. Each
feature records ``ok`` (✓), ``fail`` (✗, with the numbers), ``error`` (✗, an unexpected exception, with
its text), ``na`` (—, not applicable or refused loudly, with the reason). Results go to
``benchmarks/results/arch_sweep.json`` (rewritten after every model, so a partial run is usable) and
``arch_sweep.md``; a full run (no ``--only`` / ``--limit``) also regenerates the table in
``docs/reference/architectures.md``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/arch_sweep.py                   # everything, ~20-40 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/arch_sweep.py --only llama,bart,roberta
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/arch_sweep.py --limit 10 --kinds causal --out /tmp/sw

The module also exposes :func:`build_tiny` and :func:`run_features` for the tests
(``tests/models/test_arch_sweep.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS_PAGE = ROOT.parent / "docs" / "reference" / "architectures.md"
FEATURES = ("load", "parity", "logprobs", "hooks", "attention", "unembed", "generate", "left_pad", "causal")
KINDS = ("causal", "masked", "seq2seq")
SYMBOL = {"ok": "✓", "fail": "✗", "error": "✗", "na": "—", None: "·"}

WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
# Size fields set wherever the default config has them (values for the tiny model).
SIZE_FIELDS: dict[str, Any] = {
    # width
    "hidden_size": WIDTH, "d_model": WIDTH, "n_embd": WIDTH, "dim": WIDTH, "embed_dim": WIDTH, "emb_dim": WIDTH,
    "word_embed_proj_dim": WIDTH, "d_embed": WIDTH,
    # factorised embeddings keep a factorisation (narrower than the width)
    "embedding_size": 32, "input_embedding_size": 32, "output_embedding_size": 32,
    # depth
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "num_decoder_layers": LAYERS, "num_encoder_layers": LAYERS, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "d_kv": HEAD_DIM, "kv_channels": HEAD_DIM,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM, "kv_lora_rank": 16, "q_lora_rank": 32,
    "rotary_dim": 8,
    # feed-forward
    "intermediate_size": FFN, "n_inner": FFN, "ffn_dim": FFN, "d_ff": FFN, "encoder_ffn_dim": FFN,
    "decoder_ffn_dim": FFN, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "intermediate_size_mlp": FFN, "ffn_hidden_size": FFN, "d_inner": FFN,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    # state-space
    "state_size": 8, "d_state": 8,
    # per-layer token embeddings (Gemma-3n / Gemma-4)
    "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 0,
    # positions
    "max_position_embeddings": 512, "n_positions": 512, "n_ctx": 512,
}
TEXT_A = "The quick brown fox jumps over the lazy dog"
TEXT_B = "Hello world"


# ------------------------------------------------------------------------------------------------ models
def entries(kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, str]]:
    """``(model_type, kind, class name)`` for every mapped architecture of the installed transformers."""
    from transformers.models.auto import modeling_auto as ma

    maps = {
        "causal": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "masked": ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "seq2seq": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    out = []
    for kind in kinds:
        for mt, cls in maps[kind].items():
            out.append((mt, kind, cls if isinstance(cls, str) else cls[0]))
    return sorted(out)


_TOKENIZERS: dict[str, Any] = {}


def tokenizer_for(kind: str) -> Any:
    """A shared real tokenizer: SmolLM2's byte-level BPE (causal, seq2seq) or MiniLM's WordPiece (masked)."""
    key = "bert" if kind == "masked" else "bpe"
    if key not in _TOKENIZERS:
        from tokensmith.models.tiny import _bert_tokenizer, _decoder_tokenizer

        _TOKENIZERS[key] = _bert_tokenizer() if key == "bert" else _decoder_tokenizer()
    import copy

    return copy.deepcopy(_TOKENIZERS[key])


_MISSING = object()


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """getattr that treats any error as absent (Gemma-4 configs raise on per-layer attributes)."""
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001
        return default


def _shrunk_kwargs(cfg_cls: type, vocab: int, tok: Any, kind: str, drop: frozenset[str], depth: int = 0) -> dict[str, Any]:
    default = cfg_cls()
    kw: dict[str, Any] = {}
    for name, val in SIZE_FIELDS.items():
        if name in drop or _get(default, name, _MISSING) is _MISSING:
            continue
        cur = _get(default, name)
        if isinstance(cur, bool) or (cur is not None and not isinstance(cur, int)):
            continue  # e.g. a list per layer, or "auto"
        kw[name] = val
    if hasattr(default, "hidden_dim") and "dim" in kw:  # distilbert: hidden_dim is the FFN width
        kw["hidden_dim"] = FFN
    if isinstance(getattr(default, "qk_rope_head_dim", None), int):
        kw.pop("head_dim", None)  # multi-head latent attention derives its head size from the rope/nope split
    if isinstance(getattr(default, "expand", None), int) and "num_heads" in kw and "head_dim" in kw:
        kw["num_heads"] = default.expand * WIDTH // HEAD_DIM  # Mamba-2: heads · head_dim = expand · width
        if hasattr(default, "n_groups"):
            kw["n_groups"] = 1
    for name in ("vocab_size", "vocab_size_per_layer_input"):
        if _get(default, name, _MISSING) is not _MISSING:
            kw[name] = vocab
    for k, v in (("pad_token_id", tok.pad_token_id), ("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)):
        if v is not None and (hasattr(default, k) or depth == 0):
            kw[k] = v
    if kind == "seq2seq" and hasattr(default, "decoder_start_token_id"):
        kw["decoder_start_token_id"] = tok.pad_token_id
    if kind == "causal" and "is_decoder" in default.to_dict():
        kw["is_decoder"] = True  # BERT-style classes are causal only as decoders (HF's documented use)
    if kind == "causal" and isinstance(default.to_dict().get("causal"), bool):
        kw["causal"] = True  # XLM: the causal-LM use of XLMWithLMHeadModel
    for sub, sub_cls in (getattr(cfg_cls, "sub_configs", None) or {}).items():
        if isinstance(sub_cls, type) and depth < 2:
            try:
                kw[sub] = _shrunk_kwargs(sub_cls, vocab, tok, kind, drop, depth + 1)
            except Exception:  # noqa: BLE001 - keep the default sub-config
                pass
    return kw


def _is_attention_type(t: str) -> bool:
    t = t.lower()
    return ("attention" in t or t in ("attn", "full", "sliding")) and "linear" not in t


def _hybrid_pattern(default: Any) -> list[dict[str, Any]]:
    """Layer-pattern patches to try, best first, for configs that list a block kind per layer.

    Hybrid stacks interleave attention with recurrent / SSM / linear-attention blocks, and the default
    patterns put the first attention layer deep in the stack: 2 shrunk layers would have none (and
    transformers' cache then fails on every forward). The patch is 2 layers with one block of each kind;
    a pattern that the config does not recompute from the depth is truncated to the tiny depth.
    """
    out: list[dict[str, Any]] = []
    for name in ("layer_types", "layers_block_type", "block_types"):
        pat = getattr(default, name, None)
        if not isinstance(pat, (list, tuple)) or len(pat) < 2 or not all(isinstance(t, str) for t in pat):
            continue
        attn = [t for t in pat if _is_attention_type(t)]
        other = [t for t in pat if not _is_attention_type(t)]
        if attn and other and not any(_is_attention_type(t) for t in pat[:LAYERS]):
            out.append({name: [other[0], attn[0]] + [attn[0]] * (LAYERS - 2)})
        out.append({name: list(pat[:LAYERS])})
    if isinstance(getattr(default, "attn_layer_period", None), int):  # Jamba
        patch = {"attn_layer_period": 2, "attn_layer_offset": 1}
        if isinstance(getattr(default, "expert_layer_period", None), int):
            patch.update(expert_layer_period=2, expert_layer_offset=1)
        out.append(patch)
    if isinstance(getattr(default, "attn_layer_indices", None), (list, tuple)):  # Bamba, ...
        out.append({"attn_layer_indices": [1]})
    return out


def _with_pattern(cfg_cls: type, kw: dict[str, Any]) -> Any:
    """``cfg_cls(**kw)`` with the first layer-pattern patch (:func:`_hybrid_pattern`) it accepts, else plain."""
    errors = []
    for patch in [*_hybrid_pattern(cfg_cls()), {}]:
        try:
            config = cfg_cls(**{**kw, **patch})
        except Exception as e:  # noqa: BLE001 - a field this config derives itself, or an invalid pattern
            errors.append(e)
            continue
        if all(list(getattr(config, k, None) or []) == list(v) if isinstance(v, list) else getattr(config, k, None) == v
               for k, v in patch.items()):
            return config
    raise errors[-1] if errors else RuntimeError("no config")


def _perturb_norms(model: torch.nn.Module, seed: int) -> int:
    """Add N(0, 0.3^2) to every norm weight and N(0, 0.1^2) to every norm bias; returns #modules touched."""
    g = torch.Generator().manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if "norm" not in type(mod).__name__.lower():
                continue
            w = getattr(mod, "weight", None)
            b = getattr(mod, "bias", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                w.add_(0.3 * torch.randn(w.shape, generator=g).to(w))
                n += 1
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                b.add_(0.1 * torch.randn(b.shape, generator=g).to(b))
    return n


def build_tiny(model_type: str, kind: str, class_name: str, seed: int = 0) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Build the tiny random model for one sweep entry; returns ``(model, tokenizer, info)``.

    Tries the full shrink first, then without the head-geometry fields, then without the expert fields, so
    that configs with their own head arithmetic still build.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    tok = tokenizer_for(kind)
    vocab = len(tok)
    cfg_cls = CONFIG_MAPPING[model_type]
    model_cls = getattr(transformers, class_name)
    attempts = [
        frozenset(),
        frozenset({"head_dim", "d_kv", "kv_channels", "num_key_value_heads", "num_kv_heads", "multi_query_group_num"}),
        frozenset({"head_dim", "d_kv", "kv_channels", "num_key_value_heads", "num_kv_heads", "multi_query_group_num",
                   "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                   "moe_topk", "n_shared_experts", "n_group", "topk_group", "embedding_size",
                   "input_embedding_size", "output_embedding_size"}),
    ]
    errors = []
    for i, drop in enumerate(attempts):
        try:
            kw = _shrunk_kwargs(cfg_cls, vocab, tok, kind, drop)
            config = _with_pattern(cfg_cls, kw)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = model_cls(config)
            n_params = sum(p.numel() for p in model.parameters())
            if n_params > 60_000_000:
                raise ValueError(f"tiny model too large ({n_params / 1e6:.0f}M parameters): size fields not shrunk")
            model.to(torch.float32).eval()
            if hasattr(model, "set_default_language") and getattr(config, "languages", None):
                model.set_default_language(list(config.languages)[0])  # X-MOD: adapters per language
            touched = _perturb_norms(model, seed)
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tok.pad_token_id
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
                    v = getattr(tok, k, None)
                    if v is not None:
                        setattr(gen, k, v)
            info = {"attempt": i, "n_params": n_params, "norms_perturbed": touched,
                    "attn_implementation": getattr(model.config, "_attn_implementation", None)}
            return model, tok, info
        except Exception as e:  # noqa: BLE001
            errors.append(f"attempt {i}: {type(e).__name__}: {e}")
    raise RuntimeError("cannot build a tiny model: " + " | ".join(errors))


# ------------------------------------------------------------------------------------------------ features
def _short(e: BaseException, n: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _first_tensor(out: Any) -> torch.Tensor:
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


class _Feature:
    def __init__(self, results: dict[str, Any], name: str):
        self.results, self.name = results, name

    def __enter__(self) -> _Feature:
        self.t0 = time.perf_counter()
        return self

    def set(self, status: str, detail: str = "", **extra: Any) -> None:
        self.results[self.name] = {"status": status, "detail": detail, **extra}

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> bool:
        if e is not None:
            if isinstance(e, _NA):
                self.set("na", str(e))
            elif isinstance(e, _Fail):
                self.set("fail", str(e))
            else:
                self.set("error", _short(e), where=traceback.format_tb(tb)[-1].strip()[:300] if tb else "")
        self.results.setdefault(self.name, {"status": "ok", "detail": ""})
        self.results[self.name]["seconds"] = round(time.perf_counter() - self.t0, 3)
        return et is None or issubclass(et, Exception)


class _NA(Exception):
    pass


class _Fail(Exception):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise _Fail(msg)


TOL = 1e-4  # relative (to the reference's max |value|) for fp32 paths through a 2-layer, 64-wide model


def run_features(
    model: torch.nn.Module,
    tok: Any,
    kind: str,
    features: tuple[str, ...] = FEATURES,
    res: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the feature matrix on one model; returns ``{feature: {status, detail, ...}, "_caps": ...}``.

    ``res`` (optional) is filled in place, so a caller keeps the features done before a crash.
    """
    from tokensmith.models.adapter import ModelAdapter

    res = {} if res is None else res
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    ad = None
    with _Feature(res, "load"):
        try:
            ad = ModelAdapter(model, tok)
        except Exception as e:
            first = _short(e)
            res["load"] = {"status": "error", "detail": first}
            try:
                ad = ModelAdapter(model, tok, validate=False)
            except Exception as e2:
                raise RuntimeError(f"{first} (and with validate=False: {_short(e2)})") from None
    if ad is None:
        for f in features:
            res.setdefault(f, {"status": "error", "detail": "adapter could not be built even with validate=False"})
        return res
    try:
        caps = ad.capabilities()
        res["_caps"] = {"features": caps["features"], "structure": {k: v for k, v in caps["structure"].items() if k != "found_by"}}
    except Exception as e:  # noqa: BLE001
        res["_caps"] = {"error": _short(e)}
    ids = tok(TEXT_A, return_tensors="pt").input_ids
    T = ids.shape[1]
    extra: dict[str, Any] = {}
    if seq2seq:
        start = getattr(model.config, "decoder_start_token_id", None)
        start = tok.pad_token_id if start is None else start
        extra["decoder_input_ids"] = torch.cat([torch.tensor([[int(start)]]), ids[:, :4]], 1)
    if "use_cache" in ad._fwd_params:
        extra["use_cache"] = False  # the reference is one full forward; some hybrid caches fail without layers
    ref_out = None
    with torch.no_grad():
        try:
            ref_out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **extra)
        except Exception as e:  # noqa: BLE001
            res["_reference_error"] = _short(e)
    ref = _first_tensor(ref_out) if ref_out is not None else None
    has_logits = ref is not None and ref.dim() == 3 and ref.shape[-1] == ad.structure.vocab_size

    if "parity" in features:
        with _Feature(res, "parity") as f:
            if ref is None:
                raise _Fail("plain HF forward failed: " + res.get("_reference_error", "?"))
            with torch.no_grad():
                mine = _first_tensor(ad.forward(ids, **extra))
            err = _rel(mine, ref)
            f.set("ok" if err <= TOL else "fail", f"rel err {err:.2e}", rel_err=err)

    if "causal" in features:
        with _Feature(res, "causal") as f:
            if seq2seq:
                raise _NA("encoder-decoder (encoder is bidirectional by design)")
            if not has_logits:
                raise _NA("no [B, T, V] logits to measure")
            alt = ids.clone()
            alt[0, -1] = ids[0, 1] if ids[0, 1] != ids[0, -1] else ids[0, 2]
            with torch.no_grad():
                z2 = _first_tensor(model(input_ids=alt, attention_mask=torch.ones_like(alt), **extra))
            dep = _rel(z2[:, : T - 1], ref[:, : T - 1])
            truly = dep <= 1e-6
            says = bool(ad.is_causal)
            if kind == "masked" and truly and not says:
                # a masked LM is bidirectional by construction; no future-token effect on one short input (MRA's
                # block approximation) does not make it a causal LM, and refusing to score it causally is right
                truly = False
            detail = f"adapter is_causal={says}, measured {'causal' if truly else 'bidirectional'} (future-token effect {dep:.1e})"
            f.set("ok" if says == truly else "fail", detail, measured_causal=truly, adapter_causal=says)

    if "logprobs" in features:
        with _Feature(res, "logprobs") as f:
            if not ad.capabilities()["features"].get("token_logprobs"):
                raise _NA("capabilities: token_logprobs unavailable (" + ("not causal" if not ad.is_causal else "no LM head") + ")")
            if not has_logits:
                raise _Fail("no reference logits")
            tm = torch.zeros_like(ids, dtype=torch.bool)
            tm[:, 1:] = True
            mine = ad.token_logprobs(ids, tm)
            full = torch.log_softmax(ref.double(), -1)
            want = torch.zeros_like(mine, dtype=torch.float64)
            want[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            err = float((mine.double() - want).abs().max())
            tol = TOL * max(1.0, float(want.abs().max()))
            f.set("ok" if err <= tol else "fail", f"max abs err {err:.2e} (tol {tol:.1e})", abs_err=err)

    h_cache: dict[str, torch.Tensor] = {}
    if "hooks" in features or "unembed" in features:
        with _Feature(res, "hooks") as f:
            L = ad.structure.num_layers
            with torch.no_grad(), ad.hooks(cache="layers.*.resid_post") as h:
                ad.forward(ids, **extra)
            h_cache = {k: h.cache[k] for k in list(h.cache.keys())}
            missing = [i for i in range(L) if f"layers.{i}.resid_post" not in h_cache]
            _check(not missing, f"no resid_post for layers {missing}")
            d = ad.structure.hidden_size
            bad = {i: tuple(h_cache[f"layers.{i}.resid_post"].shape) for i in range(L)
                   if tuple(h_cache[f"layers.{i}.resid_post"].shape) != (1, T if not seq2seq else h_cache[f"layers.{i}.resid_post"].shape[1], d)}
            _check(not bad, f"resid_post shapes {bad}, expected (1, {T}, {d})")
            hs = None
            if ref_out is not None:
                hs = getattr(ref_out, "decoder_hidden_states", None) if seq2seq else getattr(ref_out, "hidden_states", None)
            if hs is not None and len(hs) in (L, L + 1):
                # hidden_states[i + 1] is layer i's output, or hidden_states[i] where the model omits the embedding
                # output (state-space models); the last entry may be final-normed, so layer L-1 is not compared
                worst, off = min(
                    (max([_rel(h_cache[f"layers.{i}.resid_post"], hs[i + o]) for i in range(L - 1)], default=0.0), o)
                    for o in (1, 0) if L - 1 + o <= len(hs)
                )
                _check(worst <= TOL, f"resid_post differs from hidden_states (rel err {worst:.2e})")
                f.set("ok", f"{L} layers, match hidden_states[i + {off}] (rel err {worst:.1e})")
            else:
                f.set("ok", f"{L} layers, shapes ok (hidden_states has {None if hs is None else len(hs)} entries: not compared)")
        if "hooks" not in features:
            res.pop("hooks", None)

    if "attention" in features:
        with _Feature(res, "attention") as f:
            if not ad.capabilities()["features"].get("attention_probe"):
                raise _NA("capabilities: attention_probe unavailable")
            with torch.no_grad(), ad.capture_attention() as att:
                ad.forward(ids, **extra)
            got = {i: att[i] for i in att.layers if len(att.records.get(i, []))} if hasattr(att, "records") else {}
            _check(bool(got), "no attention recorded")
            eager = None
            impl = getattr(model.config, "_attn_implementation", None)
            try:
                if impl != "eager":
                    model.set_attn_implementation("eager")
                with torch.no_grad():
                    o = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **extra)
                eager = getattr(o, "decoder_attentions", None) if seq2seq else getattr(o, "attentions", None)
            except Exception:  # noqa: BLE001
                eager = None
            finally:
                if impl and impl != "eager":
                    try:
                        model.set_attn_implementation(impl)
                    except Exception:  # noqa: BLE001
                        pass
            if eager is not None and len(eager) == ad.structure.num_layers and all(e is not None for e in eager):
                errs = {}
                for i, a in got.items():
                    e = eager[i]
                    if tuple(a.shape) != tuple(e.shape):
                        raise _Fail(f"layer {i}: probe shape {tuple(a.shape)} != eager {tuple(e.shape)}")
                    errs[i] = float((a.double() - e.double()).abs().max())
                worst = max(errs.values())
                _check(worst <= 1e-4, f"probe differs from eager attentions by {worst:.2e}")
                f.set("ok", f"{len(got)} layers, equal to eager reference (max abs err {worst:.1e})")
            else:
                for i, a in got.items():
                    _check(bool(torch.isfinite(a).all()), f"layer {i}: non-finite attention")
                    _check(float(a.sum(-1).max()) <= 1 + 1e-4, f"layer {i}: rows sum above 1")
                    if ad.is_causal and a.shape[-1] == a.shape[-2]:
                        fut = float(torch.triu(a[0].sum(0), 1).abs().max())
                        _check(fut <= 1e-6, f"layer {i}: weight {fut:.1e} on future keys")
                f.set("ok", f"{len(got)} layers, structural checks (no eager reference)")

    if "unembed" in features:
        with _Feature(res, "unembed") as f:
            if not ad.capabilities()["features"].get("unembed"):
                raise _NA("capabilities: no LM head")
            if not has_logits:
                raise _Fail("no reference logits")
            last = h_cache.get(f"layers.{ad.structure.num_layers - 1}.resid_post")
            _check(last is not None, "no cached resid_post of the last layer")
            with torch.no_grad():
                z = ad.unembed(last)
            want = ref if not seq2seq else ref
            _check(tuple(z.shape) == tuple(want.shape), f"unembed shape {tuple(z.shape)} != logits {tuple(want.shape)}")
            err = _rel(z, want)
            f.set("ok" if err <= TOL else "fail", f"rel err {err:.2e} (final_norm={ad.structure.final_norm_path})", rel_err=err)

    if "generate" in features:
        with _Feature(res, "generate") as f:
            if not ad.capabilities()["features"].get("generate"):
                raise _NA("capabilities: generate unavailable")
            g = ad.generate(TEXT_A, max_new_tokens=3)
            _check(1 <= g.new_tokens[0].numel() <= 3, f"generated {g.new_tokens[0].numel()} tokens")
            if has_logits and not seq2seq:
                p_ids = g.prompt.input_ids
                with torch.no_grad():
                    zp = _first_tensor(model(input_ids=p_ids, attention_mask=torch.ones_like(p_ids), **extra))
                first = int(g.new_tokens[0][0])
                want = int(zp[0, -1].argmax())
                _check(first == want, f"first greedy token {first} != argmax of plain logits {want}")
            f.set("ok", f"{g.new_tokens[0].numel()} new tokens; first = plain argmax")

    if "left_pad" in features:
        with _Feature(res, "left_pad") as f:
            ea, eb = ad.encode(TEXT_A), ad.encode(TEXT_B)
            batch = ad.encode_batch([ea, eb])
            nb = len(eb.input_ids)
            _check(batch.attention_mask[1].sum() < batch.attention_mask.shape[1], "batch not padded")
            try:
                if ad.capabilities()["features"].get("token_logprobs"):
                    tb = ad.token_logprobs(batch)
                    ta, tbb = ad.token_logprobs(ea), ad.token_logprobs(eb)
                    got_b, want_b = tb[1, -nb:], tbb[0]
                    got_a, want_a = tb[0], ta[0]
                    what = "token log-probs"
                else:
                    x_extra = dict(extra)
                    if seq2seq:
                        x_extra = {"decoder_input_ids": extra["decoder_input_ids"].expand(2, -1)}
                    with torch.no_grad():
                        zb = _first_tensor(ad.forward(batch, **x_extra))
                        za = _first_tensor(ad.forward(ea, **extra))
                        zbb = _first_tensor(ad.forward(eb, **extra))
                    if seq2seq:
                        got_b, want_b, got_a, want_a = zb[1], zbb[0], zb[0], za[0]
                    else:
                        got_b, want_b, got_a, want_a = zb[1, -nb:], zbb[0], zb[0], za[0]
                    what = "logits" if seq2seq or has_logits else "outputs"
            except ValueError as e:
                if "pad" in str(e).lower():
                    raise _NA("refused loudly: " + _short(e, 200)) from None
                raise
            scale = max(1.0, float(want_b.abs().max()), float(want_a.abs().max()))
            err = max(float((got_b - want_b).abs().max()), float((got_a - want_a).abs().max()))
            f.set("ok" if err <= TOL * scale else "fail",
                  f"padded vs alone {what}: max abs diff {err:.2e}", abs_err=err)
    return res


# ------------------------------------------------------------------------------------------------ driver
def _child(conn: Any, model_type: str, kind: str, class_name: str, seed: int) -> None:
    torch.set_num_threads(1)
    out: dict[str, Any] = {"model_type": model_type, "kind": kind, "class": class_name}
    t0 = time.perf_counter()
    try:
        model, tok, info = build_tiny(model_type, kind, class_name, seed)
        out["build"] = {"status": "ok", **info}
    except Exception as e:  # noqa: BLE001
        out["build"] = {"status": "error", "detail": _short(e, 1200)}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        conn.send(out)
        return
    feats: dict[str, Any] = {}
    out["features"] = feats
    try:
        run_features(model, tok, kind, res=feats)
    except Exception as e:  # noqa: BLE001
        feats["_crash"] = {"status": "error", "detail": _short(e), "where": traceback.format_exc()[-800:]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    conn.send(out)


def run_one(model_type: str, kind: str, class_name: str, seed: int, timeout: float) -> dict[str, Any]:
    """Run one entry in a forked child with ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, model_type, kind, class_name, seed), daemon=True)
    t0 = time.perf_counter()
    p.start()
    child.close()
    out = None
    if parent.poll(timeout):
        try:
            out = parent.recv()
        except EOFError:
            out = None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if out is None:
        status = "timeout" if time.perf_counter() - t0 >= timeout else f"crashed (exit code {p.exitcode})"
        out = {"model_type": model_type, "kind": kind, "class": class_name,
               "build": {"status": "error", "detail": f"child process {status} after {time.perf_counter() - t0:.0f}s"},
               "seconds": round(time.perf_counter() - t0, 2)}
    return out


def row_status(r: dict[str, Any]) -> str:
    """``pass`` (every feature ✓ or —), ``partial``, or ``unbuilt`` (no tiny model could be made)."""
    if r.get("build", {}).get("status") != "ok":
        return "unbuilt"
    feats = r.get("features", {})
    st = [feats.get(f, {}).get("status") for f in FEATURES]
    return "pass" if all(s in ("ok", "na") for s in st) else "partial"


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    rows = list(results.values())
    out: dict[str, Any] = {"entries": len(rows)}
    for s in ("pass", "partial", "unbuilt"):
        out[s] = sum(row_status(r) == s for r in rows)
    per = {}
    for f in FEATURES:
        c = {"ok": 0, "fail": 0, "error": 0, "na": 0}
        for r in rows:
            if r.get("build", {}).get("status") == "ok":
                s = r.get("features", {}).get(f, {}).get("status")
                if s in c:
                    c[s] += 1
        per[f] = c
    out["per_feature"] = per
    return out


def _cell(r: dict[str, Any], f: str) -> str:
    return SYMBOL.get(r.get("features", {}).get(f, {}).get("status"), "·")


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| architecture | kind | class | " + " | ".join(FEATURES) + " |",
             "|---|---|---|" + "---|" * len(FEATURES)]
    notes = []
    for key in sorted(results):
        r = results[key]
        if r.get("build", {}).get("status") != "ok":
            continue
        lines.append(f"| {r['model_type']} | {r['kind']} | `{r['class']}` | " + " | ".join(_cell(r, f) for f in FEATURES) + " |")
        for f in FEATURES:
            x = r.get("features", {}).get(f, {})
            if x.get("status") in ("fail", "error"):
                notes.append(f"- **{r['model_type']}** ({r['kind']}) `{f}`: {x.get('detail', '')[:160]}")
    unbuilt = [f"{r['model_type']} ({r['kind']})" for k, r in sorted(results.items()) if r.get("build", {}).get("status") != "ok"]
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nFailures (✗), first line of each:\n\n" + "\n".join(notes) + "\n"
    if unbuilt:
        text += ("\nNot built (the sweep could not instantiate a tiny model from the default config; not an "
                 "adapter verdict): " + ", ".join(unbuilt) + ".\n")
    return text


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "timeout_s": args.timeout,
        "tiny_sizes": {"layers": LAYERS, "width": WIDTH, "heads": HEADS, "kv_heads": KV_HEADS,
                       "head_dim": HEAD_DIM, "ffn": FFN},
        "tolerance_rel": TOL,
        "norm_perturbation": "weight += N(0, 0.3^2), bias += N(0, 0.1^2) on every module whose class name contains 'Norm'",
    }


def write(out_dir: Path, m: dict[str, Any], results: dict[str, Any], done: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summ = summarize(results)
    (out_dir / "arch_sweep.json").write_text(json.dumps({"meta": m, "complete": done, "summary": summ,
                                                         "results": results}, indent=1, default=str))
    head = (f"# Architecture sweep\n\ntransformers {m['transformers']}, torch {m['torch']}, seed {m['seed']}, "
            f"{m['threads']} thread(s), per-model timeout {m['timeout_s']} s; tiny models: {LAYERS} layers, width "
            f"{WIDTH}, {HEADS} heads ({KV_HEADS} kv), FFN {FFN}, random norm weights. "
            f"{'Complete run.' if done else 'PARTIAL run.'}\n\n"
            f"{summ['entries']} entries: {summ['pass']} pass every feature (✓ or —), {summ['partial']} partial, "
            f"{summ['unbuilt']} could not be built tiny.\n\n✓ works and matches the reference; ✗ wrong or raised "
            f"(reason below); — not applicable, or refused with a clear error.\n\n")
    (out_dir / "arch_sweep.md").write_text(head + markdown_table(results))


def update_docs(results: dict[str, Any], m: dict[str, Any], page: Path = DOCS_PAGE) -> None:
    """Replace the generated block of ``docs/reference/architectures.md`` with the table."""
    if not page.exists():
        return
    text = page.read_text()
    begin, end = "<!-- arch-sweep:begin -->", "<!-- arch-sweep:end -->"
    if begin not in text or end not in text:
        return
    summ = summarize(results)
    block = (f"{begin}\n_Generated by `benchmarks/arch_sweep.py` with transformers {m['transformers']}, torch "
             f"{m['torch']}, seed {m['seed']}: {summ['entries']} entries, {summ['pass']} pass every feature, "
             f"{summ['partial']} partial, {summ['unbuilt']} not buildable tiny._\n\n{markdown_table(results)}{end}")
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    page.write_text(pre + block + post)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model_types (all kinds of each)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of causal,masked,seq2seq")
    ap.add_argument("--limit", type=int, default=0, help="run at most N entries")
    ap.add_argument("--out", default=str(RESULTS), help="output directory for arch_sweep.{json,md}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    ap.add_argument("--no-docs", action="store_true", help="do not regenerate docs/reference/architectures.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"unknown kinds {bad}; choose from {KINDS}")
    todo = entries(kinds)
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = only - {e[0] for e in todo}
        if unknown:
            ap.error(f"unknown model_type(s) {sorted(unknown)} for kinds {kinds}")
        todo = [e for e in todo if e[0] in only]
    if args.limit:
        todo = todo[: args.limit]
    for k in set(e[1] for e in todo):
        tokenizer_for(k)  # load once in the parent; children inherit it through fork
    import transformers  # noqa: F401  (imported before forking, once)

    import tokensmith.models.adapter  # noqa: F401

    m = meta(args)
    out_dir = Path(args.out)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for n, (mt, kind, cls) in enumerate(todo, 1):
        r = run_one(mt, kind, cls, args.seed, args.timeout)
        results[f"{mt}[{kind}]"] = r
        feats = r.get("features", {})
        line = " ".join(f"{f}={_cell(r, f)}" for f in FEATURES) if r["build"]["status"] == "ok" else "BUILD: " + r["build"]["detail"][:120]
        print(f"[{n}/{len(todo)}] {mt:28s} {kind:8s} {r.get('seconds', 0):6.1f}s  {line}", flush=True)
        if "_crash" in feats:
            print("    crash:", feats["_crash"]["detail"][:200], flush=True)
        write(out_dir, m, results, done=False)
    write(out_dir, m, results, done=True)
    full = not args.only and not args.limit and set(kinds) == set(KINDS)
    if full and not args.no_docs:
        update_docs(results, m)
    s = summarize(results)
    print(f"\n{s['entries']} entries in {time.perf_counter() - t0:.0f}s: {s['pass']} pass, {s['partial']} partial, "
          f"{s['unbuilt']} unbuilt  (transformers {m['transformers']}, torch {m['torch']}, seed {m['seed']}, "
          f"threads {m['threads']})")
    for f, c in s["per_feature"].items():
        print(f"  {f:10s} ok {c['ok']:4d}  fail {c['fail']:3d}  error {c['error']:3d}  n/a {c['na']:3d}")
    print(f"wrote {out_dir / 'arch_sweep.json'} and {out_dir / 'arch_sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
