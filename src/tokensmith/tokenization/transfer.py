"""Vocabulary transfer: move a model onto a new tokenizer by initialising its embedding rows (METHODS.md
TOK-9, TOK-10), and bits-per-byte to compare models across tokenizers.

Every new token ``t`` (bytes from :class:`~tokensmith.tokenization.view.TokenizerView`, never decoded
strings) gets a row in the input embedding ``E`` (and in an untied output head ``W``):

- **specials** by identical string (``<|im_start|>`` in both vocabularies), else by role (BOS, EOS, PAD,
  UNK of the new tokenizer take the old tokenizer's row for the same role, in that order); other specials:
  the mean row;
- **shared tokens** ``S`` (identical bytes in both vocabularies, so ``Ġhello`` and ``▁hello`` match) are
  copied exactly;
- every other token by ``method``:

  ``"fvt"`` (Fast Vocabulary Transfer, the ZeTT baseline): ``E'[t] = mean_{p ∈ τ_old(t)} E[p]``, the mean of
  the old tokenizer's pieces of t's bytes; tokens without pieces get ``N(μ, σ²)`` (per-dimension mean and
  std of the old rows, seeded).

  ``"omp"`` (Tokenizer Transplantation via Orthogonal Matching Pursuit, Goddard & Neto 2025): with a
  *donor* model that already uses the new tokenizer, express the donor's row of t as a k-sparse
  combination of the donor's rows of the shared tokens, ``D[t] ≈ Σ_j c_j D[S_j]`` (greedy OMP with
  incremental QR: pick ``j = argmax |⟨r, D[S_j]⟩| / ‖D[S_j]‖``, orthogonalise, ``r ← r − q qᵀ r``; at the end
  ``c = R⁻¹ Qᵀ y``), then apply the coefficients in the base model's space: ``E'[t] = Σ_j c_j E[S_j]``.
  Repeated with the donor's output rows for an untied head. Tokens whose donor row is zero (no
  information, e.g. a corpus donor that never saw them) fall back to FVT.

  ``"focus"`` (FOCUS-style, Dobler & de Melo 2023): a convex combination of shared tokens,
  ``E'[t] = Σ_j w_j E[S_j]``, ``w = sparsemax(cos(v_t, E[S_j])_j)``. FOCUS takes the similarity from fastText
  vectors trained on target-language text; no fastText model is available offline, so ``v_t`` is the
  old model's own FVT embedding of t (the mean of its old pieces) — a documented substitution.

  ``"random"``: ``N(μ, σ²)`` for every row (the floor); with ``copy_shared=True`` shared tokens and
  specials are copied and only the rest is random.

:func:`bits_per_byte` is the comparison: total NLL in bits over total UTF-8 bytes, which does not depend
on how the text is cut into tokens.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.tokenization.transfer import transfer_embeddings
    >>> ad = ts.tiny("llama")
    >>> new = transfer_embeddings(ad, ts.tiny("llama").tokenizer, method="fvt", progress=False)
    >>> bool((new.E == ad.E).all())   # the same tokenizer: every row copied
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokensmith.models import ModelAdapter, replace_vocabulary
from tokensmith.tokenization.view import TokenizerView

__all__ = [
    "METHODS",
    "TransferPlan",
    "bits_per_byte",
    "omp",
    "plan_transfer",
    "sparsemax",
    "transfer_embeddings",
]

METHODS = ("fvt", "omp", "focus", "random")
_ROLES = ("bos", "eos", "pad", "unk")
_NUMBER_PROBE = "In 2024, 1234567 people paid $3.14159 each; 99 or 100000 or 42."


def _as_hf_tokenizer(tok: Any) -> Any:
    """A transformers fast tokenizer for ``tok`` (a ``tokenizers.Tokenizer`` is wrapped)."""
    import tokenizers

    if isinstance(tok, tokenizers.Tokenizer):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=tok)
    if not callable(tok) or not hasattr(tok, "get_vocab") or not hasattr(tok, "backend_tokenizer"):
        raise TypeError(
            f"the new tokenizer must be a transformers fast tokenizer or a tokenizers.Tokenizer, got "
            f"{type(tok).__name__} (a tiktoken Encoding: convert it, e.g. with "
            "transformers.convert_slow_tokenizer.TikTokenConverter)"
        )
    return tok


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class TransferPlan:
    """Where every new token's row comes from.

    Attributes:
        kind: per new id, one of ``"special"`` (copied by string or role), ``"special_mean"`` (an unmatched
            special: the mean row), ``"shared"`` (identical bytes: copied), ``"decomposed"`` (has old pieces),
            ``"fallback"`` (no pieces: random).
        source: per new id, the old id copied for ``special``/``shared``, else -1.
        pieces: ``{new id: old ids of its bytes}`` for the ``decomposed`` tokens.
        shared_new: new ids of the shared tokens ``S`` (anchors), aligned with ``shared_old``.
        shared_old: old ids of the shared tokens.
        notes: warnings raised while planning (number splitting, dropped bytes).
    """

    kind: list[str]
    source: list[int]
    pieces: dict[int, list[int]]
    shared_new: list[int]
    shared_old: list[int]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many new tokens of each kind."""
        out: dict[str, int] = {}
        for k in self.kind:
            out[k] = out.get(k, 0) + 1
        return out


