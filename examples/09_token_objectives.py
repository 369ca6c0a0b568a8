# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Token-weighted training: plain CE vs Rho-1 selection vs TLDR
#
# `tokensmith.optimization.training` writes every token-level objective as a per-token loss times a per-token
# weight, `L = Σ m·w·CE / Σ m` (Rho-1 divides by `Σ m·w`). This notebook (1) shows the weights of a few
# weighters on one sentence, then (2) fine-tunes a tiny Llama (`ts.tiny("llama")`, the real SmolLM2 tokenizer)
# with `TokenWeightedTrainer` on real English prose (the standard library's `pydoc_data.topics`) in which
# some training text was replaced by random tokens, with plain CE, Rho-1 and TLDR on the same batches, and
# (3) compares the held-out loss per token-frequency bucket and the training throughput.
#
# The runs are short so that the notebook finishes in about a minute on two CPU cores; the longer runs, with
# SmolLM2-135M, are in `benchmarks/objectives_experiment.py` (`benchmarks/results/objectives_experiment.md`).

# %%
import copy
import os
import tempfile

import datasets
import torch
import transformers

import tokensmith as ts
from tokensmith.optimization.training import (
    Rho1,
    TokenWeightedTrainer,
    compute_token_objective,
    frequency_buckets,
    reference_token_loss,
    shift_labels,
    token_frequencies,
    weighted_token_loss,
)
from tokensmith.pruning.haystack import english_paragraphs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the tiny model runs faster on one thread than on two shared ones
transformers.logging.set_verbosity_error()

# %% [markdown]
# ## 1. Per-token weights on one sentence
# Labels are aligned with the logits once (`shift_labels`: `logits[:, t]` predicts `labels[:, t]`), so the
# model's logits are used as they are. With no weighter the loss is HF's causal-LM loss. TLDR weighs a token
# by `cos(π·p) + 1` (hard tokens 2, easy ones 0), focal by `(1 − p)^γ`, and Rho-1 keeps the top 60% of the
# batch's tokens by excess loss `L_θ − L_ref` against a reference model.

# %%
ad = ts.tiny("llama", seed=0)
ids = ad.tokenizer(["The interpreter reads the source file and executes it."], return_tensors="pt").input_ids
labels, mask = shift_labels(ids)
logits = ad.forward(ids).logits
plain = weighted_token_loss(logits, labels, mask)
print(f"ours {plain.item():.5f} = HF {ad.model(input_ids=ids, labels=ids).loss.item():.5f}")

ref = ts.tiny("llama", seed=1)  # any model with the same tokenizer; here another random init
ref_ce = reference_token_loss(ref, ids, None, labels, mask, policy=ad)
rows = {
    "tldr": compute_token_objective(logits, labels, mask, "tldr").weights,
    "focal": compute_token_objective(logits, labels, mask, "focal").weights,
    "rho1": compute_token_objective(logits, labels, mask, Rho1(0.6), ref_token_loss=ref_ce).weights,
}
toks = ad.tokenizer.convert_ids_to_tokens(labels[0][mask[0]].tolist())
print(f"{'label':>6} " + " ".join(f"{t:>12}" for t in toks[:8]))
for name, w in rows.items():
    print(f"{name:>6} " + " ".join(f"{v:>12.3f}" for v in w[0][mask[0]].tolist()[:8]))

# %% [markdown]
# A random model puts p ≈ 1/49152 on every token, so TLDR's weight is ≈ 2 everywhere and focal's ≈ 1: on a
# model that knows nothing, both are plain CE scaled (and Adam is scale-invariant). That is why the tiny
# model below is first trained a little before the objectives are compared.
#
# ## 2. Data: clean prose, and a training split with noise
# The prose paragraphs of `pydoc_data.topics` (Python's reference manual), tokenized with the SmolLM2
# tokenizer and cut into 32-token blocks, split into held-out, a clean subset and training blocks. In 30% of
# the training blocks half the tokens are replaced by uniformly random ids: the kind of noise Rho-1 is meant
# to skip. Token frequencies (for the buckets) are counted on the clean training text.

# %%
T, B = 32, 8
tok = ad.tokenizer
stream = []
for p in english_paragraphs():
    stream += tok(p, add_special_tokens=False).input_ids + [tok.eos_token_id]
