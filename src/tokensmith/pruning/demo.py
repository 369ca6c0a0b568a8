"""The ``pruning`` section of the ``tokensmith demo`` report (registered on import): a needle in a haystack of
real English text, answered with the KV cache compressed to half by several presets, with the KV bytes
actually held (measured) and which context tokens SnapKV kept."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["pruning_section"]

RATIO = 0.5


@register_section(
    "pruning", order=50, title="KV-cache compression: a needle in half a cache", requires=("generate",)
)
def pruning_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    """Needle in a haystack at 50% KV compression: presets side by side with the unpruned cache, then the
    context coloured by how many (layer, KV head) slots SnapKV kept for each token."""
    from tokensmith.models import kvcache
    from tokensmith.pruning import KeyNorm, Reducer, presets
    from tokensmith.pruning.haystack import needle_case

    n_words = 80 if ctx.quick else 220
    case = needle_case(n_words=n_words, depth=0.4, seed=3)
    enc = adapter.encode(case.prompt)
    T = int(enc.input_ids.shape[0])
    recipes = [
        ("none", None),
        ("snapkv", presets.snapkv(ratio=RATIO)),
        ("h2o", presets.h2o(ratio=RATIO)),
        ("streaming_llm", presets.streaming_llm(ratio=RATIO)),
        ("key_norm", presets.key_norm(ratio=RATIO)),
        ("random", presets.random(ratio=RATIO)),
    ]
    rows, data = [], {}
    for name, red in recipes:
        t = time.perf_counter()
        with (red or Reducer(target="kv", scorer=KeyNorm(), ratio=0.0)).apply(adapter) as rep:
            out = adapter.generate(enc, max_new_tokens=8)
        kv_after, kv_before = rep.kv_bytes_after, rep.kv_bytes_before
        physical = "—" if red is None else ("physical" if rep.physical else "simulated")
        secs = time.perf_counter() - t
        text = out.texts[0].strip()
        ok = case.answer in text
        data[name] = {
            "answer": text,
            "correct": ok,
            "kv_bytes": kv_after,
            "kv_bytes_unpruned": kv_before,
            "seconds": secs,
        }
        rows.append(
            [
                name,
                H.esc(text[:40]),
                "✓" if ok else "✗",
                f"{(kv_after or 0) / 2**20:.2f} / {(kv_before or 0) / 2**20:.2f}",
                physical,
                f"{secs:.1f}",
            ]
        )
    # which tokens SnapKV kept: fraction of (layer, KV head) slots holding each context token
    with presets.snapkv(ratio=RATIO).apply(adapter):
        cache, _ = kvcache.prefill(adapter, enc)
    counts = torch.zeros(T)
    n_slots = 0
    for i in range(kvcache.num_cache_layers(cache)):
        if kvcache.layer_kind(cache, i) != "full":
            continue
        cols = kvcache.stored_positions(cache, i)[0]  # [H_kv, K]
        counts += torch.bincount(cols.flatten().cpu(), minlength=T)[:T].float()
        n_slots += cols.shape[0]
    frac = (counts / max(n_slots, 1)).tolist()
    ids = enc.input_ids.tolist()
    chips = []
    needle_lo = case.prompt.find(case.needle)
    for j, tid in enumerate(ids):
        s = enc.offsets[j][0]
        in_needle = needle_lo <= s < needle_lo + len(case.needle)
        piece = adapter.tokenizer.decode([tid])
        shade = H.heat_color(8.0 * frac[j], 8.0)
        border = ' style="outline:2px solid #2563eb"' if in_needle else ""
        chips.append(
            f'<span class="chip" title="kept in {frac[j]:.0%} of layer×KV-head slots" '
            f'style="background:{shade}"{border}>{H.token_text(piece)}</span>'
        )
    needle_frac = [frac[j] for j in range(T) if needle_lo <= enc.offsets[j][0] < needle_lo + len(case.needle)]
    body = (
        f"<p>A needle (<i>{H.esc(case.needle)}</i>) hidden at 40% depth in {T} tokens of real English text (Python's "
        f"own reference documentation, <code>pydoc_data</code>), then <i>{H.esc(case.question)}</i>. Each "
        f"preset of <code>tokensmith.pruning.presets</code> evicts {RATIO:.0%} of the prompt's KV cache per layer "
        "and KV head right after prefill (<code>with preset.apply(adapter): adapter.generate(...)</code>); the "
        "answer is then decoded through the reduced cache with the original positions. KV MiB are measured from "
        "the cache tensors (held / unpruned).</p>"
        + H.table(["preset", "answer", "needle", "KV MiB held / unpruned", "kind", "seconds"], rows, raw=True)
        + "<p>Which context tokens SnapKV kept (darker = kept in more layer × KV-head slots; the needle is "
        "outlined). SnapKV scores each token by the attention it receives from the last 64 prompt tokens "
        "(the question and the end of the context), average-pooled over 5 neighbours, per KV head.</p>"
        + '<div class="chips" dir="ltr">'
        + "".join(chips)
        + "</div>"
    )
    n_ok = sum(1 for v in data.values() if v["correct"])
    summary = [
        "needle at 50% KV: " + ", ".join(f"{k} {'✓' if v['correct'] else '✗'}" for k, v in data.items()),
        f"SnapKV kept the needle's tokens in {sum(needle_frac) / max(len(needle_frac), 1):.0%} of slots on average",
    ]
    data["snapkv_needle_keep_fraction"] = sum(needle_frac) / max(len(needle_frac), 1)
    data["tokens"] = T
    data["correct"] = n_ok
    return Section("KV-cache compression: a needle in half a cache", body, summary, data=data)
