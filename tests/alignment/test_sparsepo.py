"""SparsePOMasks: learned SparsePO masks over reference hidden states, alignment and training."""

from __future__ import annotations

import pytest
import torch

import tokensmith as ts
from tokensmith.alignment.data import encode_pairs, pair_logprobs_and_kl
from tokensmith.alignment.losses import sparsepo
from tokensmith.alignment.sparsepo import SparsePOMasks

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city.", "rejected": " Rome"},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " five, I think"},
]


def test_masks_are_aligned_with_the_logprob_positions(shared_tiny):
    ref = shared_tiny("llama")
    pb = encode_pairs(ref, PAIRS, chat=False)
    masks = SparsePOMasks(ref, layers=[0, -1])
    m_u_w, m_u_l, m_d_w, m_d_l = masks.from_batch(pb)
    for m, cm in ((m_u_w, pb.mask_w), (m_u_l, pb.mask_l), (m_d_w, pb.mask_w), (m_d_l, pb.mask_l)):
        assert m.shape == cm.shape and (m >= 0).all() and (m[~cm.bool()] == 0).all()
    # independent computation: full hidden states of the two layers, MaskModel at every position, then the mask
    # for token t is the value at position t - 1 (the state that predicts y_t)
    names = ["layers.0.resid_post", f"layers.{ref.structure.num_layers - 1}.resid_post"]
    with torch.no_grad(), ref.hooks(cache=names) as h:
        ref.forward(pb.batch)
    full = masks.reward([h.cache[n] for n in names])  # [2B, T]
    want = torch.zeros_like(full)
    want[:, 1:] = full[:, :-1]
    want = want * pb.batch.target_mask
    got = torch.cat([m_u_w, m_u_l])
    assert torch.allclose(got.detach(), want.detach(), atol=1e-6)


def test_shared_mask_and_bad_layers(shared_tiny):
    ref = shared_tiny("llama")
    pb = encode_pairs(ref, PAIRS, chat=False)
    m = SparsePOMasks(ref, layers=[1], shared=True)
    u_w, _, d_w, _ = m.from_batch(pb)
    assert torch.equal(u_w, d_w) and m.kl is m.reward
    with pytest.raises(ValueError, match="layers"):
        SparsePOMasks(ref, layers=[7])
    with pytest.raises(TypeError, match="LossInputs"):
        m(42)
    assert not any(n.startswith("_reference") for n, _ in m.named_parameters())  # the reference is not ours


def test_masks_learn_under_the_sparsepo_loss(shared_tiny):
    """Only the mask networks train here (policy = reference frozen): with a strong L1 weight on the reward
    mask its mean falls, and every mask parameter receives a gradient."""
    ref = shared_tiny("llama")
    pol = ts.tiny("llama", seed=1)
    pol.model.requires_grad_(False)
    pb = encode_pairs(ref, PAIRS, chat=False)
    f = pair_logprobs_and_kl(pol, ref, pb, grad=False)
    masks = SparsePOMasks(ref, layers=[0, 1])
    opt = torch.optim.Adam(masks.parameters(), lr=0.05)
    means = []
    for step in range(15):
        m = masks.from_batch(pb)
        loss, _ = sparsepo(*f["policy"], *f["reference"], pb.mask_w, pb.mask_l, *f["kl"], *m, beta=0.1,
                           l1_u=1.0, l1_d=0.0)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in masks.parameters())
        opt.step()
        means.append(float(m[0].detach()[pb.mask_w.bool()].mean()))
    assert means[-1] < 0.5 * means[0], means


def test_trainer_trains_and_checkpoints_the_masks(tmp_path):
    """loss="sparsepo" with SparsePOMasks in loss_kwargs: the mask parameters join the optimiser and change, are
    saved with each checkpoint, and a run resumed from step 2 (fresh masks object, fresh trainer) ends step 3 with
    the same masks as the uninterrupted run (the masks and their Adam state are restored)."""
    transformers = pytest.importorskip("transformers")
    from tokensmith.alignment.pairs import demo_pairs
    from tokensmith.alignment.trainer import LOSS_MODULES_FILE, TokenPreferenceTrainer

    ds = demo_pairs(16, seed=0)

    def run(out, masks, resume=None):
        args = transformers.TrainingArguments(
            str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.0,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], seed=0,
            use_cpu=True, disable_tqdm=True, max_steps=3)
        tr = TokenPreferenceTrainer(ts.tiny("llama"), ref, loss="sparsepo", loss_kwargs={"masks": masks, "l1_u": 0.1},
                                    args=args, train_dataset=ds, chat=False)
        tr.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in masks.state_dict().items()}

    ref = ts.tiny("llama")
    masks = SparsePOMasks(ref, layers=[1])
    before = {k: v.clone() for k, v in masks.state_dict().items()}
    full = run(tmp_path / "a", masks)
    assert any(not torch.equal(before[k], full[k]) for k in before)  # the masks trained
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / LOSS_MODULES_FILE).exists()
    resumed = run(tmp_path / "b", SparsePOMasks(ref, layers=[1]), resume=str(ckpt))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-5)
