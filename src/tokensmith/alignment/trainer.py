"""Token-level preference training on ``transformers.Trainer`` with a cached per-token reference (METHODS.md 4).

Two pieces:

- :class:`ReferenceCache`: the reference model's per-token log-probs log π_ref(y_t∣x, y<t) of every chosen and
  rejected completion of a data set, computed ONCE (no grad, eval mode) and saved to disk (safetensors). Its key
  is (data set fingerprint, reference model digest, tokenizer digest, encoding options); a cache whose key
  differs from what a run expects is refused (``ValueError`` naming the differing fields). Rows are looked up by
  a content hash of (prompt, chosen, rejected), so any sampler order, shuffle or padding of the batch finds the
  right values; the per-row values are the completion tokens only (padding-free), scattered into each batch's
  completion masks.
- :class:`TokenPreferenceTrainer`: a thin ``transformers.Trainer`` subclass. A collator turns rows (prompt /
  chosen / rejected strings) into a :class:`~tokensmith.alignment.data.PreferenceBatch` with
  :func:`~tokensmith.alignment.data.encode_pairs` plus the cached reference log-probs; ``compute_loss`` runs the
  policy with grad (:func:`~tokensmith.alignment.data.pair_logprobs`), the per-token KL through the live
  reference when the loss needs it (:func:`~tokensmith.alignment.data.pair_kl`, D_KL(π_ref ‖ π_θ)), and any loss
  of :mod:`tokensmith.alignment.losses` by name or a callable; the loss's metrics are averaged between logging
  steps and logged. Saving, checkpointing and ``resume_from_checkpoint`` are HF Trainer's own; the reference
  cache lives under ``output_dir/reference_cache`` (by default) and is reloaded by a resumed run.

The reference may be the policy itself with its PEFT adapter disabled (``reference="peft-disabled"``,
:data:`PEFT_DISABLED`; ``peft`` is an optional extra): :func:`peft_disabled_reference` gives an adapter whose
model runs the policy's ``PeftModel`` under ``disable_adapter()``, cached like a separate reference (its digest
covers the base weights only, so a resumed run finds its cache although the adapter has trained).

Why only log-probs are cached: KL terms (TDPO, SparsePO) need the reference's full next-token distribution at
every completion position (B·T·V floats); caching a top-k approximation is left out, so those losses run the
reference forward live (no grad) and keep the cached log-probs for the reward term.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import transformers

from tokensmith.alignment import losses as L
from tokensmith.alignment.data import (
    PreferenceBatch,
    encode_pairs,
    pair_kl,
    pair_logprobs,
    pair_logprobs_and_kl,
)

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "ReferenceCache",
    "LossInputs",
    "PreferenceCollator",
    "TokenPreferenceTrainer",
    "LOSSES",
    "dataset_fingerprint",
    "model_digest",
    "tokenizer_digest",
    "normalize_encoding",
    "PEFT_DISABLED",
    "peft_disabled_reference",
]

_FORMAT = "tokensmith.reference_cache/1"


# ------------------------------------------------------------------------------------------------ digests
def _blake(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _row_hash(row: Mapping[str, Any]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for k in ("prompt", "chosen", "rejected"):
        b = str(row[k]).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def dataset_fingerprint(dataset: Any) -> str:
    """A ``datasets.Dataset``'s own ``_fingerprint`` (deterministic for the same data and transforms; a shuffle or
    select gives a new one); for any other sized, indexable data set, a content hash of all its
    (prompt, chosen, rejected) rows."""
    fp = getattr(dataset, "_fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    h = hashlib.blake2b(digest_size=16)
    for i in range(len(dataset)):
        h.update(_row_hash(dataset[i]))
    return "content-" + h.hexdigest()


def model_digest(adapter: ModelAdapter, sample: int = 1024) -> str:
    """``name|config-hash|weights-digest`` of an adapter's model.

    The config hash is over the config's JSON (sorted keys; without ``use_cache``, which does not change outputs
    and which ``transformers.Trainer`` flips on the model it trains — the policy, when the reference is the
    policy with its PEFT adapter disabled). The weights digest is cheap rather than
    exhaustive: per parameter (sorted by name) its name, shape, dtype, float64 sum and ``sample`` evenly strided
    elements — it tells apart different seeds and fine-tunes, at a cost independent of model size beyond one
    sum per tensor. An edit that keeps every sum and every sampled element could go unnoticed.
    """
    cfg = getattr(adapter.model, "config", None)
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    cfg_dict.pop("use_cache", None)  # a runtime flag (transformers.Trainer sets it False on the model it trains)
    cfg_json = json.dumps(cfg_dict, sort_keys=True, default=str)
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in sorted(adapter.model.named_parameters(), key=lambda kv: kv[0]):
            t = p.detach().reshape(-1)
            step = max(1, t.numel() // sample)
            sub = t[::step][:sample].to(torch.float32).cpu()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{float(t.double().sum())!r}".encode())
            h.update(sub.numpy().tobytes())
    return f"{adapter.name}|{_blake(cfg_json)}|{h.hexdigest()}"


def tokenizer_digest(tokenizer: Any) -> str:
    """Hash of the vocabulary (token → id), the special tokens and the chat template: two tokenizers with the same
    digest encode every pair to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    tmpl = getattr(tokenizer, "chat_template", None)
    return _blake(json.dumps(vocab), special, json.dumps(tmpl, sort_keys=True, default=str))


