"""Attention-mask overrides (masking.py) against independent references.

References:
- transformers' own 4-D mask path: a float64 eager copy of the model given an explicit additive
  ``[B, 1, T, T]`` mask (causal ∧ padding ∧ the override, built here from token positions / ids) and the
  logical position ids; it never goes through the override code;
- a model whose config has the sliding window (Qwen2 with ``use_sliding_window``, same weights);
- for per-layer / per-KV-head masks, a float64 attention written here, registered under its own name.

Tolerance: fp32 logits of a 2-layer, 64-wide model vs float64 carry ~sqrt(L·d)·eps32 relative error; we allow
2e-5·max|logit| (as test_kvcache). Each comparison is paired with a check that the override changed the
logits by much more than that.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import tokensmith as ts
from tokensmith.models import kvcache
from tokensmith.models.masking import AttentionOverride, attention_override, local_window, separator_mask

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]
TEXTS = ["The cat sat on the mat, and then it slept. It was late.", "Hello, world. Fine"]
ALL = lambda ctx: torch.ones(1, 1, 1, 1, dtype=torch.bool)  # noqa: E731


def _tol(ref: torch.Tensor) -> dict:
    return dict(atol=2e-5 * float(ref.abs().max()), rtol=0)


def _real(x: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    return x[am.bool()]


def _reference_logits(ad, ids, am, allowed_fn):
    """float64 eager forward with the explicit mask causal ∧ padding ∧ allowed_fn(pos_q, pos_k, ids)."""
    m = copy.deepcopy(ad.model).double()
    m.config._attn_implementation = "eager"
    B, T = ids.shape
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    cols = torch.arange(T)
    allowed = (cols[None, :, None] >= cols[None, None, :]) & am.bool()[:, None, :]
    allowed &= allowed_fn(pos[:, :, None], pos[:, None, :], ids[:, None, :])
    allowed |= torch.eye(T, dtype=torch.bool)[None] & ~am.bool()[:, :, None]  # pad rows: no NaN
    mask = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(
        ~allowed[:, None], torch.finfo(torch.float64).min
    )
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _window(w):
    return lambda pq, pk, ids: (pq - pk) < w


@pytest.mark.parametrize("arch, impl", [(a, "sdpa") for a in CAUSAL] + [("gpt2", "eager"), ("gemma3", "eager")])
def test_all_true_and_wide_window_change_nothing(shared_tiny, arch, impl):
    """An all-True override, and local_window(T) on inputs of length <= T, give the model's own logits
    (left-padded batch of 2; delegating to SDPA, or to the model's own eager attention)."""
    ad = shared_tiny(arch) if impl == "sdpa" else ts.tiny(arch, attn_implementation=impl)
    b = ad.encode_batch(TEXTS)
    T = b.input_ids.shape[1]
    with torch.no_grad():
        ref = ad.forward(b).logits
        with attention_override(ad, ALL):
            a = ad.forward(b).logits
        with attention_override(ad, local_window(T)):
            w = ad.forward(b).logits
        with attention_override(ad, local_window(T - 4)):
            narrow = ad.forward(b).logits
    am = b.attention_mask
    assert_close(_real(a, am), _real(ref, am), **_tol(ref))
    assert_close(_real(w, am), _real(ref, am), **_tol(ref))
    assert (_real(narrow, am) - _real(ref, am)).abs().max() > 100 * _tol(ref)["atol"]
    assert ad.config._attn_implementation == impl  # restored


@pytest.mark.parametrize("arch", CAUSAL)
def test_local_window_equals_explicit_mask_reference(shared_tiny, arch):
    """local_window(4) on a left-padded batch equals a float64 eager forward with the explicit window mask."""
    ad = shared_tiny(arch)
    b = ad.encode_batch(TEXTS)
    with torch.no_grad(), attention_override(ad, local_window(4)):
        got = ad.forward(b).logits
    ref = _reference_logits(ad, b.input_ids, b.attention_mask, _window(4))
    full = _reference_logits(ad, b.input_ids, b.attention_mask, lambda *a: torch.tensor(True))
    am = b.attention_mask
    assert_close(_real(got, am).double(), _real(ref, am), **_tol(ref))
    assert (_real(full, am) - _real(ref, am)).abs().max() > 100 * _tol(ref)["atol"]


def test_local_window_equals_a_sliding_window_config():
    """Qwen2 configured with sliding_window=w on every layer (same weights) equals plain Qwen2 under
    local_window(w); eager attention as the delegated implementation."""
    w = 3
    plain = ts.tiny("qwen2", attn_implementation="eager")
    slid = ts.tiny(
        "qwen2", attn_implementation="eager", use_sliding_window=True, sliding_window=w, max_window_layers=0
    )
    slid.model.load_state_dict(plain.model.state_dict())
    assert set(slid.config.layer_types) == {"sliding_attention"}
    ids = plain.encode_batch(TEXTS[:1]).input_ids
    with torch.no_grad():
        ref = slid.forward(ids).logits
        with attention_override(plain, local_window(w)):
            got = plain.forward(ids).logits
        base = plain.forward(ids).logits
    assert_close(got, ref, **_tol(ref))
    assert (base - ref).abs().max() > 100 * _tol(ref)["atol"]


def _generate_logits(ad, b, n, override=None):
    from tokensmith.models.hooks import internal_forward_running

    steps: list[torch.Tensor] = []

    def rec(mod, args, out):
        if not internal_forward_running():  # not the override's one-time interface probe
            steps.append(out.logits[:, -1].detach())

    h = ad.model.register_forward_hook(rec)
    try:
        if override is None:
            res = ad.generate(b, max_new_tokens=n, min_new_tokens=n)
        else:
            with attention_override(ad, override):
                res = ad.generate(b, max_new_tokens=n, min_new_tokens=n)
    finally:
        h.remove()
    return res, torch.stack(steps, 1)  # [B, n, V]


@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_with_window_left_padding(shared_tiny, arch):
    """Greedy generate (batch 2, left padding) under local_window(3): every step's logits (prefill and the
    decode steps, whose keys come from the cache) equal the float64 explicit-mask forward of the whole
    generated sequence at that position."""
    ad = shared_tiny(arch)
    b = ad.encode_batch(TEXTS)
    n = 4
    res, steps = _generate_logits(ad, b, n, local_window(3))
    seq = res.sequences
    am = torch.cat([b.attention_mask, torch.ones(2, n, dtype=b.attention_mask.dtype)], 1)
    ref = _reference_logits(ad, seq, am, _window(3))
    T0 = b.input_ids.shape[1]
    ref_steps = ref[:, T0 - 1 : T0 - 1 + n]
    assert_close(steps.double(), ref_steps, **_tol(ref_steps))
    _, plain = _generate_logits(ad, b, 1)
    assert (plain[:, 0].double() - ref_steps[:, 0]).abs().max() > 100 * _tol(ref_steps)["atol"]


def test_separator_mask_prefill_and_generate(shared_tiny):
    """SepLLM mask (2 initial tokens, separators '.' and ',', local window 3) in a forward and during generate
    equals the explicit-mask reference built from the token ids (generated tokens included)."""
    ad = shared_tiny("llama")
    tok = ad.tokenizer
    seps = [tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids(",")]
    b = ad.encode_batch(TEXTS)
    assert bool(torch.isin(b.input_ids, torch.tensor(seps)).any())
    fn = separator_mask(separators=seps, n_initial=2, n_local=3)

    def allowed(pq, pk, ids):
        return (pk < 2) | torch.isin(ids, torch.tensor(seps)) | ((pq - pk) < 3)

    n = 3
    res, steps = _generate_logits(ad, b, n, fn)
    am = torch.cat([b.attention_mask, torch.ones(2, n, dtype=b.attention_mask.dtype)], 1)
    ref = _reference_logits(ad, res.sequences, am, allowed)
    T0 = b.input_ids.shape[1]
    assert_close(steps.double(), ref[:, T0 - 1 : T0 - 1 + n], **_tol(ref))
    with torch.no_grad(), attention_override(ad, separator_mask(b.input_ids, seps, 2, 3)):  # explicit ids
        got = ad.forward(b).logits
    assert_close(_real(got, b.attention_mask).double(), _real(ref[:, :T0], b.attention_mask), **_tol(ref))
    window_only = _reference_logits(ad, b.input_ids, b.attention_mask, _window(3))
    assert (
        _real(window_only, b.attention_mask) - _real(ref[:, :T0], b.attention_mask)
    ).abs().max() > 100 * _tol(ref)["atol"]


_REF_IMPL = "tokensmith_test_mask_reference"
_LAYER_MASKS: dict[int, torch.Tensor] = {}


def _reference_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw
):
    B, H, Tq, d = query.shape
    n_rep = H // key.shape[1]
    k, v = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    Tk = k.shape[2]
    allowed = (
        torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        if attention_mask is None
        else attention_mask[..., :Tk]
    )
    allowed = allowed.expand(B, H, Tq, Tk)
    extra = _LAYER_MASKS.get(module.layer_idx)
    if extra is not None:  # [B, H_kv, T, T] over columns
        allowed = allowed & extra.repeat_interleave(n_rep, 1)[:, :, -Tq:, :Tk]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (probs @ v).transpose(1, 2).contiguous(), probs


