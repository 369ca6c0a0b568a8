"""TokenPreferenceTrainer with the reference = the policy with its PEFT adapter disabled (reference="peft-disabled")."""

from __future__ import annotations

import math

import pytest
import torch

import tokensmith as ts
from tests.tolerance import logprob_atol
from tokensmith.alignment.data import encode_pairs, pair_kl, pair_logprobs
from tokensmith.alignment.pairs import demo_pairs
from tokensmith.alignment.trainer import PEFT_DISABLED, TokenPreferenceTrainer
from tokensmith.models.tiny import tiny_model_and_tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _lora_policy(**lora_kw):
    """Tiny llama (seed 0, the same weights as ts.tiny("llama")) with a LoRA on q/v; LoRA B starts at 0."""
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM", **lora_kw)
    return ts.ModelAdapter(peft.get_peft_model(model, cfg), tok)


def _logits(model, pb):
    """Logits of the encoded batch with explicit positions (what the base model sees), no grad."""
    b = pb.batch
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits


def _args(out, **kw):
    base = dict(per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def test_peft_disabled_reference_is_the_base_model(tmp_path):
    """Step 0: LoRA B = 0, so the disabled-adapter reference model and the policy give logits bit-identical to the
    base model's; the cached and live reference log-probs equal the base adapter's (fp32 tolerance: a
    different batch composition). After one DPO step
    (lr 1e-2) the policy moves away (> 1e-3, far above the tolerance) while the reference stays bit-identical to
    the base model; the per-token KL is > 0 (the two forwards really differ), and a new trainer finds the same
    cache (its key ignores the adapter weights, as a resumed run needs)."""
    base = ts.tiny("llama")
    policy = _lora_policy()
    ds = demo_pairs(16, seed=0)
    cache_dir = tmp_path / "refcache"
    tr = TokenPreferenceTrainer(policy, PEFT_DISABLED, loss="dpo", args=_args(tmp_path / "a", max_steps=1),
                                train_dataset=ds, cache_dir=cache_dir, chat=False)
    assert tr.cache_status == ["built"] and tr.reference.model.peft_model is policy.model
    assert policy.capabilities()["features"]["logits_at_positions"]  # PeftModel.forward(**kwargs) forwards logits_to_keep to the base model
    rows = [ds[i] for i in (3, 0, 9, 14)]
    pb = encode_pairs(base, rows, chat=False)
    z_base = _logits(base.model, pb)
    assert torch.equal(_logits(tr.reference.model, pb), z_base)
    assert torch.equal(_logits(policy.model, pb), z_base)
    # log-probs: the PeftModel adapter passes position_ids and logits_to_keep through to the base model like the
    # base adapter; batches of another composition (the cache) differ by rounding: fp32 tolerance, 2 layers x 64
    atol = logprob_atol(float(z_base.abs().max()), width=64, vocab=z_base.shape[-1], depth=2)
    b_w, b_l = pair_logprobs(base, pb)

    def close(got):
        torch.testing.assert_close(got[0], b_w, rtol=0, atol=atol)
        torch.testing.assert_close(got[1], b_l, rtol=0, atol=atol)

    close(tr.reference_caches[0].lookup(rows, pb))
    close(pair_logprobs(tr.reference, pb))
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) == 0.0 for p in lora_b)

    tr.train()
    assert any(float(p.abs().max()) > 0 for p in lora_b)  # the adapter trained
    assert torch.equal(_logits(tr.reference.model, pb), z_base)
    close(pair_logprobs(tr.reference, pb))
    p_w, p_l = pair_logprobs(policy, pb)
    assert float((p_w - b_w)[pb.mask_w].abs().max()) > 1e-3 and float((p_l - b_l)[pb.mask_l].abs().max()) > 1e-3
    kl_w, _ = pair_kl(policy, tr.reference, pb)
    assert float(kl_w[pb.mask_w].min()) >= 0 and float(kl_w[pb.mask_w].max()) > 1e-6
    again = TokenPreferenceTrainer(policy, PEFT_DISABLED, loss="dpo", args=_args(tmp_path / "b", max_steps=1),
                                   train_dataset=ds, cache_dir=cache_dir, chat=False)
    assert again.cache_status == ["loaded"]
    assert all(p.requires_grad for p in lora_b)  # the trainer froze nothing of the adapter


def test_peft_disabled_tdpo_steps(tmp_path):
    """A KL loss with the disabled-adapter reference (one forward with the adapter, one without, per step): at
    step 1 policy = reference (LoRA B = 0), so the logged sequential KL is 0 up to rounding — each token's KL
    is at most the two fp32 log-prob computations' difference (the policy runs with grad, the reference
    without: other kernels), summed over the completion — and the loss is log 2 up to β times that; after
    one step (lr 5e-2) the KL is above twice that bound (measured: 0.0 at step 1; 0.015 / 0.099 at step 2, bound
    0.004)."""
    policy = _lora_policy()
    ds = demo_pairs(8, seed=1)
    tr = TokenPreferenceTrainer(policy, PEFT_DISABLED, loss="tdpo", beta=0.1,
                                args=_args(tmp_path, max_steps=2, learning_rate=5e-2),
                                train_dataset=ds, chat=False)
    tr.train()
    h1, h2 = (h for h in tr.state.log_history if "loss" in h)
    pb = encode_pairs(policy, list(ds), chat=False)
    T = int(max(pb.mask_w.sum(-1).max(), pb.mask_l.sum(-1).max()))
    bound = T * logprob_atol(1.0, width=64, vocab=len(policy.tokenizer), depth=2)
    for k in ("seq_kl/chosen", "seq_kl/rejected"):
        assert abs(h1[k]) <= bound, (k, h1[k], bound)
        assert h2[k] > 2 * bound, (k, h2[k], bound)
    assert h1["loss"] == pytest.approx(math.log(2), abs=0.1 * 2 * bound)


def test_peft_disabled_refuses_models_without_adapter(tmp_path):
    ds = demo_pairs(8, seed=0)
    args = _args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="no PEFT adapter"):
        TokenPreferenceTrainer(ts.tiny("llama"), PEFT_DISABLED, args=args, train_dataset=ds, chat=False)
    with pytest.raises(ValueError, match="peft-disabled"):
        TokenPreferenceTrainer(_lora_policy(), "peft", args=args, train_dataset=ds, chat=False)
    drifting = _lora_policy()
    next(p for n, p in drifting.model.named_parameters() if n.endswith("model.norm.weight")).requires_grad_(True)
    with pytest.raises(ValueError, match="outside its PEFT adapter"):  # a trained base weight: the reference drifts
        TokenPreferenceTrainer(drifting, PEFT_DISABLED, args=args, train_dataset=ds, chat=False)
    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="not the PeftModel"):  # LoRA injected in place, adapter on the bare model
        TokenPreferenceTrainer(ts.ModelAdapter(model, tok), PEFT_DISABLED, args=args, train_dataset=ds, chat=False)
