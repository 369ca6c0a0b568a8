"""Token-weighted training on ``transformers.Trainer`` (METHODS.md 3B): any weighter, extra token losses, Rho-1's
reference computed on the fly, kept-token fraction and per-frequency-bucket losses in the logs.

:class:`TokenWeightedTrainer` only overrides ``compute_loss`` (and the logging / evaluation step around it): the
loop, optimiser, scheduler, checkpointing, gradient accumulation and distribution are HF Trainer's own. Per
micro-batch:

1. the model's forward on the batch (without ``labels``, so HF computes no loss of its own and no extra
   ``B×T×V`` tensor exists beyond the logits the model returns);
2. ``labels, mask = shift_labels(labels or input_ids, attention_mask)`` (HF labels with ``-100`` work);
3. the reference quantities a weighter needs, under ``no_grad`` on the reference's device (Rho-1:
   ``ref_token_loss``; PRIOR: ``ref_noctx_logprobs``);
4. :func:`~tokensmith.optimization.training.compute_token_objective` → the loss and its logs.

The loss is a per-micro-batch mean (``loss_is_scaled_for_ga = False``: HF divides it by the accumulation
steps), so with gradient accumulation each micro-batch is normalised by its own counted tokens, and Rho-1's
top-k% is taken per micro-batch.

**Non-finite losses** (``nan=``): ``"raise"`` (default) raises a ValueError that says what is non-finite (logits,
weights, a loss term) at which step. ``"skip"`` replaces the loss of that micro-batch by ``0·Σθ`` (a zero with a
zero gradient for every trainable parameter, so DDP and gradient accumulation see a normal backward), counts it
in :attr:`TokenWeightedTrainer.nan_skipped` and logs ``nan_skipped`` (cumulative). The optimiser still steps (with
the other micro-batches' gradients, or zeros): Adam's moments decay and weight decay applies; a skip is not a
rollback.

**Logs** (means over the micro-batches since the last log; ``eval_``-prefixed in evaluation): ``loss_ce`` (plain
mean CE), ``loss_weighted``, ``kept_fraction``, ``weight_mean``, ``loss_<term>`` of each token loss, the weighter's
own (Rho-1: ``excess_loss_mean``, ``ref_loss_mean``) and ``loss_bucket_0 … loss_bucket_{n−1}``: the mean plain CE
of the counted tokens whose *label* falls in each frequency bucket (:func:`frequency_buckets`; bucket 0 the
rarest), accumulated as Σ CE / count over the interval. A bucket with no token in the interval is not logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from tokensmith.models.adapter import ModelAdapter
from tokensmith.optimization.training.base import TokenWeighter, get_weighter
from tokensmith.optimization.training.losses import (
    _NAN,
    _check_reduction,
    _loss_terms,
    _token_loss,
    compute_token_objective,
    shift_labels,
)
from tokensmith.optimization.training.weighters import (
    _eval,
    check_reference_vocab,
    no_context_logprobs,
    reference_token_loss,
)

__all__ = ["TokenWeightedTrainer", "frequency_buckets", "token_frequencies"]

_REF_KEYS = ("ref_token_loss", "ref_noctx_logprobs")
_BATCH_FIELDS = ("logits", "labels", "mask", "token_loss", "input_ids", "hidden")


# --------------------------------------------------------------------------------------------------- buckets
def frequency_buckets(freq: torch.Tensor | Any, n_buckets: int) -> torch.Tensor:
    """Bucket id per token ``[V]`` (long) from token frequencies: equal-mass buckets along log frequency.

    Tokens are ordered by frequency (equivalently log frequency); bucket boundaries fall where the cumulative
    occurrence mass crosses ``j/n`` of the total, so every bucket holds about ``1/n`` of all token occurrences
    (the rare bucket many token types, the frequent one a few). A group of tokens with the same frequency lies in
    one bucket, at the bucket of the midpoint of its mass interval: with ``M`` the total and ``C_g`` the mass up
    to and including the group, ``bucket(g) = min(n−1, ⌊n·(C_g − m_g/2)/M⌋)``. Hence:

    - the buckets partition the vocabulary (every id gets exactly one bucket in ``[0, n)``);
    - the bucket id is non-decreasing in frequency; bucket 0 holds the rarest tokens, including unseen ones;
    - each bucket's mass is within ``max_g m_g`` of ``M/n`` (a bucket can be empty when one token holds more than
      ``1/n`` of the mass).

    Args:
        freq: ``[V]`` non-negative counts (any numeric tensor or sequence).
        n_buckets: ``n >= 1``.

    Raises:
        ValueError: not 1-D, negative / non-finite counts, all zero, ``n_buckets < 1``.

    Examples:
        >>> import torch
        >>> frequency_buckets(torch.tensor([0, 1, 1, 2, 100, 6]), 2).tolist()      # 100 of 110 in one token
        [0, 0, 0, 0, 1, 0]
        >>> frequency_buckets(torch.tensor([5, 5, 5, 5]), 4).tolist()     # one group, mass midpoint 1/2
        [2, 2, 2, 2]
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be an int >= 1, got {n_buckets!r}")
    f = torch.as_tensor(freq).detach().to("cpu", torch.float64)
    if f.dim() != 1 or f.numel() == 0:
        raise ValueError(f"freq must be a non-empty 1-D tensor [V], got shape {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ValueError("freq must hold finite counts >= 0")
    total = float(f.sum())
    if total <= 0:
        raise ValueError("freq is all zero: no frequencies to bucket (count the training labels first)")
    uniq, inv = torch.unique(f, sorted=True, return_inverse=True)
    mass = uniq * torch.bincount(inv, minlength=uniq.numel()).double()
    cum = torch.cumsum(mass, 0)
    mid = (cum - mass / 2) / total
    b = torch.floor(mid * n_buckets).clamp(0, n_buckets - 1).long()
    return b[inv]


def token_frequencies(
    dataset: Iterable[Mapping[str, Any]],
    vocab_size: int,
    *,
    column: str | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Counts ``[V]`` (long) of the token ids of a data set's rows: the ``labels`` column where present (without
    ``ignore_index``), else ``input_ids``; ``column=`` picks one. One pass over the rows (on a big data set pass a
    precomputed ``frequency=`` to the trainer instead).

    Examples:
        >>> token_frequencies([{"input_ids": [1, 2, 2]}, {"input_ids": [2]}], 4).tolist()
        [0, 1, 3, 0]
    """
    counts = torch.zeros(int(vocab_size), dtype=torch.long)
    try:
        iter(dataset)
    except TypeError:
        raise TypeError("dataset must be iterable over rows (dicts with input_ids / labels)") from None
    for row in dataset:
        col = column or ("labels" if "labels" in row and row["labels"] is not None else "input_ids")
        if col not in row:
            raise ValueError(f"a row has no {col!r} column; pass column= or frequency=")
        ids = torch.as_tensor(row[col]).reshape(-1).long()
        ids = ids[ids != ignore_index]
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(f"token id outside [0, {vocab_size}) in column {col!r}")
            counts += torch.bincount(ids, minlength=vocab_size)
    return counts


# --------------------------------------------------------------------------------------------------- trainer
def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v is None:
        raise ValueError(
            "cannot tell the model's vocabulary size (no output embeddings, no config.vocab_size)"
        )
    return int(v)


class TokenWeightedTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is :func:`~tokensmith.optimization.training.compute_token_objective`:

        L = reduce(m·w·CE) + Σ_i λ_i·L_i,    w = weighter(batch)

    (see the module doc for the step, the logs and the NaN policy).

    Args:
        model: the causal LM to train (``nn.Module``) or a :class:`~tokensmith.models.ModelAdapter` (its model is
            trained; its tokenizer becomes the default ``processing_class``).
        args: ``transformers.TrainingArguments``.
        weighter: a :class:`TokenWeighter` or registry name (``"uniform"`` default, ``"rho1"``, ``"tldr"``,
            ``"focal"``, ``"prior"``).
        weighter_kwargs: keyword arguments when ``weighter`` is a name (e.g. ``{"keep_ratio": 0.7}``).
        token_losses: extra :class:`TokenLoss` terms (instances with a ``weight`` attribute, names, or
            ``(loss, λ)`` pairs).
        ref_model: the frozen reference (adapter or module, the policy's tokenizer) for weighters that need
            ``ref_token_loss`` / ``ref_noctx_logprobs``. It is put in eval mode, its parameters frozen
            (``requires_grad_(False)``) and moved to the training device unless dispatched with ``device_map``;
            it must not be the trained model itself (pass a copy).
        frequency: ``[V]`` token frequencies for the bucket logs; None counts the training set's labels
            (:func:`token_frequencies`).
        n_buckets: frequency buckets logged (0 disables the bucket logs).
        reduction: ``"token"`` or ``"sequence"`` (:func:`reduce_token_loss`).
        normalize: override the weighter's ``normalize``.
        nan: ``"raise"`` or ``"skip"``.
        bos_id: BOS id for the no-context reference (PRIOR; default the reference's BOS/EOS).
        **kwargs: ``transformers.Trainer`` arguments (``train_dataset``, ``eval_dataset``, ``data_collator``,
            ``processing_class``, ``callbacks``, ...).

    Raises:
        ValueError: a weighter that needs a reference without ``ref_model``; the policy as its own reference; a
            reference with another vocabulary; a frequency tensor of the wrong length; bad ``nan`` /
            ``reduction``.

    Examples:
        >>> import copy, tempfile, datasets, transformers, tokensmith as ts               # doctest: +SKIP
        >>> ad = ts.tiny("llama")                                                          # doctest: +SKIP
        >>> ds = datasets.Dataset.from_dict({"input_ids": [ad.tokenizer("the cat sat").input_ids] * 8})  # doctest: +SKIP
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=3, report_to=[], use_cpu=True)  # doctest: +SKIP
        >>> tr = TokenWeightedTrainer(ad, args, weighter="rho1", ref_model=copy.deepcopy(ad.model),   # doctest: +SKIP
        ...                           train_dataset=ds)
        >>> tr.train()                                                                      # doctest: +SKIP
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | ModelAdapter | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        weighter: str | TokenWeighter | None = None,
        weighter_kwargs: Mapping[str, Any] | None = None,
        token_losses: Iterable[Any] = (),
        ref_model: nn.Module | ModelAdapter | None = None,
        frequency: torch.Tensor | None = None,
        n_buckets: int = 4,
        reduction: str = "token",
        normalize: str | None = None,
        nan: str = "raise",
        bos_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = model
        if isinstance(model, ModelAdapter):
            kwargs.setdefault("processing_class", model.tokenizer)
            model = model.model
        if model is None:
            raise ValueError("model is required (a causal LM module or a ModelAdapter)")
        if nan not in _NAN:
            raise ValueError(f"nan must be one of {_NAN}, got {nan!r}")
        if isinstance(weighter, TokenWeighter) and weighter_kwargs:
            raise ValueError("weighter_kwargs only apply to a weighter given by name")
        self.weighter = get_weighter(
            weighter if weighter is not None else "uniform", **dict(weighter_kwargs or {})
        )
        _check_reduction(reduction, normalize or self.weighter.normalize)
        self.token_loss_terms = _loss_terms(token_losses)
        self.reduction, self.normalize, self.nan = reduction, normalize, nan
        needs = set(self.weighter.needs)
        for t, _, _ in self.token_loss_terms:
            needs |= set(t.needs)
        self.ref_needs = tuple(k for k in _REF_KEYS if k in needs)
        self.needs_hidden = "hidden" in needs
        self.batch_keys = tuple(sorted(needs - set(_REF_KEYS) - set(_BATCH_FIELDS)))
        if self.ref_needs and ref_model is None:
            raise ValueError(
                f"{type(self.weighter).__name__} needs {list(self.ref_needs)} from a reference model: pass ref_model= "
                "(e.g. copy.deepcopy(model) or a model trained on high-quality data, with the same tokenizer)"
            )
        if ref_model is not None:
            ref_mod = ref_model.model if isinstance(ref_model, ModelAdapter) else ref_model
            if not isinstance(ref_mod, nn.Module):
                raise TypeError(
                    f"ref_model must be a ModelAdapter or nn.Module, got {type(ref_model).__name__}"
                )
            if ref_mod is model:
                raise ValueError(
                    "ref_model is the model being trained: the excess loss would be 0 for every token; pass a frozen "
                    "copy (copy.deepcopy(model)) or another reference"
                )
            tok = kwargs.get("processing_class")
            check_reference_vocab(
                policy if isinstance(policy, ModelAdapter) else (tok if tok is not None else model), ref_model
            )
            check_reference_vocab(model, ref_mod)  # and the output vocabulary sizes
        self.ref_model = ref_model
        self.bos_id = bos_id
        super().__init__(model=model, args=args, **kwargs)
        if ref_model is not None:
            ref_mod = ref_model.model if isinstance(ref_model, ModelAdapter) else ref_model
            if not getattr(ref_mod, "hf_device_map", None):
                ref_mod.to(self.args.device)
            ref_mod.eval()
            ref_mod.requires_grad_(False)
        V = _vocab_size(model)
        self.bucket_ids: torch.Tensor | None = None
        if n_buckets:
            if frequency is None and self.train_dataset is not None:
                frequency = token_frequencies(self.train_dataset, V)
            if frequency is not None:
                frequency = torch.as_tensor(frequency)
                if frequency.dim() != 1 or frequency.numel() != V:
                    raise ValueError(f"frequency must be a [V] tensor with V = {V} (the model's vocabulary)")
                self.bucket_ids = frequency_buckets(frequency, int(n_buckets))
        self.n_buckets = int(n_buckets) if self.bucket_ids is not None else 0
        self.frequency = frequency
        self.nan_skipped = 0
        self._stored: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}

    # ---------------------------------------------------------------- reference quantities
    def _reference_extras(
        self, inputs: Mapping[str, Any], labels: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        ref = self.ref_model
        ids, am = inputs["input_ids"], inputs.get("attention_mask")
        if "ref_token_loss" in self.ref_needs:
            if isinstance(ref, ModelAdapter):
                out["ref_token_loss"] = reference_token_loss(ref, ids, am, labels, mask)
            else:  # the same plain call as the policy's forward (same positions under any padding)
                dev = next(ref.parameters()).device
                call = {
                    k: v.to(dev)
                    for k, v in inputs.items()
                    if k in ("input_ids", "attention_mask", "position_ids")
                }
                with torch.no_grad(), _eval(ref):
                    logits = ref(**call, use_cache=False).logits
                    out["ref_token_loss"] = _token_loss(logits, labels.to(dev), mask.to(dev), None).to(
                        labels.device
                    )
                    del logits
        if "ref_noctx_logprobs" in self.ref_needs:
            out["ref_noctx_logprobs"] = no_context_logprobs(ref, labels, mask, bos_id=self.bos_id).to(
                labels.device
            )
        return out

    # ---------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Forward, shift, reference quantities, :func:`compute_token_objective`; records the logs."""
        inputs = dict(inputs)
        hf_labels = inputs.pop("labels", None)
        extra = {k: inputs.pop(k) for k in self.batch_keys if k in inputs}
        if "input_ids" not in inputs:
            raise ValueError("TokenWeightedTrainer needs input_ids in every batch")
        fwd = dict(inputs)
        if self.needs_hidden:
            fwd["output_hidden_states"] = True
        outputs = model(**fwd)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        ids, am = inputs["input_ids"], inputs.get("attention_mask")
        labels, mask = shift_labels(hf_labels if hf_labels is not None else ids, am)
        extra.update(self._reference_extras(inputs, labels, mask))
        hidden = outputs.hidden_states[-1] if self.needs_hidden else None
        try:
            out = compute_token_objective(
                logits,
                labels,
                mask,
                self.weighter,
                [(t, lam) for t, lam, _ in self.token_loss_terms],
                reduction=self.reduction,
                normalize=self.normalize,
                nan=self.nan,
                input_ids=ids,
                hidden=hidden,
                **extra,
            )
        except ValueError as e:
            raise ValueError(f"step {self.state.global_step}: {e}") from e
        split = "train" if model.training else "eval"
        if out.skipped:
            self.nan_skipped += 1
            params = [p for p in model.parameters() if p.requires_grad]
            loss = sum(p.sum() for p in params) * 0.0 if params else out.loss
        else:
            loss = out.loss
        self._record(split, out, labels)
        return (loss, outputs) if return_outputs else loss

    def _record(self, split: str, out: Any, labels: torch.Tensor) -> None:
        store = self._stored[split]
        for k, v in out.logs.items():
            store.setdefault(k, []).append(v.detach().float())
        if split == "train":
            store["nan_skipped"] = self.nan_skipped
        if self.bucket_ids is not None and not out.skipped:
            n = self.n_buckets
            ce = out.token_loss.detach().float()
            m = out.mask
            if self.bucket_ids.device != labels.device:
                self.bucket_ids = self.bucket_ids.to(labels.device)
            b = torch.where(m, self.bucket_ids[labels.clamp(0, self.bucket_ids.numel() - 1)], n).reshape(-1)
            sums = torch.zeros(n + 1, dtype=torch.float64, device=ce.device).scatter_add_(
                0, b.to(ce.device), torch.where(m, ce, 0.0).reshape(-1).double()
            )
            cnt = torch.zeros(n + 1, dtype=torch.float64, device=ce.device).scatter_add_(
                0, b.to(ce.device), m.reshape(-1).double()
            )
            if "_bucket_sum" in store:
                store["_bucket_sum"] += sums[:n]
                store["_bucket_count"] += cnt[:n]
            else:
                store["_bucket_sum"], store["_bucket_count"] = sums[:n], cnt[:n]

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation: the objective's loss only (its logs, with the bucket losses, are logged ``eval_``-prefixed)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the objective's logs since the last log, the bucket losses and ``nan_skipped``."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._stored[split]
        prefix = "eval_" if split == "eval" else ""
        sums, cnt = store.pop("_bucket_sum", None), store.pop("_bucket_count", None)
        for k, vals in store.items():
            if k == "nan_skipped":
                logs[k] = float(vals)
            elif vals:
                logs[prefix + k] = float(torch.stack([v.to(vals[0].device) for v in vals]).mean())
        if sums is not None:
            s, c = sums.tolist(), cnt.tolist()
            for i in range(len(s)):
                if c[i] > 0:
                    logs[f"{prefix}loss_bucket_{i}"] = s[i] / c[i]
        store.clear()
        super().log(logs, start_time)
