"""Retrieval objectives for RAG poisoning (METHODS.md OPT-A7): corpus poisoning and Joint-GCG.

A retrieval-augmented generator answers a query from the passages a dense retriever ranks highest. An attacker
who can add one passage to the corpus wants it (a) retrieved for the target queries and (b) to make the
generator say a chosen answer once retrieved. This module gives the objectives for both, on the search loop of
:mod:`tokensmith.optimization.search`:

- :class:`RetrieverSimilarity` — corpus poisoning (Zhong et al. 2023, "Poisoning Retrieval Corpora by Injecting
  Adversarial Passages"): L = 1 − mean_q cos(pool(Enc(doc ⊕ z)), Enc(q)), optimised over the retriever's own
  vocabulary with the one-hot gradient (HotFlip / GCG).
- :class:`CrossTokenizer` — an objective over another tokenizer's slot (the retriever's WordPiece) made
  optimisable in the primary (generator) vocabulary: the candidate's text is re-tokenized, and the gradient is
  carried over by Joint-GCG's Gradient Tokenization Alignment (character overlaps, A) and Cross-Vocabulary
  Projection (a vocabulary map, W): G_primary ≈ A · (G_inner · W).
- :class:`Joint` — Joint-GCG (Wang et al. 2025, "Joint-GCG: Unified Gradient-Based Poisoning Attacks on
  Retrieval-Augmented Generation Systems"): g = (1 − r)·norm(G_gen) + r·A·(norm(G_ret)·W), with r set by
  Adaptive Weighted Fusion from the poisoned passage's retrieval margin over competitor passages.
- :func:`retrieval_rank` — where documents rank for a query.

Red-teaming tool: use it to measure how robust retrieval pipelines you are responsible for are to poisoning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded, pooling
from tokensmith.models.batching import is_oom
from tokensmith.optimization.search.objectives import (
    Evaluation,
    Objective,
    TemplateObjective,
    _same_vocab,
    register_objective,
)
from tokensmith.optimization.search.template import SlotTemplate

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "RetrieverSimilarity",
    "CrossTokenizer",
    "Joint",
    "retrieval_rank",
    "vocab_map",
    "char_alignment",
    "minmax_normalize",
    "awf_ratio",
]

_DEC = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------- helpers
def minmax_normalize(x: torch.Tensor, axis: str = "row", eps: float = 1e-12) -> torch.Tensor:
    """Joint-GCG's normalisation norm(x) = (x − mean(x)) / (max(x) − min(x)).

    Args:
        x: ``[n, V]`` gradient (or any tensor with ``axis="all"``).
        axis: ``"row"``: statistics per row (per slot position; the default here, so that no position
            dominates); ``"all"``: over the whole matrix (the authors' released implementation).
        eps: lower bound on the range (a constant row becomes 0).

    Examples:
        >>> minmax_normalize(torch.tensor([[0.0, 1.0, 2.0]]))
        tensor([[-0.5000,  0.0000,  0.5000]])
    """
    if axis == "row":
        lo = x.amin(-1, keepdim=True)
        hi = x.amax(-1, keepdim=True)
        return (x - x.mean(-1, keepdim=True)) / (hi - lo).clamp_min(eps)
    if axis == "all":
        return (x - x.mean()) / (x.max() - x.min()).clamp_min(eps)
    raise ValueError(f"axis must be 'row' or 'all', got {axis!r}")


def awf_ratio(doc_scores: torch.Tensor, competitor_scores: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Adaptive Weighted Fusion weight of the retriever term, per query (Joint-GCG, AWF).

    With s the poisoned passage's similarity to the query, c_(1) ≥ … ≥ c_(M) the competitors' similarities
    sorted, and k the rank the passage must reach:

        D = (s − c_(k)) / ḡ,   ḡ = (c_(1) − c_(M)) / (M − 1)   (the mean gap between consecutive competitors)
        r = 1 − σ(D) = σ(−D)

    D, the "stability" of the passage's rank, is its margin over the k-th competitor in units of the typical
    score gap: r → 1 (optimise retrieval) while the passage is below the k-th competitor, r → 0 (optimise the
    generator) once it is safely above. The rule follows the paper's description of AWF (α from a stability
    metric of the poisoned passage's rank) in the form of the authors' released implementation.

    Args:
        doc_scores: ``[..., Q]`` cosine of the poisoned passage to each query.
        competitor_scores: ``[Q, M]`` cosine of each competitor passage to each query (M ≥ 2).
        top_k: the rank to reach (1: above every competitor).

    Returns:
        ``[..., Q]`` weights in (0, 1).

    Examples:
        >>> awf_ratio(torch.tensor([0.5]), torch.tensor([[0.5, 0.4, 0.3]])).tolist()
        [0.5]
    """
    c = torch.sort(competitor_scores.to(doc_scores.dtype), dim=-1, descending=True).values
    M = c.shape[-1]
    if M < 2:
        raise ValueError("adaptive fusion needs at least 2 competitor passages (their score gaps set the scale)")
    k = min(max(int(top_k), 1), M)
    gap = ((c[:, 0] - c[:, -1]) / (M - 1)).clamp_min(1e-8)
    D = (doc_scores - c[:, k - 1]) / gap
    return torch.sigmoid(-D)


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte → printable-character table of byte-level BPE (GPT-2, Llama 3, SmolLM): the printable
    Latin-1 bytes stand for themselves, the other 68 bytes are shifted to code points 256, 257, …"""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def _is_byte_level(tokens: Sequence[str | None]) -> bool:
    marked = sum(1 for t in tokens if t and t.startswith("Ġ"))
    return marked > 0.01 * max(1, len(tokens))


def _surface_strings(tokenizer: Any, size: int, normalize: Callable[[str], str] | None) -> list[str | None]:
    """Each id's surface string with the word-boundary markers removed (WordPiece ``##``, byte-level ``Ġ``,
    SentencePiece ``▁``), decoded from bytes for byte-level BPE, stripped, then passed through ``normalize``;
    None for special tokens, ids past the tokenizer, byte-fallback pieces and empty strings."""
    n = min(size, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    byte_level = _is_byte_level(tokens)
    dec = _byte_decoder() if byte_level else {}
    out: list[str | None] = [None] * size
    for i, t in enumerate(tokens):
        if t is None or i in special:
            continue
        s = t
        if byte_level:
            try:
                s = bytes(dec[ch] for ch in s).decode("utf-8")
            except (KeyError, UnicodeDecodeError):  # a fragment of a multi-byte character: no surface string
                continue
        if s.startswith("##"):
            s = s[2:]
        if s.startswith("<0x") and s.endswith(">") and len(s) == 6:  # SentencePiece byte fallback
            continue
        s = s.replace("▁", " ").strip()
        if normalize is not None and s:
            s = normalize(s).strip()
        if s:
            out[i] = s
    return out


def _normalizer_of(tokenizer: Any) -> Callable[[str], str] | None:
    """The string normalisation a tokenizer applies before splitting (BERT uncased: lowercase, strip accents)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None) if backend is not None else None
    if norm is not None:
        return norm.normalize_str
    if getattr(tokenizer, "do_lower_case", False):
        return str.lower
    return None


