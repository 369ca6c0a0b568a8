"""TokenWeightedTrainer, frequency_buckets and token_frequencies (tokensmith.optimization.training.trainer).

(Named test_weighted_trainer.py: tests/alignment/test_trainer.py already owns the module name test_trainer.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensmith as ts
from tokensmith.optimization.training import (
    TokenLoss,
    TokenWeightedTrainer,
    frequency_buckets,
    keep_count,
    shift_labels,
    token_frequencies,
    token_loss,
)

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["the cat sat on the mat and the dog sat too", "a bird flew over the hill"]
N_BUCKETS = 3


# ------------------------------------------------------------------------------------------- buckets
def test_frequency_buckets_hand_case_and_errors():
    # total 110: the token with 100 holds 91% of the mass and is alone in the top bucket
    assert frequency_buckets(torch.tensor([0, 1, 1, 2, 100, 6]), 2).tolist() == [0, 0, 0, 0, 1, 0]
    # four tokens of mass 1, 1, 2, 4 (total 8) into 2 buckets: midpoints 1/16, 3/16, 3/8, 3/4
    assert frequency_buckets(torch.tensor([4, 1, 2, 1]), 2).tolist() == [1, 0, 0, 0]
    assert frequency_buckets([3, 0, 5], 1).tolist() == [0, 0, 0]
    for bad, n in (([1, -1], 2), ([0, 0], 2), ([[1, 2]], 2), ([1.0, float("nan")], 2), ([1, 2], 0)):
        with pytest.raises(ValueError):
            frequency_buckets(torch.tensor(bad), n)


@settings(max_examples=40, deadline=None)
@given(
    freq=st.lists(st.integers(0, 1000), min_size=1, max_size=60).filter(lambda f: sum(f) > 0),
    n=st.integers(1, 8),
)
def test_frequency_buckets_partition_monotone_equal_mass(freq, n):
    f = torch.tensor(freq, dtype=torch.float64)
    b = frequency_buckets(f, n)
    assert b.shape == f.shape and b.dtype == torch.long
    assert int(b.min()) >= 0 and int(b.max()) < n  # every token in exactly one bucket of [0, n)
    order = torch.argsort(f, stable=True)
    assert bool((b[order][1:] >= b[order][:-1]).all())  # non-decreasing in frequency
    for v in f.unique():
        assert b[f == v].unique().numel() == 1  # equal frequency, same bucket
    total = float(f.sum())
    group_max = max(float(v) * int((f == v).sum()) for v in f.unique())
    for j in range(n):
        mass = float(f[b == j].sum())
        assert abs(mass - total / n) <= group_max + 1e-9


def test_token_frequencies_counts_labels_without_ignore_index():
    rows = [{"input_ids": [1, 2, 2], "labels": [-100, 2, 2]}, {"input_ids": [3], "labels": [3]}]
    assert token_frequencies(rows, 5).tolist() == [0, 0, 2, 1, 0]
    assert token_frequencies(rows, 5, column="input_ids").tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        token_frequencies([{"input_ids": [7]}], 5)


# ------------------------------------------------------------------------------------------- trainer fixtures
@pytest.fixture(scope="module")
def data(llama):
    rows = [llama.tokenizer(t).input_ids for t in TEXTS] * 2  # every batch of 4 holds the same rows
    return datasets.Dataset.from_dict({"input_ids": rows})


def _args(tmp_path, **kw):
    base = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        optim="sgd",
    )
    base.update(kw)
    return transformers.TrainingArguments(str(tmp_path), **base)


def _collator(tok):
    return transformers.DataCollatorForLanguageModeling(tok, mlm=False)


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss_ce" in h]


def _hand_first_step(model, tok, data, buckets):
    """Step-1 values from the initial model on the (order-free) batch: mean CE and per-bucket mean CE."""
    batch = _collator(tok)([data[i] for i in range(len(data))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels, mask = shift_labels(batch["labels"], batch["attention_mask"])
    ce = token_loss(logits, labels, mask)
    b = buckets[labels.clamp_min(0)]
    per = {j: float(ce[mask & (b == j)].mean()) for j in range(N_BUCKETS) if bool((mask & (b == j)).any())}
    return float(ce[mask].mean()), per, int(mask.sum())


# ------------------------------------------------------------------------------------------- trainer
def test_uniform_trainer_logs_kept_fraction_and_bucket_losses(tmp_path, llama, data):
    model = copy.deepcopy(llama.model)
    V = llama.structure.vocab_size
    freq = token_frequencies(data, V)
    buckets = frequency_buckets(freq, N_BUCKETS)
    mean_ce, per_bucket, _ = _hand_first_step(model, llama.tokenizer, data, buckets)
    tr = TokenWeightedTrainer(
        model,
        _args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        data_collator=_collator(llama.tokenizer),
        processing_class=llama.tokenizer,
        n_buckets=N_BUCKETS,
    )
    assert torch.equal(tr.frequency, freq)  # frequency=None: the training rows' counts
    tr.train()
    logs = _train_logs(tr)
    assert len(logs) == 3
    first = logs[0]
    assert first["kept_fraction"] == 1.0 and first["weight_mean"] == 1.0
    assert first["loss"] == pytest.approx(mean_ce, abs=1e-4)  # HF's logged loss is our objective
    assert first["loss_ce"] == pytest.approx(mean_ce, abs=1e-4)
    assert per_bucket and {f"loss_bucket_{j}" for j in per_bucket} == {
        k for k in first if k.startswith("loss_bucket_")
    }
    for j, v in per_bucket.items():
        assert first[f"loss_bucket_{j}"] == pytest.approx(v, abs=1e-4)
    assert logs[-1]["loss_ce"] < first["loss_ce"]  # it trains
    ev = tr.evaluate()
    assert {"eval_loss", "eval_loss_ce", "eval_kept_fraction"} <= set(ev)
    assert any(k.startswith("eval_loss_bucket_") for k in ev)
    assert ev["eval_loss"] == pytest.approx(ev["eval_loss_ce"], abs=1e-5)


def test_rho1_trainer_with_a_copy_as_reference(tmp_path, llama, data):
    model = copy.deepcopy(llama.model)
    ref = copy.deepcopy(llama.model)
    ref_before = [p.detach().clone() for p in ref.parameters()]
    pol_before = [p.detach().clone() for p in model.parameters()]
    buckets = frequency_buckets(token_frequencies(data, llama.structure.vocab_size), N_BUCKETS)
    _, _, N = _hand_first_step(model, llama.tokenizer, data, buckets)
    tr = TokenWeightedTrainer(
        model,
        _args(tmp_path),
        weighter="rho1",
        weighter_kwargs={"keep_ratio": 0.5},
        ref_model=ref,
        train_dataset=data,
        data_collator=_collator(llama.tokenizer),
        n_buckets=N_BUCKETS,
    )
    tr.train()
    logs = _train_logs(tr)
    assert len(logs) == 3
    for h in logs:
        assert all(v == v and abs(v) != float("inf") for k, v in h.items() if isinstance(v, float)), h
        assert h["kept_fraction"] == pytest.approx(keep_count(N, 0.5) / N, abs=1e-6)
    # step 1: the reference IS the initial model, so the excess loss is 0 up to rounding; later it is not
    assert abs(logs[0]["excess_loss_mean"]) < 1e-5
    assert abs(logs[-1]["excess_loss_mean"]) > 1e-4
    assert logs[0]["ref_loss_mean"] == pytest.approx(logs[0]["loss_ce"], abs=1e-5)
    # the reference stays frozen; the policy moves
    assert all(torch.equal(a, b) for a, b in zip(ref_before, ref.parameters(), strict=True))
    assert not all(p.requires_grad for p in ref.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(pol_before, model.parameters(), strict=True))


class _HiddenSquare(TokenLoss):
    """A test term (unregistered) that needs the hidden states: mean squared hidden state at counted tokens."""

    needs = ("hidden",)

    def loss(self, batch):
        return batch.hidden[batch.mask].pow(2).mean()


def test_prior_trainer_with_an_adapter_reference_and_a_token_loss_term(tmp_path, llama, data):
    ref = ts.ModelAdapter(copy.deepcopy(llama.model), llama.tokenizer)
    tr = TokenWeightedTrainer(
        ts.ModelAdapter(copy.deepcopy(llama.model), llama.tokenizer),
        _args(tmp_path, max_steps=2),
        weighter="prior",
        ref_model=ref,
        token_losses=[(_HiddenSquare(), 0.01)],
        train_dataset=data,
        data_collator=_collator(llama.tokenizer),
        n_buckets=0,
    )
    tr.train()
    logs = _train_logs(tr)
    assert len(logs) == 2 and all(h["weight_mean"] == pytest.approx(1.0, abs=1e-5) for h in logs)
    first = logs[0]
    assert first["loss__hiddensquare"] > 0
    assert first["loss"] == pytest.approx(
        first["loss_weighted"] + 0.01 * first["loss__hiddensquare"], abs=1e-5
    )
    assert not any(k.startswith("loss_bucket") for k in first)  # n_buckets=0 disables the bucket logs


class _Snapshots(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.params = model, []

    def on_step_end(self, args, state, control, **kw):
        self.params.append(self.model.lm_head.weight.detach().clone())


def _nan_on_second_call(model):
    calls = {"n": 0}

    def hook(mod, inp, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 else out

    return model.lm_head.register_forward_hook(hook)


def test_nan_steps_skip_with_a_counter_or_raise(tmp_path, llama, data):
    model = copy.deepcopy(llama.model)
    _nan_on_second_call(model)
    snaps = _Snapshots(model)
    tr = TokenWeightedTrainer(
        model,
        _args(tmp_path),
        nan="skip",
        train_dataset=data,
        data_collator=_collator(llama.tokenizer),
        n_buckets=N_BUCKETS,
        callbacks=[snaps],
    )
    before = model.lm_head.weight.detach().clone()
    tr.train()
    logs = _train_logs(tr)
    assert tr.nan_skipped == 1 and [h["nan_skipped"] for h in logs] == [0.0, 1.0, 1.0]
    assert logs[1]["loss"] == 0.0
    # SGD without momentum or weight decay: the skipped step changes no weight, the others do
    assert not torch.equal(snaps.params[0], before)
    assert torch.equal(snaps.params[1], snaps.params[0])
    assert not torch.equal(snaps.params[2], snaps.params[1])
    assert bool(torch.isfinite(model.lm_head.weight).all())
    # nan="raise" (the default): a ValueError naming the step and the skip option
    model2 = copy.deepcopy(llama.model)
    _nan_on_second_call(model2)
    tr2 = TokenWeightedTrainer(
        model2, _args(tmp_path), train_dataset=data, data_collator=_collator(llama.tokenizer)
    )
    with pytest.raises(ValueError, match=r"step 1: the logits are NaN/inf.*nan='skip'"):
        tr2.train()


def test_trainer_refuses_bad_configurations(tmp_path, llama, data):
    model = copy.deepcopy(llama.model)
    kw = dict(train_dataset=data, data_collator=_collator(llama.tokenizer))
    with pytest.raises(ValueError, match="ref_model"):
        TokenWeightedTrainer(model, _args(tmp_path), weighter="rho1", **kw)
    with pytest.raises(ValueError, match="model being trained"):
        TokenWeightedTrainer(model, _args(tmp_path), weighter="rho1", ref_model=model, **kw)
    bigger = copy.deepcopy(llama.model)
    bigger.resize_token_embeddings(llama.structure.vocab_size + 8)
    with pytest.raises(ValueError, match="another tokenizer"):
        TokenWeightedTrainer(model, _args(tmp_path), weighter="rho1", ref_model=bigger, **kw)
    with pytest.raises(ValueError, match="frequency"):
        TokenWeightedTrainer(model, _args(tmp_path), frequency=torch.ones(10), **kw)
    with pytest.raises(ValueError, match="nan"):
        TokenWeightedTrainer(model, _args(tmp_path), nan="ignore", **kw)
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenWeightedTrainer(model, _args(tmp_path), weighter="rho1", weighter_kwargs={"keep_ratio": 0}, **kw)
    with pytest.raises(ValueError, match="reduction"):
        TokenWeightedTrainer(model, _args(tmp_path), reduction="mean", **kw)
