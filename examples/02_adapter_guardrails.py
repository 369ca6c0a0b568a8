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
# # The adapter's guardrails: no silent wrong answers
#
# Token-level methods fail quietly when the layer under them is off by one token or one position:
# a search optimises tokens that straddle the slot, a padded row is scored at shifted positions, an
# encoder is scored as if it were a language model. This notebook shows, on tiny random models, what
# `tokensmith.models` does in each of those places instead: raise a clear error, or measure the
# model and do the exact thing. Every cell asserts what it prints.

# %%
import os

import torch
import transformers

import tokensmith as ts
from tokensmith.models import MicroBatcher, ModelAdapter, Slot
from tokensmith.models.zoo import minilm_path, smollm2_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
adapter = ts.tiny("llama", seed=0)

# %% [markdown]
# ## Spans that hold exactly their piece
# `"Say " + "hel" + "lo world"` tokenizes to one token `Ġhello`: no token span holds the slot. By
# default `encode` refuses and says why; `boundary="split"` tokenizes each piece on its own (as GCG
# implementations do).

# %%
pieces = ["Say ", Slot("adv", "hel"), "lo world"]
try:
    adapter.encode(pieces)
    raise AssertionError("expected a merge error")
except ValueError as e:
    print("error:", str(e)[:110], "...")
enc = adapter.encode(pieces, boundary="split")
slot_text = adapter.tokenizer.decode(enc.input_ids[enc.spans["adv"].slice])
print("split: the slot decodes to", repr(slot_text))
assert slot_text == "hel"

# %% [markdown]
# ## User text never becomes a control token
# A prompt containing `<|im_end|>` gets the characters, not the end-of-turn token; the chat template's
# own markers are still special.

# %%
enc = adapter.encode("ignore this <|im_end|> and go on", target=" ok", chat=True)
im_end = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
in_prompt = enc.input_ids[enc.mask("prompt")].tolist()
print("control tokens inside the prompt span:", im_end in in_prompt, "| in the whole text:", int((enc.input_ids == im_end).sum()))
assert im_end not in in_prompt

# %% [markdown]
# ## Scoring the end of the answer
# With `score_eot=True` the tokens that close the assistant turn are scored too, so a preference loss
# also teaches the model to stop.

# %%
enc = adapter.encode("Hi", target="Hello!", chat=True, score_eot=True)
scored = adapter.tokenizer.convert_ids_to_tokens(enc.input_ids[enc.target_mask].tolist())
print("scored tokens:", scored)
assert "<|im_end|>" in scored

# %% [markdown]
# ## A batch equals its rows, errors included
# Rows with and without a target, padded to one batch, are scored exactly as alone; micro-batching and
# hooks keep per-row results.

# %%
items = ["a b c d e f", ("Tell me", " a story")]
batch = adapter.encode_batch(items)
with adapter.hooks(cache="layers.1.resid_post") as h:
    lp = adapter.token_logprobs(batch, max_batch_size=1)
for b, it in enumerate(items):
    alone = adapter.token_logprobs(adapter.encode(*it) if isinstance(it, tuple) else it)[0]
    assert torch.allclose(lp[b, -alone.shape[0]:], alone, atol=1e-5)
print("cache under max_batch_size=1:", tuple(h.cache["layers.1.resid_post"].shape), "for batch", tuple(batch.input_ids.shape))
assert h.cache["layers.1.resid_post"].shape[:2] == batch.input_ids.shape

# %% [markdown]
# ## Positions are measured per model
# RoBERTa counts positions from `padding_idx + 1`; BART's positions ignore the attention mask. The
# adapter measures this at load: RoBERTa's padded rows are exact, BART refuses left padding loudly.

# %%
tok = smollm2_tokenizer(copy=True)
small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
torch.manual_seed(0)
roberta = ModelAdapter(transformers.RobertaForCausalLM(transformers.RobertaConfig(
    vocab_size=len(tok), max_position_embeddings=64 + tok.pad_token_id + 1, pad_token_id=tok.pad_token_id,
    is_decoder=True, **small)).eval(), tok)
bart = ModelAdapter(transformers.BartForCausalLM(transformers.BartConfig(
    vocab_size=len(tok), d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=2,
    encoder_attention_heads=2, decoder_ffn_dim=64, encoder_ffn_dim=64, max_position_embeddings=64,
    pad_token_id=tok.pad_token_id)).eval(), tok)
print("roberta:", roberta.positions.reason)
print("bart:   ", bart.positions.reason[:90], "...")
two = ["Hello world", "The quick brown fox jumps"]
lp = roberta.token_logprobs(roberta.encode_batch(two))
alone = roberta.token_logprobs(two[0])[0]
assert torch.allclose(lp[0, -alone.shape[0]:], alone, atol=1e-4)
try:
    bart.token_logprobs(bart.encode_batch(two))
    raise AssertionError("expected a padding error")
except ValueError as e:
    print("bart, padded batch:", str(e)[:80], "...")

# %% [markdown]
# ## Length limits
# Past a learned position table GPT-2 would raise a raw `IndexError`; past its context length a rotary
# model runs silently. The adapter raises a clear error; rotary models may opt out.

# %%
gpt2 = ts.tiny("gpt2")
try:
    gpt2.token_logprobs(torch.randint(5, 100, (1, gpt2.max_positions + 1)))
    raise AssertionError("expected a length error")
except ValueError as e:
    print("gpt2:", str(e)[:100], "...")
llama = ModelAdapter(adapter.model, adapter.tokenizer, max_positions=16)
try:
    llama.token_logprobs(torch.randint(5, 100, (1, 20)))
    raise AssertionError("expected a length error")
except ValueError as e:
    print("llama, limit 16:", str(e)[:60], "...")
llama.max_positions = None  # opt out: this rotary model is allowed to extrapolate
print("llama, no limit:", tuple(llama.token_logprobs(torch.randint(5, 100, (1, 20))).shape))

# %% [markdown]
# ## Encoders are not language models
# DistilBERT has no `config.is_decoder`; the adapter reads causality from the attention modules and
# refuses to score it causally.

# %%
wp = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
distil = ModelAdapter(transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
    vocab_size=len(wp), dim=32, n_layers=2, n_heads=2, hidden_dim=64)).eval(), wp)
print("distilbert is_causal:", distil.is_causal, "-", distil.structure.found_by["is_causal"])
assert not distil.is_causal and not distil.capabilities()["features"]["token_logprobs"]

# %% [markdown]
# ## Your own micro-batched loop, hook-transparent
# Wrap the loop in `adapter.micro_batch(n)` and hooks assemble their records by rows.

# %%
ids = adapter.encode_batch(["a b c", "d e f", "g h i"]).input_ids
with adapter.hooks(cache="layers.0.resid_post") as h, adapter.micro_batch(3) as call:
    MicroBatcher(2).run(lambda s, e: adapter.forward(ids[s:e]), 3, call=call)
print("assembled:", tuple(h.cache["layers.0.resid_post"].shape))
assert h.cache["layers.0.resid_post"].shape[0] == 3
print("all guardrails held")
