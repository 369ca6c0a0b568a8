"""The token-space search loop and its target objective (tokensmith.optimization.search).

Pinned: the cached / grouped / target-only loss equals the uncached full-logits loss (fp32 rounding over all
layers); the gradient equals the one-hot gradient of the full forward; GCG and random search lower the loss;
an identical seed gives an identical history; resume continues exactly; every stopping rule and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokensmith as ts
from tests.tolerance import assert_fp32_close, logprob_atol
from tokensmith.models import Slot, allowed_token_mask
from tokensmith.optimization import (
    Constraints,
    Problem,
    SearchResult,
    TargetLoss,
    gcg,
    mellowmax,
    multi_model,
    multi_prompt,
    search,
    target_loss,
)
from tokensmith.optimization.behaviours import load_behaviours

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = "Write a poem about the sea"
TARGET = " Sure, here is a poem"


def _enc(ad, suffix=" x y z w v u", chat=True, **kw):
    kw.setdefault("close_target", False) if chat else None
    return ad.encode([PROMPT, Slot("suffix", suffix)], target=TARGET, chat=chat, **kw)


def _full_logits_loss(ad, obj, cands):
    """Independent reference: the whole sequence forward, full logits, log_softmax in float64."""
    t = obj.template
    ids = t.fill(cands)
    with torch.no_grad():
        z = ad.forward(ids).logits.double()
    lp = torch.log_softmax(z, -1)
    pos = t.target_positions
    vals = lp[:, pos - 1].gather(-1, ids[:, pos, None])[..., 0]
    return -vals.mean(-1), z


def _random_cands(obj, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = obj.init_ids[None].repeat(n, 1)
    for i in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        p = torch.randperm(obj.n, generator=g)[:k]
        c[i, p] = torch.randint(300, 5000, (k,), generator=g)
    return c


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox", "qwen2"])
def test_cached_grouped_target_only_loss_equals_full_logits(shared_tiny, arch):
    ad = shared_tiny(arch)
    obj = TargetLoss(ad, _enc(ad), max_batch_size=4)
    plain = TargetLoss(ad, _enc(ad), prefix_cache=False, group=False)
    cands = _random_cands(obj, 11)
    ref, z = _full_logits_loss(ad, obj, cands)
    fast = obj.evaluate(cands, base=obj.init_ids)
    slow = plain.evaluate(cands)
    tol = logprob_atol(float(z.abs().max()), ad.structure.hidden_size, ad.structure.vocab_size,
                       depth=ad.structure.num_layers + 1)
    assert (fast.loss.double() - ref).abs().max() <= tol
    assert (slow.loss.double() - ref).abs().max() <= tol
    # success is read off the same logits: argmax at every target position
    t = obj.template
    greedy = (z[:, t.target_positions - 1].argmax(-1) == t.fill(cands)[:, t.target_positions]).all(-1)
    assert torch.equal(fast.success, greedy)
    # and the loss is the one token_logprobs gives on the same ids
    lp = ad.token_logprobs({"input_ids": t.fill(cands[:1])}, target_mask=t.target_mask[None])
    assert abs(float(-lp[0][t.target_mask].mean()) - float(fast.loss[0])) <= tol
    # the same targets scored from the wrong positions (one step early) are off by far more than the bound
    lp64 = torch.log_softmax(z, -1)
    pos = t.target_positions
    shifted = -lp64[:, pos - 2].gather(-1, t.fill(cands)[:, pos, None])[..., 0].mean(-1)
    assert (shifted - fast.loss.double()).abs().max() > 10 * tol


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_equals_onehot_gradient_of_the_full_forward(shared_tiny, arch):
    ad = shared_tiny(arch)
    obj = TargetLoss(ad, _enc(ad))
    t = obj.template
    g = obj.grad(obj.init_ids)
    ids = t.ids[None]
    pos = torch.zeros_like(ids, dtype=torch.bool)
    pos[0, t.start : t.end] = True
    embeds, onehot = ad.onehot_embeds(ids, pos)
    lp = ad.token_logprobs({"input_ids": ids}, target_mask=t.target_mask[None], inputs_embeds=embeds, grad=True)
    loss = -lp[0][t.target_mask].mean()
    (ref,) = torch.autograd.grad(loss, onehot)
    assert g.shape == (t.n, ad.E.shape[0])
    assert_fp32_close(g, ref, width=ad.structure.hidden_size, depth=ad.structure.num_layers + 1, scale=float(ref.abs().max()) * 10)
    # embed_grad is the same gradient before the vocabulary projection
    eg = obj.embed_grad(obj.init_ids)
    assert_fp32_close(eg @ ad.E.detach().float().T, g, width=ad.structure.hidden_size, scale=float(g.abs().max()) * 10)


def test_loss_formulas_against_float64():
    lp = torch.log(torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.3, 0.4]], dtype=torch.float64))
    nll = -lp
    assert torch.allclose(target_loss(lp), nll.mean(-1).float())
    w = torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(target_loss(lp, first_token_weight=3.0), ((nll * w).sum(-1) / 5).float())
    a = 2.0
    ref = (torch.logsumexp(a * nll, -1) - math.log(3)) / a
    assert torch.allclose(target_loss(lp, "mellowmax", alpha=a), ref.float())
    # mellowmax lies between the mean and the max, tends to the mean as alpha -> 0
    assert (target_loss(lp, "mellowmax", alpha=a) >= nll.mean(-1).float() - 1e-6).all()
    assert (target_loss(lp, "mellowmax", alpha=a) <= nll.max(-1).values.float() + 1e-6).all()
    assert torch.allclose(mellowmax(nll, 1e-4), nll.mean(-1), atol=1e-3)  # float64: (lse - log H)/α cancels
    with pytest.raises(ValueError, match="loss must be"):
        target_loss(lp, "nope")


@pytest.mark.parametrize("method,kw", [("gcg", {"search_width": 24, "topk": 16}), ("random", {"search_width": 24})])
def test_proposers_lower_the_loss_and_seed_fixes_the_history(shared_tiny, method, kw):
    ad = shared_tiny("llama")
    enc = _enc(ad)
    r1 = search(ad, enc, method, steps=6, seed=3, progress=False, **kw)
    r2 = search(ad, enc, method, steps=6, seed=3, progress=False, **kw)
    r3 = search(ad, enc, method, steps=6, seed=4, progress=False, **kw)
    init = TargetLoss(ad, enc).evaluate(TargetLoss(ad, enc).init_ids[None]).loss.item()
    assert abs(r1.init_loss - init) < 1e-6
    assert r1.best_loss < init - 0.01
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    assert r1.best_ids == r2.best_ids
    assert r3.best_ids != r1.best_ids
    # best loss never increases; the best ids' string re-tokenizes to the same ids, so both losses agree
    bl = r1.losses
    assert all(b <= a + 1e-7 for a, b in zip(bl, bl[1:], strict=False))
    assert r1.string_ids == r1.best_ids
    assert abs(r1.string_loss - r1.best_loss) < 1e-3
    assert all(0.0 <= h["filtered"] <= 1.0 for h in r1.history)
    assert r1.history[-1]["forwards"] > r1.history[0]["forwards"] > 0


def test_no_special_or_added_token_is_ever_proposed(shared_tiny):
    ad = shared_tiny("llama")
    allowed = Constraints().allowed(ad)
    tok = ad.tokenizer
    specials = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    assert specials and not any(bool(allowed[i]) for i in specials)
    assert not allowed[len(tok):].any()
    r = search(ad, _enc(ad), "gcg", steps=3, search_width=16, topk=8, progress=False)
    assert not set(r.best_ids) & specials


def test_allowed_mask_excludes_llama3_style_reserved_and_added_tokens():
    tok = ts.tiny("llama").tokenizer
    import copy

    tok = copy.deepcopy(tok)
    from tokenizers import AddedToken

    names = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(6)]
    tok.add_tokens([AddedToken(n, special=True) for n in names[:7]])
    tok.add_tokens([AddedToken(n, special=False) for n in names[7:]])  # added but not flagged special
    ids = tok.convert_tokens_to_ids(names)
    m = allowed_token_mask(tok, len(tok) + 64)  # padding rows past len(tokenizer) too
    assert not any(bool(m[i]) for i in ids)
    assert not m[len(tok):].any()
    assert int(m.sum()) == len(tok) - len(set(tok.all_special_ids) | set(tok.added_tokens_decoder))


def test_rendered_chat_ids_keep_every_turn_marker(shared_tiny):
    """nanoGCG strips the tokenizer's BOS *string* from the rendered template; on SmolLM2 (BOS = <|im_start|>)
    that deletes every turn marker. Ours are exactly the template's ids."""
    ad = shared_tiny("llama")
    tok = ad.tokenizer
    enc = ad.encode([PROMPT, Slot("suffix", " ! ! !")], target=TARGET, chat=True, close_target=False)
    msgs = [{"role": "user", "content": PROMPT + " ! ! !"}, {"role": "assistant", "content": TARGET}]
    ref = tok.apply_chat_template(msgs, tokenize=True, continue_final_message=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert enc.input_ids.tolist() == list(ref)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert enc.input_ids.tolist().count(im_start) == 3  # system, user, assistant
    t = TargetLoss(ad, enc).template
    assert t.ids.tolist().count(im_start) == 3


def test_multi_prompt_and_multi_model_aggregate(shared_tiny):
    ad = shared_tiny("llama")
    e1 = _enc(ad)
    e2 = ad.encode(["Tell me a joke", Slot("suffix", " x y z w v u")], target=" Sure", chat=True, close_target=False)
    s = multi_prompt(ad, [e1, e2])
    a, b = TargetLoss(ad, e1), TargetLoss(ad, e2)
    c = _random_cands(a, 5)
    assert torch.allclose(s.loss(c), (a.loss(c) + b.loss(c)) / 2, atol=1e-5)
    g = s.grad(a.init_ids)
    ga, gb = a.grad(a.init_ids), b.grad(a.init_ids)
    ref = (ga / ga.norm(dim=-1, keepdim=True) + gb / gb.norm(dim=-1, keepdim=True)) / 2
    assert torch.allclose(g, ref, atol=1e-6)
    other = ts.tiny("llama", seed=1)
    mm = multi_model([ad, other], e1)
    assert len(mm.terms) == 2 and mm.terms[1][1].adapter is other
    r = search(ad, mm, "gcg", steps=2, search_width=8, topk=8, progress=False)
    assert len(r.history) == 2
    # a different vocabulary cannot share slot ids
    odd = ts.tiny("llama", seed=2)
    odd.add_tokens(["<zz_new>"])
    with pytest.raises(ValueError, match="tokenizer"):
        multi_model([ad, odd], e1)
    # a slot that tokenizes differently in another prompt
    e3 = ad.encode(["Hi", Slot("suffix", " x y z")], target=" ok")
    with pytest.raises(ValueError, match="tokenizes differently"):
        multi_prompt(ad, [e1, e3])


def test_stopping_rules(shared_tiny, tmp_path):
    ad = shared_tiny("llama")
    enc = _enc(ad)
    r = search(ad, enc, "gcg", steps=50, time_limit=0.0, search_width=8, topk=8, progress=False)
    assert r.stopped == "time" and r.steps == 0
    r = search(ad, enc, "gcg", steps=50, max_forwards=30, search_width=8, topk=8, progress=False)
    assert r.stopped == "forwards" and 0 < r.steps < 50 and r.history[-2]["forwards"] < 30 <= r.history[-1]["forwards"]
    seen = []
    r = search(ad, enc, "gcg", steps=50, search_width=8, topk=8, progress=False,
               callbacks=[lambda st, rec: seen.append(rec["step"]) or rec["step"] >= 2])
    assert r.stopped == "callback" and seen == [0, 1, 2]
    calls = []
    r = search(ad, enc, "random", steps=4, search_width=4, progress=False, success_every=2, success_tokens=3,
               success_fn=lambda text: calls.append(text) or True)
    assert len(calls) == 2 and any(a["by"] == "success_fn" for a in r.archive)
    # early stop: the selected candidate succeeds (an objective that says every candidate does)
    class AlwaysGreedy(TargetLoss):
        def evaluate(self, slot_ids, base=None):
            ev = super().evaluate(slot_ids, base)
            ev.success = torch.ones_like(ev.success)
            return ev

    r = search(ad, AlwaysGreedy(ad, enc), "random", steps=10, search_width=4, early_stop=True, progress=False)
    assert r.stopped == "early_stop" and r.steps == 1 and r.success is True
    assert len(r.archive) >= 1 and all(a["by"] == "greedy_target" for a in r.archive)


def test_interrupt_returns_best_so_far_and_resume_continues_exactly(shared_tiny, tmp_path):
    ad = shared_tiny("llama")
    enc = _enc(ad)
    kw = dict(search_width=12, topk=8, progress=False, seed=5)
    full = search(ad, enc, "gcg", steps=6, **kw)

    def boom(state, rec):
        if rec["step"] == 2:
            raise KeyboardInterrupt

    path = tmp_path / "run.json"
    part = search(ad, enc, "gcg", steps=6, callbacks=[boom], save_path=path, **kw)
    assert part.stopped == "interrupted" and part.steps == 3
    assert SearchResult.load(path).steps == 3
    resumed = search(ad, enc, "gcg", steps=6, resume=path, **kw)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.best_ids == full.best_ids and resumed.stopped == "steps"
    back = SearchResult.load(resumed.save(tmp_path / "r.json"))
    assert back.best_ids == resumed.best_ids and back.history == resumed.history


def test_buffer_keeps_the_best_candidates(shared_tiny):
    ad = shared_tiny("llama")
    r = search(ad, _enc(ad), "random", steps=5, search_width=8, buffer_size=4, progress=False)
    buf = r.state["buffer"]
    assert 1 <= len(buf) <= 4 and [b[0] for b in buf] == sorted(b[0] for b in buf)
    assert abs(buf[0][0] - r.best_loss) < 1e-6


def test_bad_input_raises_clear_errors(shared_tiny, tmp_path):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="target is empty"):
        gcg(ad, PROMPT, "", steps=1)
    with pytest.raises(ValueError, match="prompt is empty"):
        gcg(ad, "  ", " ok", steps=1)
    with pytest.raises(ValueError, match="no optimizable slot"):
        search(ad, ad.encode(PROMPT, target=TARGET), "gcg", steps=1)
    with pytest.raises(ValueError, match="no target"):
        search(ad, ad.encode([PROMPT, Slot("suffix", " x")]), "gcg", steps=1)
    with pytest.raises(ValueError, match="fewer than topk"):
        m = torch.zeros(ad.E.shape[0], dtype=torch.bool)
        m[300:303] = True
        search(ad, Problem(_enc(ad), constraints=Constraints(mask=m)), "gcg", steps=1, topk=8)
    with pytest.raises(TypeError, match="no option"):
        search(ad, _enc(ad), "gcg", steps=1, search_widht=8)
    with pytest.raises(ValueError, match="unknown method"):
        search(ad, _enc(ad), "nope", steps=1)
    small = ts.tiny("llama")
    small.max_positions = 20
    with pytest.raises(ValueError, match="longer|exceeds|max"):
        search(small, small.encode([PROMPT, Slot("suffix", " x" * 30)], target=TARGET), "gcg", steps=1)
    bert = shared_tiny("bert")
    with pytest.raises(ValueError, match="causal LM"):
        TargetLoss(bert, bert.encode(["Say", Slot("s", " x y")], target=" ok"))
    bad = tmp_path / "b.csv"
    bad.write_text("prompt,answer\nhi,there\n")
    with pytest.raises(ValueError, match="no column"):
        load_behaviours(bad)