def _number_style(view: TokenizerView) -> str:
    from tokensmith.tokenization.metrics import digit_chunks, number_split_style

    e = view.encode(_NUMBER_PROBE)
    return str(number_split_style(digit_chunks(e.offsets, e.data))["style"])


def _old_pieces(old: TokenizerView, datas: Sequence[bytes]) -> list[list[int]]:
    """The old tokenizer's pieces of each byte string: its own encoding for valid UTF-8, the BPE merges on
    raw bytes otherwise (byte-level BPE / tiktoken), else the greedy longest-prefix cover."""
    out: list[list[int]] = [[] for _ in datas]
    texts, where = [], []
    for k, b in enumerate(datas):
        try:
            texts.append(b.decode("utf-8"))
            where.append(k)
        except UnicodeDecodeError:
            out[k] = _raw_pieces(old, b)
    specials = old.special_ids
    for k, e in zip(where, old.encode_batch(texts), strict=True):
        out[k] = [i for i in e.ids if i not in specials]
    return out


def _raw_pieces(old: TokenizerView, b: bytes) -> list[int]:
    if old.family in ("byte_bpe", "tiktoken"):
        try:
            return list(old.bpe_merge(b))
        except (KeyError, NotImplementedError):
            pass
    ids, p = [], 0
    while p < len(b):
        cand = old.prefix_tokens(b[p:])
        if not cand:
            p += 1  # a byte the old vocabulary cannot spell: skipped
            continue
        best = max(cand, key=lambda i: len(old.token_bytes(i)))
        ids.append(best)
        p += len(old.token_bytes(best))
    return ids