def vocab_map(inner_tokenizer: Any, primary_tokenizer: Any, inner_size: int | None = None,
              primary_size: int | None = None) -> torch.Tensor:
    """The default Cross-Vocabulary Projection W ``[V_inner, V_primary]`` (sparse, rows sum to 1 or 0).

    Inner token j maps to every primary token whose surface string equals j's once word-boundary markers are
    removed (WordPiece ``##ing`` → ``ing``; byte-level ``Ġword`` → ``word``; SentencePiece ``▁word`` →
    ``word``) and both are normalised the way the inner tokenizer normalises text (BERT uncased: lowercase,
    accents stripped), each match with weight 1/(number of matches). Inner tokens without a match, and special
    tokens, have an all-zero row: their gradient is dropped (Joint-GCG learns W instead; this string map is
    exact where it applies and needs no training).

    Args:
        inner_tokenizer: the tokenizer of the objective being mapped (the retriever's).
        primary_tokenizer: the tokenizer whose vocabulary is searched (the generator's).
        inner_size: rows of W (default ``len(inner_tokenizer)``; pass ``adapter.E.shape[0]``).
        primary_size: columns of W (default ``len(primary_tokenizer)``).

    Examples:
        >>> import tokensmith as ts                                          # doctest: +SKIP
        >>> W = vocab_map(ts.tiny("bert").tokenizer, ts.tiny("llama").tokenizer)  # doctest: +SKIP
        >>> W.is_sparse and W.shape[0] == 30522                              # doctest: +SKIP
        True
    """
    Vi = int(inner_size or len(inner_tokenizer))
    Vp = int(primary_size or len(primary_tokenizer))
    norm = _normalizer_of(inner_tokenizer)
    inner = _surface_strings(inner_tokenizer, Vi, None)
    primary = _surface_strings(primary_tokenizer, Vp, norm)
    by_string: dict[str, list[int]] = {}
    for v, s in enumerate(primary):
        if s is not None:
            by_string.setdefault(s, []).append(v)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for j, s in enumerate(inner):
        hits = by_string.get(s) if s is not None else None
        if hits:
            w = 1.0 / len(hits)
            rows += [j] * len(hits)
            cols += hits
            vals += [w] * len(hits)
    idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    W = torch.sparse_coo_tensor(idx, torch.tensor(vals, dtype=torch.float32), (Vi, Vp), check_invariants=True)
    return W.coalesce()