def normalize_encoding(tokenizer: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`encode_pairs` options with its defaults resolved (``chat``: when the tokenizer has a chat template;
    in chat mode ``score_eot`` True and ``system`` None; outside chat mode both dropped), so equal encodings give
    equal cache keys."""
    enc = dict(options or {})
    chat = enc.pop("chat", None)
    system = enc.pop("system", None)
    score_eot = enc.pop("score_eot", None)
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    enc["chat"] = bool(chat)
    if chat:
        enc["system"] = system
        enc["score_eot"] = True if score_eot is None else bool(score_eot)
    return enc


def _encoding_key(options: Mapping[str, Any]) -> str:
    return json.dumps(dict(options), sort_keys=True, default=repr)


# ------------------------------------------------------------------------------------------------ the cache
class ReferenceCache:
    """Per-token reference log-probs of every chosen and rejected completion of one data set.

    Storage: for row i, its chosen values ``lp_w[off_w[i]:off_w[i+1]]`` (the completion tokens in order, no
    padding) and likewise for rejected, plus a 16-byte content hash per row; :attr:`key` says what it was built
    from: ``dataset`` (fingerprint), ``reference`` (:func:`model_digest`), ``tokenizer``
    (:func:`tokenizer_digest`), ``encoding`` (the :func:`encode_pairs` options as JSON), ``format``.

    Build with :meth:`build` (or :meth:`get_or_build`, which reuses a file under a cache directory whose name is
    the key's hash), save with :meth:`save`, reload with :meth:`load` (``expect=`` refuses a differing key).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.alignment.pairs import demo_pairs
        >>> ref, ds = ts.tiny("llama"), demo_pairs(4)
        >>> cache = ReferenceCache.build(ref, ds, encoding={"chat": False})
        >>> len(cache), cache.key["dataset"] == ds._fingerprint
        (4, True)
    """

    def __init__(
        self,
        key: Mapping[str, str],
        hashes: torch.Tensor,
        lp_w: torch.Tensor,
        off_w: torch.Tensor,
        lp_l: torch.Tensor,
        off_l: torch.Tensor,
    ) -> None:
        n = int(hashes.shape[0])
        if off_w.shape != (n + 1,) or off_l.shape != (n + 1,):
            raise ValueError(f"offsets must have {n + 1} entries for {n} rows")
        self.key = dict(key)
        self.hashes = hashes
        self.lp_w, self.off_w, self.lp_l, self.off_l = lp_w, off_w, lp_l, off_l
        self._index = {bytes(hashes[i].tolist()): i for i in range(n)}

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def __repr__(self) -> str:
        return f"ReferenceCache(rows={len(self)}, dataset={self.key.get('dataset')!r})"

    @property
    def key_hash(self) -> str:
        """A short hash of :attr:`key` (the file name under a cache directory)."""
        return _blake(json.dumps(self.key, sort_keys=True))

    @staticmethod
    def make_key(reference: ModelAdapter, dataset: Any, encoding: Mapping[str, Any]) -> dict[str, str]:
        """The key a cache of ``reference`` on ``dataset`` with these :func:`encode_pairs` options has."""
        return {
            "format": _FORMAT,
            "dataset": dataset_fingerprint(dataset),
            "reference": model_digest(reference),
            "tokenizer": tokenizer_digest(reference.tokenizer),
            "encoding": _encoding_key(normalize_encoding(reference.tokenizer, encoding)),
        }

    def check(self, expect: Mapping[str, str]) -> None:
        """Raise ``ValueError`` when any field of ``expect`` differs from :attr:`key` (fields absent from
        ``expect`` are not checked)."""
        bad = [k for k, v in expect.items() if self.key.get(k) != v]
        if bad:
            detail = "; ".join(f"{k}: cache has {self.key.get(k)!r}, expected {expect[k]!r}" for k in bad)
            raise ValueError(
                f"reference cache key mismatch ({', '.join(bad)}): {detail}. The cache was built for another data "
                "set, reference model, tokenizer or encoding; rebuild it (ReferenceCache.build) or delete the file"
            )

    @classmethod
    def build(
        cls,
        reference: ModelAdapter,
        dataset: Any,
        *,
        encoding: Mapping[str, Any] | None = None,
        batch_size: int = 16,
    ) -> ReferenceCache:
        """Compute the reference's per-token log-probs of every row of ``dataset`` (no grad, eval mode).

        Args:
            reference: the frozen reference model.
            dataset: rows with prompt / chosen / rejected (a ``datasets.Dataset`` or any sized indexable).
            encoding: :func:`encode_pairs` options (``chat``, ``system``, ``score_eot``, other ``encode`` options);
                must equal the trainer's.
            batch_size: pairs per forward.
        """
        enc = normalize_encoding(reference.tokenizer, encoding)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(dataset)
        if n == 0:
            raise ValueError("the data set is empty")
        hashes, vals_w, vals_l = [], [], []
        with reference.eval_mode():
            for s in range(0, n, batch_size):
                rows = [dataset[i] for i in range(s, min(n, s + batch_size))]
                pb = encode_pairs(reference, rows, **enc)
                lp_w, lp_l = pair_logprobs(reference, pb)
                for b, row in enumerate(rows):
                    hashes.append(list(_row_hash(row)))
                    vals_w.append(lp_w[b][pb.mask_w[b].to(lp_w.device)].float().cpu())
                    vals_l.append(lp_l[b][pb.mask_l[b].to(lp_l.device)].float().cpu())

        def flat(vals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            off = torch.zeros(len(vals) + 1, dtype=torch.int64)
            off[1:] = torch.tensor([v.numel() for v in vals]).cumsum(0)
            return torch.cat(vals), off

        lw, ow = flat(vals_w)
        ll, ol = flat(vals_l)
        return cls(cls.make_key(reference, dataset, enc), torch.tensor(hashes, dtype=torch.uint8), lw, ow, ll, ol)

    def save(self, path: str | os.PathLike) -> str:
        """Write the cache as one safetensors file (the key in its metadata); returns the path."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tensors = {"hashes": self.hashes, "lp_w": self.lp_w, "off_w": self.off_w, "lp_l": self.lp_l, "off_l": self.off_l}
        # A temporary file of this writer's own, then an atomic rename: under DDP every process builds the same
        # cache and saves it to the same path at about the same time (a shared ``output_dir``); with one shared
        # ``path + ".tmp"`` a second writer's rename found the file already moved (FileNotFoundError). Readers
        # only ever see a complete file, and concurrent writers of the same key write the same content.
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": json.dumps(self.key)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Mapping[str, str] | None = None) -> ReferenceCache:
        """Read a cache written by :meth:`save`; with ``expect``, refuse (``ValueError``) a differing key."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "key" not in meta:
                raise ValueError(f"{path} is not a tokensmith reference cache (no key in its metadata)")
            key = json.loads(meta["key"])
            t = {k: f.get_tensor(k) for k in ("hashes", "lp_w", "off_w", "lp_l", "off_l")}
        if key.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported cache format {key.get('format')!r} (expected {_FORMAT!r})")
        cache = cls(key, t["hashes"], t["lp_w"], t["off_w"], t["lp_l"], t["off_l"])
        if expect is not None:
            cache.check(expect)
        return cache

    @classmethod
    def get_or_build(
        cls,
        reference: ModelAdapter,
        dataset: Any,
        cache_dir: str | os.PathLike,
        *,
        encoding: Mapping[str, Any] | None = None,
        batch_size: int = 16,
    ) -> tuple[ReferenceCache, bool]:
        """Load ``cache_dir/<key hash>.safetensors`` when it exists (its key checked), else build and save it.
        Returns ``(cache, loaded)``."""
        enc = normalize_encoding(reference.tokenizer, encoding)
        key = cls.make_key(reference, dataset, enc)
        path = os.path.join(os.fspath(cache_dir), _blake(json.dumps(key, sort_keys=True)) + ".safetensors")
        if os.path.exists(path):
            return cls.load(path, expect=key), True
        cache = cls.build(reference, dataset, encoding=enc, batch_size=batch_size)
        cache.save(path)
        return cache, False

    def lookup(self, rows: Sequence[Mapping[str, Any]], pb: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached reference log-probs of ``rows`` scattered into ``pb``'s completion masks: two ``[B, T]``
        float32 tensors (0 outside the masks).

        Raises:
            KeyError: a row that is not in the cache (another data set).
            ValueError: a row whose completion token count differs from the cache (other tokenization).
        """
        out_w = torch.zeros(pb.mask_w.shape, dtype=torch.float32)
        out_l = torch.zeros(pb.mask_l.shape, dtype=torch.float32)
        for b, row in enumerate(rows):
            i = self._index.get(_row_hash(row))
            if i is None:
                raise KeyError(
                    f"row {b} of the batch (prompt {str(row['prompt'])[:40]!r}) is not in the reference cache; the "
                    "cache was built for another data set"
                )
            for side, out, mask, flat, off in (
                ("chosen", out_w, pb.mask_w, self.lp_w, self.off_w),
                ("rejected", out_l, pb.mask_l, self.lp_l, self.off_l),
            ):
                vals = flat[int(off[i]) : int(off[i + 1])]
                m = mask[b].cpu()
                if int(m.sum()) != vals.numel():
                    raise ValueError(
                        f"row {b}: the {side} completion has {int(m.sum())} tokens but the cache holds {vals.numel()}; "
                        "the cache was built with another tokenization or encoding"
                    )
                out[b, m] = vals
        return out_w, out_l


# ------------------------------------------------------------------------------------------------ losses
@dataclasses.dataclass
class LossInputs:
    """What a trainer loss receives: per-token ``[B, T]`` tensors of one batch, and a lazy per-token KL.

    Attributes:
        pol_lp_w: policy log-probs of the chosen completions (with grad).
        pol_lp_l: policy log-probs of the rejected completions (with grad).
        ref_lp_w: reference log-probs of the chosen completions (cached, constants).
        ref_lp_l: reference log-probs of the rejected completions.
        mask_w: chosen completion masks.
        mask_l: rejected completion masks.
        beta: the trainer's β.
        pb: the encoded batch (for hooks, hidden states, token ids).
        policy: the policy adapter.
        reference: the reference adapter (None when training from a cache only).
    """

    pol_lp_w: torch.Tensor
    pol_lp_l: torch.Tensor
    ref_lp_w: torch.Tensor
    ref_lp_l: torch.Tensor
    mask_w: torch.Tensor
    mask_l: torch.Tensor
    beta: float
    pb: PreferenceBatch
    policy: Any
    reference: Any
    _kl: tuple[torch.Tensor, torch.Tensor] | None = None

    def kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token D_KL(π_ref ‖ π_θ) along the chosen and the rejected completions (with grad through the
        policy), computed once per batch by :func:`pair_kl` with a live reference forward."""
        if self._kl is None:
            if self.reference is None:
                raise ValueError(
                    "this loss needs the per-token KL, i.e. the reference's full distributions; the reference cache "
                    "holds log-probs only: pass reference= to the trainer"
                )
            kw, kl_ = pair_kl(self.policy, self.reference, self.pb, grad=True)
            dev = self.pol_lp_w.device
            self._kl = (kw.to(dev), kl_.to(dev))
        return self._kl


def _dpo(x: LossInputs, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return L.dpo(x.pol_lp_w, x.pol_lp_l, x.ref_lp_w, x.ref_lp_l, x.mask_w, x.mask_l, beta=x.beta, **kw)


def _ipo(x: LossInputs, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _dpo(x, loss_type="ipo", **kw)


def _hinge(x: LossInputs, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _dpo(x, loss_type="hinge", **kw)


def _tdpo(x: LossInputs, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    kw_, kl_ = x.kl()
    return L.tdpo(x.pol_lp_w, x.pol_lp_l, x.ref_lp_w, x.ref_lp_l, x.mask_w, x.mask_l, kw_, kl_, beta=x.beta, **kw)


def _tdpo2(x: LossInputs, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _tdpo(x, variant=2, **kw)


def _sparsepo(
    x: LossInputs, *, masks: Callable[[LossInputs], Sequence[torch.Tensor]] | None = None, **kw: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if masks is None:
        raise ValueError(
            "loss='sparsepo' needs loss_kwargs={'masks': fn}, fn(inputs: LossInputs) -> (m_u_w, m_u_l, m_d_w, m_d_l) "
            "[B, T] tensors, e.g. {'masks': SparsePOMasks(reference)} (tokensmith.alignment.sparsepo: learned masks over "
            "the reference's hidden states, trained with the policy)"
        )
    m = masks(x)
    if len(m) != 4:
        raise ValueError(f"the sparsepo masks function must return 4 tensors (m_u_w, m_u_l, m_d_w, m_d_l), got {len(m)}")
    kw_, kl_ = x.kl()
    return L.sparsepo(x.pol_lp_w, x.pol_lp_l, x.ref_lp_w, x.ref_lp_l, x.mask_w, x.mask_l, kw_, kl_, *m, beta=x.beta, **kw)


LOSS_MODULES_FILE = "loss_modules.pt"

#: name → (loss function over :class:`LossInputs`, whether it needs the per-token KL / a live reference)
LOSSES: dict[str, tuple[Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]], bool]] = {
    "dpo": (_dpo, False),
    "ipo": (_ipo, False),
    "hinge": (_hinge, False),
    "tdpo": (_tdpo, True),
    "tdpo1": (_tdpo, True),
    "tdpo2": (_tdpo2, True),
    "sparsepo": (_sparsepo, True),
}


# ------------------------------------------------------------------------------------------------ PEFT reference
#: ``TokenPreferenceTrainer(policy, reference=PEFT_DISABLED)``: the reference is the policy with its PEFT adapter
#: disabled (the base model the adapter was added to).
PEFT_DISABLED = "peft-disabled"


class _AdapterDisabledModel:
    """A ``peft.PeftModel`` seen with its adapters disabled: every forward (and ``generate``) runs inside
    ``PeftModel.disable_adapter()``; ``named_parameters``/``parameters`` list the base weights only (not the
    adapter's, whose names carry an adapter name such as ``default``). Everything else is the PeftModel's."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    def __getattr__(self, name: str) -> Any:
        if name == "peft_model":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.peft_model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.peft_model.training

    def eval(self) -> _AdapterDisabledModel:
        self.peft_model.eval()
        return self

    def train(self, mode: bool = True) -> _AdapterDisabledModel:
        self.peft_model.train(mode)
        return self

    def _is_adapter_param(self, name: str) -> bool:
        parts = set(name.split("."))
        return any(a in parts for a in self.peft_model.peft_config)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return ((n, p) for n, p in self.peft_model.named_parameters(*args, **kwargs) if not self._is_adapter_param(n))

    def parameters(self, *args: Any, **kwargs: Any) -> Any:
        return (p for _, p in self.named_parameters(*args, **kwargs))


def peft_disabled_reference(policy: ModelAdapter) -> ModelAdapter:
    """The policy with its PEFT adapter disabled, as a reference adapter (what ``reference="peft-disabled"`` uses).

    A shallow copy of ``policy`` (same tokenizer, structure, position scheme) whose ``model`` runs the policy's
    ``peft.PeftModel`` under ``disable_adapter()``: log π_ref(y_t∣x, y<t) is the base model's, whatever the
    adapter has learnt, at the memory cost of no second model. Per-token KL works too: the policy's forward and
    the reference's are separate calls, only the reference's with the adapter off.

    Args:
        policy: an adapter whose ``model`` is a ``peft.PeftModel`` (``ts.ModelAdapter(peft.get_peft_model(model,
            config), tokenizer)``) that trains only its adapter weights.

    Raises:
        ImportError: ``peft`` is not installed.
        ValueError: the model is not a ``PeftModel`` (no PEFT adapter), or it trains weights outside the adapter
            (e.g. ``LoraConfig(bias="all")``), which disabling the adapter would not undo.
    """
    try:
        import peft
    except ImportError as e:
        raise ImportError("reference='peft-disabled' needs peft: pip install 'tokensmith[peft]'") from e
    model = policy.model
    if not isinstance(model, peft.PeftModel):
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            hint = ("it has PEFT layers but is not the PeftModel: build the policy adapter on the model "
                    "peft.get_peft_model returned, ts.ModelAdapter(peft_model, tokenizer)")
        else:
            hint = ("add one first: peft_model = peft.get_peft_model(model, peft.LoraConfig(...)); "
                    "policy = ts.ModelAdapter(peft_model, tokenizer); or pass a separate reference adapter")
        raise ValueError(
            f"reference={PEFT_DISABLED!r} needs a policy whose model is a peft.PeftModel, got "
            f"{type(model).__name__} (no PEFT adapter); {hint}"
        )
    view = _AdapterDisabledModel(model)
    trained = [n for n, p in view.named_parameters() if p.requires_grad]
    if trained:
        raise ValueError(
            f"reference={PEFT_DISABLED!r}: the policy trains {len(trained)} parameter(s) outside its PEFT adapter "
            f"(e.g. {trained[0]!r}; LoraConfig(bias='all'/'lora_only')?), which disabling the adapter does not undo, "
            "so the reference would drift: freeze them or pass a separate reference adapter"
        )
    ref = copy.copy(policy)
    ref.model = view  # type: ignore[assignment]
    ref.name = f"{policy.name}[{PEFT_DISABLED}]"
    return ref


# ------------------------------------------------------------------------------------------------ collator
class PreferenceCollator:
    """Rows (dicts with prompt / chosen / rejected) → ``{"pb": PreferenceBatch, "ref_lp_w": [B, T],
    "ref_lp_l": [B, T]}`` (the reference entries only with a cache), encoded by :func:`encode_pairs` on the
    policy with the trainer's encoding options."""

    def __init__(self, policy: ModelAdapter, encoding: Mapping[str, Any], caches: Sequence[ReferenceCache] = ()):
        self.policy = policy
        self.encoding = dict(encoding)
        self.caches = list(caches)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = list(rows)
        pb = encode_pairs(self.policy, rows, **self.encoding)
        out: dict[str, Any] = {"pb": pb}
        if self.caches:
            err: Exception | None = None
            for cache in self.caches:
                try:
                    out["ref_lp_w"], out["ref_lp_l"] = cache.lookup(rows, pb)
                    break
                except KeyError as e:
                    err = e
            else:
                raise KeyError(str(err)) from err
        return out


# ------------------------------------------------------------------------------------------------ trainer
class _ZeroLossModuleGrads(transformers.TrainerCallback):
    """``transformers.Trainer`` zeroes ``model``'s gradients after each optimiser step, not those of the loss
    modules (their parameters are not the model's): without this they would accumulate across steps."""

    def __init__(self, trainer: TokenPreferenceTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for m in self.trainer.loss_modules.values():
            m.zero_grad(set_to_none=True)


class TokenPreferenceTrainer(transformers.Trainer):
    """Preference optimisation with any token-level loss of :mod:`tokensmith.alignment.losses`, as a thin layer
    over ``transformers.Trainer`` (its loop, optimiser, scheduler, logging, checkpointing and resume).

    Per batch of pairs: L = loss(log π_θ, log π_ref, masks[, KL_t = D_KL(π_ref(·∣x, y<t) ‖ π_θ(·∣x, y<t))]), e.g.
    DPO L = −log σ(β·[Σ_t Δ_t(y_w) − Σ_t Δ_t(y_l)]), Δ_t = log π_θ(y_t∣·) − log π_ref(y_t∣·) (Rafailov et al.
    2023, Eq. 7), TDPO (Zeng et al. 2024) adds the sequential KL.

    Args:
        policy: the model to train (a :class:`~tokensmith.models.ModelAdapter`; its ``.model`` is the Trainer's
            model).
        reference: the frozen reference adapter (same tokenizer); ``"peft-disabled"`` (:data:`PEFT_DISABLED`):
            the policy with its PEFT adapter disabled (the policy's model must be a ``peft.PeftModel``, see
            :func:`peft_disabled_reference`); or None to train from ``reference_cache`` only (then losses that
            need the KL are refused).
        loss: a name in :data:`LOSSES` (``"dpo"``, ``"ipo"``, ``"hinge"``, ``"tdpo"``/``"tdpo1"``, ``"tdpo2"``,
            ``"sparsepo"``) or a callable ``fn(inputs: LossInputs, **loss_kwargs) -> (loss, metrics)``.
        loss_kwargs: extra keyword arguments of the loss (e.g. ``{"alpha": 0.5}``, ``{"label_smoothing": 0.1}``).
        beta: β > 0.
        needs_kl: for a callable loss: whether it calls ``inputs.kl()`` (so a reference is required).
        args: ``transformers.TrainingArguments`` (``remove_unused_columns`` is set to False: the rows are strings).
        train_dataset: rows with prompt / chosen / rejected (a ``datasets.Dataset``).
        eval_dataset: held-out rows (its own reference cache is built too).
        reference_cache: a precomputed :class:`ReferenceCache` (or a list, e.g. train and eval); with a reference
            its key is checked against the reference and the encoding, without one against the data set,
            tokenizer and encoding.
        cache_dir: where caches are built / found (default ``args.output_dir/reference_cache``).
        precompute_reference: with a reference and no cache, build (or load) the caches at init; False computes
            the reference log-probs live each step.
        chat: :func:`encode_pairs` option (default: when the tokenizer has a chat template).
        system: :func:`encode_pairs` option.
        score_eot: :func:`encode_pairs` option.
        encode_kwargs: other ``adapter.encode`` options.
        reference_batch_size: pairs per forward when building a cache.
        **trainer_kwargs: other ``transformers.Trainer`` arguments (``callbacks``, ``optimizers``, ...).

    Raises:
        ValueError: β <= 0, a reference with another tokenizer, a KL loss without a reference, an unknown loss
            name, a cache whose key differs, ``"peft-disabled"`` with a policy that has no PEFT adapter.

    Examples:
        >>> import tokensmith as ts, transformers, tempfile                   # doctest: +SKIP
        >>> from tokensmith.alignment.pairs import demo_pairs                 # doctest: +SKIP
        >>> pol, ref = ts.tiny("llama"), ts.tiny("llama")                     # doctest: +SKIP
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), max_steps=10, report_to=[])  # doctest: +SKIP
        >>> tr = TokenPreferenceTrainer(pol, ref, loss="tdpo", args=args,     # doctest: +SKIP
        ...                             train_dataset=demo_pairs(64), chat=False)
        >>> tr.train()                                                         # doctest: +SKIP
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        policy: ModelAdapter,
        reference: ModelAdapter | str | None = None,
        *,
        loss: str | Callable[..., Any] = "dpo",
        loss_kwargs: Mapping[str, Any] | None = None,
        beta: float = 0.1,
        needs_kl: bool = False,
        args: transformers.TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reference_cache: ReferenceCache | Sequence[ReferenceCache] | None = None,
        cache_dir: str | os.PathLike | None = None,
        precompute_reference: bool = True,
        chat: bool | None = None,
        system: str | None = None,
        score_eot: bool | None = None,
        encode_kwargs: Mapping[str, Any] | None = None,
        reference_batch_size: int = 16,
        **trainer_kwargs: Any,
    ) -> None:
        L._check_beta(beta)
        if isinstance(reference, str):
            if reference != PEFT_DISABLED:
                raise ValueError(f"reference must be an adapter, None or {PEFT_DISABLED!r}, got {reference!r}")
            reference = peft_disabled_reference(policy)
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable")
            self.loss_fn, self.needs_kl = LOSSES[loss]
        elif callable(loss):
            self.loss_fn, self.needs_kl = loss, bool(needs_kl)
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
        self.loss_kwargs = dict(loss_kwargs or {})
        if "beta" in self.loss_kwargs:
            raise ValueError("pass beta as the trainer's beta=, not in loss_kwargs")
        if reference is not None and not policy.same_vocab(reference):
            raise ValueError(
                f"the reference {reference.name!r} has another tokenizer than the policy {policy.name!r}; per-token "
                "log-probs and KL need the same vocabulary (use the policy's base model as the reference)"
            )
        if self.needs_kl and reference is None:
            raise ValueError(f"loss {loss!r} needs the per-token KL and therefore a live reference: pass reference=")
        if reference is None and reference_cache is None:
            raise ValueError("give a reference adapter, a precomputed reference_cache, or both")
        if train_dataset is None:
            raise ValueError("train_dataset is required (rows with prompt / chosen / rejected)")
        if args is None:
            raise ValueError("args (transformers.TrainingArguments) is required")
        self.policy, self.reference, self.beta = policy, reference, float(beta)
        self._policy_views: dict[int, ModelAdapter] = {}  # see _policy_running
        enc = normalize_encoding(
            policy.tokenizer, {**dict(encode_kwargs or {}), "chat": chat, "system": system, "score_eot": score_eot}
        )
        self.encoding = enc
        args.remove_unused_columns = False
        if reference is not None and not isinstance(reference.model, _AdapterDisabledModel):
            for p in reference.model.parameters():
                p.requires_grad_(False)

        caches = [] if reference_cache is None else (
            [reference_cache] if isinstance(reference_cache, ReferenceCache) else list(reference_cache)
        )
        expect = {"encoding": _encoding_key(enc), "tokenizer": tokenizer_digest(policy.tokenizer)}
        if reference is not None and caches:
            expect["reference"] = model_digest(reference)
        for c in caches:
            c.check(expect)
        datasets_ = [train_dataset] + (
            list(eval_dataset.values()) if isinstance(eval_dataset, Mapping) else [eval_dataset] if eval_dataset is not None else []
        )
        self.cache_status: list[str] = []
        if caches:
            have = {c.key["dataset"] for c in caches}
            for ds in datasets_:
                if dataset_fingerprint(ds) not in have:
                    if reference is None:
                        raise ValueError(
                            f"no reference cache for data set {dataset_fingerprint(ds)!r} (caches: {sorted(have)}); "
                            "reference cache key mismatch: build one for this data set or pass reference="
                        )
                    caches.append(self._get_cache(ds, cache_dir, args, reference_batch_size))
                else:
                    self.cache_status.append("given")
        elif reference is not None and precompute_reference:
            caches = [self._get_cache(ds, cache_dir, args, reference_batch_size) for ds in datasets_]
        self.reference_caches = caches
        self._stored: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}
        trainer_kwargs.setdefault("processing_class", policy.tokenizer)
        super().__init__(
            model=policy.model,
            args=args,
            data_collator=PreferenceCollator(policy, enc, caches),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **trainer_kwargs,
        )
        if self.loss_modules:
            self.add_callback(_ZeroLossModuleGrads(self))

    # ---------------------------------------------------------------- trainable loss modules (SparsePO masks)
    @property
    def loss_modules(self) -> dict[str, torch.nn.Module]:
        """``nn.Module`` values of ``loss_kwargs`` (e.g. ``{"masks": SparsePOMasks(...)}``): trained with the policy
        (their parameters join the optimiser as their own parameter group, weight decay 0, zeroed after every
        optimiser step, not included in ``max_grad_norm`` clipping) and saved with every checkpoint as
        ``loss_modules.pt`` (restored on ``train(resume_from_checkpoint=...)``)."""
        return {k: v for k, v in self.loss_kwargs.items() if isinstance(v, torch.nn.Module)}

    def create_optimizer(self, model: Any = None) -> Any:
        opt = super().create_optimizer() if model is None else super().create_optimizer(model)
        extra = [p for m in self.loss_modules.values() for p in m.parameters() if p.requires_grad]
        if extra and not any(any(p is q for q in g["params"]) for g in opt.param_groups for p in extra[:1]):
            dev = self.policy.device
            for m in self.loss_modules.values():
                m.to(dev)
            opt.add_param_group({"params": extra, "weight_decay": 0.0, "lr": self.args.learning_rate})
        return opt

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        mods = self.loss_modules
        if mods:
            out = output_dir if output_dir is not None else self.args.output_dir
            torch.save({k: m.state_dict() for k, m in mods.items()}, os.path.join(out, LOSS_MODULES_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        mods = self.loss_modules
        path = os.path.join(resume_from_checkpoint, LOSS_MODULES_FILE)
        if mods:
            if not os.path.exists(path):
                raise ValueError(
                    f"{resume_from_checkpoint} has no {LOSS_MODULES_FILE}: it was not saved by a trainer with the "
                    f"loss modules {sorted(mods)} (resuming would restart them from scratch)"
                )
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for k, m in mods.items():
                if k not in saved:
                    raise ValueError(f"{path} holds loss modules {sorted(saved)}, not {k!r}")
                m.load_state_dict(saved[k])

    def _get_cache(self, ds: Any, cache_dir: Any, args: Any, bs: int) -> ReferenceCache:
        d = cache_dir if cache_dir is not None else os.path.join(args.output_dir, "reference_cache")
        cache, loaded = ReferenceCache.get_or_build(self.reference, ds, d, encoding=self.encoding, batch_size=bs)
        self.cache_status.append("loaded" if loaded else "built")
        return cache

    # ---------------------------------------------------------------- loss
    def _policy_running(self, model: torch.nn.Module) -> ModelAdapter:
        """The policy adapter whose forward is ``model``, the module ``transformers.Trainer`` passes to
        ``compute_loss``.

        Under DDP (``accelerate launch``, ``torchrun``) that module is the ``DistributedDataParallel`` wrapper of
        ``self.policy.model``: only a forward *through the wrapper* arms its gradient all-reduce for the next
        backward. Running the bare ``self.policy.model`` instead trains every process on its own micro-batch,
        without an error, and the replicas drift apart. The returned view is a shallow copy of the policy
        adapter (same tokenizer, structure, batcher) with ``model`` as its ``.model``; the adapter reaches the
        weights through ``structure`` (the wrapped module's own submodules) and runs the forward through
        ``.model``, so log-probs and KL are unchanged. Without a wrapper it is the policy itself."""
        if model is self.policy.model:
            return self.policy
        view = self._policy_views.get(id(model))
        if view is None or view.model is not model:
            view = copy.copy(self.policy)
            view.model = model  # type: ignore[assignment]
            self._policy_views = {id(model): view}  # one wrapper per run; do not keep old ones alive
        return view

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Policy per-token log-probs (with grad), cached (or live) reference log-probs, the loss; stores its
        metrics for the next log."""
        pb: PreferenceBatch = inputs["pb"]
        policy = self._policy_running(model)
        fused = None
        if self.needs_kl and self.reference is not None:
            # one forward of each model gives the log-probs and the KL (pair_logprobs + pair_kl would run the
            # policy twice, with two graphs alive at the backward)
            fused = pair_logprobs_and_kl(policy, self.reference, pb, grad=torch.is_grad_enabled())
            lp_w, lp_l = fused["policy"]
        else:
            lp_w, lp_l = pair_logprobs(policy, pb, grad=True)
        dev = lp_w.device
        if "ref_lp_w" in inputs:
            ref_w, ref_l = inputs["ref_lp_w"].to(dev), inputs["ref_lp_l"].to(dev)
        elif fused is not None:
            ref_w, ref_l = (t.detach().to(dev) for t in fused["reference"])
        else:
            with self.reference.eval_mode():
                ref_w, ref_l = (t.to(dev) for t in pair_logprobs(self.reference, pb))
        x = LossInputs(lp_w, lp_l, ref_w, ref_l, pb.mask_w.to(dev), pb.mask_l.to(dev), self.beta, pb, policy,
                       self.reference)
        if fused is not None:
            x._kl = tuple(t.to(dev) for t in fused["kl"])
        loss, metrics = self.loss_fn(x, **self.loss_kwargs)
        split = "train" if model.training else "eval"
        store = self._stored[split]
        for k, v in metrics.items():
            store.setdefault(k, []).append(v.detach().float().cpu() if isinstance(v, torch.Tensor) else torch.tensor(v))
        return (loss, metrics) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation: the loss only (its metrics are logged as ``eval_<name>``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of the loss metrics stored since the last log (``eval_`` prefixed for evaluation)."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._stored[split]
        prefix = "eval_" if split == "eval" else ""
        for k, vals in stored.items():
            logs[prefix + k] = float(torch.stack(vals).mean())
        stored.clear()
        super().log(logs, start_time)