def plan_transfer(
    old_tokenizer: Any,
    new_tokenizer: Any,
    *,
    copy_shared: bool = True,
    views: tuple[TokenizerView, TokenizerView] | None = None,
) -> TransferPlan:
    """Decide, for every token of ``new_tokenizer``, whether its row is copied, decomposed or random.

    Args:
        old_tokenizer: the model's current tokenizer.
        new_tokenizer: the tokenizer to move to.
        copy_shared: copy specials and shared tokens (False: everything is ``fallback``, the random floor).
        views: ``(old_view, new_view)`` when already built (a view parses the whole tokenizer once).

    Examples:
        >>> import tokensmith as ts
        >>> tok = ts.tiny("llama").tokenizer
        >>> plan_transfer(tok, tok).counts()
        {'special': 17, 'shared': 49135}
    """
    new_tokenizer = _as_hf_tokenizer(new_tokenizer)
    old, new = views if views is not None else (TokenizerView(old_tokenizer), TokenizerView(new_tokenizer))
    n_new = len(new_tokenizer)
    kind = ["fallback"] * n_new
    source = [-1] * n_new
    pieces: dict[int, list[int]] = {}
    notes: list[str] = []
    if not copy_shared:
        return TransferPlan(kind, source, pieces, [], [], notes)
    old_vocab = old_tokenizer.get_vocab()
    new_specials = set(new.special_ids) | set(getattr(new_tokenizer, "all_special_ids", []) or [])
    new_specials = {i for i in new_specials if i < n_new}
    for i in sorted(new_specials):  # the identical string (an exact match), else by role
        s = new_tokenizer.convert_ids_to_tokens(i)
        if s in old_vocab:
            kind[i], source[i] = "special", int(old_vocab[s])
            continue
        for r in _ROLES:
            if getattr(new_tokenizer, f"{r}_token_id", None) == i and getattr(old_tokenizer, f"{r}_token_id", None) is not None:
                kind[i], source[i] = "special", int(getattr(old_tokenizer, f"{r}_token_id"))
                break
        else:
            kind[i] = "special_mean"
    old_specials = old.special_ids
    todo, todo_bytes = [], []
    n_old = len(old_tokenizer)
    new_pieces = new_tokenizer.convert_ids_to_tokens(list(range(n_new)))
    old_strings = old_tokenizer.convert_ids_to_tokens(list(range(n_old)))
    new_bytes = new.all_token_bytes
    for i in range(n_new):
        if i in new_specials:
            continue
        b = new_bytes[i] if i < len(new_bytes) else b""
        if not b:
            kind[i] = "special_mean"
            continue
        cands = [j for j in old.ids_of_bytes(b) if j < n_old and j not in old_specials]
        if cands:
            same = [j for j in cands if old_strings[j] == new_pieces[i]]
            kind[i], source[i] = "shared", (same or sorted(cands))[0]
        else:
            todo.append(i)
            todo_bytes.append(b)
    for i, ps in zip(todo, _old_pieces(old, todo_bytes), strict=True):
        if ps:
            kind[i], pieces[i] = "decomposed", ps
    sn = [i for i in range(n_new) if kind[i] == "shared"]
    so = [source[i] for i in sn]
    try:
        s_old, s_new = _number_style(old), _number_style(new)
        if s_old != s_new:
            notes.append(
                f"number splitting differs: the old tokenizer splits digits as {s_old!r}, the new one as {s_new!r}; "
                "transferred embeddings of numbers are unreliable (Goddard & Neto 2025 report broken arithmetic) "
                "until the model is trained on the new splits"
            )
    except Exception:  # noqa: BLE001  (the probe is a diagnostic only)
        pass
    return TransferPlan(kind, source, pieces, sn, so, notes)


