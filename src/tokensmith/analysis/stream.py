"""Streaming over a corpus: batches of texts -> per-layer hidden states of the real tokens -> small reducers.

The diagnostics of :mod:`tokensmith.analysis` never hold every hidden state of a corpus. They iterate
:func:`stream_hidden`, which encodes the texts a batch at a time (left-padded, each row exactly as alone),
runs one forward with ``adapter.hooks(cache=...)`` on the requested layers only (stopping the forward after
the deepest one when nothing later is needed) and yields the hidden states of that batch; each diagnostic
folds them into fixed-size statistics:

- :class:`Moments`: ``n``, ``Σx`` and ``Σxxᵀ`` in float64 -> mean, covariance (effective rank, whitening,
  linear maps between layers, ridge probes). Sums are exact enough in float64 that the streamed result
  equals the all-in-memory one to ~1e-12 relative, whatever the batch size.
- :class:`TokenSample`: a uniform random sample of at most ``k`` tokens of the whole stream (priority
  sampling: each token draws a key from a seeded generator, the ``k`` smallest keys are kept), the same
  tokens in every layer, for statistics that need points (TwoNN, k-NN overlap). When the corpus has at most
  ``k`` tokens every token is kept, in stream order, so the result equals the all-in-memory computation.

**Layers** are hidden-state depths, HF's ``output_hidden_states`` convention: ``0`` is the input of block 0
(token + position embeddings, ``layers.0.resid_pre``), ``ℓ`` the output of block ``ℓ − 1``
(``layers.{ℓ-1}.resid_post``), ``L`` = the number of blocks; negative values count from ``L``. Unlike HF's
last hidden state, depth ``L`` is *before* the final norm (``adapter.unembed`` applies it).

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.stream import Moments, resolve_layers, stream_hidden
    >>> ad = ts.tiny("llama")
    >>> resolve_layers(ad, None), resolve_layers(ad, [-1])
    ([0, 1, 2], [2])
    >>> m = Moments()
    >>> for hb in stream_hidden(ad, ["Hello world", "A longer second text"], layers=[2], progress=False):
    ...     _ = m.update(hb.tokens(2))
    >>> m.n == sum(len(ad.encode(t).input_ids) for t in ["Hello world", "A longer second text"])
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "CorpusBatch",
    "HiddenBatch",
    "Moments",
    "TokenSample",
    "as_texts",
    "hook_name",
    "iter_batches",
    "logit_chunks",
    "require_lm_head",
    "resolve_layers",
    "stream_hidden",
]


# ----------------------------------------------------------------------------------------------- inputs
def as_texts(data: Any, column: str = "text") -> list[Any]:
    """A list of examples from a str, a list of str, a list of token-id lists / 1-D tensors, a ``[N, T]`` id
    tensor, or a ``datasets.Dataset`` (its ``column``).

    Raises:
        ValueError: no texts, an empty text, or a Dataset without ``column``.
        TypeError: anything else.
    """
    if isinstance(data, str):
        items: list[Any] = [data]
    elif isinstance(data, torch.Tensor):
        if data.dtype not in (torch.long, torch.int32, torch.int64) or data.dim() not in (1, 2):
            raise TypeError("a tensor corpus must hold integer token ids, shape [T] or [N, T]")
        items = [data] if data.dim() == 1 else list(data)
    elif hasattr(data, "column_names") and hasattr(data, "__getitem__"):  # datasets.Dataset
        if column not in data.column_names:
            raise ValueError(
                f"the dataset has no column {column!r} (columns: {data.column_names}); pass column='<text column>'"
            )
        items = list(data[column])
    elif isinstance(data, Iterable):
        items = list(data)
    else:
        raise TypeError(f"texts must be a str, a list of str or token ids, or a datasets.Dataset, not "
                        f"{type(data).__name__}")
    if not items:
        raise ValueError("the corpus is empty: give at least one text")
    for i, x in enumerate(items):
        if isinstance(x, str):
            if not x.strip():
                raise ValueError(f"text {i} is empty (or whitespace only): drop it or give real text")
        elif isinstance(x, torch.Tensor):
            if x.numel() == 0:
                raise ValueError(f"example {i} has no token ids")
        elif isinstance(x, Sequence) and all(isinstance(v, int) for v in x):
            if len(x) == 0:
                raise ValueError(f"example {i} has no token ids")
        else:
            raise TypeError(f"example {i} is a {type(x).__name__}; give str or a list of token ids")
    return items


def resolve_layers(adapter: ModelAdapter, layers: Any) -> list[int]:
    """Hidden-state depths (module docstring): None -> ``[0, ..., L]``; ints in ``[-(L+1), L]``, sorted, unique.

    Raises:
        ValueError: a depth out of range or not an int.
    """
    L = int(adapter.structure.num_layers)
    if layers is None:
        return list(range(L + 1))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = set()
    for x in layers:
        if not isinstance(x, int) or isinstance(x, bool) or not -(L + 1) <= x <= L:
            raise ValueError(
                f"layers are hidden-state depths in [0, {L}] (0 = embeddings, l = output of block l-1, as HF's "
                f"hidden_states; negative counts from the end) for {adapter.name!r} with {L} blocks; got {x!r}"
            )
        out.add(x % (L + 1))
    if not out:
        raise ValueError("layers is empty: give at least one depth, or None for all")
    return sorted(out)


def hook_name(depth: int) -> str:
    """The canonical hook holding hidden-state depth ``depth``."""
    return "layers.0.resid_pre" if depth == 0 else f"layers.{depth - 1}.resid_post"


def require_lm_head(adapter: ModelAdapter, what: str, causal: bool = True) -> None:
    """Raise a ValueError saying what to do when ``adapter`` has no LM head (or, with ``causal``, is not a
    causal LM) but ``what`` needs one."""
    if adapter.structure.lm_head is None:
        raise ValueError(
            f"{what} reads hidden states through the LM head, and {adapter.name!r} has none: load the model with "
            "its language-modelling head (e.g. AutoModelForCausalLM / AutoModelForMaskedLM)"
        )
    if causal and not adapter.is_causal:
        raise ValueError(
            f"{what} needs next-token predictions of a causal LM; {adapter.name!r} is an encoder (its head predicts "
            "masked tokens): use a causal LM"
        )


def logit_chunks(adapter: ModelAdapter, h: torch.Tensor, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, logits)`` for ``h`` ``[N, d]`` (hidden states before the final norm) ``chunk`` rows at a time:
    ``adapter.unembed`` (final norm, head, logit scale, soft-capping), float32 on CPU. Never ``[N, V]`` at once."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.no_grad():
        for s in range(0, int(h.shape[0]), chunk):
            z = adapter.unembed(h[s : s + chunk].to(device=adapter.device, dtype=adapter.dtype))
            yield s, z.float().cpu()


# ----------------------------------------------------------------------------------------------- batches
@dataclass
class CorpusBatch:
    """One batch of the corpus, left-padded.

    Attributes:
        input_ids: ``[B, T]``.
        mask: ``[B, T]`` bool, the real tokens.
        labels: ``[B, T]`` the next real token of each position (``-100`` at a row's last token and on padding).
        index: the corpus index of each row.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    index: list[int]

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The dict to pass to ``adapter.forward`` (positions are derived from the mask)."""
        return {"input_ids": self.input_ids, "attention_mask": self.mask.long()}

    @property
    def label_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: positions that predict a real next token."""
        return self.labels != -100


def _encode_ids(adapter: ModelAdapter, x: Any, max_length: int | None) -> list[int]:
    if isinstance(x, str):
        ids = adapter.encode(x).input_ids.tolist()
    elif isinstance(x, torch.Tensor):
        ids = x.flatten().tolist()
    else:
        ids = list(x)
    if max_length is not None:
        ids = ids[:max_length]
    V = int(adapter.model.get_input_embeddings().weight.shape[0])
    if any(not 0 <= i < V for i in ids):
        raise ValueError(f"token ids must be in [0, {V}) for {adapter.name!r}")
    return ids


def iter_batches(
    adapter: ModelAdapter,
    texts: Any,
    batch_size: int = 8,
    max_length: int | None = None,
    column: str = "text",
    progress: bool = True,
    desc: str = "analysis",
) -> Iterator[CorpusBatch]:
    """Encode ``texts`` (:func:`as_texts`) ``batch_size`` at a time with ``adapter.encode`` (the adapter's own
    special tokens), truncate each to ``max_length`` tokens, left-pad, and yield :class:`CorpusBatch` es.

    Raises:
        ValueError: ``batch_size < 1``, ``max_length < 1``, an empty corpus or text, ids out of the vocabulary.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 (or None), got {max_length}")
    items = as_texts(texts, column)
    from tqdm.auto import tqdm

    pad = adapter.pad_token_id
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        for s in range(0, len(items), batch_size):
            rows = [_encode_ids(adapter, x, max_length) for x in items[s : s + batch_size]]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.bool)
            labels = torch.full((len(rows), T), -100, dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r)
                ids[b, T - n :] = torch.tensor(r)
                mask[b, T - n :] = True
                if n > 1:
                    labels[b, T - n : T - 1] = torch.tensor(r[1:])
            bar.update(len(rows))
            yield CorpusBatch(ids, mask, labels, list(range(s, s + len(rows))))
    finally:
        bar.close()


@dataclass
class HiddenBatch(CorpusBatch):
    """A :class:`CorpusBatch` with the hidden states of the requested depths (``[B, T, d]`` float32, CPU)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def tokens(self, depth: int, where: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, d]``: the hidden states at ``depth`` of the real tokens (or of ``where``, a ``[B, T]`` mask), in
        row-major order."""
        m = self.mask if where is None else where
        return self.hidden[depth][m]


def stream_hidden(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    column: str = "text",
    progress: bool = True,
    desc: str = "hidden states",
) -> Iterator[HiddenBatch]:
    """Yield :class:`HiddenBatch` es with the hidden states of ``layers`` (depths, module docstring).

    One forward per batch under ``adapter.hooks(cache=...)`` on those layers only; the forward stops after the
    deepest requested layer (``stop_after``), so asking for early layers costs only those layers.
    """
    depths = resolve_layers(adapter, layers)
    names = {d: hook_name(d) for d in depths}
    deepest = names[max(depths)]
    for cb in iter_batches(adapter, texts, batch_size, max_length, column, progress, desc):
        with torch.no_grad(), adapter.hooks(cache=sorted(set(names.values())), stop_after=deepest) as h:
            adapter.forward(cb.inputs)
        hidden = {d: h.cache[n].detach().float().cpu() for d, n in names.items()}
        yield HiddenBatch(cb.input_ids, cb.mask, cb.labels, cb.index, hidden)
        del hidden, h  # drop this batch's states before the next forward: peak = one batch, not two


# ----------------------------------------------------------------------------------------------- reducers
class Moments:
    """Streaming first and second moments of row vectors, in float64.

    ``update(x)`` with ``x`` ``[N, d]``; then ``n``, ``mean`` ``[d]``, ``second`` (``Σxxᵀ/n``) and ``cov``
    (population covariance, ``Σ(x-μ)(x-μ)ᵀ/n``). Stacking the rows of every update and computing these in
    float64 gives the same numbers to float64 rounding.

    Examples:
        >>> x = torch.randn(100, 3)
        >>> m = Moments().update(x[:30]).update(x[30:])
        >>> torch.allclose(m.cov, torch.cov(x.double().T, correction=0))
        True
    """

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> Moments:
        if x.dim() != 2:
            raise ValueError(f"Moments.update takes [N, d] rows, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.detach().to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values (NaN/inf) in the hidden states: check the model's dtype/weights")
        if self.s1 is None:
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.s1.shape[0]:
            raise ValueError(f"Moments got rows of width {x.shape[1]} after {self.s1.shape[0]}")
        self.n += int(x.shape[0])
        self.s1 += x.sum(0)
        self.s2 += x.T @ x
        return self

    def merge(self, other: Moments) -> Moments:
        """Add another stream's sums (e.g. another process's shard)."""
        if other.s1 is None:
            return self
        if self.s1 is None:
            self.n, self.s1, self.s2 = other.n, other.s1.clone(), other.s2.clone()  # type: ignore[union-attr]
            return self
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2  # type: ignore[operator]
        return self

    def _need(self) -> None:
        if self.s1 is None or self.n == 0:
            raise ValueError("no rows seen yet: update() with some hidden states first")

    @property
    def mean(self) -> torch.Tensor:
        self._need()
        return self.s1 / self.n  # type: ignore[operator]

    @property
    def second(self) -> torch.Tensor:
        self._need()
        return self.s2 / self.n  # type: ignore[operator]

    @property
    def cov(self) -> torch.Tensor:
        mu = self.mean
        c = self.second - torch.outer(mu, mu)
        return (c + c.T) / 2


class TokenSample:
    """A seeded uniform sample of at most ``k`` tokens from a stream, the same tokens for every field.

    ``add(fields)`` takes a dict of tensors whose first dimension is the batch's tokens (e.g. ``{"h3": [N, d],
    "h4": [N, d], "id": [N]}``). Each token gets a key ``u ~ U(0, 1)`` from ``torch.Generator(seed)``; the
    ``k`` smallest keys over the whole stream are kept (a uniform sample without replacement). ``fields``
    returns the kept rows in stream order. With at most ``k`` tokens in total, all are kept.

    Examples:
        >>> s = TokenSample(k=5, seed=0)
        >>> s.add({"x": torch.arange(3)}); s.add({"x": torch.arange(3, 10)})
        >>> s.n_seen, len(s.fields["x"])
        (10, 5)
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"the sample size k must be >= 1, got {k}")
        self.k = int(k)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.n_seen = 0
        self._keys = torch.empty(0, dtype=torch.float64)
        self._order = torch.empty(0, dtype=torch.long)
        self._fields: dict[str, torch.Tensor] = {}

    def add(self, fields: dict[str, torch.Tensor]) -> None:
        if not fields:
            return
        n = {int(v.shape[0]) for v in fields.values()}
        if len(n) != 1:
            raise ValueError(f"TokenSample.add: fields have different numbers of tokens {sorted(n)}")
        m = n.pop()
        if m == 0:
            return
        if self._fields and set(fields) != set(self._fields):
            raise ValueError(f"TokenSample.add: fields {sorted(fields)} differ from {sorted(self._fields)}")
        keys = torch.rand(m, generator=self.gen, dtype=torch.float64)
        order = torch.arange(self.n_seen, self.n_seen + m)
        self.n_seen += m
        keys = torch.cat([self._keys, keys])
        order = torch.cat([self._order, order])
        cat = {name: torch.cat([self._fields[name], v.detach().cpu()]) if name in self._fields else v.detach().cpu()
               for name, v in fields.items()}
        if keys.shape[0] > self.k:
            keep = torch.topk(keys, self.k, largest=False).indices
            keep = keep[torch.argsort(order[keep])]
            keys, order = keys[keep], order[keep]
            cat = {name: v[keep] for name, v in cat.items()}
        self._keys, self._order, self._fields = keys, order, cat

    @property
    def fields(self) -> dict[str, torch.Tensor]:
        return self._fields

    @property
    def positions(self) -> torch.Tensor:
        """The stream index of each kept token."""
        return self._order
