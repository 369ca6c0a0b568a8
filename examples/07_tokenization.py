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
# # Tokenizers at the byte level: views, fairness, healing, byte probabilities, vocabulary transfer
#
# Everything in `tokensmith.tokenization` reads tokens through one byte-exact `TokenizerView`. This notebook
# (1) compares four real tokenizer families on the same text, (2) measures tokenization premiums across
# languages on Django's human translations, (3) shows the tokenization bias of a prompt that ends inside a
# token and two fixes — token healing and exact byte-level probabilities (`ByteLM`) — on SmolLM2-135M, and
# (4) transfers SmolLM2 to a new tokenizer and compares bits per byte.

# %%
import os

import torch

import tokensmith as ts
from tokensmith.tokenization import (
    ByteLM,
    TokenizerView,
    check_homomorphism,
    django_parallel_corpus,
    load_tokenizer,
    report,
    token_healing_generate,
    tokenization_bias,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# %% [markdown]
# ## 1. One view, four families
# Byte-level BPE (SmolLM2, Qwen 2.5), SentencePiece with byte fallback (Mistral) and tiktoken (Tekken). The
# view gives every token its exact bytes, so a token holding half of an emoji is shown as bytes, not "\ufffd".
# `lossless` is measured: SmolLM2's vocabulary has no token for eight bytes, which its tokenizer drops.

# %%
text = "naïve café 😀 — 数学"
for name in ["smollm2", "qwen2.5", "mistral-sp", "tekken"]:
    view = TokenizerView.of(load_tokenizer(name))
    enc = view.encode(text)
    assert view.decode_bytes(enc.ids) == text.encode()
    print(f"{name:>10} {view.family:>13} |V|={view.vocab_size:>6} lossless={view.lossless!s:5} "
          f"homomorphic={check_homomorphism(view, 'Hello', ' world')!s:5} tokens={len(enc)}: {enc.pieces()[:6]}")

# %% [markdown]
# ## 2. Tokenization premiums on human translations
# Django ships human translations of its UI strings; `django_parallel_corpus` keeps the strings translated in
# every chosen language, with placeholders and markup stripped. The premium of a language is its token count
# over English's on the same strings (95% bootstrap CIs over rows).

# %%
corpus = django_parallel_corpus(["en", "de", "ru", "ja", "ar"], max_rows=400)
rep = report(["smollm2", "minilm", "qwen2.5", "tekken"], corpus, n_boot=300, seed=0, progress=False)
print(len(corpus), "parallel strings")
print(rep.premiums().round(2))
rep.to_html("tokenizer_report.html")
try:
    rep.plot("tokenizer_premiums.png")
except ImportError:
    pass

# %% [markdown]
# ## 3. A prompt that ends inside a token
# SmolLM2 merges "://" into one token, so the prompt "The url is http:" ends mid-token: naive prompting
# puts little probability on "/" (the model never saw ":" followed by a separate "/" token). Token healing
# backs off the last token and constrains generation to reproduce its bytes; `ByteLM` computes the exact
# probability of the next byte by summing over every tokenization that covers the prompt.

# %%
lm = ts.load("smollm2-135m-instruct")
bias = tokenization_bias(lm, "The url is http://www.example.com", split=len("The url is http:"))
print(f"P('/' | 'The url is http:'): token-level {bias.token_level:.3f}, byte-level {bias.byte_level:.3f}")
assert bias.byte_level > bias.token_level

healed = token_healing_generate(lm, "The url is http:", max_new_tokens=8, do_sample=False)
plain = lm.generate("The url is http:", max_new_tokens=8, do_sample=False)
print("healed:", repr(healed.texts[0]), "| plain:", repr(plain.texts[0] if hasattr(plain, "texts") else plain))

blm = ByteLM(lm)
p = blm.next_byte_distribution(b"The url is http:")
top = torch.topk(p, 3)
print("next byte:", [(bytes([int(b)]), round(float(v), 3)) for v, b in zip(top.values, top.indices, strict=True)])
assert abs(float(p.sum()) - 1) < 1e-4

# %% [markdown]
# ## 4. Vocabulary transfer
# Train a small byte-level BPE on Django's English strings, move SmolLM2 onto it with FVT (each new token's
# row = the mean of the old rows of its pieces; exact byte matches copied) and with random rows, and compare
# bits per byte on held-out strings (comparable across tokenizers). No training after the transfer.

# %%
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tokensmith.tokenization import bits_per_byte, transfer_embeddings  # noqa: E402

english = [t for t in django_parallel_corpus(["en", "de"])["en"] if len(t) > 20]
train, held_out = english[:-40], english[-40:]
bt = Tokenizer(models.BPE())
bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bt.decoder = decoders.ByteLevel()
bt.train_from_iterator(train, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"], show_progress=False,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
new_tok = PreTrainedTokenizerFast(tokenizer_object=bt, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

results = {"unchanged": bits_per_byte(lm, held_out, progress=False)}
for method in ["fvt", "random"]:
    moved = transfer_embeddings(lm, new_tok, method=method, seed=0, progress=False)
    results[method] = bits_per_byte(moved, held_out, progress=False)
    del moved
print({k: round(v, 3) for k, v in results.items()}, "bits per byte")
assert results["fvt"] < results["random"]
