"""ReAGent (ATT-8): recursive attribution from masked-LM replacements, black-box (no gradients, no weights).

Zhao & Shan (2024), "ReAGent: A Model-agnostic Feature Attribution Method for Generative Language Models".
Each row ``t`` (a scored token ``y_t`` at position ``p_t``) keeps importance log-odds ``ℓ_t`` over its context
``C_t`` (the source tokens before ``p_t``), starting uniform (``ℓ = 0``). One iteration:

1. draw a random subset ``R`` of the source tokens (``⌈replace_ratio·|sources|⌉`` of them);
2. replace every token of ``R`` by a masked LM's prediction (all of ``R`` masked at once), giving ``x̃``;
3. measure ``Δ_t = p(y_t | x) − p(y_t | x̃)`` (the paper's ``Δp = p^(o) − p^(r)``, probabilities, not
   log-probs) for every row from one teacher-forced ``token_logprobs`` of ``x̃``;
4. raise the tokens of ``R`` and lower the others in proportion to ``Δ_t``, in log-odds:
   ``ℓ_ti ← ℓ_ti + logit((1 + σ_i·Δ_t)/2)`` with ``σ_i = +1`` for ``i ∈ R``, ``−1`` otherwise (``i ∈ C_t``);
   the importance is the renormalised ``s_t = softmax_{C_t}(ℓ_t)`` (:func:`reagent_update`,
   :func:`reagent_scores`).

Stopping (the paper's top-k test): keep row ``t``'s ``keep_top_n`` most important context tokens, replace the
rest of ``C_t`` by masked-LM predictions; when ``y_t`` is then among the model's ``stop_topk`` most likely next
tokens, the important tokens alone suffice and row ``t`` stops (its scores freeze). Otherwise it runs
``n_iters`` iterations.

Batching: the subsets ``R`` do not depend on the scores, so a block of ``block_size`` iterations is drawn at
once: one masked-LM forward proposes all their replacements and one batched ``token_logprobs`` scores all
their sequences for every row; the updates are then applied in order. The stopping test runs after each
block (``block_size=1`` tests after every iteration as the paper does); without stopping the scores do not
depend on ``block_size``.

Replacement across tokenizers, by character offsets: the rendered text is tokenized by the masked LM; a
model token at characters ``[a, b)`` masks every MLM token overlapping them, and its replacement is the MLM's
best prediction at the first of those, as text (``##`` / byte-level markers removed, the original token's
leading whitespace kept), encoded by the model's tokenizer without special tokens; its **first** token
replaces the model token, so the sequence length (and every other position) is kept. Candidates that map to
the original token or to a special token are skipped (the next of the MLM's top ``n_candidates``). A model
token no MLM token covers (a bare newline or space) cannot be replaced: it gets no score. When the masked LM
shares the model's vocabulary its ids are used directly. Template and special tokens are never replaced.

Targets: token rows (the paper). For a :class:`~tokensmith.attribution.Contrast` or a callable target the
change is ``Δ = tanh(f(x) − f(x̃))`` (bounded like a probability difference) and there is no stopping test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.progress import bar
from tokensmith.attribution.targets import AttributionProblem
from tokensmith.models import ModelAdapter

__all__ = ["ReAGent", "reagent_update", "reagent_scores", "align_offsets", "mlm_piece_text", "MLMReplacer"]

_NO_REPLACER = (
    "reagent needs a masked LM to propose replacements: pass replacer=ts.load('FacebookAI/roberta-base') (the "
    "paper uses RoBERTa; any HF masked LM, a hub id or a local path, loaded with its MLM head), or "
    "ts.ModelAdapter(AutoModelForMaskedLM.from_pretrained(p), AutoTokenizer.from_pretrained(p)); tests use "
    "ts.tiny('bert')"
)


def _check_replacer(rep: Any) -> ModelAdapter:
    if rep is None:
        raise ValueError(_NO_REPLACER)
    if not isinstance(rep, ModelAdapter):
        raise TypeError(f"replacer must be a tokensmith ModelAdapter of a masked LM, got {type(rep).__name__}; "
                        + _NO_REPLACER.split(": ", 1)[1])
    tok = rep.tokenizer
    why = None
    if rep.is_causal:
        why = "it is a causal LM (it cannot fill a masked position from both sides)"
    elif not rep.capabilities()["features"]["unembed"]:
        why = "it has no MLM head (a bare encoder, e.g. the bundled sentence encoder minilm-l6)"
    elif getattr(tok, "mask_token_id", None) is None:
        why = "its tokenizer has no mask token"
    if why:
        raise ValueError(f"replacer {rep.name!r} is not a masked LM: {why}. " + _NO_REPLACER)
    return rep


# ------------------------------------------------------------------------------------------------ alignment
def align_offsets(model_offsets: list[tuple[int, int]], mlm_offsets: list[tuple[int, int]],
                  mlm_special: list[bool] | None = None) -> list[list[int]]:
    """For each model token ``[a, b)``, the MLM token positions whose character span overlaps it (empty spans
    and MLM special tokens never match).

    Examples:
        >>> align_offsets([(0, 3), (3, 11), (11, 12)], [(0, 0), (0, 3), (4, 7), (7, 11), (0, 0)])
        [[1], [2, 3], []]
    """
    special = mlm_special or [False] * len(mlm_offsets)
    out = []
    for a, b in model_offsets:
        out.append([j for j, (s, e) in enumerate(mlm_offsets)
                    if e > s and not special[j] and s < b and e > a and b > a])
    return out


def mlm_piece_text(tokenizer: Any, token_id: int) -> str:
    """The text of one MLM token without word-piece markers (``##ing`` → ``ing``, ``Ġword`` → ``word``).

    Examples:
        >>> from transformers import AutoTokenizer
        >>> from tokensmith.models.zoo import minilm_path
        >>> tok = AutoTokenizer.from_pretrained(str(minilm_path()))  # WordPiece
        >>> mlm_piece_text(tok, tok.convert_tokens_to_ids("##bly")), mlm_piece_text(tok, tok.convert_tokens_to_ids("good"))
        ('bly', 'good')
    """
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    text = tokenizer.convert_tokens_to_string([piece]).strip()
    return text[2:] if text.startswith("##") else text


class MLMReplacer:
    """Proposes masked-LM replacements for sets of model positions, keeping the model's sequence length.

    Args:
        problem: the attribution problem (its sequence, sources and model tokenizer).
        mlm: a masked-LM adapter.
        n_candidates: MLM predictions tried per position before giving up on a different token.
        batch_size: micro-batch size of the MLM forwards.

    Attributes:
        replaceable: ``[L]`` bool, source positions that can be replaced.
        shared_vocab: the MLM uses the model's vocabulary (ids are used directly).
    """

    def __init__(self, problem: AttributionProblem, mlm: ModelAdapter, n_candidates: int = 8,
                 batch_size: int | None = None) -> None:
        self.problem, self.mlm, self.k = problem, mlm, max(1, int(n_candidates))
        self.batch_size = batch_size or 16
        ad = problem.adapter
        self.ids = problem.ids.tolist()
        mtok, tok = mlm.tokenizer, ad.tokenizer
        self.mask_id = int(mtok.mask_token_id)
        self.model_special = set(getattr(tok, "all_special_ids", []) or [])
        V = mlm.structure.vocab_size
        self.mlm_banned = torch.zeros(V, dtype=torch.bool)
        banned = [i for i in (getattr(mtok, "all_special_ids", []) or []) if 0 <= i < V]
        self.mlm_banned[banned] = True
        self.shared_vocab = mtok is tok or (len(mtok) == len(tok) and mtok.get_vocab() == tok.get_vocab())
        src = problem.sources.tolist()
        enc = problem.encoded
        if self.shared_vocab:
            self.mlm_ids = list(self.ids)
            self.align = [[i] if src[i] else [] for i in range(len(self.ids))]
            self.prefix = [""] * len(self.ids)
        else:
            if not getattr(mtok, "is_fast", False):
                raise ValueError(f"replacer {mlm.name!r} needs a fast tokenizer (character offsets) to align with "
                                 f"{ad.name!r}'s tokens; load it with use_fast=True")
            m = mtok(enc.text, return_offsets_mapping=True, add_special_tokens=True)
            self.mlm_ids = list(m["input_ids"])
            mspecial = [i in set(banned) for i in self.mlm_ids]
            al = align_offsets(list(enc.offsets), [tuple(o) for o in m["offset_mapping"]], mspecial)
            self.align = [a if src[i] else [] for i, a in enumerate(al)]
            self.prefix = []
            for a, b in enc.offsets:
                piece = enc.text[a:b]
                self.prefix.append(piece[: len(piece) - len(piece.lstrip())])
        mlm.check_length(len(self.mlm_ids), f"the text as tokenized by the replacer {mlm.name!r}")
        self.replaceable = torch.tensor([bool(a) for a in self.align], dtype=torch.bool)
        self._map: dict[tuple[int, str], int | None] = {}

    def _to_model(self, mlm_id: int, prefix: str) -> int | None:
        if self.shared_vocab:
            return mlm_id
        key = (mlm_id, prefix)
        if key not in self._map:
            text = mlm_piece_text(self.mlm.tokenizer, mlm_id)
            new = self.problem.adapter.tokenizer.encode(prefix + text, add_special_tokens=False) if text else []
            self._map[key] = int(new[0]) if new else None
        return self._map[key]

    def fill(self, masks: list[list[int]]) -> list[list[int]]:
        """One model id sequence per mask: the listed (replaceable) positions replaced by MLM predictions."""
        if not masks:
            return []
        x = torch.tensor(self.mlm_ids, dtype=torch.long).repeat(len(masks), 1)
        for n, mask in enumerate(masks):
            for i in mask:
                x[n, self.align[i]] = self.mask_id
        # predictions are read at the first MLM token of each replaced model token only
        need = sorted({self.align[i][0] for mask in masks for i in mask if self.align[i]})
        col = {j: c for c, j in enumerate(need)}
        cand = []
        with torch.no_grad():
            for s in range(0, len(masks), self.batch_size):
                xb = x[s : s + self.batch_size]
                logits = self.mlm.forward({"input_ids": xb, "attention_mask": torch.ones_like(xb)}).logits
                logits = logits[:, need].float().cpu()
                logits = logits.masked_fill(self.mlm_banned[: logits.shape[-1]], float("-inf"))
                cand.append(logits.topk(min(self.k, logits.shape[-1]), -1).indices)  # [b, |need|, k]
        top = torch.cat(cand, 0)
        out = []
        for n, mask in enumerate(masks):
            row = list(self.ids)
            for i in mask:
                if not self.align[i]:
                    continue
                choice = None
                for c in top[n, col[self.align[i][0]]].tolist():
                    mid = self._to_model(int(c), self.prefix[i])
                    if mid is None or mid in self.model_special:
                        continue
                    if choice is None:
                        choice = mid  # best usable prediction, even if it is the original
                    if mid != self.ids[i]:
                        choice = mid
                        break
                if choice is not None:
                    row[i] = choice
            out.append(row)
        return out


# ------------------------------------------------------------------------------------------------ method
@register_method("reagent")
@dataclass
class ReAGent(AttributionMethod):
    """ReAGent (ATT-8; Zhao & Shan, 2024): importance from the change ``Δ_t = p(y_t|x) − p(y_t|x̃)`` when random
    subsets of the context are replaced by a masked LM's predictions, updated recursively in log-odds
    ``ℓ_ti += logit((1 + σ_i Δ_t)/2)`` (``σ = +1`` replaced, ``−1`` kept) and renormalised by a softmax over the
    row's context; rows stop at the paper's top-k test. Scores are a distribution over each row's context.

    Args:
        replacer: a :class:`~tokensmith.models.ModelAdapter` of a masked LM (required), e.g.
            ``ts.load("FacebookAI/roberta-base")`` (the paper's RoBERTa) or ``ts.tiny("bert")`` in tests.
        n_iters: maximum iterations per row.
        replace_ratio: fraction of the source tokens replaced per iteration (paper: 0.3).
        stop_topk: stop a row when its target is in the model's top ``stop_topk`` with only its
            ``keep_top_n`` most important tokens kept (None: always run ``n_iters``).
        keep_top_n: tokens kept by the stopping test.
        block_size: iterations drawn, proposed and scored per batched call; the stopping test runs per block.
        n_candidates: masked-LM predictions tried per position (to avoid proposing the original token).
        delta: ``"prob"`` (the paper: ``Δ = p(y|x) − p(y|x̃)``) or ``"logprob"`` (``Δ = tanh(log p(y|x) −
            log p(y|x̃))``, which still moves the scores when ``p(y|x)`` is tiny, e.g. on random models).
        seed: sampling seed (no global RNG is touched).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> import tokensmith.attribution.reagent  # registers "reagent"
        >>> r = attribute(ts.tiny("llama"), "The capital of France is", target=" Paris", method="reagent",
        ...               replacer=ts.tiny("bert"), n_iters=8)
        >>> bool(abs(float(r.scores[0].sum()) - 1) < 1e-5)
        True
    """

    replacer: Any = None
    n_iters: int = 64
    replace_ratio: float = 0.3
    stop_topk: int | None = 3
    keep_top_n: int = 5
    block_size: int = 8
    n_candidates: int = 8
    delta: str = "prob"
    seed: int | None = 0
    requires = ()
    stochastic = True

    def config(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        rep = out["replacer"]
        out["replacer"] = getattr(rep, "name", None) if rep is not None else None
        return out

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        mlm = _check_replacer(self.replacer)
        if self.n_iters < 1 or self.block_size < 1:
            raise ValueError("n_iters and block_size must be >= 1")
        if not 0 < self.replace_ratio < 1:
            raise ValueError("replace_ratio must lie in (0, 1)")
        if self.delta not in ("prob", "logprob"):
            raise ValueError(f"delta must be 'prob' (the paper) or 'logprob', got {self.delta!r}")
        if self.stop_topk is not None and self.stop_topk < 1:
            raise ValueError("stop_topk must be >= 1 (or None to run n_iters)")
        rep = MLMReplacer(problem, mlm, self.n_candidates, problem.batch_size)
        context = problem.valid() & rep.replaceable[None, :]  # [R, L]
        pool = torch.nonzero(context.any(0)).flatten()
        if pool.numel() == 0:
            raise ValueError("no source token before the target can be replaced by the masked LM")
        R, L = context.shape
        n_rep = max(1, math.ceil(self.replace_ratio * pool.numel()))
        gen = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        full = problem.score_ids([problem.ids.tolist()])[0].double()  # [R]
        logits = torch.zeros(R, L, dtype=torch.float64)
        active = torch.ones(R, dtype=torch.bool)
        iters = torch.zeros(R, dtype=torch.long)
        done = 0
        progress = bar(self.n_iters, desc="reagent", unit="iter")
        while done < self.n_iters and bool(active.any()):
            k = min(self.block_size, self.n_iters - done)
            masks = [pool[torch.randperm(pool.numel(), generator=gen)[:n_rep]].tolist() for _ in range(k)]
            f = problem.score_ids(rep.fill(masks)).double()  # [k, R]
            delta = self._delta(problem, full, f, self.delta)
            for j, mask in enumerate(masks):
                replaced = torch.zeros(L, dtype=torch.bool)
                replaced[mask] = True
                d = torch.where(active, delta[j], torch.full_like(delta[j], float("nan")))
                logits = reagent_update(logits, d, replaced, context)
            iters[active] += k
            done += k
            progress.update(k)
            if self.stop_topk is not None and problem.kind == "tokens":
                stop = self._stop_test(problem, rep, reagent_scores(logits, context), context, active)
                active &= ~stop
        progress.close()
        scores = reagent_scores(logits, context)
        return MethodOutput(scores.float(), target_scores=full.float(), valid=context & problem.valid(),
                            extra={"iterations": iters.tolist(), "stopped": (~active).tolist(),
                                   "replaced_per_iteration": n_rep, "shared_vocab": rep.shared_vocab,
                                   "replacer": mlm.name})

    @staticmethod
    def _delta(problem: AttributionProblem, full: torch.Tensor, f: torch.Tensor, how: str) -> torch.Tensor:
        if problem.kind == "tokens" and how == "prob":
            return full.exp()[None, :] - f.exp()  # Δp = p(y|x) − p(y|x̃); NaN where the row's token was replaced
        return torch.tanh(full[None, :] - f)

    def _stop_test(self, problem: AttributionProblem, rep: MLMReplacer, scores: torch.Tensor,
                   context: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``[R]`` True where row ``t``'s target is in the top ``stop_topk`` with only its ``keep_top_n`` most
        important context tokens kept (the rest of its context replaced by MLM predictions)."""
        rows = torch.nonzero(active).flatten().tolist()
        masks = []
        for t in rows:
            ctx = torch.nonzero(context[t]).flatten()
            order = ctx[torch.argsort(scores[t, ctx], descending=True, stable=True)]
            masks.append(order[self.keep_top_n :].tolist())
        seqs = rep.fill(masks)
        ad = problem.adapter
        pos = problem.target_positions
        stop = torch.zeros(len(active), dtype=torch.bool)
        bs = problem.batch_size or 16
        with torch.no_grad():
            for s in range(0, len(rows), bs):
                part = rows[s : s + bs]
                x = torch.tensor(seqs[s : s + bs], dtype=torch.long)
                at = torch.tensor([int(pos[t]) - 1 for t in part])
                uniq = torch.unique(at)
                use_keep = ad.capabilities()["features"]["logits_at_positions"]
                out = ad.forward({"input_ids": x, "attention_mask": torch.ones_like(x)},
                                 logits_to_keep=uniq if use_keep else None)
                lg = out.logits.float().cpu()
                col = torch.searchsorted(uniq, at) if use_keep and lg.shape[1] == uniq.numel() else at
                z = lg[torch.arange(len(part)), col]  # [b, V]
                y = problem.ids[pos[part]]
                rank = (z > z.gather(1, y[:, None])).sum(1)
                for n, t in enumerate(part):
                    stop[t] = bool(rank[n] < self.stop_topk)  # type: ignore[operator]
        return stop


# ------------------------------------------------------------------------------------------------ update rule
def reagent_update(logits: torch.Tensor, delta: torch.Tensor, replaced: torch.Tensor, context: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """One ReAGent update: ``ℓ_ti ← ℓ_ti + logit((1 + σ_i Δ_t)/2)`` on the context ``C_t``, ``σ_i = +1`` for
    replaced tokens and ``−1`` for kept ones. Rows with a non-finite ``Δ_t`` are left unchanged.

    Args:
        logits: ``[R, L]`` importance log-odds; delta: ``[R]`` changes ``Δ_t ∈ [−1, 1]``;
        replaced: ``[L]`` bool, the subset ``R``; context: ``[R, L]`` bool.
        eps: clamp of ``(1 + σΔ)/2`` into ``[eps, 1 − eps]`` (``|Δ| = 1`` would give ±inf).

    Examples:
        >>> l = reagent_update(torch.zeros(1, 3), torch.tensor([0.5]), torch.tensor([True, False, False]),
        ...                    torch.ones(1, 3, dtype=torch.bool))
        >>> [round(v, 6) for v in l[0].tolist()]  # ±log 3
        [1.098612, -1.098612, -1.098612]
    """
    sign = torch.where(replaced, 1.0, -1.0).to(logits.dtype)
    d = delta.to(logits.dtype)
    ok = torch.isfinite(d)
    p = ((1 + sign[None, :] * torch.where(ok, d, torch.zeros_like(d))[:, None]) / 2).clamp(eps, 1 - eps)
    upd = torch.log(p) - torch.log1p(-p)
    return torch.where(context & ok[:, None], logits + upd, logits)


def reagent_scores(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``softmax`` of each row's log-odds over its context (0 elsewhere): the importance distribution.

    Examples:
        >>> import math
        >>> s = reagent_scores(torch.tensor([[math.log(3), -math.log(3), -math.log(3)]]),
        ...                    torch.ones(1, 3, dtype=torch.bool))
        >>> [round(v, 6) for v in s[0].tolist()]  # 9/11, 1/11, 1/11
        [0.818182, 0.090909, 0.090909]
    """
    z = logits.masked_fill(~context, float("-inf"))
    s = torch.softmax(z, -1)
    return torch.where(context, s, torch.zeros_like(s)).nan_to_num(0.0)
