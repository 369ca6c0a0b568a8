"""TokenPreferenceTrainer, ReferenceCache and the demo preference set (tokensmith.alignment.trainer / .pairs)."""

from __future__ import annotations

import os

import pytest
import torch

import tokensmith as ts
from tokensmith.alignment.data import encode_pairs, pair_logprobs
from tokensmith.alignment.pairs import demo_pairs
from tokensmith.alignment.trainer import ReferenceCache, TokenPreferenceTrainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BETA = 0.1


@pytest.fixture(scope="module")
def split():
    return demo_pairs(160, seed=0).train_test_split(test_size=0.25, seed=0)


def _args(out, **kw):
    base = dict(
        per_device_train_batch_size=8, learning_rate=1e-3, weight_decay=0.0, lr_scheduler_type="constant",
        logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
    )
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def _margin(pol, ref, ds):
    """Independent held-out implicit-reward margin β(Σ Δ_w − Σ Δ_l) and accuracy (direct forwards, no cache)."""
    pb = encode_pairs(pol, list(ds), chat=False)
    pw, pl = pair_logprobs(pol, pb)
    rw, rl = pair_logprobs(ref, pb)
    h = ((pw - rw) * pb.mask_w).sum(-1) - ((pl - rl) * pb.mask_l).sum(-1)
    return float(BETA * h.mean()), float((h > 0).float().mean())


def test_demo_pairs_deterministic_and_well_formed():
    a, b = demo_pairs(50, seed=3), demo_pairs(50, seed=3)
    assert a._fingerprint == b._fingerprint and a[:] == b[:]
    assert demo_pairs(50, seed=4)["prompt"] != a["prompt"]
    for r in a:
        assert r["chosen"] != r["rejected"] and r["chosen"].startswith(" ") and r["prompt"].endswith("Answer:")
        if r["family"] == "arith":
            x, y = (int(t) for t in r["prompt"].split("What is ")[1].split("?")[0].split(" plus "))
            assert r["chosen"] == f" {x + y}."
    with pytest.raises(ValueError):
        demo_pairs(0)
    with pytest.raises(ValueError):
        demo_pairs(5, styles=("poetic",))