def test_per_layer_per_kv_head_fn_and_tensor_masks(shared_tiny):
    """{layer: mask}: layer 0 gets a different window per KV head (a function returning [B, H_kv, Q, K]),
    layer 1 a boolean tensor over columns; equals a float64 reference attention applying the same
    per-(layer, KV head) masks. The tensor form also serves generate (it is indexed by absolute columns)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    ad = shared_tiny("llama")
    Hkv = ad.structure.num_kv_heads
    assert Hkv == 2
    ids = torch.randint(10, 2000, (2, 10), generator=torch.Generator().manual_seed(0))
    T = ids.shape[1]
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    per_head = torch.stack([dist < 2, dist < 5])[None].expand(2, Hkv, T, T)  # layer 0
    g = torch.Generator().manual_seed(1)
    tensor1 = (torch.rand(1, 1, 16, 16, generator=g) < 0.5) | torch.eye(16, dtype=torch.bool)  # layer 1

    def head_windows(ctx):
        d = ctx.distance()  # [B, 1, Q, K]
        return torch.cat([d < 2, d < 5], 1)

    with torch.no_grad(), attention_override(ad, {0: head_windows, 1: tensor1}):
        got = ad.forward(ids).logits
    AttentionInterface.register(_REF_IMPL, _reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_REF_IMPL, sdpa_mask)
    ref_model = copy.deepcopy(ad.model).double()
    ref_model.config._attn_implementation = _REF_IMPL
    _LAYER_MASKS.clear()
    _LAYER_MASKS.update({0: per_head, 1: tensor1[..., :T, :T].expand(2, Hkv, T, T)})
    try:
        with torch.no_grad():
            ref = ref_model(input_ids=ids).logits
    finally:
        _LAYER_MASKS.clear()
    assert_close(got.double(), ref, **_tol(ref))
    with torch.no_grad():
        plain = ad.forward(ids).logits
    assert (plain.double() - ref).abs().max() > 100 * _tol(ref)["atol"]
    # the tensor reaches 16 columns: generation past it is refused with a clear error
    with attention_override(ad, tensor1), pytest.raises(ValueError, match="covers 16 columns"):
        ad.generate(ad.encode_batch(["a b c d e f g h i j k l m n"]), max_new_tokens=8, min_new_tokens=8)


def test_context_after_eviction_and_with_attention_probe(shared_tiny):
    """After a per-KV-head kvcache.evict, ctx.key_columns are the columns each head holds (+ the new one) and
    key positions/ids follow them; an override inside capture_attention makes the recorded probabilities
    zero outside the window."""
    ad = shared_tiny("llama")
    ids = torch.randint(10, 2000, (1, 8), generator=torch.Generator().manual_seed(2))
    cache, _ = kvcache.prefill(ad, {"input_ids": ids})
    keep = torch.tensor([[[0, 2, 5, 7], [1, 3, 4, 6]]])
    kvcache.evict(cache, keep)
    seen = []

    def record(ctx):
        seen.append(ctx)
        return torch.ones(1, 1, 1, 1, dtype=torch.bool)

    nxt = torch.tensor([[77]])
    with torch.no_grad(), attention_override(ad, record, layers=[0]):
        ad.model(input_ids=nxt, position_ids=torch.tensor([[8]]), cache=cache, use_cache=True)
    (ctx,) = seen
    want = torch.cat([keep, torch.full((1, 2, 1), 8)], -1)
    assert torch.equal(ctx.key_columns, want) and torch.equal(ctx.key_positions, want)
    assert ctx.query_positions.tolist() == [[8]] and not ctx.is_prefill
    assert (
        ctx.key_token_ids[0, 0, -1] == 77 and (ctx.key_token_ids[..., :-1] == -1).all()
    )  # cache filled before

    # evict + compact (rerotate_cache) inside one override block: the key ids follow the kept columns
    from tokensmith.models.rerotate import rerotate_cache

    seen.clear()
    kept = torch.tensor([[0, 2, 5, 7]])
    with torch.no_grad(), attention_override(ad, record, layers=[1]):
        cache, _ = kvcache.prefill(ad, {"input_ids": ids})
        kvcache.evict(cache, kept)
        rerotate_cache(ad, cache)
        kvcache.extend(ad, cache, 4, nxt)
    ctx = seen[-1]
    assert ctx.key_token_ids[0, 0].tolist() == ids[0, kept[0]].tolist() + [77]
    assert ctx.key_positions[0, 0].tolist() == [0, 1, 2, 3, 4] and ctx.query_positions.tolist() == [[4]]

    text = "one two three four five six seven"
    with ad.capture_attention(layers=[1]) as att, attention_override(ad, local_window(2)):
        ad.forward(text)
    p = att[1][0]  # [H, T, T]
    d = torch.arange(p.shape[-1])[:, None] - torch.arange(p.shape[-1])[None, :]
    assert float(p[:, (d >= 2) | (d < 0)].abs().max()) == 0.0
    assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)


def test_errors():
    """Clear errors: unsupported implementation, a layer computing attention outside the interface (named),
    a non-boolean mask, an override leaving a query with nothing, bad arguments."""
    ad = ts.tiny("llama")
    with pytest.raises(ValueError, match="window size"):
        local_window(0)
    with pytest.raises(TypeError, match="function ctx -> bool"):
        attention_override(ad, 3)
    with pytest.raises(ValueError, match="out of range"):
        attention_override(ad, ALL, layers=[5])
    with (
        pytest.raises(TypeError, match="boolean tensor"),
        attention_override(ad, lambda ctx: torch.ones(1, 1, 1, 1)),
    ):
        ad.forward("hello there")
    with (
        pytest.raises(ValueError, match="no key to attend to"),
        attention_override(ad, lambda ctx: ctx.distance() > 0),
    ):
        ad.forward("hello there")
    assert ad.config._attn_implementation == "sdpa"  # restored after the errors
    # an attention probe opened inside an override would bypass it: refused (open the probe first)
    with attention_override(ad, ALL), pytest.raises(ValueError, match="attention capture supports"):
        with ad.capture_attention():
            pass
    assert ad.config._attn_implementation == "sdpa"

    ad.model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="dense mask"), attention_override(ad, ALL):
            pass
    finally:
        ad.model.config._attn_implementation = "sdpa"

    # layer 1 computes attention itself (not through the interface): named in the error, layer 0 still works
    other = ts.tiny("llama", seed=3)
    attn = other.structure.attn[1]
    import transformers.models.llama.modeling_llama as ml

    def own_forward(hidden_states, position_embeddings, attention_mask=None, **kw):
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
        out, w = ml.eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), w

    attn.forward = own_forward
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\].*without transformers' attention interface"):
        with attention_override(other, ALL):
            pass
    with attention_override(other, local_window(2), layers=[0]) as ov:
        assert isinstance(ov, AttentionOverride)
        other.forward("hello there you")
