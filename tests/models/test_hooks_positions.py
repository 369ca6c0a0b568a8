"""Position-selected caches: ``adapter.hooks(cache=..., cache_positions=...)`` on every tiny architecture.

Every selection is checked against the full cache of the *same* forward (two sessions record one forward),
sliced by an index computed here from the attention mask, so the comparison is exact (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_fp32_close

from tokensmith.models import MicroBatcher
from tokensmith.models.tiny import TINY_ARCHS

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["The quick brown fox jumps", "Hello there my friend", "one two three four five six seven"]
CAUSAL = [a for a in TINY_ARCHS if a not in ("bert", "t5")]


def _names(ad):
    return [n for n in ad.hook_names() if not n.endswith("attn.probs")]


def _extra(ad, B, right_pad_decoder=False):
    """Forward kwargs: T5 needs a decoder input (here 4 tokens, optionally right-padded per row)."""
    if not ad.structure.is_encoder_decoder:
        return {}
    dec = torch.tensor([[0, 11, 12, 13]] * B)
    out = {"decoder_input_ids": dec}
    if right_pad_decoder:
        dm = torch.ones(B, 4, dtype=torch.long)
        dm[0, 3:] = 0
        out["decoder_attention_mask"] = dm
    return out


def _row_mask(ad, name, step, batch, extra):
    """[B, T] real-token mask of the tokens the ``step``-th record of ``name`` covers (reference)."""
    if ad.structure.is_encoder_decoder and not (name == "embed" and step == 0):
        dm = extra.get("decoder_attention_mask")
        return dm.bool() if dm is not None else torch.ones_like(extra["decoder_input_ids"], dtype=torch.bool)
    return batch.attention_mask.bool()


def _ref_index(real, spec):
    """Per-row column indices of ``spec`` (``'last'``, int or list) from a [B, T] real-token mask."""
    out = []
    for row in real.tolist():
        cols = [j for j, r in enumerate(row) if r]
        wanted = [spec] if isinstance(spec, int) else ([-1] if spec == "last" else list(spec))
        out.append([cols[p] for p in wanted])
    return torch.tensor(out)


def _run(ad, names, specs, batch, extra):
    """One forward with a full-cache session and one session per selection, all recording it."""
    sessions = [ad.hooks(cache=names, cache_positions=s) for s in specs]
    with torch.no_grad(), ad.hooks(cache=names) as full:
        for s in sessions:
            s.__enter__()
        try:
            ad.forward(batch, **extra)
        finally:
            for s in reversed(sessions):
                s.__exit__(None, None, None)
    return full, sessions


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_selection_equals_slicing_the_full_cache(arch, shared_tiny):
    ad = shared_tiny(arch)
    names = _names(ad)
    batch = ad.encode_batch(PROMPTS)  # left-padded
    extra = _extra(ad, len(PROMPTS), right_pad_decoder=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(batch.input_ids.shape, generator=g) < 0.5
    # T5's decoder layers have other columns than the encoder input: masks are tested there with a callable
    specs = ["last", 1, [0, -1, 2]] + ([] if ad.structure.is_encoder_decoder else [mask])
    full, sel = _run(ad, names, specs, batch, extra)
    checked = 0
    fired = list(full.cache)  # (tiny T5's `embed` module is not the one its stacks call: it never fires)
    assert len(fired) >= len(names) - 1
    for name in fired:
        for step, F in enumerate(full.cache.steps(name)):
            real = _row_mask(ad, name, step, batch, extra)
            B, T = F.shape[:2]
            rows = torch.arange(B)[:, None]
            for spec, s in zip(specs, sel, strict=True):
                got = s.cache.steps(name)[step]
                if isinstance(spec, torch.Tensor):
                    want = F[spec]
                else:
                    idx = _ref_index(real, spec)
                    want = F[rows, idx]
                    if not isinstance(spec, list):
                        want = want[:, 0]
                assert torch.equal(got, want), (arch, name, step, spec)
                checked += 1
    assert checked >= 3 * len(fired)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_callable_mask_and_right_padding(arch, shared_tiny):
    ad = shared_tiny(arch)
    name = f"layers.{ad.structure.num_layers - 1}.resid_post"
    enc = [ad.encode(p).input_ids for p in PROMPTS]
    T = max(len(e) for e in enc)
    ids = torch.full((len(enc), T), ad.pad_token_id)
    am = torch.zeros(len(enc), T, dtype=torch.long)
    for b, e in enumerate(enc):  # right padding
        ids[b, : len(e)], am[b, : len(e)] = e, 1
    batch = {"input_ids": ids, "attention_mask": am}
    extra = _extra(ad, len(enc))
    seen = []

    def every_other(ctx):
        seen.append(ctx.name)
        width = extra["decoder_input_ids"].shape[1] if extra else T
        return (torch.arange(width) % 2 == 0).expand(len(enc), width)

    with torch.no_grad(), ad.hooks(cache=name) as full, ad.hooks(cache=name, cache_positions="last") as last, \
            ad.hooks(cache=name, cache_positions=every_other) as odd:
        ad.forward(batch, **extra)
    F = full.cache[name]
    real = torch.ones(F.shape[:2], dtype=torch.bool) if extra else am.bool()
    want_last = F[torch.arange(F.shape[0]), real.sum(-1) - 1]
    assert torch.equal(last.cache[name], want_last)
    assert torch.equal(odd.cache[name], F[:, ::2].reshape(-1, F.shape[-1]))
    assert seen == [name]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_last_of_a_left_padded_batch_equals_each_row_alone(arch, shared_tiny):
    ad = shared_tiny(arch)
    names = [f"layers.{i}.resid_post" for i in range(ad.structure.num_layers)]
    batch = ad.encode_batch(PROMPTS)
    with torch.no_grad(), ad.hooks(cache=names, cache_positions="last") as h:
        ad.forward(batch, **_extra(ad, len(PROMPTS)))
    for b, p in enumerate(PROMPTS):
        with torch.no_grad(), ad.hooks(cache=names) as one:
            ad.forward(ad.encode_batch([p]), **_extra(ad, 1))
        for i, n in enumerate(names):
            assert h.cache[n].shape == (len(PROMPTS), ad.structure.hidden_size)
            assert_fp32_close(h.cache[n][b], one.cache[n][0, -1], width=ad.structure.hidden_size, depth=i + 1)


def _split_forwards(ad, batch, extra, sizes, fail_once=False):
    """The batch run as one logical call in chunks (``MicroBatcher``), optionally with a fake OOM after the
    first attempt's forward (its records must be dropped)."""
    B = batch.input_ids.shape[0]
    failed = []

    def run(s, e):
        out = ad.forward({"input_ids": batch.input_ids[s:e], "attention_mask": batch.attention_mask[s:e]},
                         **{k: v[s:e] for k, v in extra.items()})
        if fail_once and not failed:
            failed.append((s, e))
            raise RuntimeError("CUDA out of memory (simulated)")
        return out

    with ad.micro_batch(B) as call:
        MicroBatcher(sizes).run(run, B, call=call)
    return failed


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_micro_batched_and_oom_retried_equal_unbatched(arch, shared_tiny):
    ad = shared_tiny(arch)
    names = ["layers.0.resid_pre", f"layers.{ad.structure.num_layers - 1}.resid_post"]
    batch = ad.encode_batch(PROMPTS)
    extra = _extra(ad, len(PROMPTS))
    T = batch.input_ids.shape[1]
    mask = torch.zeros(len(PROMPTS), T, dtype=torch.bool)
    mask[:, -2:] = True
    mask[1, -4] = True
    specs = ["last", [0, -1]] + ([] if extra else [mask])
    for spec in specs:
        with torch.no_grad(), ad.hooks(cache=names, cache_positions=spec) as whole:
            ad.forward(batch, **extra)
        with torch.no_grad(), ad.hooks(cache=names, cache_positions=spec) as split:
            # one simulated OOM (it costs a gc.collect) for the first selection, plain chunks of 2 after
            failed = _split_forwards(ad, batch, extra, sizes=3 if spec == "last" else 2, fail_once=spec == "last")
        assert failed == ([(0, 3)] if spec == "last" else [])
        for n in names:
            a, b = split.cache.steps(n), whole.cache.steps(n)
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert x.shape == y.shape
                assert_fp32_close(x, y, width=ad.structure.hidden_size, depth=ad.structure.num_layers)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_records_are_small_copies_not_views(arch, shared_tiny):
    ad = shared_tiny(arch)
    names = _names(ad)
    batch = ad.encode_batch(PROMPTS)
    with torch.no_grad(), ad.hooks(cache=names, cache_positions="last", offload="cpu") as h:
        ad.forward(batch, **_extra(ad, len(PROMPTS)))
    assert len(h.cache) >= len(names) - 1
    for n in h.cache:
        for c in h.cache.steps(n):
            assert c.dim() == 2 and c.shape[0] == len(PROMPTS)
            assert c.untyped_storage().nbytes() == c.numel() * c.element_size(), n


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradients_at_selected_positions_equal_sliced_full_gradients(arch, shared_tiny):
    ad = shared_tiny(arch)
    name = "layers.0.resid_post"
    batch = ad.encode_batch(PROMPTS)
    extra = _extra(ad, len(PROMPTS))
    with ad.hooks(grad=name) as full, ad.hooks(grad=name, cache=name, cache_positions=[0, -1], detach=False) as sel:
        out = ad.forward(batch, **extra)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        (logits.float() ** 2).mean().backward()
    G = full.grads[name]
    real = _row_mask(ad, name, 1, batch, extra)
    idx = _ref_index(real, [0, -1])
    assert torch.equal(sel.grads[name], G[torch.arange(G.shape[0])[:, None], idx])
    assert sel.cache[name].requires_grad  # detach=False keeps the selection differentiable


