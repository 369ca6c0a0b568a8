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
- ``None`` with an :class:`~tokensmith.models.Encoded` that carries a target: its target tokens;
- a class label of a sequence classifier (a ``*ForSequenceClassification`` model): ``Label(2)``,
  ``Label("positive")`` (a name from ``config.id2label``), or the bare int / label name; one row per label,
  ``f = log softmax(logits)[c]``;
- the tokens at the ``[MASK]`` positions of a masked LM: inputs holding the tokenizer's mask token (parsed
  as the special token) and ``MaskFill(" paris")`` (or the bare string, token ids, or a list of strings,
  one per mask), or ``MaskFill(tokens, positions=[...])`` to mask explicit positions; one row per mask,
  ``f_m = log p(x_m = y_m | x)`` from one bidirectional forward. The masked position itself is never a
  valid source for its row.

``target_span=(char_start, char_end)`` keeps only the continuation tokens overlapping those characters
of the target string as rows.

Sources are the content tokens (prompt, slots, system text, target) by default; template and special
tokens (chat scaffolding, BOS) are flagged and excluded unless ``include_template=True``. A source can
only affect a row whose token comes after it (causal LM), so ``valid[t, i] = i < p_t``; label and mask
rows come from a bidirectional forward (``valid[t, i]`` = every source, except a row's own masked position).
Label and mask rows of perturbed id sequences are scored by forwards grouped by length (no padding at all,
so [CLS]-pooling classifiers and absolute positions see exactly the sequence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded, Span

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Contrast", "Label", "MaskFill", "AttributionProblem", "prepare", "FORWARD_KINDS"]

CPU_TOKENS_PER_FORWARD = 1536  # default micro-batch of perturbed sequences on CPU: ~16 x 83 tokens was fastest
FORWARD_KINDS = ("label", "mask")  # target kinds scored from the model's own outputs (no token_logprobs)


@dataclass(frozen=True)
class Contrast:
    """A contrastive target: ``f = log p(target | x) − log p(foil | x)`` (GrAInS, contrastive explanations).

    Examples:
        >>> Contrast(" Paris", " London").foil
        ' London'
    """

    target: str
    foil: str


@dataclass(frozen=True)
class Label:
    """A class-label target for a sequence classifier: ``f = log softmax(logits)[c]`` (one row per label).

    ``label``: a class index, a name from ``config.id2label``, or a sequence of them (several rows from the
    same forwards).

    Examples:
        >>> Label("positive").label
        'positive'
    """

    label: Any


@dataclass(frozen=True)
class MaskFill:
    """Masked-LM target: the token(s) scored at the mask positions, ``f_m = log p(x_m = y_m | x)``.

    ``tokens``: a string (its tokens, one per mask, in order), a list of strings (one per mask, each one
    token) or token ids. ``positions``: explicit token positions to mask (their ids are replaced by the mask
    token); default: the mask tokens already in the input.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> r = attribute(ts.tiny("bert"), "paris is the capital of [MASK] .", target=MaskFill("france"),
        ...               method="saliency")
        >>> r.target_labels, bool(r.valid[0, 6])     # one row per mask; the mask itself is not a source
        (['[MASK]@6→france'], False)
    """

    tokens: Any
    positions: Sequence[int] | None = None


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
        kind: ``"tokens"``, ``"contrast"``, ``"callable"``, ``"label"`` or ``"mask"``.
        foil: the foil sequence of a :class:`Contrast` (shares the first ``shared`` tokens).
        foil_positions: its scored positions.
        shared: number of leading tokens the target and foil sequences share.
        fn: the callable target.
        batch_size: micro-batch size for the forwards.
        row_ids: ``[R]`` for ``"label"`` rows the class index, for ``"mask"`` rows the vocabulary id scored
            at the masked position ``target_positions[t]``.
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
    row_ids: torch.Tensor | None = None

    @property
    def ids(self) -> torch.Tensor:
        return self.encoded.input_ids

    @property
    def n_rows(self) -> int:
        if self.kind == "contrast":  # one row, f = Σ log p(target) − Σ log p(foil), however many tokens
            return 1
        return int(self.target_positions.numel())

    def valid(self) -> torch.Tensor:
        """``[R, L]`` bool: source ``i`` can affect row ``t`` (``sources[i]`` and ``i < p_t``)."""
        L = len(self.encoded)
        pos = torch.arange(L)
        if self.kind in ("callable", "label"):
            return self.sources.expand(self.n_rows, L).clone()
        if self.kind == "mask":
            return self.sources[None, :] & (pos[None, :] != self.target_positions[:, None])
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
        if self.kind in FORWARD_KINDS:
            bs = self.batch_size or N
            with torch.set_grad_enabled(grad):
                return torch.cat([self._forward_rows(embeds[s : s + bs], self.target_positions)
                                  for s in range(0, N, bs)], 0)
        lp = self._logprobs(self.ids, self.target_positions, embeds, grad)
        if self.kind == "tokens":
            return lp
        fe = ad.embed(self.foil.input_ids[None].expand(N, -1))  # type: ignore[union-attr]
        fe = torch.cat([embeds[:, : self.shared], fe[:, self.shared :].to(embeds)], 1)
        lf = self._logprobs(self.foil.input_ids, self.foil_positions, fe, grad)  # type: ignore[union-attr, arg-type]
        return lp.sum(-1, keepdim=True) - lf.sum(-1, keepdim=True)

    def _forward_rows(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Label / mask row scores ``[n, R]`` of unpadded embedded sequences (``positions``: the masks)."""
        n, L = embeds.shape[:2]
        rid = self.row_ids.to(embeds.device)  # type: ignore[union-attr]
        if self.kind == "label":
            out = self.adapter.forward(inputs_embeds=embeds, attention_mask=torch.ones(n, L, dtype=torch.long))
            return torch.log_softmax(out.logits.float(), -1)[:, rid]
        h = self._last_hidden(inputs_embeds=embeds)[:, positions.to(embeds.device)]  # [n, R, d]
        lsm = torch.log_softmax(self.adapter.unembed(h).float(), -1)
        return lsm.gather(-1, rid[None, :, None].expand(n, -1, 1).to(lsm.device))[..., 0]

    def _last_hidden(self, ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's output ``[n, L, d]`` of unpadded sequences; the forward stops there, so a masked
        LM's prediction head runs only where :meth:`ModelAdapter.unembed` is asked (the scored masks)."""
        ad = self.adapter
        name = f"layers.{ad.structure.num_layers - 1}.resid_post"
        x = ids if ids is not None else inputs_embeds
        am = torch.ones(x.shape[:2], dtype=torch.long)  # type: ignore[union-attr]
        with ad.hooks(cache=name, stop_after=name, detach=False) as h:
            if ids is not None:
                ad.forward({"input_ids": ids, "attention_mask": am})
            else:
                ad.forward(inputs_embeds=inputs_embeds, attention_mask=am)
        return h.cache[name]

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
        if self.kind in FORWARD_KINDS:
            return self._score_ids_forward(rows, keep)
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
        orig = ids.tolist()
        pos_list = positions.tolist()
        causal = bool(getattr(ad, "is_causal", False))
        # where each row's scored token sits in each sequence; a causal LM needs nothing after the last one
        local: list[list[int]] = []
        cut: list[int] = []
        for n, r in enumerate(rows):
            k = list(range(len(r))) if keep is None else list(keep[n])
            index = {p: j for j, p in enumerate(k)}
            js = []
            for p in pos_list:
                j = index.get(p)
                js.append(j if j is not None and j > 0 and r[j] == orig[p] else -1)
            local.append(js)
            cut.append(max(max(js) + 1, 2) if causal else len(r))
        T = max(cut)
        cut = [min(len(r), T) for r in rows]  # one cut for all: equal-length (replacement) rows stay unpadded
        T = max(cut)
        pad = ad.pad_token_id
        x = torch.full((N, T), pad, dtype=torch.long)
        am = torch.zeros(N, T, dtype=torch.long)
        tm = torch.zeros(N, T, dtype=torch.bool)
        where = torch.full((N, positions.numel()), -1, dtype=torch.long)
        for n, r in enumerate(rows):
            r = list(r)[: cut[n]]
            off = T - len(r)
            x[n, off:] = torch.tensor(r, dtype=torch.long)
            am[n, off:] = 1
            for t, j in enumerate(local[n]):
                if j >= 0:
                    where[n, t] = off + j
                    tm[n, off + j] = True
        bs = self.batch_size
        if bs is None and ad.device.type == "cpu":
            bs = max(1, CPU_TOKENS_PER_FORWARD // T)  # large CPU batches fall out of cache (measured on SmolLM2)
        lp = ad.token_logprobs({"input_ids": x, "attention_mask": am}, tm, max_batch_size=bs)
        out = torch.full((N, positions.numel()), float("nan"), dtype=lp.dtype)
        ok = where >= 0
        rows_i = torch.arange(N)[:, None].expand_as(where)
        out[ok] = lp.cpu()[rows_i[ok], where[ok]]
        return out

    def _score_ids_forward(self, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]] | None) -> torch.Tensor:
        """Label / mask rows of perturbed sequences: forwards grouped by length, never padded. A mask row
        whose masked position was deleted or replaced is NaN."""
        ad = self.adapter
        N, R = len(rows), self.n_rows
        out = torch.full((N, R), float("nan"), dtype=torch.float32)
        orig = self.ids.tolist()
        where = torch.full((N, R), -1, dtype=torch.long)
        if self.kind == "mask":
            for n, r in enumerate(rows):
                k = list(range(len(r))) if keep is None else list(keep[n])
                index = {p: j for j, p in enumerate(k)}
                for t, p in enumerate(self.target_positions.tolist()):
                    j = index.get(p)
                    if j is not None and r[j] == orig[p]:
                        where[n, t] = j
        by_len: dict[int, list[int]] = {}
        for n, r in enumerate(rows):
            by_len.setdefault(len(r), []).append(n)
        bs = self.batch_size or N
        rid = self.row_ids.cpu()  # type: ignore[union-attr]
        with torch.no_grad():
            for members in by_len.values():
                for s in range(0, len(members), bs):
                    idx = members[s : s + bs]
                    x = torch.tensor([list(rows[n]) for n in idx], dtype=torch.long)
                    if self.kind == "label":
                        logits = ad.forward({"input_ids": x, "attention_mask": torch.ones_like(x)}).logits
                        out[idx] = torch.log_softmax(logits.float().cpu(), -1)[:, rid]
                        continue
                    w = where[idx]  # [b, R]
                    ok = w >= 0
                    if not bool(ok.any()):
                        continue
                    h = self._last_hidden(ids=x)
                    b_i = torch.arange(len(idx))[:, None].expand_as(w)[ok]
                    lsm = torch.log_softmax(ad.unembed(h[b_i.to(h.device), w[ok].to(h.device)]).float().cpu(), -1)
                    vals = lsm.gather(-1, rid[None, :].expand_as(w)[ok][:, None])[:, 0]
                    block = torch.full((len(idx), R), float("nan"))
                    block[ok] = vals
                    out[idx] = block
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
    classifier, mlm = is_sequence_classifier(adapter), is_masked_lm(adapter)
    if isinstance(target, Label) or (classifier and _label_like(target)):
        return _prepare_label(adapter, inputs, target, kw, include_template, batch_size)
    if isinstance(target, MaskFill) or (mlm and _mask_like(target)):
        mf = target if isinstance(target, MaskFill) else MaskFill(target)
        return _prepare_mask(adapter, inputs, mf, kw, include_template, batch_size)
    if not callable(target) or isinstance(target, (str, Contrast)):
        if not is_lm:
            hint = (f"this is a sequence classifier: give a class label, one of {_label_names(adapter)}" if classifier
                    else "this is a masked LM: put the mask token in the inputs and give the token(s) to score "
                    "there, e.g. target=MaskFill(' paris')" if mlm else "")
            raise ValueError(
                f"{adapter.name!r} cannot score tokens (not a causal LM with an LM head): attribute a callable "
                "target instead, e.g. target=lambda out, problem: out.logits[:, 0, label_id]"
                + (f"; {hint}" if hint else "")
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


# ---------------------------------------------------------------------------------------------- label / mask
def is_sequence_classifier(adapter: ModelAdapter) -> bool:
    """The model is a ``*ForSequenceClassification`` (its forward returns ``logits [B, num_labels]``)."""
    return type(adapter.model).__name__.endswith("ForSequenceClassification")


def is_masked_lm(adapter: ModelAdapter) -> bool:
    """A bidirectional encoder with a token prediction head (``BertForMaskedLM`` and the like)."""
    return not adapter.is_causal and adapter.structure.lm_head is not None and not is_sequence_classifier(adapter)


def _label_like(target: Any) -> bool:
    return (isinstance(target, int) and not isinstance(target, bool)) or isinstance(target, str)


def _mask_like(target: Any) -> bool:
    if isinstance(target, str):
        return True
    if isinstance(target, torch.Tensor):
        return target.dim() <= 1
    return isinstance(target, (list, tuple)) and bool(target) and all(
        isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool)) for t in target)


def _label_names(adapter: ModelAdapter) -> list[str]:
    cfg = adapter.model.config
    n = int(getattr(cfg, "num_labels", 0) or 0)
    id2label = getattr(cfg, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def _encode_plain(adapter: ModelAdapter, inputs: Any, kw: dict[str, Any], allow_special: bool) -> Encoded:
    if isinstance(inputs, Encoded):
        return inputs
    if inputs is None or (isinstance(inputs, str) and not inputs.strip()):
        raise ValueError("inputs is empty: give a prompt string, a list of str/Slot pieces or an Encoded")
    if allow_special:
        kw = {"allow_special": True, **kw}
    return adapter.encode(inputs, **kw)


def _finish_forward(adapter: ModelAdapter, enc: Encoded, positions: torch.Tensor, labels: list[str], kind: str,
                    row_ids: torch.Tensor, include_template: bool, batch_size: int | None,
                    meta: dict[str, Any]) -> AttributionProblem:
    adapter.check_length(len(enc), "the attributed sequence")
    if not adapter.capabilities()["features"]["inputs_embeds"]:  # pragma: no cover - every HF encoder takes them
        raise ValueError(f"{adapter.name!r} does not take inputs_embeds")
    p = AttributionProblem(adapter, enc, _sources(enc, include_template), positions, labels, kind=kind,
                           batch_size=batch_size, row_ids=row_ids, meta=meta)
    if not bool(p.valid().any()):
        raise ValueError("the input has no source token to attribute (give content text, or include_template=True)")
    return p


def _prepare_label(adapter: ModelAdapter, inputs: Any, target: Any, kw: dict[str, Any], include_template: bool,
                   batch_size: int | None) -> AttributionProblem:
    if not is_sequence_classifier(adapter):
        raise ValueError(f"a Label target needs a sequence classifier (a *ForSequenceClassification model); "
                         f"{adapter.name!r} is a {type(adapter.model).__name__} without a classification head")
    names = _label_names(adapter)
    raw = target.label if isinstance(target, Label) else target
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not items:
        raise ValueError("Label() needs at least one label")
    ids = []
    for it in items:
        if isinstance(it, bool) or not isinstance(it, (int, str)):
            raise TypeError(f"a label is a class index or a name from config.id2label, got {type(it).__name__}")
        if isinstance(it, int):
            if not 0 <= it < len(names):
                raise ValueError(f"label {it} is out of range: {adapter.name!r} has {len(names)} labels {names}")
            ids.append(it)
        elif it in names:
            ids.append(names.index(it))
        else:
            raise ValueError(f"{it!r} is not a label of {adapter.name!r}; its labels are {names} (or an index)")
    enc = _encode_plain(adapter, inputs, kw, allow_special=False)
    return _finish_forward(adapter, enc, torch.full((len(ids),), -1, dtype=torch.long), [names[i] for i in ids],
                           "label", torch.tensor(ids, dtype=torch.long), include_template, batch_size,
                           {"labels": [names[i] for i in ids]})


def _prepare_mask(adapter: ModelAdapter, inputs: Any, target: MaskFill, kw: dict[str, Any], include_template: bool,
                  batch_size: int | None) -> AttributionProblem:
    tok = adapter.tokenizer
    mask_id = getattr(tok, "mask_token_id", None)
    if not is_masked_lm(adapter) or mask_id is None:
        raise ValueError(f"a mask target needs a masked LM with a mask token; {adapter.name!r} "
                         f"({type(adapter.model).__name__}) is not one")
    enc = _encode_plain(adapter, inputs, kw, allow_special=True)
    if target.positions is not None:
        pos = sorted({int(p) for p in target.positions})
        if not pos or any(not 0 <= p < len(enc) for p in pos):
            raise ValueError(f"mask positions must be token positions in [0, {len(enc)}), got {list(target.positions)}")
        ids = enc.input_ids.clone()
        ids[pos] = int(mask_id)
        special = enc.special_mask.clone()
        special[pos] = True
        toks = list(enc.tokens)
        for p in pos:
            toks[p] = str(tok.mask_token)
        enc = Encoded(input_ids=ids, text=enc.text, offsets=list(enc.offsets), spans=dict(enc.spans),
                      segment_ids=enc.segment_ids.clone(), segment_names=list(enc.segment_names),
                      special_mask=special, tokens=toks)
    positions = torch.nonzero(enc.input_ids == int(mask_id)).flatten()
    if positions.numel() == 0:
        raise ValueError(f"{adapter.name!r} cannot score tokens as a continuation (a masked LM): the inputs hold no "
                         f"mask token {tok.mask_token!r}; write it where the token to score goes, or pass "
                         "MaskFill(tokens, positions=[...])")
    want = _mask_token_ids(adapter, target.tokens)
    if len(want) != positions.numel():
        raise ValueError(f"the target gives {len(want)} token(s) for {positions.numel()} mask position(s); give one "
                         "token per mask (a list of strings, or ids)")
    labels = [f"{tok.mask_token}@{int(p)}→{t}" for p, t in zip(positions.tolist(), tok.convert_ids_to_tokens(want),
                                                                  strict=True)]
    return _finish_forward(adapter, enc, positions, labels, "mask", torch.tensor(want, dtype=torch.long),
                           include_template, batch_size, {"mask_positions": positions.tolist()})


def _mask_token_ids(adapter: ModelAdapter, tokens: Any) -> list[int]:
    tok = adapter.tokenizer
    V = adapter.structure.vocab_size
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    if isinstance(tokens, str):
        if not tokens.strip():
            raise ValueError("the mask target is empty: give the token(s) to score at the mask position(s)")
        ids = tok(tokens, add_special_tokens=False).input_ids
    elif isinstance(tokens, (list, tuple)) and tokens:
        ids = []
        for t in tokens:
            if isinstance(t, str):
                one = tok(t, add_special_tokens=False).input_ids
                if len(one) != 1:
                    raise ValueError(f"mask target {t!r} is {len(one)} tokens; each mask scores exactly one token")
                ids.append(one[0])
            elif isinstance(t, int) and not isinstance(t, bool):
                ids.append(t)
            else:
                raise TypeError(f"mask target items are strings or token ids, got {type(t).__name__}")
    else:
        raise TypeError(f"a mask target is a string, a list of strings or token ids, got {type(tokens).__name__}")
    if not ids:
        raise ValueError("the mask target tokenizes to nothing")
    if any(not 0 <= i < V for i in ids):
        raise ValueError(f"mask target token ids must lie in [0, {V})")
    return [int(i) for i in ids]
