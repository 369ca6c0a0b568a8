"""TokenDPOTrainer: tokensmith losses on TRL's DPOTrainer batch (tokensmith.alignment.trl)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensmith as ts
from tests.tolerance import EPS32, assert_fp32_close, fp32_atol
from tokensmith.alignment import losses as L
from tokensmith.alignment.pairs import demo_pairs

trl = pytest.importorskip("trl", minversion="1.0")
pytest.importorskip("datasets")
from tokensmith.alignment.trl import TokenDPOTrainer, check_trl_version  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BETA = 0.2


@pytest.fixture(scope="module")
def pairs():
    return demo_pairs(8, seed=0).select_columns(["prompt", "chosen", "rejected"])


def _cfg(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
                logging_steps=1, save_strategy="no", beta=BETA, seed=0)
    base.update(kw)
    return trl.DPOConfig(str(tmp_path), **base)


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _h_scale(batch, model):
    """max_b Σ_t |log p_t| over the batch (the magnitude the DPO sums carry), for the fp32 tolerance."""
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(z.double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return float((lp.abs() * batch["completion_mask"][:, 1:]).sum(-1).max())


def _weighted_dpo(x, **kw):
    """A callable loss with our signature: DPO with explicit unit token weights."""
    return L.dpo(x.pol_lp_w, x.pol_lp_l, x.ref_lp_w, x.ref_lp_l, x.mask_w, x.mask_l, beta=x.beta,
                 weights_w=torch.ones_like(x.pol_lp_w), weights_l=torch.ones_like(x.pol_lp_l), **kw)


def test_dpo_equals_stock_trl_sigmoid(tmp_path, pairs):
    """Same batch, same weights (policy seed 0, reference seed 1, so the margin is not 0): our loss, every
    parameter gradient and the reward metrics equal stock DPOTrainer's sigmoid loss, for loss="dpo" through
    TRL's fused LM head, loss="dpo" through the [N, V] completion logits, and a callable loss with explicit unit
    token weights. Tolerance: fp32 sums of T per-token log-probs of magnitude Σ|log p| (β times that for the
    loss), plus the per-token log-sum-exp rounding when the log-probs come from another kernel."""
    tok = ts.tiny("llama").tokenizer
    stock = trl.DPOTrainer(ts.tiny("llama").model, ts.tiny("llama", seed=1).model, args=_cfg(tmp_path / "s"),
                           train_dataset=pairs, processing_class=tok)
    ours = TokenDPOTrainer(ts.tiny("llama"), ts.tiny("llama", seed=1), _cfg(tmp_path / "o"), loss="dpo",
                           train_dataset=pairs, logprobs="fused")
    assert ours._use_fused
    b_s, b_o = _batch(stock, 4), _batch(ours, 4)
    assert b_s.keys() == b_o.keys() and all(torch.equal(b_s[k], b_o[k]) for k in b_s)
    stock.model.train()
    ours.model.train()
    l_s = stock.compute_loss(stock.model, b_s)
    l_s.backward()
    g_s = _grads(stock.model)
    assert abs(l_s.item() - math.log(2)) > 1e-2  # the two models differ: a non-trivial margin
    T = b_s["input_ids"].shape[1]
    V = ours.model.config.vocab_size
    h = _h_scale(b_o, ours.model)
    lse = 4 * EPS32 * math.sqrt(V) * T  # per-token log-sum-exp rounding, summed over T tokens
    m_s = stock._metrics["train"]
    for variant in ("dpo-fused", "dpo-logits", "callable-unit-weights"):
        ours._use_fused = variant == "dpo-fused"
        if variant == "callable-unit-weights":
            ours.loss_fn = _weighted_dpo
        ours.model.zero_grad(set_to_none=True)
        ours._metrics["train"].clear()
        l_o = ours.compute_loss(ours.model, b_o)
        l_o.backward()
        assert_fp32_close(l_o.detach(), l_s.detach(), width=T, scale=BETA * (h + lse))
        g_o = _grads(ours.model)
        assert g_s.keys() == g_o.keys() and len(g_o) > 0
        for k in g_s:
            g = max(float(g_s[k].abs().max()), 1e-3)
            assert_fp32_close(g_o[k], g_s[k], width=T, scale=g * BETA * (h + lse))
        # the reward metrics agree with TRL's (ours: rewards/accuracy, TRL: rewards/accuracies)
        m_o = ours._metrics["train"]
        tol = fp32_atol(BETA * (h + lse), T)
        assert m_o["rewards/margins"][-1] == pytest.approx(m_s["rewards/margins"][-1], abs=tol), variant
        assert m_o["logps/chosen"][-1] == pytest.approx(m_s["logps/chosen"][-1], abs=fp32_atol(h + lse, T))


def test_tdpo1_value_and_three_steps(tmp_path, pairs):
    """loss="tdpo1": (1) on one batch (2 pairs) it equals a float64 step-by-step TDPO1 from the full logits of
    both models, L = −log σ(β[Σ_t Δ_t(y_w) − Σ_t Δ_t(y_l) − (D(y_l) − D(y_w))]), D(y) = Σ_t KL(π_ref ‖ π_θ);
    (2) three training steps log a finite loss and the loss's metrics (seq_kl/* > 0)."""
    tr = TokenDPOTrainer(ts.tiny("llama"), ts.tiny("llama", seed=1), _cfg(tmp_path, learning_rate=1e-3),
                         loss="tdpo1", train_dataset=pairs)
    b = _batch(tr, 2)
    tr.model.train()
    ours = tr.compute_loss(tr.model, b).detach()
    ids, am, cm = b["input_ids"], b["attention_mask"], b["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        lp = torch.log_softmax(tr.model(input_ids=ids, attention_mask=am).logits[:, :-1].double(), -1)
        lr = torch.log_softmax(tr.ref_model(input_ids=ids, attention_mask=am).logits[:, :-1].double(), -1)
    tok = ids[:, 1:, None]
    delta = (lp.gather(-1, tok) - lr.gather(-1, tok))[..., 0] * cm
    kl = (lr.exp() * (lr - lp)).sum(-1) * cm
    s, D = delta.sum(-1), kl.sum(-1)
    B = 2
    ref = -F.logsigmoid(BETA * ((s[:B] - s[B:]) - (D[B:] - D[:B]))).mean()
    V, T = tr.model.config.vocab_size, ids.shape[1]
    # ours runs the LM head chunked (another summation order than the reference's full head): depth 2, and the
    # 2x margin a busy CI machine needed (6.5e-6 against a 3.6e-6 bound at depth 1, safety 4)
    assert_fp32_close(ours.double(), ref, width=T, depth=2, safety=8,
                      scale=BETA * (float(delta.abs().sum(-1).max()) + 4 * EPS32 * V))
    assert float(D.min()) > 0  # the KL term is live: the models differ
    tr._metrics["train"].clear()
    tr.train()
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    for h in logged:
        assert math.isfinite(h["loss"]) and h["seq_kl/chosen"] > 0 and h["seq_kl/rejected"] > 0
        assert {"rewards/margins", "rewards/accuracy", "logps/chosen"} <= h.keys()


def test_version_gate_and_refused_settings(tmp_path, pairs, monkeypatch):
    assert check_trl_version() == trl.__version__
    pol, ref = ts.tiny("llama"), ts.tiny("llama", seed=1)
    for bad in ("0.29.1", "2.0.0", "2.0.0.dev0", "not-a-version"):
        monkeypatch.setattr(trl, "__version__", bad)
        with pytest.raises(RuntimeError, match=r"TRL >=1\.0,<2 .*found trl " + bad.replace(".", r"\.")):
            TokenDPOTrainer(pol, ref, _cfg(tmp_path), train_dataset=pairs)
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    assert check_trl_version() == "1.99.0"
    monkeypatch.undo()
    for kw, match in (
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"loss_type": ["ipo"]}, "loss_type"),
        ({"label_smoothing": 0.1}, "label_smoothing"),
        ({"beta": 0.0}, "beta"),
    ):
        with pytest.raises(ValueError, match=match):
            TokenDPOTrainer(pol, ref, _cfg(tmp_path, **kw), train_dataset=pairs)
    with pytest.raises(ValueError, match="unknown loss"):
        TokenDPOTrainer(pol, ref, _cfg(tmp_path), loss="dpoo", train_dataset=pairs)
    with pytest.raises(ValueError, match="beta"):
        TokenDPOTrainer(pol, ref, _cfg(tmp_path), loss_kwargs={"beta": 0.3}, train_dataset=pairs)
    # a callable loss that calls inputs.kl() without needs_kl=True gets a clear error
    with pytest.raises(ValueError, match="logprobs"):
        TokenDPOTrainer(pol, ref, _cfg(tmp_path), logprobs="fast", train_dataset=pairs)
    tr = TokenDPOTrainer(pol, ref, _cfg(tmp_path), loss=lambda x: (x.kl()[0].sum(), {}), train_dataset=pairs)
    assert tr._use_fused is False  # logprobs="auto" on CPU: the completion-logits path
    with pytest.raises(ValueError, match="needs_kl=True"):
        tr.compute_loss(tr.model, _batch(tr, 2))