def test_cache_matches_direct_reference_and_refuses_other_keys(tmp_path, split):
    ref = ts.tiny("llama")
    ds = split["test"].select(range(12))
    cache, loaded = ReferenceCache.get_or_build(ref, ds, tmp_path, encoding={"chat": False}, batch_size=5)
    assert not loaded and len(cache) == 12
    again, loaded = ReferenceCache.get_or_build(ref, ds, tmp_path, encoding={"chat": False})
    assert loaded and torch.equal(again.lp_w, cache.lp_w) and torch.equal(again.off_l, cache.off_l)
    # values: the cache (built in batches of 5, other padding) equals a direct forward of a reordered batch
    rows = [ds[i] for i in (7, 2, 11, 0)]
    pb = encode_pairs(ref, rows, chat=False)
    cw, cl = again.lookup(rows, pb)
    dw, dl = pair_logprobs(ref, pb)
    torch.testing.assert_close(cw, dw, atol=2e-5, rtol=0)
    torch.testing.assert_close(cl, dl, atol=2e-5, rtol=0)
    # refused keys
    path = next(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    with pytest.raises(ValueError, match="mismatch.*encoding"):
        ReferenceCache.load(tmp_path / path, expect={"encoding": '{"chat": true}'})
    other_ref = ts.tiny("llama", seed=1)
    with pytest.raises(ValueError, match="mismatch.*reference"):
        ReferenceCache.load(tmp_path / path, expect=ReferenceCache.make_key(other_ref, ds, {"chat": False}))
    with pytest.raises(KeyError, match="not in the reference cache"):
        cache.lookup([split["train"][0]], encode_pairs(ref, [split["train"][0]], chat=False))
    # a trainer given a cache for another data set refuses it
    args = _args(tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match="mismatch"):
        TokenPreferenceTrainer(ts.tiny("llama"), None, reference_cache=cache, args=args,
                               train_dataset=split["train"], chat=False)
    with pytest.raises(ValueError, match="mismatch.*encoding"):
        TokenPreferenceTrainer(ts.tiny("llama"), None, reference_cache=cache, args=args, train_dataset=ds, chat=True)


def test_bad_input(tmp_path, split):
    pol, ref = ts.tiny("llama"), ts.tiny("llama")
    args = _args(tmp_path, max_steps=1)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            TokenPreferenceTrainer(pol, ref, beta=beta, args=args, train_dataset=split["test"], chat=False)
    other = ts.tiny("llama")
    other.tokenizer.add_tokens(["<ts_extra_token>"])  # a fresh tokenizer object per ts.tiny call: safe to mutate
    for bad_ref in (other, ts.tiny("bert")):
        with pytest.raises(ValueError, match="another tokenizer"):
            TokenPreferenceTrainer(pol, bad_ref, args=args, train_dataset=split["test"], chat=False)
    with pytest.raises(ValueError, match="KL"):
        cache = ReferenceCache.build(ref, split["test"], encoding={"chat": False})
        TokenPreferenceTrainer(pol, None, loss="tdpo", reference_cache=cache, args=args,
                               train_dataset=split["test"], chat=False)
    with pytest.raises(ValueError, match="unknown loss"):
        TokenPreferenceTrainer(pol, ref, loss="dpoo", args=args, train_dataset=split["test"], chat=False)


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])
def test_training_raises_heldout_margin(tmp_path, split, loss):
    """30 steps (batch 8, Adam lr 1e-3, β = 0.1) on 120 pairs: the held-out margin goes from exactly 0 (policy =
    reference) to ~3.5 (measured), held-out accuracy ~0.92."""
    pol, ref = ts.tiny("llama"), ts.tiny("llama")
    before, _ = _margin(pol, ref, split["test"])
    tr = TokenPreferenceTrainer(pol, ref, loss=loss, beta=BETA, args=_args(tmp_path, max_steps=30),
                                train_dataset=split["train"], chat=False)
    tr.train()
    after, acc = _margin(pol, ref, split["test"])
    assert abs(before) < 1e-5
    assert after - before > 1.5 and acc > 0.75, (before, after, acc)
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert logged and "rewards/margins" in logged[-1]
    if loss == "tdpo":
        assert logged[-1]["seq_kl/rejected"] > 0


def test_resume_continues_identically(tmp_path, split):
    """6 steps uninterrupted vs 3 steps, stop, resume from the checkpoint (fresh trainer, reference=None, the
    saved reference cache): steps 4-6 log the same losses (fp32 tolerance)."""
    ds = split["train"].select(range(48))
    cache_dir = tmp_path / "refcache"
    kw = dict(max_steps=6, logging_steps=1, lr_scheduler_type="linear", save_strategy="steps", save_steps=3)

    def losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    ref = ts.tiny("llama")
    full = TokenPreferenceTrainer(ts.tiny("llama"), ref, args=_args(tmp_path / "a", **kw), train_dataset=ds,
                                  cache_dir=cache_dir, chat=False)
    assert full.cache_status == ["built"]
    full.train()

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 3:
                control.should_training_stop = True

    first = TokenPreferenceTrainer(ts.tiny("llama"), ref, args=_args(tmp_path / "b", **kw), train_dataset=ds,
                                   cache_dir=cache_dir, chat=False, callbacks=[Stop()])
    assert first.cache_status == ["loaded"]
    first.train()
    assert max(losses(first)) == 3 and os.path.isdir(tmp_path / "b" / "checkpoint-3")
    cache_file = next((cache_dir).glob("*.safetensors"))
    resumed = TokenPreferenceTrainer(ts.tiny("llama", seed=5), None, reference_cache=ReferenceCache.load(cache_file),
                                     args=_args(tmp_path / "b", **kw), train_dataset=ds, chat=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # steps 1-3 restored from the checkpoint's state, 4-6 run now
    for s in (4, 5, 6):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a, b)
    assert losses(first)[3] == pytest.approx(a[3], rel=1e-5)
