"""HotFlip / AutoPrompt: one coordinate per step, first-order candidates, accept if better (METHODS.md OPT-A5).

- :class:`HotFlip` (Ebrahimi et al. 2018; AutoPrompt, Shin et al. 2020): at one position i per step, the
  candidates are the ``num_cand`` tokens with the largest first-order decrease of the loss,
  V_cand = TopK_v(−e_vᵀ∇_{e_i}L); the best of them replaces token i only if it lowers the loss.
- :class:`MaskedTargetLoss`: AutoPrompt's objective on a masked LM: the template holds one or more mask tokens
  and L = −(1/M)·Σ_m log p(label | x, z) at each mask position m.

Reimplemented from the papers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded
from tokensmith.models.batching import is_oom
from tokensmith.optimization.search.objectives import Evaluation, TemplateObjective, register_objective
from tokensmith.optimization.search.proposers import Proposer, register_proposer

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter
    from tokensmith.optimization.search.loop import SearchState

__all__ = ["HotFlip", "MaskedTargetLoss"]

_POSITIONS = ("random", "cycle")


@register_proposer("hotflip")
@dataclass
class HotFlip(Proposer):
    """HotFlip / AutoPrompt token search (Ebrahimi et al. 2018, eq. 2; Shin et al. 2020, eq. 2).

    At step t one position i is chosen (``position="random"``: uniform from ``state.generator``;
    ``"cycle"``: i = t mod n). With G = ∂L/∂onehot (``state.grad()``, row i equals E·∇_{e_i}L up to the
    embedding scale), the candidates are

        V_cand = TopK_v(−G_{i,v}) over allowed v ≠ z_i,   |V_cand| = ``num_cand``,

    each replacing z_i alone; the loop scores them exactly. The first-order estimate of the change of the
    loss when z_i → v is (e_v − e_{z_i})ᵀ∇_{e_i}L; the e_{z_i} term is the same for every v, so ranking by
    −e_vᵀ∇_{e_i}L is the same ranking.

    **Acceptance.** With ``strict=True`` (default) the best candidate becomes the current ids only when its
    loss is strictly lower than the current loss; otherwise :meth:`observe` restores the previous ids (the
    loop always moves to the step's best candidate, so the proposer undoes a move that does not improve).
    The current loss therefore never increases. A step's history ``loss`` is still the loss of the best
    candidate *tried* (what the loop records); ``best_loss`` and the current ids follow the acceptance rule.
    ``strict=False`` moves to the step's best candidate like GCG (``buffer_size=1`` in :func:`search`
    gives strict acceptance too).

    Args:
        num_cand: candidates per step (AutoPrompt: 10–100).
        position: ``"random"`` or ``"cycle"``.
        strict: keep the current ids when no candidate lowers the loss.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> from tokensmith.optimization.search import search
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Say", Slot("trigger", " x x x")], target=" ok")
        >>> res = search(ad, enc, "hotflip", steps=3, num_cand=8, progress=False)
        >>> res.best_loss <= res.init_loss
        True
    """

    num_cand: int = 100
    position: str = "random"
    strict: bool = True
    resample = False  # one position per step: do not ask again (a second call would pick another position)

    def __post_init__(self) -> None:
        self._prev: tuple[torch.Tensor, float] | None = None
        self.positions_used: list[int] = []

    def setup(self, state: SearchState) -> None:
        if int(self.num_cand) < 1:
            raise ValueError(f"num_cand must be >= 1, got {self.num_cand}")
        if self.position not in _POSITIONS:
            raise ValueError(f"position must be one of {_POSITIONS}, got {self.position!r}")
        n_allowed = int(state.allowed.sum())
        if n_allowed < int(self.num_cand):
            raise ValueError(
                f"the constraints leave {n_allowed} allowed tokens, fewer than num_cand={self.num_cand}: lower "
                "num_cand or relax the constraints (ascii_only, blocklist, mask)"
            )

    def choose_position(self, state: SearchState) -> int:
        """The coordinate flipped at this step."""
        if self.position == "cycle":
            return int(state.step % state.n)
        return int(torch.randint(0, state.n, (1,), generator=state.generator))

    def propose(self, state: SearchState) -> torch.Tensor:
        i = self.choose_position(state)
        self.positions_used.append(i)
        self._prev = (state.current.clone(), float(state.current_loss))
        g = state.grad()[i].detach().clone().cpu().float()
        g[~state.allowed] = float("inf")
        g[state.current[i]] = float("inf")
        k = min(int(self.num_cand), int(torch.isfinite(g).sum()))
        top = (-g).topk(k).indices
        out = state.current[None].repeat(k, 1)
        out[:, i] = top
        return out

    def observe(self, state: SearchState, candidates: torch.Tensor, evaluation: Evaluation) -> None:
        if not self.strict or self._prev is None:
            return
        ids, loss = self._prev
        if not state.current_loss < loss:  # no strict improvement: stay
            state.current = ids.clone()
            state.current_loss = loss


def _label_id(tokenizer: Any, label: str | int) -> int:
    if isinstance(label, (int,)) and not isinstance(label, bool):
        return int(label)
    if not isinstance(label, str):
        raise TypeError(f"a label is a token id (int) or a word (str), got {type(label).__name__}")
    ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"the label {label!r} is {len(ids)} tokens {pieces}; a masked LM predicts one token per mask: choose a "
            "single-token label word, pass its token id, or put one mask token per label token (label=[...])"
        )
    return int(ids[0])


@register_objective("masked_target")
class MaskedTargetLoss(TemplateObjective):
    """AutoPrompt's objective on a masked LM (Shin et al. 2020, eq. 1):

        L(z) = −(1/M)·Σ_{m=1..M} log p([MASK]_m = y_m | x_prompt, z)

    over the M mask tokens of the template, from the masked-LM head's logits at the mask positions
    (``adapter.forward(...).logits``). ``success`` is True where the label is the arg-max at every mask.

    Put the tokenizer's mask token in the prompt and encode with ``allow_special=True`` (content text never
    produces special tokens otherwise), without a ``target``:
    ``ad.encode(["the movie was ", Slot("trigger", "a b c"), " [MASK] ."], allow_special=True)``. Keep the
    spaces around the slot in the template text: a WordPiece tokenizer decodes slot ids without a leading
    space, so a slot text ``" a b c"`` would not survive the re-tokenization check.

    Args:
        adapter: a masked-LM adapter (e.g. ``BertForMaskedLM``).
        enc: the template, with one :class:`~tokensmith.models.Slot` and at least one mask token.
        label: the word or token id predicted at every mask, or a sequence with one entry per mask; a word must
            be a single token.
        slot: the slot's name (default: the only slot).
        max_batch_size: candidates per forward (halved on out-of-memory).

    Raises:
        ValueError: a causal model, a tokenizer without a mask token, a template without a mask token outside
            the slot, an encoding with a target, or a label that is not exactly one token.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> ad = ts.tiny("bert")
        >>> enc = ad.encode(["the movie was ", Slot("trigger", "a b"), " [MASK] ."], allow_special=True)
        >>> obj = MaskedTargetLoss(ad, enc, "great")
        >>> obj.evaluate(obj.init_ids[None]).loss.shape
        torch.Size([1])
    """

    name = "masked_target"

    def __init__(
        self,
        adapter: ModelAdapter,
        enc: Encoded,
        label: str | int | Sequence[str | int],
        slot: str | None = None,
        *,
        max_batch_size: int = 64,
    ):
        if adapter.is_causal or adapter.structure.lm_head is None:
            raise ValueError(
                "MaskedTargetLoss needs a masked LM with its LM head (e.g. BertForMaskedLM); for a causal LM score a "
                "continuation with TargetLoss (encode with target='...')"
            )
        tok = adapter.tokenizer
        mask_id = getattr(tok, "mask_token_id", None)
        if mask_id is None:
            raise ValueError(f"the tokenizer of {adapter.name!r} has no mask token: MaskedTargetLoss needs a masked LM")
        if not isinstance(enc, Encoded):
            raise TypeError(f"expected an Encoded example from adapter.encode, got {type(enc).__name__}")
        if bool(enc.target_mask.any()):
            raise ValueError(
                "a masked-LM template has no target continuation: encode it without target= and give the word to "
                "predict at the mask as label="
            )
        super().__init__(adapter, enc, slot)
        t = self.template
        is_mask = t.ids == int(mask_id)
        is_mask[t.start : t.end] = False
        if not bool(is_mask.any()):
            hint = ""
            if tok.mask_token and tok.mask_token in enc.text:
                hint = (f" The text contains {tok.mask_token!r} but it was tokenized as plain text: encode with "
                        "allow_special=True.")
            raise ValueError(
                f"the template has no mask token outside the slot: put tokenizer.mask_token ({tok.mask_token!r}) "
                f"where the label should be predicted and encode with allow_special=True.{hint}"
            )
        self.mask_positions = torch.nonzero(is_mask).flatten()
        M = len(self.mask_positions)
        labels = list(label) if isinstance(label, (list, tuple)) else [label] * M
        if len(labels) != M:
            raise ValueError(f"label has {len(labels)} entries but the template has {M} mask tokens; give one per mask")
        self.labels = torch.tensor([_label_id(tok, lab) for lab in labels], dtype=torch.long)
        V = int(adapter.E.shape[0])
        if bool(((self.labels < 0) | (self.labels >= V)).any()):
            raise ValueError(f"label ids must be in [0, {V})")
        self.max_batch_size = int(max_batch_size)
        adapter.check_length(len(t.ids), "the template")

    def __repr__(self) -> str:
        return f"MaskedTargetLoss({self.template!r}, masks={self.mask_positions.tolist()}, labels={self.labels.tolist()})"

    def _loss_from_logits(self, z: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` [N, T, V] → (loss [N], success [N]) at ``positions``."""
        zm = z[:, positions.to(z.device)].float()
        lab = self.labels.to(z.device)
        lp = torch.log_softmax(zm, -1).gather(-1, lab[None, :, None].expand(len(zm), -1, 1))[..., 0]
        return -lp.mean(-1), (zm.argmax(-1) == lab[None]).all(-1)

    def evaluate(self, slot_ids: torch.Tensor, base: torch.Tensor | None = None) -> Evaluation:
        t = self.template
        cand = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1, t.n)
        N = len(cand)
        losses = torch.empty(N)
        success = torch.empty(N, dtype=torch.bool)
        start, bs = 0, self.max_batch_size
        while start < N:
            rows = t.fill(cand[start : start + bs])
            try:
                with torch.no_grad():
                    z = self.adapter.forward(rows.to(self.adapter.device)).logits
                    lo, ok = self._loss_from_logits(z, self.mask_positions)
            except Exception as err:  # noqa: BLE001 - re-raised unless out of memory
                if not is_oom(err) or bs == 1:
                    raise
                bs = self.max_batch_size = max(1, bs // 2)
                continue
            self.forwards += len(rows)
            self.tokens += rows.numel()
            losses[start : start + len(rows)] = lo.cpu()
            success[start : start + len(rows)] = ok.cpu()
            start += len(rows)
        return Evaluation(losses, success)

    def _grad_of(self, embeds: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = self.adapter.forward(inputs_embeds=embeds).logits
            loss = self._loss_from_logits(z, self.mask_positions)[0][0]
            (g,) = torch.autograd.grad(loss, leaf)
        self.forwards += 1
        self.backwards += 1
        self.tokens += embeds.shape[1]
        return g.float()

    def grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂onehot ``[n, V]`` through ``adapter.onehot_embeds``."""
        t = self.template
        ids = t.fill(torch.as_tensor(slot_ids).reshape(1, t.n))
        pos = torch.zeros_like(ids, dtype=torch.bool)
        pos[0, t.start : t.end] = True
        with torch.enable_grad():
            embeds, onehot = self.adapter.onehot_embeds(ids, pos)
        return self._grad_of(embeds, onehot)

    def embed_grad(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """∂L/∂e ``[n, d]`` with respect to the embedding rows in the slot (before the embedding scale)."""
        t = self.template
        ad = self.adapter
        ids = t.fill(torch.as_tensor(slot_ids).reshape(1, t.n)).to(ad.device)
        with torch.no_grad():
            base = ad.embed(ids)
            rows = ad.E[ids[0, t.start : t.end]].detach().clone()
        rows.requires_grad_(True)
        with torch.enable_grad():
            e = torch.cat(
                [base[:, : t.start], (rows * ad.structure.embed_scale)[None].to(base.dtype), base[:, t.end :]], 1
            )
        return self._grad_of(e, rows)

    def rescore(self, text: str) -> float:
        """The loss with ``text`` rendered into the slot through the full template (mask positions re-found)."""
        enc = self.template.render(text)
        ids = enc.input_ids
        sp = enc.spans[self.template.slot]
        is_mask = ids == int(self.adapter.tokenizer.mask_token_id)
        is_mask[sp.start : sp.end] = False
        pos = torch.nonzero(is_mask).flatten()
        if len(pos) != len(self.mask_positions):
            raise ValueError(f"the string {text!r} changes the number of mask tokens of the template")
        with torch.no_grad():
            z = self.adapter.forward(ids[None].to(self.adapter.device)).logits
        self.forwards += 1
        self.tokens += len(ids)
        return float(self._loss_from_logits(z, pos)[0][0])