def char_alignment(primary_spans: Sequence[tuple[int, int]], inner_spans: Sequence[tuple[int, int]],
                   text: str) -> torch.Tensor:
    """Gradient Tokenization Alignment matrix A ``[n_primary, n_inner]`` for two tokenizations of ``text``.

    Joint-GCG spreads each inner token's gradient over its characters and gives a primary token the average
    over its own characters: A[i, j] = |chars(i) ∩ chars(j)| / |chars(i)|, counting non-whitespace characters
    only (a byte-level ``Ġword`` covers " word", a WordPiece ``word`` covers "word": the space carries no
    gradient). A row sums to 1 when every non-space character of primary token i lies in some inner token,
    and is 0 for a whitespace-only token.

    Args:
        primary_spans: ``(start, end)`` character spans of the primary tokens in ``text``.
        inner_spans: ``(start, end)`` character spans of the inner tokens in ``text``.
        text: the slot text both tokenizations cover.

    Examples:
        >>> A = char_alignment([(0, 4), (4, 8)], [(1, 3), (3, 8)], " abcdefg")
        >>> [[round(x, 3) for x in row] for row in A.tolist()]
        [[0.667, 0.333], [0.0, 1.0]]
    """
    L = len(text)
    solid = torch.tensor([not c.isspace() for c in text], dtype=torch.float32) if L else torch.zeros(0)

    def cover(spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        m = torch.zeros(len(spans), L)
        for k, (a, b) in enumerate(spans):
            a, b = max(0, int(a)), min(L, int(b))
            if b > a:
                m[k, a:b] = 1.0
        return m * solid

    P, Q = cover(primary_spans), cover(inner_spans)
    return (P @ Q.T) / P.sum(1, keepdim=True).clamp_min(1.0)


def _query_matrix(encoder: ModelAdapter, queries: Any, what: str) -> torch.Tensor:
    """``[Q, d]`` float32 unit vectors from strings (embedded with the encoder's pooling) or embeddings."""
    d = int(encoder.structure.hidden_size)
    if isinstance(queries, str):
        queries = [queries]
    if isinstance(queries, torch.Tensor):
        q = queries.detach().float()
        if q.dim() == 1:
            q = q[None]
        if q.dim() != 2 or q.shape[0] == 0:
            raise ValueError(f"{what} embeddings must be [Q, d] or [d], got shape {tuple(queries.shape)}")
    else:
        texts = list(queries)
        if not texts:
            raise ValueError(f"no {what} given: pass a string, a list of strings or a [Q, d] tensor of embeddings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{what} {i} is a {type(t).__name__}; pass strings or one [Q, d] embedding tensor")
            if not t.strip():
                raise ValueError(f"{what} {i} is empty: give the text a retriever would embed")
        q = encoder.sentence_embedding(texts).detach().float()
    if q.shape[1] != d:
        raise ValueError(
            f"{what} embeddings have d={q.shape[1]} but the encoder {encoder.name!r} pools d={d}-dimensional "
            "vectors: embed them with the same encoder (encoder.sentence_embedding(texts))"
        )
    if not torch.isfinite(q).all() or bool((q.norm(dim=-1) == 0).any()):
        raise ValueError(f"{what} embeddings contain NaN/inf or a zero vector (cosine is undefined)")
    return torch.nn.functional.normalize(q, dim=-1).cpu()


# ---------------------------------------------------------------------------------------------- retriever
@register_objective("retriever")
class RetrieverSimilarity(TemplateObjective):
    """Corpus poisoning (Zhong et al. 2023): make a passage retrieved for the queries by maximising its
    similarity to them under a dense retriever.

    L(z) = 1 − (1/Q)·Σ_q cos(pool(Enc(doc ⊕ z)), e_q)

    where pool is the encoder's own pooling (``adapter.pool``; for ``ts.load("minilm-l6")`` mean pooling +
    L2 normalisation, as sentence-transformers computes it), z the slot's tokens anywhere in the passage, and
    e_q the queries' embeddings. The gradient is ∂L/∂onehot over the encoder's vocabulary
    (``adapter.onehot_embeds``), the HotFlip step of the paper; GCG's candidate sampling on top of it is the
    paper's multi-token extension.

    With ``competitors`` (passages already in the corpus), ``success`` says whether the passage ranks within
    ``top_k`` for every query and :meth:`stability` gives the rank margin that :class:`Joint` adapts to.

    Args:
        encoder: a sentence-encoder adapter (``ts.load("minilm-l6")``; ``ts.tiny("bert")`` in tests).
        doc: the passage, from ``encoder.encode([..., Slot("adv", " ! ! !"), ...])`` (no target).
        queries: a query string, a list of them, or their embeddings ``[Q, d]``.
        slot: the slot's name (default: the only slot).
        competitors: competitor passages (strings, or embeddings ``[M, d]``).
        top_k: the rank the passage must reach for ``success`` and :meth:`stability`.
        method: pooling method override (default: the encoder's pooling configuration, else ``"mean"``).
        layers: hidden-state layers to average before pooling (default: the encoder's configuration).
        max_batch_size: candidates per forward (halved on out-of-memory). Default 64.

    Raises:
        ValueError: an empty query, embeddings whose width is not the encoder's, a passage with a target or
            longer than the encoder reads.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> enc = ts.tiny("bert")
        >>> obj = RetrieverSimilarity(enc, enc.encode(["Paris is in France.", Slot("adv", " ! ! !")]),
        ...                           "where is paris")
        >>> float(obj.evaluate(obj.init_ids[None]).loss[0]) < 2
        True
    """

    name = "retriever"

    def __init__(
        self,
        encoder: ModelAdapter,
        doc: Encoded,
        queries: str | Sequence[str] | torch.Tensor,
        slot: str | None = None,
        *,
        competitors: Sequence[str] | torch.Tensor | None = None,
        top_k: int = 1,
        method: str | None = None,
        layers: Sequence[int] | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__(encoder, doc, slot)
        if bool(self.template.target_mask.any()):
            raise ValueError("a retrieval passage has no target: encode it without target=")
        cfg = encoder.pooling_config
        self.method = method or (cfg.method if cfg is not None else "mean")
        if self.method not in pooling.POOLING_METHODS:
            raise ValueError(f"unknown pooling method {self.method!r}; choose one of {pooling.POOLING_METHODS}")
        self.layers = layers if layers is not None else (cfg.layers if cfg is not None else None)
        self.normalize = bool(cfg.normalize) if cfg is not None else False
        self.max_length = (cfg.max_length if cfg is not None else None) or encoder.max_positions
        T = len(self.template.ids)
        if self.max_length is not None and T > self.max_length:
            raise ValueError(
                f"the passage is {T} tokens but {encoder.name!r} reads at most {self.max_length} (it truncates the "
                "rest, so a slot there would not count): shorten the passage or move the slot forward"
            )
        self.queries = _query_matrix(encoder, queries, "query")
        self.top_k = int(top_k)
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        self.competitors: torch.Tensor | None = None
        self.competitor_scores: torch.Tensor | None = None
        if competitors is not None:
            self.competitors = _query_matrix(encoder, competitors, "competitor passage")
            self.competitor_scores = self.queries @ self.competitors.T  # [Q, M]
        self.max_batch_size = int(max_batch_size or 64)

    def __repr__(self) -> str:
        return f"RetrieverSimilarity({self.template!r}, queries={len(self.queries)}, method={self.method!r})"

    # ---- the computation
    def _pool(self, hidden: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``adapter.pool``'s pooling on hidden states (float64 stays float64: pooling.pool accumulates means in
        float32, which would limit a float64 gradient check)."""
        layers = self.layers if self.layers is not None else -1
        if self.method == "mean" and hidden[0].dtype == torch.float64:
            h = pooling._select_layers(list(hidden), layers)
            w = mask.to(h.device, h.dtype)[..., None]
            out = (h * w).sum(1) / w.sum(1)
        else:
            out = pooling.pool(list(hidden), mask.to(hidden[0].device), method=self.method, layers=layers)
        return pooling.l2_normalize(out) if self.normalize else out

    def pooled(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence vectors ``[N, d]`` of ``ids`` ``[N, T]`` (with ``mask``) or of ``inputs_embeds`` ``[N, T, d]``,
        pooled exactly as ``adapter.pool`` pools (tested); gradients flow through ``inputs_embeds``."""
        ad = self.adapter
        x = inputs_embeds if inputs_embeds is not None else ids
        if x is None:
            raise ValueError("give ids or inputs_embeds")
        N, T = x.shape[:2]
        am = mask if mask is not None else torch.ones(N, T, dtype=torch.long)
        if inputs_embeds is not None:
            out = ad.forward(inputs_embeds=inputs_embeds, attention_mask=am, output_hidden_states=True)
        else:
            out = ad.forward(ids.to(torch.long), attention_mask=am, output_hidden_states=True)  # type: ignore[union-attr]
        self.forwards += N
        self.tokens += int(am.sum())
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            raise ValueError(f"{ad.name} does not return hidden_states; it cannot be pooled")
        return self._pool(hs, am)

    def similarities(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N, Q]`` cosine of pooled passage vectors to each query."""
        p = torch.nn.functional.normalize(pooled, dim=-1)
        return p @ self.queries.to(p.device, p.dtype).T

    def _loss(self, sims: torch.Tensor) -> torch.Tensor:
        return 1.0 - sims.mean(-1)

    def _success(self, sims: torch.Tensor) -> torch.Tensor | None:
        if self.competitor_scores is None:
            return None
        c = torch.sort(self.competitor_scores, dim=-1, descending=True).values
        if self.top_k > c.shape[1]:
            return torch.ones(len(sims), dtype=torch.bool)
        kth = c[:, self.top_k - 1].to(sims.dtype)
        return (sims.cpu() >= kth[None]).all(-1)

    def score_ids(self, rows: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``[N, Q]`` cosines of full passages given as ids: a ``[N, T]`` tensor or a list of 1-D tensors of
        different lengths (right-padded and masked; exact). Batched, halving the batch on out-of-memory."""
        if isinstance(rows, torch.Tensor):
            rows = list(rows.reshape(-1, rows.shape[-1]))
        N = len(rows)
        sims = torch.empty(N, len(self.queries))
        pad = self.adapter.pad_token_id if self.adapter.pad_token_id is not None else 0
        start, bs = 0, self.max_batch_size
        while start < N:
            chunk = rows[start : start + bs]
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), int(pad), dtype=torch.long)
            am = torch.zeros(len(chunk), T, dtype=torch.long)
            for k, r in enumerate(chunk):
                ids[k, : len(r)] = r
                am[k, : len(r)] = 1
            try:
                with torch.no_grad():
                    sims[start : start + len(chunk)] = self.similarities(self.pooled(ids, am)).float().cpu()
            except Exception as err:  # noqa: BLE001 - re-raised unless out of memory
                if not is_oom(err) or bs == 1:
                    raise
                bs = max(1, bs // 2)
                self.max_batch_size = bs
                continue
            start += len(chunk)
        return sims

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        t = self.template
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, t.n)
        if len(cand) == 0:
            return Evaluation(torch.zeros(0), None if self.competitor_scores is None else torch.zeros(0, dtype=torch.bool))
        sims = self.score_ids(t.fill(cand))
        return Evaluation(self._loss(sims), self._success(sims))

    def render_ids(self, text: str) -> tuple[torch.Tensor, Encoded]:
        """The passage rendered with ``text`` in the slot (through the full recipe): its ids, cut to the encoder's
        ``max_length`` the way its tokenizer truncates (keeping the final special token), and the encoding."""
        enc = self.template.render(text)
        ids = enc.input_ids
        if self.max_length is not None and len(ids) > self.max_length:
            ids = torch.cat([ids[: self.max_length - 1], ids[-1:]])
        return ids, enc

    def evaluate_texts(self, texts: Sequence[str]) -> Evaluation:
        """Losses of slot *strings* rendered through the passage's recipe (their token counts may differ)."""
        rows = [self.render_ids(s)[0] for s in texts]
        if not rows:
            return Evaluation(torch.zeros(0), None)
        sims = self.score_ids(rows)
        return Evaluation(self._loss(sims), self._success(sims))

    def rescore(self, text: str) -> float:
        return float(self.evaluate_texts([text]).loss[0])

    # ---- rank margin (for adaptive fusion)
    def stability(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``[N, Q]`` AWF weight σ(−D) of each candidate per query (:func:`awf_ratio`; needs ≥ 2 competitors)."""
        t = self.template
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, t.n)
        return self._awf(self.score_ids(t.fill(cand)))

    def stability_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """:meth:`stability` for slot strings."""
        return self._awf(self.score_ids([self.render_ids(s)[0] for s in texts]))

    def _awf(self, sims: torch.Tensor) -> torch.Tensor:
        if self.competitor_scores is None:
            raise ValueError("the rank margin needs competitor passages: RetrieverSimilarity(..., competitors=[...])")
        return awf_ratio(sims, self.competitor_scores, self.top_k)

    # ---- gradients
    def _grad_at(self, ids: torch.Tensor, start: int, end: int, kind: str) -> torch.Tensor:
        ad = self.adapter
        ids = ids.to(ad.device, torch.long)[None]
        T = ids.shape[1]
        with torch.enable_grad():
            if kind == "onehot":
                pos = torch.zeros(1, T, dtype=torch.bool)
                pos[0, start:end] = True
                embeds, leaf = ad.onehot_embeds(ids, pos)
            else:
                with torch.no_grad():
                    base = ad.embed(ids)
                leaf = ad.E[ids[0, start:end]].detach().clone().requires_grad_(True)
                rows = (leaf * ad.structure.embed_scale)[None].to(base.dtype)
                embeds = torch.cat([base[:, :start], rows, base[:, end:]], 1)
            loss = self._loss(self.similarities(self.pooled(inputs_embeds=embeds)))[0]
            (g,) = torch.autograd.grad(loss, leaf)
        self.backwards += 1
        return g

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂onehot ``[n, V]`` through ``adapter.onehot_embeds`` (one forward and backward of the passage)."""
        t = self.template
        ids = t.fill(torch.as_tensor(slot_ids).reshape(1, t.n))[0]
        return self._grad_at(ids, t.start, t.end, "onehot").float()

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂e ``[n, d]`` with respect to the embedding rows in the slot (before the embedding scale); the
        one-hot gradient is ``embed_grad @ E.T`` times the scale."""
        t = self.template
        ids = t.fill(torch.as_tensor(slot_ids).reshape(1, t.n))[0]
        return self._grad_at(ids, t.start, t.end, "embed")

    def grad_text(self, text: str) -> tuple[torch.Tensor, Encoded]:
        """∂L/∂onehot ``[m, V]`` over the slot tokens that ``text`` renders to, and that rendering (its slot span
        and offsets give the tokens' characters). ``m`` is 0 when the text produces no slot token."""
        ids, enc = self.render_ids(text)
        sp = enc.spans[self.template.slot]
        end = min(sp.end, len(ids) - 1) if len(ids) < len(enc.input_ids) else sp.end
        if end <= sp.start:
            return torch.zeros(0, self.vocab_size), enc
        return self._grad_at(ids, sp.start, end, "onehot").float(), enc


# ---------------------------------------------------------------------------------------------- cross-tokenizer
class CrossTokenizer(Objective):
    """An objective over another tokenizer's slot, optimised in the primary vocabulary (Joint-GCG's GTA + CVP).

    A candidate's primary slot ids are decoded to text z; the inner objective scores z rendered through its own
    recipe (``inner.templates[0].render(z)``; its token count may differ). The gradient is mapped back:

        G_primary ≈ A · (G_inner · W)

    with A ``[n, m]`` the character overlap of the two tokenizations of z (:func:`char_alignment`: primary
    token i gets the average over its characters of the inner gradients covering them) and W
    ``[V_inner, V_primary]`` a vocabulary map (default :func:`vocab_map`, built once, sparse: inner tokens map
    to primary tokens with the same surface string; unmatched inner tokens contribute nothing). A first-order
    estimate only: W is exact only for tokens whose string exists in both vocabularies.

    The inner objective must render strings: it provides ``evaluate_texts(texts)`` and ``grad_text(text)``
    (as :class:`RetrieverSimilarity` does).

    Args:
        inner: the objective over the other tokenizer (e.g. a :class:`RetrieverSimilarity`).
        primary: the primary slot: a :class:`SlotTemplate`, or an objective whose first template it is.
        W: vocabulary map ``[V_inner, V_primary]``, dense or sparse (default: :func:`vocab_map`).

    Examples:
        >>> import tokensmith as ts                                                   # doctest: +SKIP
        >>> from tokensmith.models import Slot                                        # doctest: +SKIP
        >>> bert, llama = ts.tiny("bert"), ts.tiny("llama")                           # doctest: +SKIP
        >>> ret = RetrieverSimilarity(bert, bert.encode(["Paris.", Slot("adv", " x")]), "paris")  # doctest: +SKIP
        >>> gen = SlotTemplate(llama, llama.encode(["Context:", Slot("adv", " hello world")], target=" ok"))  # doctest: +SKIP
        >>> CrossTokenizer(ret, gen).evaluate(gen.slot_ids[None]).loss.shape          # doctest: +SKIP
        torch.Size([1])
    """

    name = "cross_tokenizer"

    def __init__(self, inner: Objective, primary: SlotTemplate | Objective, *, W: torch.Tensor | None = None):
        super().__init__()
        if not (hasattr(inner, "evaluate_texts") and hasattr(inner, "grad_text")):
            raise TypeError(
                f"{type(inner).__name__} cannot score slot strings: CrossTokenizer needs an inner objective with "
                "evaluate_texts(texts) and grad_text(text), such as RetrieverSimilarity"
            )
        self.inner = inner
        self.primary = primary if isinstance(primary, SlotTemplate) else primary.templates[0]
        if not isinstance(self.primary, SlotTemplate):
            raise TypeError("primary must be a SlotTemplate or an Objective")
        self._W = W
        self._Wt: torch.Tensor | None = None

    @property
    def adapter(self) -> ModelAdapter:
        return self.primary.adapter

    @property
    def templates(self) -> list[SlotTemplate]:
        return [self.primary]

    def __repr__(self) -> str:
        return f"CrossTokenizer({self.inner!r} -> {self.primary.adapter.name})"

    # ---- vocabulary map
    @property
    def W(self) -> torch.Tensor:
        """The vocabulary map ``[V_inner, V_primary]`` (built on first use)."""
        Vi, Vp = int(self.inner.adapter.E.shape[0]), int(self.adapter.E.shape[0])
        if self._W is None:
            self._W = vocab_map(self.inner.adapter.tokenizer, self.adapter.tokenizer, Vi, Vp)
        if tuple(self._W.shape) != (Vi, Vp):
            raise ValueError(f"W must be [V_inner, V_primary] = [{Vi}, {Vp}], got {tuple(self._W.shape)}")
        return self._W

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """``G @ W`` for ``G`` ``[k, V_inner]`` → ``[k, V_primary]`` (sparse product when W is sparse)."""
        W = self.W
        if W.is_sparse or W.layout != torch.strided:
            if self._Wt is None:
                self._Wt = W.t().coalesce() if W.layout == torch.sparse_coo else W.to_sparse_coo().t().coalesce()
            return torch.sparse.mm(self._Wt, G.float().T.contiguous()).T
        return G.float() @ W.to(torch.float32)

    # ---- alignment
    def primary_spans(self, slot_ids: torch.Tensor) -> tuple[str, list[tuple[int, int]]]:
        """The slot text and each primary token's character span in it (by incremental decoding)."""
        tok = self.adapter.tokenizer
        ids = torch.as_tensor(slot_ids).reshape(-1).tolist()
        text = tok.decode(ids, **_DEC)
        spans, prev = [], 0
        for i in range(len(ids)):
            end = len(text) if i == len(ids) - 1 else min(len(text), len(tok.decode(ids[: i + 1], **_DEC)))
            end = max(end, prev)
            spans.append((prev, end))
            prev = end
        return text, spans

    def alignment(self, slot_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Encoded]:
        """``(A [n, m], G_inner [m, V_inner], inner encoding)`` at ``slot_ids``."""
        text, pspans = self.primary_spans(slot_ids)
        G, enc = self.inner.grad_text(text)  # type: ignore[attr-defined]
        sp = enc.spans[self.inner.templates[0].slot]
        ispans = [(a - sp.char_start, b - sp.char_start) for a, b in enc.offsets[sp.start : sp.start + len(G)]]
        return char_alignment(pspans, ispans, text), G, enc

    # ---- objective
    def texts(self, slot_ids: torch.Tensor) -> list[str]:
        return [self.primary.decode(r) for r in torch.as_tensor(slot_ids).reshape(-1, self.primary.n)]

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        return self.inner.evaluate_texts(self.texts(slot_ids))  # type: ignore[attr-defined]

    def grad(self, slot_ids: torch.Tensor, inner_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> torch.Tensor:
        """G_primary = A · (t(G_inner) · W) ``[n, V_primary]`` (``t`` = ``inner_transform``, e.g. Joint-GCG's
        normalisation of the retriever gradient before projection; default identity)."""
        A, G, _ = self.alignment(slot_ids)
        if len(G) == 0:
            return torch.zeros(self.primary.n, self.vocab_size)
        if inner_transform is not None:
            G = inner_transform(G)
        return self.project(A.to(G.dtype) @ G.cpu())

    def inner_nonempty(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the decoded text produces at least one inner token."""
        tok = self.inner.adapter.tokenizer
        texts = self.texts(slot_ids)
        if not texts:
            return torch.zeros(0, dtype=torch.bool)
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return torch.tensor([len(x) > 0 for x in ids], dtype=torch.bool)

    def round_trips(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """The primary in-context re-tokenization check and a non-empty inner tokenization."""
        return self.primary.round_trips(slot_ids) & self.inner_nonempty(slot_ids)

    def stability(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """The inner objective's AWF weights for the decoded texts (see :meth:`RetrieverSimilarity.stability`)."""
        if not hasattr(self.inner, "stability_texts"):
            raise ValueError(f"{type(self.inner).__name__} has no rank margin (stability_texts)")
        return self.inner.stability_texts(self.texts(slot_ids))  # type: ignore[attr-defined]

    def rescore(self, text: str) -> float:
        return float(self.inner.rescore(text))

    def counters(self) -> dict[str, int]:
        return self.inner.counters()


# ---------------------------------------------------------------------------------------------- Joint-GCG
class Joint(Objective):
    """Joint-GCG (Wang et al. 2025): one slot optimised against the generator and the retriever together.

    Gradient (what GCG ranks swaps with):

        g = (1 − r)·norm(G_gen) + r·A·(norm(G_ret)·W)

    with norm(x) = (x − mean)/(max − min) (:func:`minmax_normalize`, per row by default) and A, W the
    :class:`CrossTokenizer` alignment and projection (applied automatically when the retriever's vocabulary is
    not the generator's). Loss used for selection:

        L = (1 − r)·L_gen / s_gen + r·L_ret / s_ret

    where s_gen, s_ret are the two losses at the template's initial slot (so L = 1 at the start for any r; pass
    ``scales=`` to fix them yourself). The paper min-max normalises each step's *batch* of loss decreases
    instead; that needs the whole batch at once and makes losses of different steps incomparable, which the
    search loop's best-so-far tracking relies on, so the scales here are fixed once.

    r (Adaptive Weighted Fusion) is recomputed once per step at the current ids (in :meth:`grad`, or in
    :meth:`evaluate` from ``base`` for gradient-free methods): the mean over queries of :func:`awf_ratio`,
    σ(−D) with D the passage's margin over the ``top_k``-th competitor in units of the mean competitor score
    gap, clamped to ``[r_min, r_max]``. A negative margin drives r above 1/2 (optimise retrieval), a
    comfortable positive one towards 0 (optimise the answer). :attr:`r_history` keeps every value used; with an
    adaptive r the loop's ``best_loss`` compares steps scored under different r (read :meth:`components`).

    Args:
        generator: the generator-side objective (e.g. :class:`~tokensmith.optimization.search.TargetLoss` on the
            RAG prompt with the passage's slot).
        retriever: the retriever-side objective (a :class:`RetrieverSimilarity` over the encoder's tokenizer, or
            an objective already in the generator's vocabulary).
        r: ``"adaptive"`` (needs ``competitors=`` on the retriever) or a fixed weight in [0, 1].
        r_min: lower clamp of the adaptive r.
        r_max: upper clamp of the adaptive r.
        norm: ``"row"`` or ``"all"``: the statistics of :func:`minmax_normalize`.
        map_then_norm: normalise the retriever gradient after mapping it into the generator's vocabulary
            (default False: before, as in the paper).
        scales: ``(s_gen, s_ret)``, or None for the losses at the initial slot.
        W: vocabulary map for the automatic :class:`CrossTokenizer`.

    Raises:
        ValueError: slots of different lengths, an adaptive r without competitor passages, r outside [0, 1].
    """

    name = "joint"

    def __init__(
        self,
        generator: Objective,
        retriever: Objective,
        *,
        r: float | str = "adaptive",
        r_min: float = 0.0,
        r_max: float = 1.0,
        norm: str = "row",
        map_then_norm: bool = False,
        scales: tuple[float, float] | None = None,
        W: torch.Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(generator, Objective) or not isinstance(retriever, Objective):
            raise TypeError("Joint needs two Objectives (generator, retriever)")
        if retriever.adapter is not generator.adapter and not _same_vocab(retriever.adapter, generator.adapter):
            retriever = CrossTokenizer(retriever, generator, W=W)
        if retriever.n != generator.n:
            raise ValueError(f"the two objectives' slots differ in length ({generator.n} vs {retriever.n} tokens)")
        if norm not in ("row", "all"):
            raise ValueError(f"norm must be 'row' or 'all', got {norm!r}")
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"need 0 <= r_min <= r_max <= 1, got {r_min}, {r_max}")
        self.gen = generator
        self.ret = retriever
        self.adaptive = r == "adaptive"
        if self.adaptive:
            base = retriever.inner if isinstance(retriever, CrossTokenizer) else retriever
            comp = getattr(base, "competitor_scores", None)
            if comp is None or comp.shape[1] < 2:
                raise ValueError(
                    "r='adaptive' sets the weight from the passage's retrieval margin: give the retriever at least "
                    "2 competitor passages (RetrieverSimilarity(..., competitors=[...])), or pass a fixed r=0.5"
                )
            self.r = 0.5
        else:
            if isinstance(r, str) or not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"r must be 'adaptive' or a float in [0, 1], got {r!r}")
            self.r = float(r)
        self.r_min, self.r_max = float(r_min), float(r_max)
        self.norm = norm
        self.map_then_norm = bool(map_then_norm)
        self._scales = None if scales is None else (float(scales[0]), float(scales[1]))
        self._r_key: tuple[int, ...] | None = None
        self.r_history: list[float] = []
        self.last_components: dict[str, torch.Tensor] = {}

    @property
    def adapter(self) -> ModelAdapter:
        return self.gen.adapter

    @property
    def templates(self) -> list[SlotTemplate]:
        return self.gen.templates

    def __repr__(self) -> str:
        r = "adaptive" if self.adaptive else f"{self.r:g}"
        return f"Joint({self.gen!r}, {self.ret!r}, r={r})"

    # ---- weights
    def update_r(self, slot_ids: torch.Tensor) -> float:
        """Recompute the adaptive r at ``slot_ids`` (once per distinct ids) and return the r in use."""
        ids = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1)
        key = tuple(ids.tolist())
        if self.adaptive and key != self._r_key:
            w = self.ret.stability(ids[None])[0]  # type: ignore[attr-defined]
            self.r = float(min(self.r_max, max(self.r_min, float(w.mean()))))
            self._r_key = key
            self.r_history.append(self.r)
        elif not self.r_history:
            self.r_history.append(self.r)
        return self.r

    @property
    def scales(self) -> tuple[float, float]:
        """``(s_gen, s_ret)``: the losses at the initial slot unless given."""
        if self._scales is None:
            ids = self.init_ids[None]
            sg = abs(float(self.gen.evaluate(ids).loss[0]))
            sr = abs(float(self.ret.evaluate(ids).loss[0]))
            self._scales = (max(sg, 1e-6), max(sr, 1e-6))
        return self._scales

    def fuse(self, gen_loss: torch.Tensor, ret_loss: torch.Tensor) -> torch.Tensor:
        """(1 − r)·L_gen/s_gen + r·L_ret/s_ret."""
        sg, sr = self.scales
        return (1.0 - self.r) * gen_loss / sg + self.r * ret_loss / sr

    # ---- objective
    def components(self, slot_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw losses ``{"generator": [N], "retriever": [N]}``."""
        return {"generator": self.gen.evaluate(slot_ids).loss, "retriever": self.ret.evaluate(slot_ids).loss}

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, self.n)
        if base is not None:
            self.update_r(base)
        elif not self.r_history and len(cand):
            self.update_r(cand[0])
        eg = self.gen.evaluate(cand, base)
        er = self.ret.evaluate(cand)
        self.last_components = {"generator": eg.loss, "retriever": er.loss}
        succ = None
        if eg.success is not None and er.success is not None:
            succ = eg.success & er.success
        elif eg.success is not None or er.success is not None:
            succ = eg.success if eg.success is not None else er.success
        return Evaluation(self.fuse(eg.loss, er.loss), succ)

    def _norm(self, g: torch.Tensor) -> torch.Tensor:
        return minmax_normalize(g.float(), self.norm)

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """(1 − r)·norm(G_gen) + r·A·(norm(G_ret)·W) ``[n, V]``."""
        r = self.update_r(slot_ids)
        gg = self._norm(self.gen.grad(slot_ids))
        if isinstance(self.ret, CrossTokenizer) and not self.map_then_norm:
            gr = self.ret.grad(slot_ids, inner_transform=self._norm)
        else:
            gr = self._norm(self.ret.grad(slot_ids))
        return (1.0 - r) * gg + r * gr.to(gg.device)

    def round_trips(self, slot_ids: torch.Tensor) -> torch.Tensor:
        ok = self.gen.round_trips(slot_ids)
        if isinstance(self.ret, CrossTokenizer):
            return ok & self.ret.inner_nonempty(slot_ids)
        return ok & self.ret.round_trips(slot_ids)

    def rescore(self, text: str) -> float:
        return float(self.fuse(torch.tensor(self.gen.rescore(text)), torch.tensor(self.ret.rescore(text))))

    def counters(self) -> dict[str, int]:
        a, b = self.gen.counters(), self.ret.counters()
        return {k: a[k] + b[k] for k in a}


# ---------------------------------------------------------------------------------------------- ranking
def retrieval_rank(encoder: ModelAdapter, query: str | Sequence[str], documents: Sequence[str], *,
                   tie: float = 1e-6) -> list[int] | list[list[int]]:
    """Rank of each document for the query by cosine of the encoder's sentence embeddings (1 = best). Scores
    within ``tie`` of each other tie (fp32 cosines of identical passages can differ in the last bits between
    batched and single matrix products) and share the better rank. A list of queries gives one list of ranks
    per query.

    Args:
        encoder: a sentence-encoder adapter.
        query: the query (or several).
        documents: the passages to rank.
        tie: score difference below which two documents tie.

    Examples:
        >>> import tokensmith as ts                                          # doctest: +SKIP
        >>> retrieval_rank(ts.tiny("bert"), "paris", ["paris", "paris"])    # doctest: +SKIP
        [1, 1]
    """
    if not documents:
        raise ValueError("no documents to rank")
    many = not isinstance(query, str)
    q = _query_matrix(encoder, query, "query")
    d = _query_matrix(encoder, list(documents), "document")
    s = q @ d.T  # [Q, D]
    ranks = 1 + (s[:, None, :] > s[:, :, None] + tie).sum(-1)
    out = [[int(x) for x in row] for row in ranks]
    return out if many else out[0]