def test_clear_import_error_without_trl(monkeypatch):
    """Without TRL the module still imports (API docs, doctest collection) and constructing says what to
    install; tokensmith.alignment itself never imports TRL."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "tokensmith.alignment.trl")
    mod = importlib.import_module("tokensmith.alignment.trl")
    assert mod.trl is None and mod.check_trl_version("1.16.0") == "1.16.0"
    with pytest.raises(ImportError, match=r"tokensmith\[trl\]"):
        mod.TokenDPOTrainer(ts.tiny("llama").model)
    with pytest.raises(ImportError, match=r"tokensmith\[trl\]"):
        mod.check_trl_version()
    importlib.reload(importlib.import_module("tokensmith.alignment"))  # imports fine with trl unavailable


def test_peft_policy_reference_is_the_disabled_adapter(tmp_path, pairs):
    """ref_model=None with a LoRA policy (TRL's peft_config): the reference is the policy with its adapter
    disabled (TRL's convention). LoRA B starts at 0, so step 1 has policy = reference: loss log 2 and sequential
    KL 0 up to rounding (bound: each token's KL is at most the fp32 log-prob difference of two kernels, summed
    over T); after one step at lr 5e-2 the KL exceeds that bound: only the reference forward had the adapter off."""
    peft = pytest.importorskip("peft")
    from tests.tolerance import logprob_atol
    from tokensmith.models.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("llama", seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    tr = TokenDPOTrainer(model, None, _cfg(tmp_path, max_steps=2, learning_rate=5e-2), loss="tdpo",
                         train_dataset=pairs, processing_class=tok, peft_config=lora)
    assert tr.ref_model is None and isinstance(tr.model, peft.PeftModel)
    tr.train()
    h1, h2 = (h for h in tr.state.log_history if "loss" in h)
    T = max(len(r["chosen_ids"]) + len(r["prompt_ids"]) for r in tr.train_dataset)
    bound = T * logprob_atol(1.0, width=64, vocab=len(tok), depth=2)
    assert abs(h1["seq_kl/chosen"]) <= bound and abs(h1["seq_kl/rejected"]) <= bound
    assert h1["loss"] == pytest.approx(math.log(2), abs=BETA * 2 * bound)
    assert h2["seq_kl/rejected"] > 2 * bound and h2["rewards/margins"] > 0
