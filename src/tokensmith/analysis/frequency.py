"""Loss by token frequency: per-token cross-entropy grouped into frequency buckets, and its slope.

A language model's next-token loss is an average over a heavy-tailed (Zipfian) token distribution, so it
is dominated by the few frequent types and says little about the many rare ones. Kunstner et al. (2024,
*Heavy-Tailed Class Imbalance and Why Adam Outperforms Gradient Descent on Language Models*, Fig. 1) sort
the classes by frequency, group them into bins of equal total frequency and follow the training loss of
each bin; Pinto, Galanti & Balestriero (2024, *The Fair Language Model Paradox*) compare such per-frequency
losses across weight-decay settings (regularisation hurts the rare tokens most); Diehl Martinez et al.
(2024, *Mitigating Frequency Bias and Anisotropy in Language Model Pre-Training with Syntactic Smoothing*)
quantify a model's frequency bias from how its behaviour depends on token frequency. This module computes
the per-bucket curves for one or several models (checkpoints of a run, models of a sweep) on one corpus,
and one slope per model in the spirit of the last paper (not its exact metric):

1. for every predicting position ``t`` of every text, the per-token loss
   ``ℓ_t = −log p_θ(x_{t+1} | x_{≤t})`` (``adapter.token_logprobs``: the LM head runs only at scored
   positions, chunked, never ``B×T×V``);
2. a frequency ``f(v)`` per vocabulary entry: the corpus' own counts of the predicted tokens
   (``"corpus"``), the tokenizer's BPE merge rank as a proxy (``"merge_order"``,
   :func:`merge_order_frequencies`), or counts you give (e.g. of the training set);
3. a bucket ``b(v)`` per token, bucket 0 the rarest: ``scheme="equal_mass"``
   (:func:`tokensmith.optimization.training.frequency_buckets`: tokens sorted by frequency, boundaries
   where the cumulative mass crosses ``j/n``, so each bucket holds about ``1/n`` of the mass — of the
   scored tokens with ``"corpus"``, of your counts with a tensor; merge ranks are no counts, so with
   ``"merge_order"`` tokens are ordered by rank and the mass is the corpus' scored tokens), or
   ``scheme="log_bins"``: ``n`` equal-width bins of ``log f`` between the rarest and the most frequent
   predicted type;
4. per (model, bucket ``B``): ``mean_loss = (1/N_B) Σ_{t: b(x_{t+1}) = B} ℓ_t`` and its standard error
   ``sem = s_B/√N_B`` (``s_B`` the sample standard deviation), accumulated in float64 without keeping the
   per-token losses.

:func:`frequency_bias` reduces a curve to two numbers per model: the token-weighted least-squares slope of
``mean_loss`` against the bucket's log-frequency midpoint ``m_B = (log f_lo + log f_hi)/2``,

    slope = Σ_B N_B (m_B − m̄)(ℓ̄_B − ℓ̄) / Σ_B N_B (m_B − m̄)²,   m̄ = Σ N_B m_B / Σ N_B  (same for ℓ̄),

(negative: rare tokens have the higher loss) and the rare-token loss gap ``ℓ̄_rarest − ℓ̄_most frequent``.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.frequency import token_loss_by_frequency
    >>> ad = ts.tiny("llama")
    >>> texts = ["the cat sat on the mat and the dog sat on the log", "a cat and a dog and a bird"]
    >>> f = token_loss_by_frequency(ad, texts, n_buckets=2, progress=False)
    >>> list(f.bucket), int(f.n_tokens.sum()) == f.meta["n_tokens"]
    ([0, 1], True)
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import iter_batches, require_lm_head

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["token_loss_by_frequency", "frequency_bias", "merge_order_frequencies", "plot_loss_by_frequency"]

SCHEMES = ("equal_mass", "log_bins")


# ------------------------------------------------------------------------------------------- frequencies
def merge_order_frequencies(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """A frequency proxy ``[V]`` (float64) from a BPE tokenizer's merge order: ``f(v) = 1/(r(v) + 1)``.

    BPE merges the most frequent pair of its training data first, so a token made by an early merge was
    frequent there. The rank ``r`` is ``0`` for the base alphabet (entries of the model vocabulary that no
    merge produces, e.g. the 256 byte symbols), ``k + 1`` for the token produced by merge ``k`` (0-based),
    and ``n_merges + 1`` for added/special tokens and ids beyond the tokenizer's model vocabulary (never
    counted by the tokenizer's training: placed after the last merge, i.e. rarest). ``f`` is strictly
    decreasing in the rank, so any bucketing by ``f`` is monotone in merge order.

    Args:
        tokenizer: a fast (``tokenizers``-backed) HF tokenizer whose model is BPE.
        vocab_size: length of the result (default ``len(tokenizer)``); ids past the tokenizer are rarest.

    Raises:
        ValueError: the tokenizer has no ``tokenizers`` backend, or its model has no merges (WordPiece,
            Unigram, WordLevel): use ``frequencies="corpus"`` or give a ``[V]`` tensor of counts.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> f = merge_order_frequencies(ad.tokenizer)
        >>> ids = ad.tokenizer.convert_tokens_to_ids(["t", "Ġt", "Ġthe"])    # base, merge 0, a later merge
        >>> bool(f[ids[0]] > f[ids[1]] > f[ids[2]])
        True
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "frequencies='merge_order' reads the BPE merges of a fast (tokenizers-backed) tokenizer, and "
            f"this {type(tokenizer).__name__} has none: load the fast tokenizer, or use frequencies='corpus' "
            "or a [V] tensor of counts"
        )
    model = json.loads(backend.to_str()).get("model", {})
    merges = model.get("merges") or []
    if not merges:
        raise ValueError(
            f"frequencies='merge_order' needs a BPE tokenizer with merges; this one is {model.get('type')!r} "
            "(no merge ranks): use frequencies='corpus' (the corpus' own counts) or pass a [V] tensor of "
            "counts"
        )
    vocab: dict[str, int] = model.get("vocab", {})
    V = int(vocab_size) if vocab_size is not None else len(tokenizer)
    n_merges = len(merges)
    made_by: dict[int, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is not None:
            made_by.setdefault(int(i), k + 1)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    rank = [float(n_merges + 1)] * V
    for i in vocab.values():
        if i < V and i not in added:
            rank[i] = float(made_by.get(int(i), 0))
    return 1.0 / (torch.tensor(rank, dtype=torch.float64) + 1.0)


def _frequencies(
    frequencies: Any, counts: torch.Tensor, adapter: ModelAdapter, V: int
) -> tuple[torch.Tensor, str]:
    if isinstance(frequencies, str):
        if frequencies == "corpus":
            return counts.double(), "corpus"
        if frequencies == "merge_order":
            return merge_order_frequencies(adapter.tokenizer, V), "merge_order"
        raise ValueError(
            "frequencies must be 'corpus', 'merge_order' or a [V] tensor/array of counts, got "
            f"{frequencies!r}"
        )
    try:
        f = torch.as_tensor(np.asarray(frequencies, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(
            "frequencies must be 'corpus', 'merge_order' or a [V] tensor/array of counts, not "
            f"{type(frequencies).__name__}"
        ) from None
    n_tok = len(adapter.tokenizer)
    if f.dim() != 1 or int(f.numel()) not in (V, n_tok):
        raise ValueError(
            f"a frequency tensor must be 1-D with one count per vocabulary entry ({V} model rows or {n_tok} "
            f"tokenizer entries), got shape {tuple(f.shape)}"
        )
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ValueError("frequencies must be finite counts >= 0")
    if f.numel() < V:
        f = torch.cat([f, torch.zeros(V - f.numel(), dtype=torch.float64)])
    return f, "user"


def _equal_mass(order: torch.Tensor, mass: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """The midpoint rule of :func:`~tokensmith.optimization.training.frequency_buckets` with the ordering key
    and the mass apart: tokens sorted by ``order``, equal ``order`` values grouped, group ``g`` (mass
    ``m_g``, cumulative ``C_g``) in bucket ``min(n − 1, ⌊n·(C_g − m_g/2)/M⌋)``. With ``order == mass`` it
    is that function."""
    uniq, inv = torch.unique(order, sorted=True, return_inverse=True)
    gm = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, mass.double())
    cum = torch.cumsum(gm, 0)
    mid = (cum - gm / 2) / float(gm.sum())
    return torch.floor(mid * n_buckets).clamp(0, n_buckets - 1).long()[inv]


def _buckets(
    freq: torch.Tensor, counts: torch.Tensor, n_buckets: int, scheme: str, source: str
) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Bucket id per vocabulary entry ``[V]`` (-1: cannot be placed) and the (lo, hi) frequency range of
    each bucket (equal_mass: of the corpus' predicted types in it; log_bins: the bin edges)."""
    from tokensmith.optimization.training import frequency_buckets

    seen = counts > 0
    if scheme == "equal_mass":
        if source == "merge_order":  # ranks are no counts: equal mass of the corpus' tokens, ordered by rank
            bucket = _equal_mass(freq, counts, n_buckets)
        else:
            if float(freq.sum()) <= 0:
                raise ValueError(
                    "the frequencies are all zero: give counts with some mass, or frequencies='corpus'"
                )
            bucket = frequency_buckets(freq, n_buckets)
        empty = [j for j in range(n_buckets) if not bool(seen[bucket == j].any())]
        if empty:
            raise ValueError(
                f"equal-mass bucket(s) {empty} of {n_buckets} hold no token of the corpus (a few frequent "
                "tokens carry more than 1/n of the frequency mass, or the corpus is small): use fewer "
                "n_buckets, a larger corpus, or scheme='log_bins'"
            )
        ranges = []
        for j in range(n_buckets):
            fj = freq[(bucket == j) & seen]
            ranges.append((float(fj.min()), float(fj.max())))
        return bucket, ranges
    fs = freq[seen]
    if bool((fs <= 0).any()):
        raise ValueError(
            "scheme='log_bins' needs a positive frequency for every predicted token, and some corpus tokens "
            "have frequency 0 in the given counts: add a pseudocount (counts + 1) or use scheme='equal_mass'"
        )
    lo, hi = math.log(float(fs.min())), math.log(float(fs.max()))
    if not hi > lo:
        raise ValueError(
            "all predicted tokens have the same frequency, so log-frequency bins are undefined: use a "
            "larger, more varied corpus or scheme='equal_mass'"
        )
    edges = torch.linspace(lo, hi, n_buckets + 1, dtype=torch.float64)
    bucket = torch.full(freq.shape, -1, dtype=torch.long)
    pos = freq > 0
    x = (torch.log(freq[pos]) - lo) / (hi - lo) * n_buckets
    bucket[pos] = torch.floor(x).clamp(0, n_buckets - 1).long()
    ranges = [(math.exp(float(edges[j])), math.exp(float(edges[j + 1]))) for j in range(n_buckets)]
    return bucket, ranges


# ------------------------------------------------------------------------------------------------- models
def _model_specs(models: Any) -> list[tuple[str | None, Any]]:
    """``[(name or None, adapter | loader)]`` in order; names resolved later for lazy entries."""
    from tokensmith.models.adapter import ModelAdapter

    if isinstance(models, ModelAdapter):
        return [(None, models)]
    if isinstance(models, Mapping):
        if not models:
            raise ValueError("models is an empty dict: give at least one adapter, loader or checkpoint path")
        return [(str(k), v) for k, v in models.items()]
    if isinstance(models, (str, Path)):
        return [(str(models), models)]
    if isinstance(models, Sequence):
        if not models:
            raise ValueError("models is an empty list: give at least one adapter")
        return [(str(m) if isinstance(m, (str, Path)) else None, m) for m in models]
    raise TypeError(
        "models must be a ModelAdapter, a list of adapters, or a dict name -> adapter / loader / checkpoint "
        f"path, not {type(models).__name__}"
    )


def _resolve(entry: Any, name: str | None) -> tuple[ModelAdapter, bool]:
    """``(adapter, owned)``: ``owned`` when this function loaded it (and must release it)."""
    from tokensmith.models.adapter import ModelAdapter

    if isinstance(entry, ModelAdapter):
        return entry, False
    if isinstance(entry, (str, Path)):
        import tokensmith as ts

        return ts.load(str(entry)), True
    if callable(entry):
        ad = entry()
        if isinstance(ad, (str, Path)):
            import tokensmith as ts

            ad = ts.load(str(ad))
        if not isinstance(ad, ModelAdapter):
            raise TypeError(
                f"the loader for model {name!r} returned a {type(ad).__name__}, not a ModelAdapter"
            )
        return ad, True
    raise TypeError(
        f"model {name!r} is a {type(entry).__name__}; give a ModelAdapter, a callable returning one, or a "
        "checkpoint path"
    )


def _unique(name: str, used: set[str]) -> str:
    out, k = name, 1
    while out in used:
        k += 1
        out = f"{name}_{k}"
    used.add(out)
    return out


def _release(adapter: ModelAdapter) -> None:
    cuda = adapter.device.type == "cuda" if isinstance(adapter.device, torch.device) else False
    del adapter
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _scored_targets(cb: Any) -> torch.Tensor:
    """``[B, T]`` bool: the target positions (``x_{t+1}`` of every predicting position ``t``)."""
    tm = torch.zeros_like(cb.mask)
    tm[:, 1:] = cb.label_mask[:, :-1]
    return tm


# ---------------------------------------------------------------------------------------------- public API
def token_loss_by_frequency(
    models: Any,
    texts: Any,
    n_buckets: int = 5,
    frequencies: Any = "corpus",
    scheme: str = "equal_mass",
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> AnalysisFrame:
    """Mean next-token loss per token-frequency bucket, for one or several models (module docstring).

    Args:
        models: a ``ModelAdapter``; a list of adapters (names from ``adapter.name``, made unique with ``_2``,
            ``_3``, ...); or a dict ``name -> adapter | callable returning an adapter | checkpoint path``.
            Callables and paths (``tokensmith.load``) are loaded one at a time and released after their pass,
            so checkpoints of a run can be compared without holding them all. All models must share one
            tokenizer (``ModelAdapter.same_vocab``).
        texts: the corpus (:func:`~tokensmith.analysis.stream.as_texts`: str, list of str or ids, Dataset).
        n_buckets: number of frequency buckets ``n >= 1``; bucket 0 is the rarest.
        frequencies: ``"corpus"`` (counts of the predicted tokens of ``texts``), ``"merge_order"`` (BPE
            merge rank, :func:`merge_order_frequencies`), or a ``[V]`` tensor / array of counts (e.g. of
            the training set; tokens it never saw have frequency 0 and sit in the rarest bucket).
        scheme: ``"equal_mass"`` (each bucket ~``1/n`` of the mass: of the corpus' scored tokens for
            ``"corpus"`` and ``"merge_order"``, of the given counts for a tensor) or ``"log_bins"``
            (equal-width bins of log frequency between the rarest and the most frequent predicted type;
            empty bins give rows with ``n_tokens == 0`` and NaN loss).
        batch_size: texts per forward.
        max_length: truncate each text to this many tokens.
        progress: tqdm progress bars.

    Returns:
        ``AnalysisFrame(kind="loss_by_frequency")``, one row per (model, bucket): ``model``, ``bucket``,
        ``freq_lo``, ``freq_hi`` (equal_mass: frequency range of the corpus' types in the bucket; log_bins:
        the bin edges), ``n_types`` (distinct predicted token types), ``n_tokens`` (scored positions),
        ``mean_loss`` (nats), ``sem`` (NaN with one token). ``meta``: ``n_tokens`` (scored per model),
        ``n_texts``, ``scheme``, ``frequencies`` (source), ``models``, ``freq`` (the ``[V]`` frequencies
        used) and ``bucket_of`` (``[V]`` bucket id per token, -1 where none).

    Raises:
        ValueError: models with different tokenizers (named), a model that is not a causal LM with an LM
            head, ``n_buckets < 1`` or an unknown ``scheme``/``frequencies``, a corpus too small for the
            buckets (fewer predicted token types than ``n_buckets``, an empty equal-mass bucket),
            ``merge_order`` on a tokenizer without merges, a frequency tensor of the wrong length.
        TypeError: ``models`` or ``frequencies`` of an unsupported type.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> texts = ["the cat sat on the mat", "the dog sat on the log", "a bird on a wire"]
        >>> f = token_loss_by_frequency({"a": ad, "b": ts.tiny("qwen2")}, texts, n_buckets=2, progress=False)
        >>> f.groupby("model").n_tokens.sum().tolist() == [f.meta["n_tokens"]] * 2
        True
        >>> token_loss_by_frequency(ad, "the the the", n_buckets=3, progress=False)
        Traceback (most recent call last):
        ...
        ValueError: the corpus has 1 distinct predicted token type(s), fewer than n_buckets=3: ...
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be an int >= 1, got {n_buckets!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    from tqdm.auto import tqdm

    from tokensmith.analysis.stream import as_texts
    from tokensmith.models.adapter import ModelAdapter

    specs = _model_specs(models)
    n_texts = len(as_texts(texts))
    # adapters given as objects: compare their tokenizers before any forward
    eager = [(n if n is not None else str(e.name), e) for n, e in specs if isinstance(e, ModelAdapter)]
    for n, e in eager[1:]:
        if not e.same_vocab(eager[0][1]):
            raise ValueError(_mismatch(eager[0][0], n))
    used: set[str] = set()
    ref: Any = None  # the first model's tokenizer (the model itself may be released)
    ref_name = ""
    state: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    bar = tqdm(total=len(specs), desc="models", disable=not progress or len(specs) == 1, leave=False)
    try:
        for name, entry in specs:
            ad, owned = _resolve(entry, name)
            try:
                mname = _unique(name if name is not None else str(ad.name), used)
                if ref is None:
                    ref, ref_name = SimpleNamespace(tokenizer=ad.tokenizer), mname
                elif not ad.same_vocab(ref):
                    raise ValueError(_mismatch(ref_name, mname))
                require_lm_head(ad, "token_loss_by_frequency")
                if not state:
                    state = _prepare(ad, texts, n_buckets, frequencies, scheme, batch_size, max_length)
                elif int(ad.structure.vocab_size) != int(state["bucket_of"].numel()):
                    raise ValueError(
                        f"model {mname!r} has {ad.structure.vocab_size} output rows, not "
                        f"{state['bucket_of'].numel()} as {ref_name!r}: give models with one vocabulary"
                    )
                rows += _score(ad, mname, texts, state, n_buckets, batch_size, max_length, progress)
                names.append(mname)
            finally:
                if owned:
                    _release(ad)
                    del ad
            bar.update(1)
    finally:
        bar.close()
    meta = {
        "n_tokens": int(state["counts"].sum()),
        "n_texts": n_texts,
        "scheme": scheme,
        "frequencies": state["source"],
        "n_buckets": n_buckets,
        "models": names,
        "freq": state["freq"],
        "bucket_of": state["bucket_of"],
    }
    cols = ["model", "bucket", "freq_lo", "freq_hi", "n_types", "n_tokens", "mean_loss", "sem"]
    return make_frame(rows, "loss_by_frequency", columns=cols, **meta)


def _mismatch(a: str, b: str) -> str:
    return (
        f"models {a!r} and {b!r} have different tokenizers (ModelAdapter.same_vocab is False): losses by "
        "token frequency are only comparable over one vocabulary; compare models that share a tokenizer"
    )


def _prepare(
    ad: ModelAdapter,
    texts: Any,
    n_buckets: int,
    frequencies: Any,
    scheme: str,
    batch_size: int,
    max_length: int | None,
) -> dict[str, Any]:
    """Counts of the predicted tokens, the frequencies and the buckets (once, with the first model)."""
    V = int(ad.structure.vocab_size)
    counts = torch.zeros(V, dtype=torch.long)
    for cb in iter_batches(ad, texts, batch_size, max_length, progress=False):
        counts += torch.bincount(cb.labels[cb.label_mask], minlength=V)
    n_types = int((counts > 0).sum())
    if n_types < n_buckets:
        raise ValueError(
            f"the corpus has {n_types} distinct predicted token type(s), fewer than n_buckets={n_buckets}: "
            "give more (or longer) texts, or fewer n_buckets"
        )
    freq, source = _frequencies(frequencies, counts, ad, V)
    bucket_of, ranges = _buckets(freq, counts, n_buckets, scheme, source)
    return {"counts": counts, "freq": freq, "source": source, "bucket_of": bucket_of, "ranges": ranges}


def _score(
    ad: ModelAdapter,
    name: str,
    texts: Any,
    state: dict[str, Any],
    n_buckets: int,
    batch_size: int,
    max_length: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Float64 sums ``N_B``, ``Σℓ``, ``Σℓ²`` per bucket over one pass -> the rows of one model."""
    bucket_of, ranges, counts = state["bucket_of"], state["ranges"], state["counts"]
    n = torch.zeros(n_buckets, dtype=torch.float64)
    s1 = torch.zeros(n_buckets, dtype=torch.float64)
    s2 = torch.zeros(n_buckets, dtype=torch.float64)
    seen = torch.zeros_like(counts)
    desc = f"loss by frequency ({name})"
    for cb in iter_batches(ad, texts, batch_size, max_length, progress=progress, desc=desc):
        tm = _scored_targets(cb)
        if not bool(tm.any()):
            continue
        lp = ad.token_logprobs(cb.inputs, tm)
        tgt = cb.input_ids[tm]
        loss = -lp[tm.to(lp.device)].double().cpu()
        if not bool(torch.isfinite(loss).all()):
            raise ValueError(f"non-finite losses from model {name!r}: check its dtype/weights")
        seen += torch.bincount(tgt, minlength=seen.numel())
        b = bucket_of[tgt]
        ok = b >= 0
        n += torch.bincount(b[ok], minlength=n_buckets).double()
        s1 += torch.bincount(b[ok], weights=loss[ok], minlength=n_buckets)
        s2 += torch.bincount(b[ok], weights=loss[ok] ** 2, minlength=n_buckets)
    if not torch.equal(seen, counts):
        raise ValueError(
            f"model {name!r} tokenizes the corpus differently from the first model (same vocabulary, other "
            "encoding settings, e.g. BOS): compare models with the same tokenizer configuration"
        )
    present = counts > 0
    out = []
    for j in range(n_buckets):
        nj = int(n[j])
        mean = float(s1[j] / nj) if nj else math.nan
        if nj > 1:
            var = max(float(s2[j] - nj * mean * mean) / (nj - 1), 0.0)
            sem = math.sqrt(var / nj)
        else:
            sem = math.nan
        out.append({
            "model": name,
            "bucket": j,
            "freq_lo": ranges[j][0],
            "freq_hi": ranges[j][1],
            "n_types": int(((bucket_of == j) & present).sum()),
            "n_tokens": nj,
            "mean_loss": mean,
            "sem": sem,
        })
    return out


def frequency_bias(frame: AnalysisFrame) -> AnalysisFrame:
    """Per model: the token-weighted least-squares slope of ``mean_loss`` against the bucket's log-frequency
    midpoint ``(log freq_lo + log freq_hi)/2``, and the rare-token loss gap (module docstring).

    Buckets without tokens are ignored; a bucket whose ``freq_lo`` is 0 (tokens unseen in user-given counts)
    has no log midpoint and is left out of the slope, but counts as the rarest bucket for the gap.

    Returns:
        ``AnalysisFrame(kind="frequency_bias")``, one row per model: ``model``, ``slope`` (nats per unit of
        natural-log frequency; NaN with fewer than two buckets of distinct midpoints), ``intercept``,
        ``rare_loss`` (loss of the rarest non-empty bucket), ``frequent_loss`` (of the most frequent),
        ``rare_token_gap`` (``rare_loss − frequent_loss``), ``n_buckets`` (non-empty), ``n_tokens``.

    Raises:
        ValueError: a frame without the columns of :func:`token_loss_by_frequency`.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> texts = ["the cat sat on the mat", "the dog sat on the log", "a bird on a wire"]
        >>> f = token_loss_by_frequency(ad, texts, n_buckets=2, progress=False)
        >>> b = frequency_bias(f)
        >>> list(b.columns)[:3], b.kind
        (['model', 'slope', 'intercept'], 'frequency_bias')
    """
    need = {"model", "bucket", "freq_lo", "freq_hi", "n_tokens", "mean_loss"}
    if not need <= set(frame.columns):
        raise ValueError(
            "frequency_bias takes the frame of token_loss_by_frequency; missing columns "
            f"{sorted(need - set(frame.columns))}"
        )
    rows = []
    for model, g in frame.groupby("model", sort=False):
        g = g[g.n_tokens > 0].sort_values("bucket")
        w_all = g.n_tokens.to_numpy(dtype=np.float64)
        pos = (g.freq_lo > 0).to_numpy() & (g.freq_hi > 0).to_numpy()
        lo, hi = g.freq_lo.to_numpy(dtype=np.float64)[pos], g.freq_hi.to_numpy(dtype=np.float64)[pos]
        x = 0.5 * (np.log(lo) + np.log(hi))
        y = g.mean_loss.to_numpy(dtype=np.float64)[pos]
        w = w_all[pos]
        slope = intercept = math.nan
        if len(x) >= 2 and np.ptp(x) > 0:
            xm, ym = np.average(x, weights=w), np.average(y, weights=w)
            slope = float(np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2))
            intercept = float(ym - slope * xm)
        ys = g.mean_loss.to_numpy(dtype=np.float64)
        rare, freq = (float(ys[0]), float(ys[-1])) if len(ys) else (math.nan, math.nan)
        rows.append({
            "model": model,
            "slope": slope,
            "intercept": intercept,
            "rare_loss": rare,
            "frequent_loss": freq,
            "rare_token_gap": rare - freq,
            "n_buckets": int(len(g)),
            "n_tokens": int(w_all.sum()),
        })
    meta = {k: v for k, v in getattr(frame, "meta", {}).items() if k in ("scheme", "frequencies", "n_tokens")}
    return make_frame(rows, "frequency_bias", **meta)


@register_plot("loss_by_frequency")
def plot_loss_by_frequency(frame: AnalysisFrame, ax: Any = None, **kw: Any) -> Any:
    """Mean loss against the bucket's frequency (geometric midpoint, log axis), one line per model, with
    ``±sem`` error bars."""
    plt = require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=kw.pop("figsize", (6, 4)))
    for model, g in frame.groupby("model", sort=False):
        g = g[g.n_tokens > 0].sort_values("bucket")
        lo, hi = g.freq_lo.to_numpy(dtype=np.float64), g.freq_hi.to_numpy(dtype=np.float64)
        x = np.where(lo > 0, np.sqrt(np.clip(lo, 1e-300, None) * hi), hi / 2)
        ax.errorbar(x, g.mean_loss, yerr=g["sem"].fillna(0.0), marker="o", capsize=3, label=str(model), **kw)
    ax.set_xscale("log")
    src = getattr(frame, "meta", {}).get("frequencies", "")
    ax.set_xlabel(f"token frequency ({src})" if src else "token frequency")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title("loss by token frequency")
    ax.legend()
    return ax

