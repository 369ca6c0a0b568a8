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
# # Attribution: one `attribute()` for every method, and how to compare them
#
# Which prompt tokens does an answer rest on? This notebook runs several attribution methods through
# `tokensmith.attribution.attribute`, reads the labelled result, checks integrated gradients'
# completeness axiom, and compares methods with faithfulness metrics (`compare_methods`). It uses a tiny
# random Llama (seconds on a CPU: the numbers are meaningless, the mechanics are real) and, in the last
# cells, the bundled SmolLM2-135M-Instruct on a chat turn.

# %%
import os

import torch

import tokensmith as ts
from tokensmith.attribution import Contrast, attribute, available_methods, compare_methods

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
adapter = ts.tiny("llama", seed=0)
print("methods:", ", ".join(available_methods()))

# %% [markdown]
# ## A continuation gives a [target tokens × source tokens] matrix in one pass
# Integrated gradients with a token-id baseline (the pad row of a random model is zero, which is a
# degenerate baseline for pre-norm models: see the guide).

# %%
res = attribute(adapter, "The capital of France is", target=" Paris is nice", method="ig", n_steps=64, baseline=42)
print(res)
print("rows:", res.target_labels)
print("completeness error per row:", [f"{x:.2%}" for x in res.relative_delta().tolist()])
assert float(res.relative_delta().max()) < 0.01
print(res.to_pandas().query("valid").head())

# %% [markdown]
# ## Other targets: contrast, generation, any scalar

# %%
c = attribute(adapter, "The capital is", target=Contrast(" Paris", " London"), method="input_x_gradient")
print("contrast f = log p(Paris) - log p(London):", round(float(c.target_scores[0]), 4), c.top(2, row=0))
g = attribute(adapter, "The capital is", target="generate", method="occlusion", max_new_tokens=3)
print("generated rows:", g.target_labels)
tid = adapter.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
f = attribute(adapter, "The capital is", target=lambda out, p: out.logits[:, -1, tid], method="saliency")
print("callable target: one row", f.shape)

# %% [markdown]
# ## Compare methods on faithfulness
# Comprehensiveness (higher: removing the top tokens hurts more), sufficiency (lower: the top tokens
# alone keep the prediction), deletion AUC (lower), insertion AUC (higher). `random` is the floor.

# %%
rows = compare_methods(adapter, "The capital of France is a city called", " Paris",
                       methods=["input_x_gradient", "ig", "occlusion", "attention_rollout"],
                       method_kwargs={"integrated_gradients": {"baseline": 42, "n_steps": 16}})
for r in rows:
    print(f"{r['method']:>22}  comp {r['comprehensiveness']:+.2e}  suff {r['sufficiency']:+.2e}  "
          f"del {r['deletion_auc']:.2e}  ins {r['insertion_auc']:.2e}  ({r['seconds']:.2f} s)")

# %% [markdown]
# ## The real model: a chat turn
# Template tokens are flagged and held; scores are reported for the user's words.

# %%
sm = ts.load("smollm2-135m-instruct")
r = attribute(sm, "What is the capital of France?", target="Paris.", chat=True, method="occlusion",
              target_span=(0, 5))
words = r.aggregate("words")
print("occlusion, top words for 'Paris':", [(t, round(s, 3)) for _, t, s in words.top(4, row=0)])
assert any("France" in t for _, t, _ in words.top(4, row=0))
