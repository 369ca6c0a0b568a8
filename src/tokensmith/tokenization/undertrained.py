"""Under-trained ("glitch") token detection (Land & Bartolo 2024, *Fishing for Magikarp*).

Tokens that exist in a vocabulary but (almost) never occurred in the training data keep rows that barely
moved from their initialisation. Weight decay and the softmax gradient then push all such rows of the
unembedding matrix the same way, so they end up *close to each other* and far from the trained rows.
Detection therefore has two stages:

1. **Indicators** from the weights (cheap, every token):

   - remove the first ``n_components`` principal components of the unembedding matrix ``U`` ([V, d];
     the component shared by every row):  ``U' = U − (U − 1μᵀ) P Pᵀ`` with ``P`` the top principal
     directions of the centred rows;
   - take the mean ``r = mean_{j∈R} U'_j`` over a **reference set** ``R`` of known-unused tokens (tokens
     the tokenizer can never emit, tokens whose bytes never occur in UTF-8 text, padding rows; else the
     reserved special tokens; or ids you pass) and score every token by ``s_i = cos(U'_i, r)`` — high means
     "looks like an unused token";
   - also the input-embedding norm ``‖E_i‖₂`` (low for under-trained rows in many models).

2. **Verification** by prompting: the token is inserted (as its id, not as text) into "repeat this
   string" prompts (:data:`REPEAT_TEMPLATES`: two few-shot copy prompts and the paper's chat prompt) and
   the model's probability of emitting it where the repeat is due is read;
   ``p_i = max_templates p(t_i | prompt(t_i))``. Trained tokens are repeated with high probability; a token
   is flagged when ``p_i < threshold`` (the paper uses 1%).

All rows of one verification batch have the same length (the token is a single id in a fixed
template), so batched and one-at-a-time scores are the same forward.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.tokenization.undertrained import find_undertrained_tokens
    >>> rep = find_undertrained_tokens(ts.tiny("llama"), top_k=4, progress=False)
    >>> len(rep.frame), int(rep.frame["verified_prob"].notna().sum())
    (49152, 4)
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokensmith.models import ModelAdapter
from tokensmith.tokenization.view import TokenizerView

__all__ = [
    "REPEAT_TEMPLATES",
    "RepeatTemplate",
    "UndertrainedReport",
    "find_undertrained_tokens",
    "impossible_utf8",
    "indicator_scores",
    "reference_tokens",
    "reserved_special_tokens",
    "repeat_probabilities",
]

_SLOT = "\u241fTOKEN\u241f"  # placeholder for the token inside a template ("␟TOKEN␟")

@dataclass(frozen=True)
class RepeatTemplate:
    """A "repeat this token" prompt: ``prompt`` holds ``{token}`` once; ``answer`` follows it and ends where
    the repeated token is expected. ``chat=True`` renders ``prompt`` as a user turn through the tokenizer's
    chat template and ``answer`` as the start of the assistant turn (skipped for tokenizers without one);
    ``chat=False`` uses the plain text (after the tokenizer's BOS, if any)."""

    prompt: str
    answer: str
    chat: bool = False


#: Default templates: two few-shot copy prompts (the slot directly after ``:`` suits tokens with a leading
#: space, the quoted one punctuation) and the paper's chat prompt. The max over templates is used.
REPEAT_TEMPLATES: tuple[RepeatTemplate, ...] = (
    RepeatTemplate("Text: apple\nCopy: apple\n\nText:_x\nCopy:_x\n\nText: 3.14\nCopy: 3.14\n\nText:ing\nCopy:ing"
                   "\n\nText:{token}", "\nCopy:"),
    RepeatTemplate("'hello' -> 'hello'\n'}]' -> '}]'\n' world' -> ' world'\n'{token}", "' -> '"),
    RepeatTemplate("Please can you repeat the string '{token}' and return back to me?",
                   "Of course! Here is the repeated string: '", chat=True),
)


def impossible_utf8(b: bytes) -> bool:
    """Whether the bytes ``b`` can never occur inside valid UTF-8 text (so a byte-level tokenizer never emits
    the token when encoding text): a byte ``0xC0``, ``0xC1`` or ``≥ 0xF5``, more than three leading
    continuation bytes, or an invalid sequence after them. A truncated final character is allowed.

    Examples:
        >>> impossible_utf8(b"\\xff"), impossible_utf8(b"\\x98\\x80"), impossible_utf8("é".encode()[:1])
        (True, False, False)
    """
    if not b:
        return False
    k = 0
    while k < len(b) and b[k] & 0xC0 == 0x80:
        k += 1
    if k > 3:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(b[k:], final=False)
    except UnicodeDecodeError:
        return True
    return False


def reference_tokens(
    adapter: ModelAdapter,
    view: TokenizerView | None = None,
    *,
    corpus: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> list[int]:
    """Known-unused token ids for the indicator: tokens the tokenizer never emits for any text.

    The union of the view's ``"unreachable"`` tokens (valid UTF-8 that encodes to other ids), tokens whose
    bytes cannot occur in UTF-8 text (:func:`impossible_utf8`: e.g. the single-byte tokens ``0xF5..0xFF`` of
    a byte-level BPE) and embedding rows with no tokenizer entry (``len(tokenizer) .. V-1``). When that is
    empty (SmolLM2's vocabulary has none), the reserved special tokens (:func:`reserved_special_tokens`). With
    ``corpus``, also every non-special token that never occurs when the corpus is encoded (a proxy for
    "unused in training", only as good as the corpus is large and close to the training data).

    Args:
        adapter: the model.
        view: its tokenizer view (built when None).
        corpus: optional texts; tokens absent from their encoding join the reference.
        categories: ``view.categories()`` when already computed.
    """
    view = view or TokenizerView(adapter.tokenizer)
    cats = list(categories) if categories is not None else _categories(view)
    ids = {i for i, c in enumerate(cats) if c == "unreachable"}
    ids |= {i for i, c in enumerate(cats) if c == "undecodeable" and impossible_utf8(view.token_bytes(i))}
    ids |= set(range(len(adapter.tokenizer), adapter.structure.vocab_size))
    if not ids:
        ids |= set(reserved_special_tokens(adapter.tokenizer))
    if corpus is not None:
        if isinstance(corpus, str):
            raise TypeError("corpus must be a list of texts, not one string")
        seen: set[int] = set()
        for e in view.encode_batch(list(corpus)):
            seen.update(e.ids)
        ids |= {i for i, c in enumerate(cats) if c != "special" and i not in seen}
    return sorted(i for i in ids if i < adapter.structure.vocab_size)


def reserved_special_tokens(tokenizer: Any) -> list[int]:
    """Special tokens that neither play a role (BOS/EOS/PAD/UNK/...) nor appear in the chat template: the
    analogue of the ``<unused_N>`` / reserved tokens the paper uses as its reference. For SmolLM2 these
    are the StarCoder-format tokens (``<file_sep>``, ``<jupyter_code>``, ``<gh_stars>``, ...).

    Examples:
        >>> from tokensmith.models.zoo import smollm2_tokenizer
        >>> tok = smollm2_tokenizer()
        >>> "<file_sep>" in tok.convert_ids_to_tokens(reserved_special_tokens(tok))
        True
    """
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
                 if getattr(t, "special", False)}
    roles = {getattr(tokenizer, f"{r}_token_id", None) for r in ("bos", "eos", "pad", "unk", "sep", "cls", "mask")}
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    out = []
    for i in sorted(specials):
        if i in roles:
            continue
        s = tokenizer.convert_ids_to_tokens(i)
        if s and s in template:
            continue
        out.append(i)
    return out


def _categories(view: TokenizerView) -> list[str]:
    """``view.categories()``, remembered on the view (one batched encode of the whole vocabulary)."""
    cats = view.__dict__.get("_undertrained_categories")
    if cats is None:
        cats = view.__dict__["_undertrained_categories"] = view.categories()
    return cats


def _remove_principal(U: torch.Tensor, n_components: int) -> torch.Tensor:
    """``U − (U − 1μᵀ) P Pᵀ``: the rows without their top-``n_components`` principal directions."""
    if n_components <= 0:
        return U
    Uc = U - U.mean(0, keepdim=True)
    cov = Uc.T @ Uc
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    P = vecs[:, -n_components:]
    return U - (Uc @ P) @ P.T


def indicator_scores(
    adapter: ModelAdapter, reference: Sequence[int], *, n_components: int = 1
) -> dict[str, torch.Tensor]:
    """Weight-based indicators for every row (stage 1; float64).

    ``unembed_cosine[i] = cos(U'_i, mean_{j∈R} U'_j)`` with ``U'`` the unembedding rows without their first
    ``n_components`` principal components (see the module docstring); ``embed_norm[i] = ‖E_i‖₂``,
    ``unembed_norm[i] = ‖U_i‖₂``.

    Args:
        adapter: a model with an LM head.
        reference: ids of known-unused tokens (at least one).
        n_components: principal components removed before the cosine.

    Raises:
        ValueError: for a model without an unembedding matrix, or an empty/out-of-range reference set.
    """
    if adapter.structure.lm_head is None:
        raise ValueError(
            f"{adapter.name!r} has no LM head (an encoder loaded without one): under-trained token indicators "
            "read the unembedding matrix. Load the model with its LM head (a causal or masked LM class)"
        )
    V = adapter.structure.vocab_size
    ref = torch.as_tensor(list(reference), dtype=torch.long)
    if ref.numel() == 0:
        raise ValueError(
            "the reference set of known-unused tokens is empty: pass reference=[ids] (e.g. reserved tokens, or "
            "ids that never occur when a large corpus is encoded)"
        )
    if ref.min() < 0 or ref.max() >= V:
        raise ValueError(f"reference ids must be in [0, {V})")
    with torch.no_grad():
        U = adapter.W_U.detach().to("cpu", torch.float64)
        E = adapter.E.detach().to("cpu", torch.float64)
        Up = _remove_principal(U, n_components)
        r = Up[ref].mean(0)
        cos = (Up @ r) / (Up.norm(dim=1) * r.norm()).clamp_min(1e-300)
    return {"unembed_cosine": cos, "embed_norm": E.norm(dim=1), "unembed_norm": U.norm(dim=1)}


def _template_ids(tokenizer: Any, template: RepeatTemplate) -> tuple[list[int], list[int]] | None:
    """Token ids before and after the token slot of one template (None: a chat template on a tokenizer
    without one)."""
    if template.prompt.count("{token}") != 1:
        raise ValueError(f"a repeat template needs '{{token}}' exactly once in its prompt: {template.prompt!r}")
    msg = template.prompt.replace("{token}", _SLOT)
    bos: list[int] = []
    if template.chat:
        if not getattr(tokenizer, "chat_template", None):
            return None
        text = tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
        text += template.answer
    else:
        text = msg + template.answer
        bid = getattr(tokenizer, "bos_token_id", None)
        bos = [int(bid)] if bid is not None and getattr(tokenizer, "add_bos_token", True) is not False else []
    if text.count(_SLOT) != 1:
        raise ValueError("the chat template changed the token placeholder; use templates with chat=False")
    pre, post = text.split(_SLOT)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    return bos + enc(pre), enc(post)


def repeat_probabilities(
    adapter: ModelAdapter,
    ids: Sequence[int],
    *,
    templates: Sequence[RepeatTemplate] = REPEAT_TEMPLATES,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Stage 2: ``p[i, k] = p(t_i | prompt_k(t_i))``, the probability that the model repeats token ``t_i`` in
    template ``k`` (``[len(ids), K]``, float64 probabilities in [0, 1]; K = the templates that apply: chat
    templates are skipped for a tokenizer without a chat template).

    Each row is ``pre_k ⊕ [t_i] ⊕ post_k ⊕ [t_i]`` and the last position is scored with
    :meth:`ModelAdapter.token_logprobs`; the token goes in as its id (not re-tokenized text), so tokens
    whose string does not round-trip are tested too. Rows of one template have equal length, so batches
    need no padding.

    Args:
        adapter: a causal LM.
        ids: token ids to test.
        templates: :class:`RepeatTemplate` prompts (default :data:`REPEAT_TEMPLATES`).
        batch_size: rows per forward.
        progress: show a tqdm bar.

    Raises:
        ValueError: for a model that is not a causal LM with an LM head (an encoder cannot be prompted).
    """
    if adapter.structure.lm_head is None or not adapter.is_causal:
        raise ValueError(
            f"{adapter.name!r} is not a causal LM with an LM head, so it cannot be asked to repeat a token; use "
            "verify=False for the weight indicators only"
        )
    if not templates:
        raise ValueError("give at least one template")
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    V = adapter.structure.vocab_size
    if ids_t.numel() and (ids_t.min() < 0 or ids_t.max() >= V):
        raise ValueError(f"token ids must be in [0, {V})")
    parts = [p for p in (_template_ids(adapter.tokenizer, t) for t in templates) if p is not None]
    if not parts:
        raise ValueError("no template applies (all are chat templates and the tokenizer has no chat template)")
    out = torch.zeros(ids_t.numel(), len(parts), dtype=torch.float64)
    if ids_t.numel() == 0:
        return out
    from tqdm.auto import tqdm

    total = math.ceil(ids_t.numel() / batch_size) * len(parts)
    bar = tqdm(total=total, desc="repeat-verify", disable=not progress, leave=False)
    for k, (pre, post) in enumerate(parts):
        for s in range(0, ids_t.numel(), batch_size):
            t = ids_t[s : s + batch_size]
            B = t.numel()
            rows = torch.cat(
                [torch.tensor(pre, dtype=torch.long).expand(B, -1), t[:, None], torch.tensor(post, dtype=torch.long).expand(B, -1),
                 t[:, None]], 1,
            )
            tm = torch.zeros_like(rows, dtype=torch.bool)
            tm[:, -1] = True
            lp = adapter.token_logprobs({"input_ids": rows, "attention_mask": torch.ones_like(rows)}, tm)
            out[s : s + B, k] = lp[:, -1].double().exp().cpu()
            bar.update(1)
    bar.close()
    return out


@dataclass
class UndertrainedReport:
    """Result of :func:`find_undertrained_tokens`.

    Attributes:
        frame: tidy ``pandas.DataFrame``, one row per token, sorted by ``unembed_cosine`` (most suspicious
            first): ``id``, ``token`` (the vocabulary string), ``bytes``, ``category`` (the view's round-trip
            category, ``"reference"`` for reference tokens, ``"padding"`` for rows without a tokenizer entry),
            ``unembed_cosine``, ``embed_norm``, ``unembed_norm``, ``rank``, ``verified_prob`` (max repeat
            probability, NaN when not verified) and ``flagged``.
        reference: the reference ids used by the indicator.
        threshold: the repeat probability under which a verified token is flagged.
        model: the model's name.
        verified: whether stage 2 ran.
    """

    frame: Any
    reference: list[int]
    threshold: float
    model: str
    verified: bool
    notes: list[str] = field(default_factory=list)

    def flagged_ids(self) -> list[int]:
        """Ids flagged as under-trained (verified with ``p < threshold``; without verification the
        ``top_k`` candidates by indicator, unverified)."""
        return sorted(int(i) for i in self.frame.loc[self.frame["flagged"], "id"])

    def blocklist(self, *, include_reference: bool = True) -> list[int]:
        """Ids to keep out of token-space searches: the flagged ones, plus the reference tokens (never
        emitted by the tokenizer) when ``include_reference``. Pass to
        ``adapter.allowed_token_mask(blocklist=...)``."""
        ids = set(self.flagged_ids())
        if include_reference:
            ids |= set(self.reference)
        return sorted(ids)

    def allowed_token_mask(self, adapter: ModelAdapter, *, include_reference: bool = True, **kwargs: Any) -> torch.Tensor:
        """``adapter.allowed_token_mask(blocklist=self.blocklist() + kwargs["blocklist"], **kwargs)``: the usual
        mask with the under-trained tokens excluded."""
        extra = list(kwargs.pop("blocklist", ()))
        return adapter.allowed_token_mask(blocklist=self.blocklist(include_reference=include_reference) + extra, **kwargs)

    def top(self, n: int = 20, *, flagged_only: bool = False) -> Any:
        """The ``n`` most suspicious rows (by indicator), optionally only flagged ones."""
        f = self.frame[self.frame["flagged"]] if flagged_only else self.frame
        return f.head(n)

    def to_markdown(self, n: int = 20) -> str:
        """A markdown table of the top ``n`` flagged tokens (or candidates)."""
        f = self.top(n, flagged_only=True)
        lines = ["| rank | id | token | category | cosine | ‖E‖ | p(repeat) |", "|---|---|---|---|---|---|---|"]
        for r in f.itertuples():
            p = "" if (r.verified_prob != r.verified_prob) else f"{r.verified_prob:.2e}"
            tok = repr(r.token).replace("|", "\\|")
            lines.append(f"| {r.rank} | {r.id} | `{tok}` | {r.category} | {r.unembed_cosine:.3f} | {r.embed_norm:.3f} | {p} |")
        return "\n".join(lines)


def find_undertrained_tokens(
    adapter: ModelAdapter,
    *,
    candidates: Iterable[int] | None = None,
    verify: bool = True,
    top_k: int = 256,
    reference: Iterable[int] | None = None,
    reference_corpus: Sequence[str] | None = None,
    n_components: int = 1,
    threshold: float = 0.01,
    templates: Sequence[RepeatTemplate] = REPEAT_TEMPLATES,
    batch_size: int = 64,
    include_special: bool = False,
    view: TokenizerView | None = None,
    progress: bool = True,
) -> UndertrainedReport:
    """Find under-trained tokens (Land & Bartolo 2024): weight indicators, then repeat-prompt verification.

    Stage 1 scores every row by ``s_i = cos(U'_i, mean_{j∈R} U'_j)`` (first principal components removed,
    :func:`indicator_scores`); stage 2 verifies the ``top_k`` highest-scoring tokens (or ``candidates``) with
    ``p_i = max_k p(t_i | repeat-prompt_k(t_i))`` (:func:`repeat_probabilities`) and flags ``p_i < threshold``.

    Args:
        adapter: a model with an LM head (verification needs a causal LM).
        candidates: ids to verify (default: the ``top_k`` by indicator, specials and reference tokens excluded).
        verify: run stage 2; False gives the indicators only (and flags the ``top_k`` candidates, unverified).
        top_k: number of candidates when ``candidates`` is None.
        reference: known-unused ids for the indicator (default :func:`reference_tokens`).
        reference_corpus: texts whose never-emitted tokens join the default reference (needed for
            vocabularies without unreachable or impossible tokens, such as SmolLM2's).
        n_components: principal components removed before the cosine.
        threshold: flag verified tokens whose max repeat probability is below this.
        templates: repeat-prompt templates (see :data:`REPEAT_TEMPLATES`).
        batch_size: rows per verification forward.
        include_special: also consider special/control tokens as candidates.
        view: the tokenizer's :class:`TokenizerView` when already built (its round-trip categories are
            computed once per view and reused).
        progress: show a tqdm bar during verification.

    Returns:
        An :class:`UndertrainedReport`; ``report.allowed_token_mask(adapter)`` is the usual
        ``allowed_token_mask`` with the flagged tokens excluded.

    Raises:
        ValueError: for a model without an LM head, an encoder with ``verify=True``, an empty reference set,
            or ``top_k < 1``.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("gpt2")
        >>> rep = find_undertrained_tokens(ad, verify=False, top_k=3)
        >>> len(rep.flagged_ids()), bool(rep.allowed_token_mask(ad)[rep.flagged_ids()].any())
        (3, False)
    """
    import pandas as pd

    if adapter.structure.lm_head is None:
        raise ValueError(
            f"{adapter.name!r} has no LM head (an encoder without one): under-trained token detection reads the "
            "unembedding matrix and prompts the model. Load it with its LM head"
        )
    if verify and not adapter.is_causal:
        raise ValueError(
            f"{adapter.name!r} is not a causal LM: it cannot be prompted to repeat a token. Use verify=False for "
            "the weight indicators only"
        )
    if candidates is None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    view = view if view is not None else TokenizerView(adapter.tokenizer)
    cats = _categories(view)
    if reference is not None:
        ref = sorted({int(i) for i in reference})
    else:
        ref = reference_tokens(adapter, view, corpus=reference_corpus, categories=cats)
    if not ref:
        raise ValueError(
            f"no known-unused reference tokens found in {adapter.name!r} (no unreachable, impossible-UTF-8 or "
            "padding rows): pass reference_corpus=[texts] (tokens it never uses become the reference) or "
            "reference=[ids] (e.g. reserved tokens)"
        )
    scores = indicator_scores(adapter, ref, n_components=n_components)
    V = adapter.structure.vocab_size
    n_tok = len(adapter.tokenizer)
    refset = set(ref)
    category = []
    for i in range(V):
        if i >= n_tok or i >= len(cats):
            category.append("padding")
        elif i in refset:
            category.append("reference")
        else:
            category.append(cats[i])
    toks = adapter.tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    frame = pd.DataFrame({
        "id": np.arange(V),
        "token": [toks[i] if i < n_tok else None for i in range(V)],
        "bytes": [view.token_bytes(i) if i < view.vocab_size else b"" for i in range(V)],
        "category": category,
        "unembed_cosine": scores["unembed_cosine"].numpy(),
        "embed_norm": scores["embed_norm"].numpy(),
        "unembed_norm": scores["unembed_norm"].numpy(),
    })
    frame = frame.sort_values("unembed_cosine", ascending=False, kind="stable").reset_index(drop=True)
    frame["rank"] = np.arange(1, V + 1)
    frame["verified_prob"] = np.nan
    frame["flagged"] = False
    if candidates is None:
        ok = frame["category"] != "padding"
        if not include_special:
            ok &= ~frame["id"].isin(view.special_ids | set(reserved_special_tokens(adapter.tokenizer)))
        cand = frame.loc[ok, "id"].head(top_k).tolist()
    else:
        cand = [int(i) for i in candidates]
        bad = [i for i in cand if not 0 <= i < n_tok]
        if bad:
            raise ValueError(f"candidate ids {bad[:5]} are not tokenizer ids in [0, {n_tok})")
    pos = pd.Series(np.arange(V), index=frame["id"].to_numpy())
    rows = pos.loc[cand].to_numpy()
    if verify:
        p = repeat_probabilities(adapter, cand, templates=templates, batch_size=batch_size, progress=progress)
        pmax = p.max(1).values.numpy() if len(cand) else np.zeros(0)
        frame.loc[rows, "verified_prob"] = pmax
        frame.loc[rows, "flagged"] = pmax < threshold
    else:
        frame.loc[rows, "flagged"] = True
    return UndertrainedReport(frame=frame, reference=ref, threshold=threshold, model=adapter.name, verified=verify)