blocks = torch.tensor(stream[: len(stream) // T * T]).view(-1, T)
g = torch.Generator().manual_seed(0)
blocks = blocks[torch.randperm(len(blocks), generator=g)]
n_held, n_clean = len(blocks) * 15 // 100, len(blocks) * 25 // 100
held, clean, train_clean = blocks[:n_held], blocks[n_held : n_held + n_clean], blocks[n_held + n_clean :]

V = ad.model.config.vocab_size
train, noise = train_clean.clone(), torch.zeros(train_clean.shape, dtype=torch.bool)
noisy_rows = torch.randperm(len(train), generator=g)[: len(train) * 3 // 10]
for r in noisy_rows.tolist():  # ids 0-2 are the special tokens of the SmolLM2 tokenizer
    s = int(torch.randint(0, T // 2 + 1, (1,), generator=g))
    train[r, s : s + T // 2] = torch.randint(len(tok.all_special_ids), V, (T // 2,), generator=g)
    noise[r, s : s + T // 2] = True


def as_dataset(x):
    return datasets.Dataset.from_dict({"input_ids": x.tolist()})


freq = token_frequencies([{"labels": b[1:]} for b in train_clean], V)
buckets = frequency_buckets(freq, 4)
print(
    f"{len(blocks)} blocks of {T}: held-out {len(held)}, clean {len(clean)}, train {len(train)} "
    f"({len(noisy_rows)} noisy)"
)
for j in range(4):
    f = freq[buckets == j]
    print(
        f"bucket {j}: {int((f > 0).sum()):5d} seen token types, training counts {int(f[f > 0].min())}–{int(f.max())}"
    )

# %% [markdown]
# ## 3. Stage 1: a "pretrained" tiny model, which is also Rho-1's reference
# Rho-1's reference is a model trained on high-quality data. A random tiny Llama is trained with plain CE
# (`TokenWeightedTrainer`, weighter `"uniform"`) on the clean subset; every objective then fine-tunes a copy
# of it on the noisy training split, and a frozen copy scores the tokens for Rho-1.


# %%
def args(steps):
    return transformers.TrainingArguments(
        tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=B,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=steps,
        seed=0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )


def trainer(model, steps, **kw):
    tr = TokenWeightedTrainer(model, args(steps), **kw)
    tr.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep the logs in tr.state.log_history
    return tr


base = ts.tiny("llama", seed=0).model
out = trainer(base, 50, weighter="uniform", train_dataset=as_dataset(clean), n_buckets=0).train()
base.eval()
print(f"stage 1: 50 CE steps on the clean subset, final training loss {out.training_loss:.3f}")

# %% [markdown]
# ## 4. Stage 2: CE vs Rho-1 vs TLDR, same steps, seed and batches
# The same `TrainingArguments` (seed 0, so the same batch order), one trainer per objective. Rho-1 gets the
# frozen stage-1 model as `ref_model` and recomputes its per-token loss on every batch. `frequency=` and
# `n_buckets=4` make the trainer log `loss_bucket_j` (training) and `eval_loss_bucket_j` (held-out, plain CE
# whatever the objective).

# %%
held_ds = as_dataset(held[:96])


def held_out(model):
    """Plain CE on the held-out blocks, overall and per bucket (a trainer with no weighter, evaluation only)."""
    return trainer(model, 1, frequency=freq, n_buckets=4).evaluate(held_ds)


results, speed = {"init": held_out(base)}, {}
objectives = {
    "ce": {},
    "rho1": {"weighter": "rho1", "weighter_kwargs": {"keep_ratio": 0.6}, "ref_model": copy.deepcopy(base)},
    "tldr": {"weighter": "tldr"},
}
for name, kw in objectives.items():
    model = copy.deepcopy(base)
    tr = trainer(model, 25, train_dataset=as_dataset(train), frequency=freq, n_buckets=4, **kw)
    out = tr.train()
    speed[name] = out.metrics["train_samples_per_second"] * T
    results[name] = held_out(model)
    if name == "rho1":
        rho1_model = model
    log = tr.state.log_history[0]  # the means over the 25 steps
    print(
        f"{name:>5}: training loss {log['loss']:.3f} (plain CE {log['loss_ce']:.3f}), kept fraction "
        f"{log['kept_fraction']:.2f}, mean weight {log['weight_mean']:.3f}; held-out CE "
        f"{results[name]['eval_loss_ce']:.3f}; {speed[name]:.0f} tokens/s ({speed[name] / speed.get('ce', speed[name]):.2f}x CE's)"
    )

# %% [markdown]
# Which tokens does Rho-1 keep? On 8 noisy training blocks, with the fine-tuned model and the reference: the
# kept share of the random (noise) labels against that of the clean labels. Noise is hard for both models, so
# its excess loss is small and Rho-1 drops most of it.

# %%
rows8 = noisy_rows[:8]
ids8 = train[rows8]
labels8, mask8 = shift_labels(ids8)
noise8 = torch.zeros_like(mask8)
noise8[:, :-1] = noise[rows8][:, 1:]
with torch.no_grad():
    ref8 = reference_token_loss(objectives["rho1"]["ref_model"], ids8, None, labels8, mask8)
    w8 = compute_token_objective(
        rho1_model(input_ids=ids8).logits, labels8, mask8, Rho1(0.6), ref_token_loss=ref8
    ).weights
kept_noise = float((w8 > 0)[mask8 & noise8].float().mean())
kept_clean = float((w8 > 0)[mask8 & ~noise8].float().mean())
print(
    f"Rho-1 keeps {kept_noise:.0%} of the noise labels and {kept_clean:.0%} of the clean ones (60% overall)"
)

# %% [markdown]
# ## 5. Held-out loss per frequency bucket
# Bucket 0 holds the rarest tokens (and those never seen in training), bucket 3 the few most frequent ones;
# each bucket holds about a quarter of the training tokens. The throughput ratios above come from one run
# each on a possibly shared machine; `benchmarks/objectives_bench.py` measures the overhead paired.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

names = ["init", "ce", "rho1", "tldr"]
table = {n: [results[n][f"eval_loss_bucket_{j}"] for j in range(4)] for n in names}
print(f"{'':>6}" + "".join(f"{'bucket ' + str(j):>10}" for j in range(4)) + f"{'all':>10}")
for n in names:
    print(f"{n:>6}" + "".join(f"{v:>10.3f}" for v in table[n]) + f"{results[n]['eval_loss_ce']:>10.3f}")

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
width, ticks = 0.2, ["0 (rare)", "1", "2", "3 (frequent)"]
for i, n in enumerate(names):
    ax.bar([j + (i - 1.5) * width for j in range(4)], table[n], width, label=n)
    if n != "init":
        delta = [a - b for a, b in zip(table[n], table["init"], strict=True)]
        ax2.bar([j + (i - 2) * width for j in range(4)], delta, width, label=n, color=f"C{i}")
for a in (ax, ax2):
    a.set_xticks(range(4), ticks)
    a.set_xlabel("token-frequency bucket (equal training mass)")
ax.set_ylabel("held-out loss (nats/token)")
ax.set_ylim(min(min(v) for v in table.values()) - 0.5, max(max(v) for v in table.values()) + 0.8)
ax.legend(ncol=4, fontsize=8)
ax.set_title("held-out loss per bucket")
ax2.axhline(0, color="k", lw=0.5)
ax2.set_ylabel("change vs the initial model")
ax2.legend(fontsize=8)
ax2.set_title("fine-tuning on noisy prose: change per bucket")
fig.tight_layout()
fig.savefig("token_objectives_buckets.png", dpi=120)
assert all(results[n]["eval_loss_ce"] < results["init"]["eval_loss_ce"] for n in ("ce", "rho1", "tldr"))

# %% [markdown]
# How to read it: 25 steps on a 6 M-parameter model are enough to see the mechanics, not to rank objectives;
# differences of a few hundredths of a nat per bucket here are within run-to-run noise. In the longer runs of
# `benchmarks/objectives_experiment.py` (same protocol, 100 fine-tuning steps, two seeds, and SmolLM2-135M)
# Rho-1 puts about a quarter of CE's weight on the noise tokens but, training on 60% of the tokens for the same
# number of steps, it ends with a *higher* held-out loss on the rare buckets; TLDR's weight stays near 2 on the
# tiny model (p is small almost everywhere), so it tracks CE, and it only departs from CE on SmolLM2, whose
# predictions are confident.