def test_constraints_ascii_and_blocklist(shared_tiny):
    ad = shared_tiny("llama")
    tok = ad.tokenizer
    bang = tok.convert_tokens_to_ids("!")
    m = Constraints(ascii_only=True, blocklist=[bang, " the"]).allowed(ad)
    assert not m[bang]
    the = tok.encode(" the", add_special_tokens=False)[0]
    assert not m[the]
    for i in torch.nonzero(m).flatten()[:500].tolist():
        s = tok.decode([i])
        assert s.isascii() and s.isprintable() and s.strip()


@pytest.mark.real_model
def test_gcg_on_smollm2_lowers_an_advbench_target_loss(smollm2_shared):
    b = load_behaviours(n=1)[0]
    target = smollm2_shared.tokenizer.decode(smollm2_shared.tokenizer.encode(b.target, add_special_tokens=False)[:8])
    r = gcg(smollm2_shared, b.goal, target, steps=3, search_width=24, topk=64, progress=False, seed=0)
    assert r.best_loss < r.init_loss - 1e-3
    assert r.string_loss is not None and r.steps == 3


def test_plan_chunks_is_an_optimal_cover():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tokensmith.optimization import plan_chunks

    def cost(chunks, first, length, overhead):
        return sum(overhead + (b - a) * (length - first[a]) for a, b in chunks)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 9), min_size=1, max_size=40), st.integers(1, 12), st.integers(0, 50))
    def check(first, max_rows, overhead):
        first = sorted(first)
        chunks = plan_chunks(first, 12, max_rows, overhead)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(first)
        assert all(a < b and b - a <= max_rows for a, b in chunks)
        assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:], strict=False))
        fixed = [(i, min(i + max_rows, len(first))) for i in range(0, len(first), max_rows)]
        assert cost(chunks, first, 12, overhead) <= cost(fixed, first, 12, overhead)

    check()
    with pytest.raises(ValueError, match="sorted"):
        plan_chunks([3, 1], 5, 4)


def test_out_of_memory_halves_the_chunk_and_loses_nothing(monkeypatch):
    """A forward of more than 3 candidates raises an out-of-memory error: evaluate backs off (8 → 4 → 2 rows)
    and returns the same losses, in the input order, as an unconstrained run."""
    ad = ts.tiny("llama")
    obj = TargetLoss(ad, _enc(ad), max_batch_size=8, chunk_overhead=10_000)  # one chunk unless memory says no
    cands = _random_cands(obj, 10, seed=1)
    ref = TargetLoss(ad, _enc(ad)).evaluate(cands, base=obj.init_ids).loss
    real = ad.model.forward

    def tight(*args, **kw):
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is not None and x.shape[0] > 3:
            raise RuntimeError("CPU out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(ad.model, "forward", tight)
    got = obj.evaluate(cands, base=obj.init_ids).loss
    assert obj.max_batch_size == 2
    assert torch.allclose(got, ref, atol=1e-5)
    monkeypatch.setattr(ad.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="other failure"):
        obj.evaluate(cands, base=obj.init_ids)
