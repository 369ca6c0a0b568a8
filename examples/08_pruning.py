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
# # Pruning: KV-cache compression, hidden-state pruning, token merging and prompt compression
#
# Every method in `tokensmith.pruning` is *score -> select -> act -> fix positions*, applied to a model with
# `with reducer.apply(adapter) as report:`. This notebook runs on the bundled SmolLM2-135M and MiniLM:
#
# 1. quality vs KV compression ratio (0.25 / 0.5 / 0.75) for the KV presets, on real English text: the
#    log-likelihood of a continuation read through the pruned cache, and a needle in a haystack;
# 2. what the report measures (bytes actually freed, physical vs simulated);
# 3. FastV hidden-state pruning inside the forward;
# 4. ToMe token merging in the MiniLM sentence encoder;
# 5. LLMLingua-style prompt compression;
# 6. LTP: learned per-layer thresholds with a FLOPs penalty, then physical pruning.

# %%
import os
import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import tokensmith as ts
from tokensmith.pruning import (
    LTPThresholds,
    Reducer,
    classification_loss,
    compress,
    ltp_forward,
    presets,
    train_ltp_thresholds,
)
from tokensmith.pruning.evaluate import continuation_logprobs, needle_accuracy
from tokensmith.pruning.haystack import english_paragraphs, english_text, needle_case

torch.set_num_threads(min(2, os.cpu_count() or 1))
adapter = ts.load("smollm2-135m-instruct")

# %% [markdown]
# ## 1. Quality vs compression ratio
#
# Context: ~120 words of Python's reference documentation (`pydoc_data`, shipped with CPython), then the
# next ~40 tokens of the same text as the continuation. Each preset prunes the context's KV cache at
# prefill; the continuation is teacher-forced through the pruned cache (`continuation_logprobs`). The
# needle task hides "The secret number is NNNNN." in a haystack and asks for it.

# %%
texts = []
for start in (40,):
    full = english_text(150, start=start)
    cut = full.rfind(" ", 0, int(len(full) * 0.8))
    texts.append((full[:cut], full[cut:]))

ratios = [0.25, 0.5, 0.75]
names = ["snapkv", "streaming_llm", "key_norm", "random"]


def mean_nll(red):
    return sum(-continuation_logprobs(adapter, red, c, x).mean().item() for c, x in texts) / len(texts)


base_nll = mean_nll(None)
nll = {(name, r): mean_nll(presets.PRESETS[name](ratio=r)) for name in names for r in ratios}
print(f"unpruned: continuation NLL {base_nll:.3f} nats/token")
for name in names:
    print(f"{name:>14}: " + "  ".join(f"r={r}: {nll[name, r]:.3f}" for r in ratios))

fig, ax = plt.subplots(figsize=(6, 3.6))
for name in names:
    ax.plot(ratios, [nll[name, r] - base_nll for r in ratios], marker="o", label=name)
ax.set(xlabel="KV compression ratio (fraction of the context's KV evicted)",
       ylabel="Δ NLL vs unpruned (nats/token)", title="continuation read through the pruned cache")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("pruning_quality_vs_ratio.png", dpi=120)
print("saved pruning_quality_vs_ratio.png")

# %% [markdown]
# The needle: one case, unpruned vs SnapKV at 50%. `benchmarks/pruning_bench.py` runs
# the full grid (presets × ratios × needle depths) side by side with kvpress.

# %%
cases = [needle_case(n_words=120, depth=0.4, seed=1)]
for name, red in [("unpruned", None), ("snapkv 0.5", presets.snapkv(ratio=0.5))]:
    res = needle_accuracy(adapter, red, cases, max_new_tokens=6)
    print(f"{name:>12}: answer {res['answers'][0].strip()!r} (needle {cases[0].answer}) correct={res['correct'][0]}")

# %% [markdown]
# ## 2. What the report measures
#
# The bytes are measured from the cache tensors (`numel · element_size`), before and after; `action="mask"`
# gives the same attention for the kept tokens (same logits, tested) but frees nothing and says so.

# %%
ctx, cont = texts[0]
for action in ("drop", "mask"):
    with presets.snapkv(ratio=0.5, action=action).apply(adapter) as report:
        adapter.generate(ctx, max_new_tokens=2)
    print(report)
    s = report.summary()
    print(f"  physical={s['physical']}  KV freed {s['kv_bytes_freed'] / 2**20:.2f} MiB of {s['kv_bytes_before'] / 2**20:.2f} MiB")