@pytest.mark.parametrize("arch", CAUSAL)
def test_generation_records_the_token_of_every_step(arch, shared_tiny):
    ad = shared_tiny(arch)
    name = f"layers.{ad.structure.num_layers - 1}.resid_post"
    batch = ad.encode_batch(PROMPTS[:2])
    n_new = 3
    with ad.hooks(cache=name) as full, ad.hooks(cache=name, cache_positions="last") as last, \
            ad.hooks(cache=name, cache_positions=1) as first:
        ad.generate(batch, max_new_tokens=n_new)
    steps = full.cache.steps(name)
    assert len(steps) == n_new  # prefill + (n_new - 1) decode steps
    want = torch.stack([steps[0][:, -1]] + [s[:, -1] for s in steps[1:]], 1)
    assert last.cache[name].shape == (2, n_new, ad.structure.hidden_size)
    assert torch.equal(last.cache[name], want)
    # position 1 exists only in prefill: decode steps record nothing
    pad = (batch.attention_mask == 0).sum(-1)
    assert len(first.cache.steps(name)) == 1
    assert torch.equal(first.cache[name], steps[0][torch.arange(2), pad + 1])


def test_bad_cache_positions(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="only named selection is 'last'"):
        ad.hooks(cache="embed", cache_positions="first")
    with pytest.raises(TypeError, match="cache_positions must be"):
        ad.hooks(cache="embed", cache_positions=True)
    with pytest.raises(TypeError, match="cache_positions must be"):
        ad.hooks(cache="embed", cache_positions=1.5)
    with pytest.raises(ValueError, match="at least one int"):
        ad.hooks(cache="embed", cache_positions=[])
    with pytest.raises(ValueError, match="bool tensor"):
        ad.hooks(cache="embed", cache_positions=torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention probabilities"):
        ad.hooks(cache="layers.0.attn.probs", cache_positions="last")
    batch = ad.encode_batch(PROMPTS[:2])
    with pytest.raises(ValueError, match="position 40 is not a real token"), torch.no_grad():
        with ad.hooks(cache="embed", cache_positions=[0, 40]):
            ad.forward(batch)
    with pytest.raises(ValueError, match=r"the mask is \[2, 1\]"), torch.no_grad():
        with ad.hooks(cache="embed", cache_positions=torch.ones(2, 1, dtype=torch.bool)):
            ad.forward(batch)
    # hooks are gone after the errors
    with torch.no_grad(), ad.hooks(cache="embed") as h:
        ad.forward(batch)
    assert len(h.cache.steps("embed")) == 1
