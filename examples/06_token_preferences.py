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
# # Token-level preference optimisation: DPO, TDPO and per-token rewards
#
# `tokensmith.alignment` keeps preference losses as pure functions over per-token log-probs, so a token
# weight or a per-token KL plugs in where TRL only sees sums. This notebook trains with
# `TokenPreferenceTrainer` (a `transformers.Trainer`) on the offline `demo_pairs` set: first a tiny random
# Llama (DPO vs TDPO, held-out margins), then a few steps on SmolLM2-135M-Instruct with a per-token reward
# heatmap of a held-out pair.

# %%
import os
import tempfile

import torch
import transformers

import tokensmith as ts
from tokensmith.alignment import (
    TokenPreferenceTrainer,
    demo_pairs,
    encode_pairs,
    pair_logprobs,
    token_rewards,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models run much faster on one thread; SmolLM2 below uses two
transformers.logging.set_verbosity_error()
split = demo_pairs(160, seed=0).train_test_split(test_size=0.25, seed=0)
print(split["train"][0])


def held_out_margin(policy, reference, rows, beta=0.1):
    """Mean implicit-reward margin β(ΣΔ_w − ΣΔ_l) and accuracy on held-out pairs."""
    pb = encode_pairs(policy, rows, chat=False)
    with torch.no_grad():
        pw, pl = pair_logprobs(policy, pb)
        rw, rl = pair_logprobs(reference, pb)
    m = beta * ((pw - rw).sum(-1) - (pl - rl).sum(-1))
    return float(m.mean()), float((m > 0).float().mean())


# %% [markdown]
# ## DPO vs TDPO on a tiny model
# TDPO adds the sequential KL D(x, y) = Σ_t KL(π_ref ‖ π_θ) of both completions to DPO's margin
# (Zeng et al. 2024); the trainer computes it per token (chunked) when the loss asks for it.

# %%
test_rows = [dict(r) for r in split["test"]]
for loss in ("dpo", "tdpo"):
    policy, reference = ts.tiny("llama", seed=0), ts.tiny("llama", seed=0)
    before = held_out_margin(policy, reference, test_rows)
    out = tempfile.mkdtemp()
    args = transformers.TrainingArguments(out, max_steps=15, per_device_train_batch_size=8, learning_rate=1e-3,
                                          lr_scheduler_type="constant", logging_steps=15, report_to=[],
                                          save_strategy="no", disable_tqdm=True)
    trainer = TokenPreferenceTrainer(policy, reference, loss=loss, beta=0.1, args=args,
                                     train_dataset=split["train"], chat=False)
    trainer.train()
    after = held_out_margin(policy, reference, test_rows)
    print(f"{loss}: held-out margin {before[0]:+.3f} -> {after[0]:+.3f}, accuracy {before[1]:.2f} -> {after[1]:.2f}")

# %% [markdown]
# ## A few DPO steps on SmolLM2-135M-Instruct, and where the reward sits
# The implicit token reward r̂_t = β·(log π_θ − log π_ref)(y_t) of the trained policy shows which tokens
# carry the preference: on these pairs, the short correct answer against filler and wrong numbers.

# %%
torch.set_num_threads(2)
policy, reference = ts.load("smollm2-135m-instruct"), ts.load("smollm2-135m-instruct")
small = demo_pairs(48, seed=1, styles=("wrong",)).train_test_split(test_size=8, seed=0)
args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=4,
                                      learning_rate=2e-5, lr_scheduler_type="constant", report_to=[],
                                      save_strategy="no", disable_tqdm=True)
rows = [dict(r) for r in small["test"]]
before = held_out_margin(policy, reference, rows)
TokenPreferenceTrainer(policy, reference, loss="dpo", beta=0.1, args=args, train_dataset=small["train"],
                       chat=False).train()
after = held_out_margin(policy, reference, rows)
print(f"SmolLM2 held-out margin {before[0]:+.4f} -> {after[0]:+.4f} (accuracy {before[1]:.2f} -> {after[1]:.2f})")

pb = encode_pairs(policy, rows[:1], chat=False)
with torch.no_grad():
    pw, pl = pair_logprobs(policy, pb)
    rw, rl = pair_logprobs(reference, pb)
r_w, r_l = token_rewards(pw, rw, pb.mask_w, beta=0.1), token_rewards(pl, rl, pb.mask_l, beta=0.1)
ids = pb.batch.input_ids
for name, r, m, row in (("chosen", r_w, pb.mask_w, 0), ("rejected", r_l, pb.mask_l, 1)):
    toks = policy.tokenizer.convert_ids_to_tokens(ids[row][m[0]].tolist())
    print(name, " ".join(f"{t}:{v:+.4f}" for t, v in zip(toks, r[0][m[0]].tolist(), strict=True)))