# %% [markdown]
# ## 3. FastV: hidden-state pruning inside the forward
#
# After layer K−1 the tokens the last token attends to least are dropped; layers K.. run on the rest
# with their original positions (`run_layers`). The report gives the analytic FLOPs ratio.

# %%
prompt = english_text(120, start=900) + "\n\nSummarise the paragraph above in one sentence:"
full = adapter.next_token_logprobs(prompt)[0]
for k, r in [(2, 0.5), (8, 0.5)]:
    out = presets.fastv(k=k, ratio=r).forward(adapter, prompt)
    lp = torch.log_softmax(out.logits[0].float(), -1)
    kl = float((full.exp() * (full - lp)).sum())
    print(f"FastV K={k} ratio={r}: flops ratio {out.flops_ratio:.2f}, top-1 agrees: {int(lp.argmax()) == int(full.argmax())}, KL {kl:.3f} nats")

# %% [markdown]
# ## 4. ToMe in a sentence encoder
#
# Merging `r` tokens per layer by bipartite soft matching on the keys, with proportional attention.

# %%
minilm = ts.load("minilm-l6")
sentences = [p[:300] for p in english_paragraphs()[100:108]]
plain = minilm.sentence_embedding(sentences)
for r in (2, 8):
    with Reducer(target="encoder", r=r).apply(minilm) as rep:
        merged = minilm.sentence_embedding(sentences)
    cos = torch.nn.functional.cosine_similarity(plain, merged, dim=-1)
    print(f"ToMe r={r}: tokens {rep.tokens_in.float().mean():.0f} -> {rep.tokens_out.float().mean():.0f}, "
          f"flops ratio {rep.flops_ratio:.2f}, cosine to unmerged min {cos.min():.3f} mean {cos.mean():.3f}")

# %% [markdown]
# ## 5. Prompt compression
#
# Text in, shorter text out: words whose tokens are least surprising (given the compressed prefix) are
# dropped until the rate is met; numbers are kept.

# %%
text = english_paragraphs()[250]
short = compress(text, adapter, rate=0.5)
print(f"rate {short.rate:.2f} ({short.tokens_in} -> {short.tokens_out} tokens)\n")
print(short.text)

# %% [markdown]
# ## 6. LTP: learned token pruning thresholds
#
# Per-layer thresholds θ_l on the attention each token receives, trained with a soft mask
# σ((s − θ_l)/T) and a penalty λ·(kept fraction), then used to drop tokens physically. A frozen MiniLM with
# a linear probe on a synthetic task (is the unpunctuated sentence a question?).

# %%
torch.manual_seed(0)
rng = random.Random(0)
subj = ["the teacher", "your brother", "the old man", "my neighbours", "the manager", "our team"]
verb = ["finish the report", "fix the car", "visit the museum", "sell the house", "read the letter", "cook dinner"]
when = ["today", "last week", "on monday", "after lunch", "before the meeting", "yesterday"]
aux, wh = ["did", "will", "can", "should", "could"], ["why", "when", "how", "where"]


def make(n):
    rows = []
    for _ in range(n):
        s, v, w, a = rng.choice(subj), rng.choice(verb), rng.choice(when), rng.choice(aux)
        rows.append(rng.choice([(f"{a} {s} {v} {w}", 1), (f"{rng.choice(wh)} {a} {s} {v} {w}", 1),
                                (f"{s} {a} {v} {w}", 0), (f"{w} {s} {a} {v}", 0)]))
    return rows


train, test = make(64), make(32)
keep_all = LTPThresholds.keep_all(minilm.structure.num_layers)
X = ltp_forward(minilm, [t for t, _ in train], keep_all).pooled
y = torch.tensor([label for _, label in train])
head = torch.nn.Linear(X.shape[1], 2)
opt = torch.optim.Adam(head.parameters(), lr=0.05)
for _ in range(200):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(head(X), y).backward()
    opt.step()
head.requires_grad_(False)
batches = [{"inputs": [t for t, _ in train[i:i + 8]], "labels": y[i:i + 8]} for i in range(0, len(train), 8)]
th = train_ltp_thresholds(minilm, batches, classification_loss(head), lam=3.0, temperature=0.01, steps=16,
                          lr=0.01, theta_base=0.03, seed=0, progress=False)
yt = torch.tensor([label for _, label in test])
for name, thr in [("unpruned", keep_all), ("LTP", th)]:
    out = ltp_forward(minilm, [t for t, _ in test], thr, head=head)
    acc = float((out.logits.argmax(-1) == yt).float().mean())
    print(f"{name:>9}: accuracy {acc:.3f}, FLOPs ratio {out.flops_ratio:.3f}, physical={out.physical}")
