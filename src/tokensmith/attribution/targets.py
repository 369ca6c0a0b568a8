"""What is attributed: the input sequence, the source tokens and the target scores, prepared once.

:func:`prepare` turns ``attribute(adapter, inputs, target=...)``'s arguments into an
:class:`AttributionProblem`: one encoded sequence (prompt and continuation tokenized **jointly**, through
the chat template when asked), the *source* positions that get scores, and the *target* rows — one row
per scored token, so a continuation gives a ``[targets × sources]`` matrix from one pass of a method.

Targets:

- a string: a forced continuation, encoded with the prompt (``adapter.encode(prompt, target=...)``); one
  row per continuation token, ``f_t = log p(y_t | x, y_<t)``;
- ``"generate"``: greedy generation with ``adapter.generate``; the generated ids are appended as they are
  (never decoded and re-encoded) and each generated token is a row;
- token ids (a list or 1-D tensor): appended to the prompt ids as they are;
- ``Contrast(target, foil)``: one row, ``f = log p(target | x) − log p(foil | x)`` (both continuations
  encoded jointly with the same prompt; the prompt tokens must coincide);
- a callable ``fn(outputs, problem) -> [N]`` or ``[N, R]`` on the model outputs of each evaluated batch
  (any scalar of the logits or hidden states);
- ``None`` with an :class:`~tokensmith.models.Encoded` that carries a target: its target tokens.

``target_span=(char_start, char_end)`` keeps only the continuation tokens overlapping those characters
of the target string as rows.

Sources are the content tokens (prompt, slots, system text, target) by default; template and special
tokens (chat scaffolding, BOS) are flagged and excluded unless ``include_template=True``. A source can
only affect a row whose token comes after it (causal LM), so ``valid[t, i] = i < p_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded, Span

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Contrast", "AttributionProblem", "prepare"]


@dataclass(frozen=True)
class Contrast:
    """A contrastive target: ``f = log p(target | x) − log p(foil | x)`` (GrAInS, contrastive explanations).

    Examples:
        >>> Contrast(" Paris", " London").foil
        ' London'
    """

    target: str
    foil: str


@dataclass
class AttributionProblem:
    """One prepared attribution: the sequence, its sources and its target rows.

    Attributes:
        adapter: the model.
        encoded: the sequence the methods run on (prompt + continuation).
        sources: ``[L]`` bool, positions that get scores (others are held at their real embeddings by
            gradient methods and never perturbed).
        target_positions: ``[R]`` long, the scored token of each row (``-1`` for callable targets).
        target_labels: one label per row.
        kind: ``"tokens"``, ``"contrast"`` or ``"callable"``.
        foil: the foil sequence of a :class:`Contrast` (shares the first ``shared`` tokens).
        foil_positions: its scored positions.
        shared: number of leading tokens the target and foil sequences share.
        fn: the callable target.
        batch_size: micro-batch size for the forwards.
    """

    adapter: ModelAdapter
    encoded: Encoded
    sources: torch.Tensor
    target_positions: torch.Tensor
    target_labels: list[str]
    kind: str = "tokens"
    foil: Encoded | None = None
    foil_positions: torch.Tensor | None = None
    shared: int = 0
    fn: Callable[..., torch.Tensor] | None = None
    batch_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> torch.Tensor:
        return self.encoded.input_ids

    @property
    def n_rows(self) -> int:
        return int(self.target_positions.numel())

    def valid(self) -> torch.Tensor:
        """``[R, L]`` bool: source ``i`` can affect row ``t`` (``sources[i]`` and ``i < p_t``)."""
        L = len(self.encoded)
        pos = torch.arange(L)
        if self.kind == "callable":
            return self.sources.expand(self.n_rows, L).clone()
        limit = self.target_positions if self.kind == "tokens" else torch.tensor([self.shared])
        return self.sources[None, :] & (pos[None, :] < limit[:, None])

    # ------------------------------------------------------------------ scoring from embeddings
    def score_embeds(self, embeds: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Row scores ``[N, R]`` for ``N`` embedded copies of the sequence (``[N, L, d]``)."""
        ad = self.adapter
        N, L = embeds.shape[:2]
        if self.kind == "callable":
            with torch.set_grad_enabled(grad):
                out = ad.forward(inputs_embeds=embeds, attention_mask=torch.ones(N, L, dtype=torch.long))
                return _as_rows(self.fn(out, self), N)  # type: ignore[misc]
        lp = self._logprobs(self.ids, self.target_positions, embeds, grad)
        if self.kind == "tokens":
            return lp
        fe = ad.embed(self.foil.input_ids[None].expand(N, -1))  # type: ignore[union-attr]
        fe = torch.cat([embeds[:, : self.shared], fe[:, self.shared :].to(embeds)], 1)
        lf = self._logprobs(self.foil.input_ids, self.foil_positions, fe, grad)  # type: ignore[union-attr, arg-type]
        return lp.sum(-1, keepdim=True) - lf.sum(-1, keepdim=True)

    def _logprobs(self, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor, grad: bool) -> torch.Tensor:
        N, L = embeds.shape[:2]
        tm = torch.zeros(N, L, dtype=torch.bool)
        tm[:, positions] = True
        batch = {"input_ids": ids[None].expand(N, L), "attention_mask": torch.ones(N, L, dtype=torch.long)}
        lp = self.adapter.token_logprobs(batch, tm, inputs_embeds=embeds, grad=grad, max_batch_size=self.batch_size)
        return lp[:, positions.to(lp.device)]

    # ------------------------------------------------------------------ scoring perturbed ids
    def score_ids(self, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Row scores ``[N, R]`` of perturbed sequences given as id lists.

        ``keep[n]`` lists, for sequence ``n``, which original positions it still holds, in order (``None``:
        same length as the original, every position kept, ids replaced). A row whose scored token was
        deleted or replaced is NaN (it is never a valid entry: ``valid[t, p_t]`` is False).
        """
        if self.kind == "callable":
            return self._score_ids_callable(rows)
        main = self._score_rows(rows, keep, self.ids, self.target_positions)
        if self.kind == "tokens":
            return main
        # contrast: perturb the shared prompt in the foil too
        foil_rows, foil_keep = [], []
        tail = self.foil.input_ids[self.shared :].tolist()  # type: ignore[union-attr]
        for n, r in enumerate(rows):
            k = list(range(len(r))) if keep is None else list(keep[n])
            head = [t for t, p in zip(r, k, strict=True) if p < self.shared]
            kh = [p for p in k if p < self.shared]
            foil_rows.append(head + tail)
            foil_keep.append(kh + list(range(self.shared, self.shared + len(tail))))
        foil = self._score_rows(foil_rows, foil_keep, self.foil.input_ids, self.foil_positions)  # type: ignore[union-attr, arg-type]
        return main.sum(-1, keepdim=True) - foil.sum(-1, keepdim=True)

    def _score_rows(
        self,
        rows: Sequence[Sequence[int]],
        keep: Sequence[Sequence[int]] | None,
        ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        ad = self.adapter
        N = len(rows)
        T = max(len(r) for r in rows)
        pad = ad.pad_token_id
        x = torch.full((N, T), pad, dtype=torch.long)
        am = torch.zeros(N, T, dtype=torch.long)
        tm = torch.zeros(N, T, dtype=torch.bool)
        where = torch.full((N, positions.numel()), -1, dtype=torch.long)
        orig = ids.tolist()
        for n, r in enumerate(rows):
            off = T - len(r)
            x[n, off:] = torch.tensor(list(r), dtype=torch.long)
            am[n, off:] = 1
            k = list(range(len(r))) if keep is None else list(keep[n])
            index = {p: j for j, p in enumerate(k)}
            for t, p in enumerate(positions.tolist()):
                j = index.get(p)
                if j is not None and j > 0 and r[j] == orig[p]:
                    where[n, t] = off + j
                    tm[n, off + j] = True
        lp = ad.token_logprobs({"input_ids": x, "attention_mask": am}, tm, max_batch_size=self.batch_size)
        out = torch.full((N, positions.numel()), float("nan"), dtype=lp.dtype)
        ok = where >= 0
        rows_i = torch.arange(N)[:, None].expand_as(where)
        out[ok] = lp.cpu()[rows_i[ok], where[ok]]
        return out

    def _score_ids_callable(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        ad = self.adapter
        N, T = len(rows), max(len(r) for r in rows)
        x = torch.full((N, T), ad.pad_token_id, dtype=torch.long)
        am = torch.zeros(N, T, dtype=torch.long)
        for n, r in enumerate(rows):
            x[n, T - len(r):] = torch.tensor(list(r))
            am[n, T - len(r):] = 1
        with torch.no_grad():
            out = ad.forward({"input_ids": x, "attention_mask": am})
            return _as_rows(self.fn(out, self), N).float().cpu()  # type: ignore[misc]

    def full_scores(self) -> torch.Tensor:
        """Row scores ``[R]`` of the unperturbed sequence."""
        with torch.no_grad():
            e = self.adapter.embed(self.ids[None])
            return self.score_embeds(e).float().cpu()[0]


def _as_rows(v: Any, N: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"a callable target must return a tensor, got {type(v).__name__}")
    if v.dim() == 1 and v.shape[0] == N:
        return v[:, None]
    if v.dim() == 2 and v.shape[0] == N:
        return v
    raise ValueError(f"a callable target must return [N] or [N, R] for N={N} sequences, got {list(v.shape)}")


# ---------------------------------------------------------------------------------------------- prepare
def _append(adapter: ModelAdapter, enc: Encoded, new: list[int]) -> Encoded:
    """``enc`` + ``new`` token ids as a ``target`` segment, with character offsets from incremental decoding."""
    tok = adapter.tokenizer
    ids = enc.input_ids.tolist() + list(new)
    text = enc.text
    offsets = list(enc.offsets)
    base = tok.decode(enc.input_ids.tolist())
    cur = base
    for k in range(len(new)):
        nxt = tok.decode(enc.input_ids.tolist() + list(new[: k + 1]))
        piece = nxt[len(cur):] if nxt.startswith(cur) else tok.decode([new[k]])
        offsets.append((len(text), len(text) + len(piece)))
        text += piece
        cur = nxt
    names = list(enc.segment_names)
    if "target" not in names:
        names.append("target")
    seg = torch.cat([enc.segment_ids, torch.full((len(new),), names.index("target"), dtype=enc.segment_ids.dtype)])
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    special = torch.cat([enc.special_mask, torch.tensor([i in special_ids for i in new], dtype=torch.bool)])
    spans = dict(enc.spans)
    spans["target"] = Span("target", len(enc), len(ids), len(enc.text), len(text))
    return Encoded(
        input_ids=torch.tensor(ids, dtype=torch.long),
        text=text,
        offsets=offsets,
        spans=spans,
        segment_ids=seg,
        segment_names=names,
        special_mask=special,
        tokens=tok.convert_ids_to_tokens(ids),
    )


def _sources(enc: Encoded, include_template: bool) -> torch.Tensor:
    if include_template:
        return torch.ones(len(enc), dtype=torch.bool)
    return ~enc.template_mask & ~enc.special_mask


def prepare(
    adapter: ModelAdapter,
    inputs: Any,
    target: Any = None,
    *,
    chat: bool = False,
    target_span: tuple[int, int] | None = None,
    include_template: bool = False,
    max_new_tokens: int = 16,
    batch_size: int | None = None,
    encode_kwargs: dict[str, Any] | None = None,
) -> AttributionProblem:
    """Build the :class:`AttributionProblem` for ``attribute``'s arguments (see the module docstring).

    Raises:
        ValueError: empty inputs or target, a target that produces no token of its own, a sequence longer
            than the model takes, a contrast whose prompt tokens differ between target and foil, or a
            model that cannot score tokens for a token target.
        TypeError: an unsupported ``inputs`` or ``target`` type.
    """
    kw = dict(encode_kwargs or {})
    if chat:
        kw["chat"] = True
    is_lm = bool(adapter.capabilities()["features"]["token_logprobs"])
    if not callable(target) or isinstance(target, (str, Contrast)):
        if not is_lm:
            raise ValueError(
                f"{adapter.name!r} cannot score tokens (not a causal LM with an LM head): attribute a callable "
                "target instead, e.g. target=lambda out, problem: out.logits[:, 0, label_id]"
            )

    def enc_with(t: str | None) -> Encoded:
        if isinstance(inputs, Encoded):
            if t is None:
                return inputs
            raise TypeError("pass a target string with a prompt (str / list of pieces), not with an Encoded that "
                            "already holds its tokens; encode the target into it with adapter.encode(..., target=)")
        if inputs is None or (isinstance(inputs, str) and not inputs.strip()):
            raise ValueError("inputs is empty: give a prompt string, a list of str/Slot pieces or an Encoded")
        return adapter.encode(inputs, target=t, **kw)

    def finish(enc: Encoded, positions: torch.Tensor, labels: list[str], **extra: Any) -> AttributionProblem:
        adapter.check_length(len(enc), "the attributed sequence")
        p = AttributionProblem(adapter, enc, _sources(enc, include_template), positions, labels,
                               batch_size=batch_size, **extra)
        if not bool(p.valid().any()):
            raise ValueError("no source token comes before any target token: nothing to attribute (give a "
                             "prompt with content, or include_template=True)")
        return p

    if isinstance(target, Contrast):
        if not target.target or not target.foil:
            raise ValueError("Contrast needs a non-empty target and foil")
        a, b = enc_with(target.target), enc_with(target.foil)
        pa, pb = torch.nonzero(a.target_mask).flatten(), torch.nonzero(b.target_mask).flatten()
        shared = int(min(pa[0], pb[0]))
        if a.input_ids[:shared].tolist() != b.input_ids[:shared].tolist():
            raise ValueError("the target and foil tokenize the prompt differently (a merge across the boundary); "
                             "start both with a space, or pass encode_kwargs={'boundary': 'split'}")
        return finish(a, pa, [f"{target.target!r} − {target.foil!r}"], kind="contrast", foil=b,
                      foil_positions=pb, shared=shared)
    if callable(target) and not isinstance(target, str):
        enc = enc_with(None)
        return finish(enc, torch.tensor([-1]), ["f(outputs)"], kind="callable", fn=target)
    if isinstance(target, str) and target == "generate":
        prompt = enc_with(None)
        g = adapter.generate(prompt, max_new_tokens=max_new_tokens)
        new = g.new_tokens[0].tolist()
        if not new:
            raise ValueError("generation produced no token to attribute")
        enc = _append(adapter, prompt, new)
        pos = torch.arange(len(prompt), len(enc))
        return finish(enc, pos, _labels(enc, pos), meta={"generated": g.texts[0]})
    if isinstance(target, (list, tuple, torch.Tensor)) and not isinstance(target, str):
        new = [int(i) for i in (target.tolist() if isinstance(target, torch.Tensor) else target)]
        if not new:
            raise ValueError("the target token ids are empty")
        V = adapter.structure.vocab_size
        if any(not 0 <= i < V for i in new):
            raise ValueError(f"target token ids must lie in [0, {V})")
        prompt = enc_with(None)
        enc = _append(adapter, prompt, new)
        pos = torch.arange(len(prompt), len(enc))
        return finish(enc, pos, _labels(enc, pos))
    if target is not None and not isinstance(target, str):
        raise TypeError(f"unsupported target type {type(target).__name__}: give a str, 'generate', token ids, "
                        "Contrast(target, foil) or a callable")
    if isinstance(target, str) and not target:
        raise ValueError("target is empty: give the continuation whose tokens are attributed")
    enc = enc_with(target)
    pos = torch.nonzero(enc.target_mask).flatten()
    if pos.numel() == 0:
        raise ValueError("there is no target: pass target='...' (a continuation), 'generate', ids, a Contrast or "
                         "a callable, or an Encoded made with adapter.encode(..., target=...)")
    if target_span is not None:
        t0 = enc.spans["target"].char_start
        cs, ce = t0 + target_span[0], t0 + target_span[1]
        keep = [int(p) for p in pos if enc.offsets[p][0] < ce and enc.offsets[p][1] > cs]
        if not keep:
            raise ValueError(f"target_span={target_span} covers no target token")
        pos = torch.tensor(keep)
    return finish(enc, pos, _labels(enc, pos))


def _labels(enc: Encoded, pos: torch.Tensor) -> list[str]:
    return [enc.tokens[int(p)] for p in pos]