# ---------------------------------------------------------------------------------------------- solvers
def omp(y: torch.Tensor, X: torch.Tensor, k: int, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched orthogonal matching pursuit with incremental QR (Pati et al. 1993; TOK-9).

    For every row ``y_b`` greedily pick ``k`` atoms (rows of ``X``) — at each step the atom most correlated
    with the residual, ``j = argmax_j |⟨r, x_j⟩| / ‖x_j‖`` — keep an orthonormal basis ``Q`` of the chosen atoms
    (Gram-Schmidt, two passes) with ``A = QR``, update ``r ← r − q qᵀ r``, and return the least-squares
    coefficients on the support, ``c = R⁻¹ Qᵀ y``.

    Args:
        y: ``[B, d]`` targets.
        X: ``[n, d]`` dictionary (atoms as rows).
        k: atoms per target (clipped to ``n``).
        batch_size: targets per chunk.

    Returns:
        ``(idx [B, k] long, coef [B, k])`` with ``y_b ≈ Σ_s coef[b, s] X[idx[b, s]]``.

    Examples:
        >>> X = torch.eye(4, dtype=torch.float64)
        >>> idx, c = omp(torch.tensor([[0.0, 2.0, 0.0, -1.0]], dtype=torch.float64), X, 2)
        >>> sorted(zip(idx[0].tolist(), c[0].tolist()))
        [(1, 2.0), (3, -1.0)]
    """
    if y.dim() != 2 or X.dim() != 2 or y.shape[1] != X.shape[1]:
        raise ValueError(f"omp needs y [B, d] and X [n, d] with the same d, got {tuple(y.shape)} and {tuple(X.shape)}")
    n, d = X.shape
    k = max(1, min(int(k), n))
    norms = X.norm(dim=1)
    Xn = X / norms.clamp_min(torch.finfo(X.dtype).tiny)[:, None]
    dead = norms == 0
    idx_all, coef_all = [], []
    for s0 in range(0, y.shape[0], batch_size):
        Y = y[s0 : s0 + batch_size]
        B = Y.shape[0]
        r = Y.clone()
        Q = torch.zeros(B, d, k, dtype=X.dtype, device=X.device)
        R = torch.zeros(B, k, k, dtype=X.dtype, device=X.device)
        idx = torch.zeros(B, k, dtype=torch.long, device=X.device)
        used = dead.expand(B, n).clone()
        rows = torch.arange(B, device=X.device)
        for s in range(k):
            corr = (r @ Xn.T).abs().masked_fill(used, -1.0)
            j = corr.argmax(1)
            idx[:, s] = j
            used[rows, j] = True
            a = X[j]
            q = a.clone()
            for _ in range(2):  # re-orthogonalise once (classical Gram-Schmidt is unstable alone)
                if s:
                    h = torch.einsum("bds,bd->bs", Q[:, :, :s], q)
                    q = q - torch.einsum("bds,bs->bd", Q[:, :, :s], h)
                    R[:, :s, s] += h
            nq = q.norm(dim=1)
            ok = nq > 1e3 * torch.finfo(X.dtype).eps * a.norm(dim=1).clamp_min(torch.finfo(X.dtype).tiny)
            R[:, s, s] = torch.where(ok, nq, torch.ones_like(nq))  # a dependent atom gets coefficient 0
            q = torch.where(ok[:, None], q / nq.clamp_min(torch.finfo(X.dtype).tiny)[:, None], torch.zeros_like(q))
            Q[:, :, s] = q
            r = r - (q * r).sum(1, keepdim=True) * q
        z = torch.einsum("bds,bd->bs", Q, Y)
        c = torch.linalg.solve_triangular(R, z[:, :, None], upper=True)[:, :, 0]
        idx_all.append(idx)
        coef_all.append(c)
    return torch.cat(idx_all), torch.cat(coef_all)


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo 2016): the Euclidean projection of ``z`` onto the probability simplex,
    ``p = max(z − τ, 0)`` with ``τ`` such that ``Σ p = 1`` (``τ = (Σ_{j≤k} z_(j) − 1)/k`` for the largest ``k`` with
    ``1 + k z_(k) > Σ_{j≤k} z_(j)``, ``z_(j)`` sorted descending).

    Examples:
        >>> sparsemax(torch.tensor([2.0, 1.0, -1.0])).tolist()
        [1.0, 0.0, 0.0]
        >>> [round(x, 4) for x in sparsemax(torch.tensor([0.5, 0.3, 0.1])).tolist()]
        [0.5333, 0.3333, 0.1333]
    """
    z = z.transpose(dim, -1)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    cs = zs.cumsum(-1)
    support = 1 + ks * zs > cs
    kz = support.sum(-1, keepdim=True)
    tau = (cs.gather(-1, kz - 1) - 1) / kz.to(z.dtype)
    return torch.clamp(z - tau, min=0).transpose(dim, -1)


# ---------------------------------------------------------------------------------------------- transfer
def _gaussian(W: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    mu, sd = W.mean(0), W.std(0)
    return mu + sd * torch.randn(n, W.shape[1], generator=gen, dtype=W.dtype)


def _donor_matrices(donor: Any, new_tokenizer: Any, n_new: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if donor is None:
        raise ValueError(
            "method='omp' needs donor=: a ModelAdapter that uses the new tokenizer, or its [V_new, d_donor] input "
            "embedding matrix (optionally a tuple (E_in, E_out) for an untied head)"
        )
    if isinstance(donor, ModelAdapter):
        if donor.tokenizer.get_vocab() != new_tokenizer.get_vocab():
            raise ValueError("the donor's tokenizer differs from new_tokenizer: OMP needs a donor with the new vocabulary")
        D_in = donor.E.detach()[:n_new].double().cpu()
        D_out = None if donor.tied or donor.structure.lm_head is None else donor.W_U.detach()[:n_new].double().cpu()
        return D_in, D_out
    if isinstance(donor, (tuple, list)):
        D_in, D_out = donor
    else:
        D_in, D_out = donor, None
    D_in = torch.as_tensor(D_in).double().cpu()
    D_out = None if D_out is None else torch.as_tensor(D_out).double().cpu()
    for name, D in (("donor E_in", D_in), ("donor E_out", D_out)):
        if D is not None and (D.dim() != 2 or D.shape[0] < n_new or not torch.isfinite(D).all()):
            raise ValueError(f"{name} must be a finite [V_new={n_new}, d] matrix, got {tuple(D.shape)}")
    return D_in[:n_new], None if D_out is None else D_out[:n_new]


def _fvt_rows(W: torch.Tensor, pieces: dict[int, list[int]], ids: list[int]) -> torch.Tensor:
    flat = torch.tensor([p for i in ids for p in pieces[i]], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(pieces[i]) for i in ids]))
    out = torch.zeros(len(ids), W.shape[1], dtype=W.dtype).index_add_(0, owner, W[flat])
    return out / torch.tensor([len(pieces[i]) for i in ids], dtype=W.dtype)[:, None]


def _omp_rows(D: torch.Tensor, W_old: torch.Tensor, plan: TransferPlan, ids: list[int], k: int, progress: bool,
              desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP rows for ``ids`` and a mask of the ids that had donor information."""
    from tqdm.auto import tqdm

    anchors = torch.tensor(plan.shared_new, dtype=torch.long)
    anchors_old = torch.tensor(plan.shared_old, dtype=torch.long)
    live = D[anchors].norm(dim=1) > 0
    anchors, anchors_old = anchors[live], anchors_old[live]
    X = D[anchors]
    tid = torch.tensor(ids, dtype=torch.long)
    has = D[tid].norm(dim=1) > 0 if len(ids) else torch.zeros(0, dtype=torch.bool)
    out = torch.zeros(len(ids), W_old.shape[1], dtype=torch.float64)
    if X.shape[0] == 0 or not bool(has.any()):
        return out, torch.zeros(len(ids), dtype=torch.bool)
    todo = torch.nonzero(has).flatten()
    chunk = 256
    for s in tqdm(range(0, todo.numel(), chunk), desc=desc, disable=not progress, leave=False):
        sel = todo[s : s + chunk]
        idx, c = omp(D[tid[sel]], X, k, batch_size=chunk)
        out[sel] = torch.einsum("bk,bkd->bd", c, W_old[anchors_old[idx]])
    return out, has


def _focus_rows(W_old: torch.Tensor, E_old: torch.Tensor, plan: TransferPlan, ids: list[int], progress: bool,
                top: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """FOCUS-style rows for decomposed ``ids``: sparsemax over cos(FVT vector, old rows of S); ``W_old`` gets the
    weights (the input or the output matrix), the similarity always uses the input embeddings ``E_old``.

    Sparsemax's support is a top set of its inputs, so it is computed on the ``top`` largest similarities of
    each row: exact whenever the support is smaller than ``top`` (rows whose support fills it are redone over
    all shared tokens)."""
    from tqdm.auto import tqdm

    So = torch.tensor(plan.shared_old, dtype=torch.long)
    A = torch.nn.functional.normalize(E_old[So], dim=1).float()
    v = torch.nn.functional.normalize(_fvt_rows(E_old, plan.pieces, ids), dim=1).float()
    WS = W_old[So]
    out = torch.zeros(len(ids), W_old.shape[1], dtype=torch.float64)
    m = min(top, So.numel())
    chunk = 512
    for s in tqdm(range(0, len(ids), chunk), desc="focus", disable=not progress, leave=False):
        sims = v[s : s + chunk] @ A.T
        val, idx = sims.topk(m, dim=1)
        w = sparsemax(val.double())
        full = (w > 0).sum(1) >= m
        if bool(full.any()) and m < So.numel():
            wf = sparsemax(sims[full].double())
            out[s : s + chunk][full] = wf @ WS
        part = ~full if m < So.numel() else torch.ones_like(full)
        out[s : s + chunk][part] = torch.einsum("bm,bmd->bd", w[part], WS[idx[part]])
    return out, torch.ones(len(ids), dtype=torch.bool)


def transfer_embeddings(
    adapter: ModelAdapter,
    new_tokenizer: Any,
    method: str = "fvt",
    *,
    donor: Any = None,
    k: int = 64,
    seed: int = 0,
    copy_shared: bool | None = None,
    validate: bool = True,
    views: tuple[TokenizerView, TokenizerView] | None = None,
    progress: bool = True,
) -> ModelAdapter:
    """A copy of ``adapter``'s model moved onto ``new_tokenizer``, with embedding rows by ``method``.

    See the module docstring for the equations of ``"fvt"``, ``"omp"``, ``"focus"`` and ``"random"``. The
    original adapter is not changed. The returned adapter carries ``transfer_plan`` (a
    :class:`TransferPlan`: which rows were copied, decomposed or random).

    Args:
        adapter: the base model (a causal or masked LM with an embedding matrix).
        new_tokenizer: a transformers fast tokenizer or a ``tokenizers.Tokenizer``.
        method: ``"fvt"``, ``"omp"``, ``"focus"`` or ``"random"``.
        donor: for ``"omp"``: a ModelAdapter using ``new_tokenizer``, or its ``[V_new, d_donor]`` embedding
            matrix, or ``(E_in, E_out)`` for an untied donor head (default: the input coefficients are reused
            for the head).
        k: OMP sparsity (atoms per token).
        seed: seeds the ``N(μ, σ²)`` rows (a private ``torch.Generator``).
        copy_shared: copy specials and shared tokens; default True except for ``"random"``.
        validate: run the new adapter's load-time self-check.
        views: ``(view of adapter.tokenizer, view of new_tokenizer)`` when already built.
        progress: show tqdm bars.

    Raises:
        ValueError: unknown method, ``"omp"`` without a valid donor.
        TypeError: a new tokenizer that is not a fast HF / ``tokenizers`` tokenizer.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("gpt2")
        >>> new = transfer_embeddings(ad, ts.tiny("gpt2").tokenizer, method="random", progress=False)
        >>> new.E.shape == ad.E.shape and not torch.equal(new.E, ad.E)
        True
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    new_tokenizer = _as_hf_tokenizer(new_tokenizer)
    n_new = len(new_tokenizer)
    if copy_shared is None:
        copy_shared = method != "random"
    D_in = D_out = None
    if method == "omp":
        D_in, D_out = _donor_matrices(donor, new_tokenizer, n_new)
    plan = plan_transfer(adapter.tokenizer, new_tokenizer, copy_shared=copy_shared, views=views)
    for note in plan.notes:
        warnings.warn(note, stacklevel=2)
    gen = torch.Generator().manual_seed(int(seed))
    E_old = adapter.E.detach().double().cpu()
    untied = not adapter.tied and adapter.structure.lm_head is not None
    W_old = adapter.W_U.detach().double().cpu() if untied else None
    n_old_real = len(adapter.tokenizer)
    mats = [("in", E_old)] + ([("out", W_old)] if W_old is not None else [])
    rows: dict[str, torch.Tensor] = {}
    kinds = plan.kind
    copy_ids = [i for i in range(n_new) if kinds[i] in ("special", "shared")]
    mean_ids = [i for i in range(n_new) if kinds[i] == "special_mean"]
    dec_ids = [i for i in range(n_new) if kinds[i] == "decomposed"]
    fb_ids = [i for i in range(n_new) if kinds[i] == "fallback"]
    for name, W in mats:
        assert W is not None
        Wr = W[:n_old_real]
        R = torch.zeros(n_new, W.shape[1], dtype=torch.float64)
        if copy_ids:
            R[copy_ids] = W[torch.tensor([plan.source[i] for i in copy_ids])]
        if mean_ids:
            R[mean_ids] = Wr.mean(0)
        extra_fb: list[int] = []
        if dec_ids:
            if method == "fvt" or (method == "random" and copy_shared):
                R[dec_ids] = _fvt_rows(W, plan.pieces, dec_ids) if method == "fvt" else _gaussian(Wr, len(dec_ids), gen)
            elif method == "focus":
                R[dec_ids] = _focus_rows(W, E_old, plan, dec_ids, progress)[0]
            elif method == "omp":
                D = D_out if (name == "out" and D_out is not None) else D_in
                assert D is not None
                vals, has = _omp_rows(D, W, plan, dec_ids, k, progress, f"omp ({name})")
                ids_t = torch.tensor(dec_ids)
                R[ids_t[has]] = vals[has]
                if not bool(has.all()):
                    R[ids_t[~has]] = _fvt_rows(W, plan.pieces, ids_t[~has].tolist())
        extra_fb += fb_ids
        if extra_fb:
            R[extra_fb] = _gaussian(Wr, len(extra_fb), gen)
        rows[name] = R
    new = replace_vocabulary(adapter, new_tokenizer, rows["in"], rows.get("out"), name=f"{adapter.name}->{method}",
                             validate=validate)
    new.transfer_plan = plan  # type: ignore[attr-defined]
    return new


# ---------------------------------------------------------------------------------------------- evaluation
def bits_per_byte(
    adapter: ModelAdapter,
    texts: Sequence[str],
    *,
    context_token: int | None = None,
    batch_size: int = 8,
    view: TokenizerView | None = None,
    progress: bool = True,
) -> float:
    """Bits per UTF-8 byte of ``texts`` under a causal LM: ``bpb = −Σ_texts Σ_t log₂ p(x_t | x_<t) / Σ_texts |text|_bytes``.

    Every token of a text is scored after one context token (the tokenizer's BOS, else its EOS, as a document
    separator), so the first token is predicted too; the sum does not depend on the tokenizer's segmentation
    being long or short, which makes models with different tokenizers comparable. Texts are encoded through
    :class:`~tokensmith.tokenization.view.TokenizerView` (special-token strings stay text).

    Args:
        adapter: a causal LM.
        texts: the held-out texts (non-empty list; empty strings add nothing).
        context_token: the id to condition on (default BOS, else EOS).
        batch_size: texts per forward (left-padded; a padded batch equals its rows one at a time).
        view: the tokenizer's :class:`TokenizerView` when already built.
        progress: show a tqdm bar.

    Raises:
        ValueError: for an empty corpus, a model that is not a causal LM, or no BOS/EOS and no ``context_token``.

    Examples:
        >>> import tokensmith as ts
        >>> bpb = bits_per_byte(ts.tiny("llama"), ["Hello world."], progress=False)
        >>> 0.0 < bpb < 16.0   # a random tiny model: about log2(49152) bits per ~4-byte token
        True
    """
    from tqdm.auto import tqdm

    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts or not any(texts):
        raise ValueError("bits_per_byte needs at least one non-empty text")
    if not adapter.is_causal or adapter.structure.lm_head is None:
        raise ValueError(f"bits_per_byte needs a causal LM with an LM head; {adapter.name!r} is not one")
    tok = adapter.tokenizer
    ctx = context_token
    if ctx is None:
        ctx = getattr(tok, "bos_token_id", None)
        if ctx is None:
            ctx = getattr(tok, "eos_token_id", None)
    if ctx is None:
        raise ValueError("the tokenizer has neither BOS nor EOS: pass context_token= (the id to condition on)")
    view = view if view is not None else TokenizerView(tok)
    encs = view.encode_batch(texts)
    total_bytes = sum(len(e.data) for e in encs)
    dropped = sum(len(e.data) - len(view.decode_bytes(e.ids)) for e in encs)
    if dropped:
        warnings.warn(
            f"the tokenizer drops {dropped} of {total_bytes} bytes it has no token for (view.missing_bytes); they "
            "are counted in the denominator but cost no bits", stacklevel=2,
        )
    seqs = [[int(ctx)] + list(e.ids) for e in encs if e.ids]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = adapter.pad_token_id
    nll = 0.0
    for s in tqdm(range(0, len(order), batch_size), desc="bits/byte", disable=not progress, leave=False):
        group = [seqs[i] for i in order[s : s + batch_size]]
        T = max(len(g) for g in group)
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        am = torch.zeros(len(group), T, dtype=torch.long)
        tm = torch.zeros(len(group), T, dtype=torch.bool)
        for b, g in enumerate(group):
            ids[b, T - len(g):] = torch.tensor(g)
            am[b, T - len(g):] = 1
            tm[b, T - len(g) + 1:] = True
        lp = adapter.token_logprobs({"input_ids": ids, "attention_mask": am}, tm)
        nll -= float(lp.double().sum())
    return nll / math.log(2) / total_bytes
