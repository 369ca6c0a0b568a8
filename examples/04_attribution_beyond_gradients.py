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
# # Attribution beyond gradients: decompositions, the logit lens, surrogates, encoders, steering, datasets
#
# The second attribution notebook. It walks through the methods that read the model's internals (ALTI,
# GlobEnc, direct logit attribution, the logit lens), the black-box ones (KernelSHAP, LIME, ReAGent with a
# masked-LM replacer), the other target kinds (a class label, a `[MASK]` position), token-pair attribution for
# a sentence encoder (integrated Jacobians on the bundled MiniLM), attribution-guided steering (GrAInS), and
# a resumable run over a `datasets.Dataset`. Tiny random models keep it to seconds on a CPU: the numbers are
# meaningless there, the mechanics and the identities are real.

# %%
import os
import tempfile

import datasets
import torch

import tokensmith as ts
from tokensmith.attribution import attribute, attribute_dataset, integrated_jacobians, logit_lens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
ad = ts.tiny("llama")
PROMPT, TARGET = "The capital of France is", " Paris is nice"

# %% [markdown]
# ## Decomposition rollout (ALTI, GlobEnc)
#
# Each attention block's output is split exactly into one vector per source token (values through the
# output projection, the residual added to the token's own vector); ALTI scores them by Manhattan proximity
# to the output, GlobEnc by their norm; the per-layer matrices are row-normalised and rolled out.

# %%
alti = attribute(ad, PROMPT, target=TARGET, method="alti", include_template=True)
glob = attribute(ad, PROMPT, target=TARGET, method="globenc", include_template=True)
print(alti)
print("ALTI rows sum to 1:", [round(float(s), 5) for s in alti.scores.sum(1)])
print("GlobEnc top sources for the first row:", glob.top(3, row=0))

# %% [markdown]
# ## Direct logit attribution and the logit lens
#
# With the final norm's scale frozen at the final residual, the target logit is a sum of components: the
# embedding, every layer's attention (split over sources) and MLP. The identity is checked below.

# %%
dla = attribute(ad, PROMPT, target=TARGET, method="dla")
x = dla.extra
parts = (dla.scores.sum(1) + torch.tensor(x["excluded"]) + torch.tensor(x["per_layer"]["attn_bias"]).sum(1)
         + torch.tensor(x["per_layer"]["mlp"]).sum(1) + torch.tensor(x["embed"]))
print("components - linearised logit:", float((parts - torch.tensor(x["linear_logit"])).abs().max()))
lens = logit_lens(ad, PROMPT, target=TARGET)
print(lens.to_pandas().head())

# %% [markdown]
# ## Surrogates: KernelSHAP and LIME (and ReAGent with a masked LM)
#
# Both score sampled coalitions of source tokens with the same batched engine as occlusion. KernelSHAP's
# values satisfy efficiency exactly: they sum to f(x) − f(all sources removed).

# %%
ks = attribute(ad, PROMPT, target=TARGET, method="kernel_shap", n_samples=64, seed=0)
print("efficiency gap:", float((ks.scores.sum(1) - (ks.target_scores - ks.baseline_scores)).abs().max()))
lime = attribute(ad, PROMPT, target=TARGET, method="lime", n_samples=64, seed=0)
print("LIME top:", lime.top(3, row=0))
reagent = attribute(ad, PROMPT, target=TARGET, method="reagent", replacer=ts.tiny("bert"), n_iters=8, seed=0)
print("ReAGent top:", reagent.top(3, row=0))

# %% [markdown]
# ## Other targets: a `[MASK]` position of a masked LM

# %%
mlm = ts.tiny("bert")
masked = attribute(mlm, "the capital of [MASK] is paris .", target="france", method="input_x_gradient")
print(masked.target_labels, masked.top(3, row=0))

# %% [markdown]
# ## Sentence encoders: integrated Jacobians on MiniLM
#
# A `[tokens_a × tokens_b]` matrix whose sum equals the similarity minus the reference terms (up to
# quadrature error, reported as `delta`).

# %%
enc = ts.load("minilm-l6")
pa = integrated_jacobians(enc, "A man plays a guitar.", "Someone is playing music.", n_steps=16)
print(pa)
print(pa.top(3))

# %% [markdown]
# ## Steering from attribution (GrAInS)
#
# Contrastive IG over (prompt, preferred, dispreferred) examples picks the tokens that push towards each
# answer; the hidden-state change when they are masked gives one steering vector per layer, applied with
# norm-preserving addition.

# %%
from tokensmith.attribution import grains_fit  # noqa: E402

examples = [("The movie was", " great", " awful"), ("The food tasted", " great", " awful"),
            ("The trip felt", " great", " awful")]
vectors = grains_fit(ad, examples, k=2, layers=[0, 1], n_steps=4, baseline=42)
print(vectors)
with vectors.apply(ad, alpha=2.0):
    steered = ad.next_token_logprobs("The show was")
print("steered next-token distribution sums to", float(steered.exp().sum()))

# %% [markdown]
# ## A dataset, resumable
#
# Every finished example is appended to a JSON Lines file; a second call skips what is there.

# %%
ds = datasets.Dataset.from_dict({"prompt": ["The sky is", "Grass is", "Snow is"], "target": [" blue", " green", " white"]})
path = os.path.join(tempfile.mkdtemp(), "attr.jsonl")
recs = attribute_dataset(ad, ds, path, method="occlusion", metrics=["comprehensiveness"], progress=False)
again = attribute_dataset(ad, ds, path, method="occlusion", metrics=["comprehensiveness"], progress=False)
print("computed:", recs.computed, "then", again.computed)
print(recs.metrics_frame())
