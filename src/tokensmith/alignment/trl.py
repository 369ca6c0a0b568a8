"""TRL integration: a ``trl.DPOTrainer`` whose loss is any token-level loss of tokensmith (METHODS.md 4).

TRL sums the per-token log-probs before its loss, so no token weight or per-token KL can be plugged into
``trl.DPOTrainer``. :class:`TokenDPOTrainer` keeps everything of TRL's trainer (data set tokenization, the
collator and its ``[chosen; rejected]`` batch, the reference model or the disabled PEFT adapter, optimiser,
logging, checkpoints) and replaces only ``compute_loss``: it reads the per-token log-probs of the policy and of
the reference off ONE forward of TRL's concatenated batch each, with the completion masks of TRL's collator, and
calls a loss of :data:`tokensmith.alignment.trainer.LOSSES` (``"dpo"``, ``"ipo"``, ``"hinge"``, ``"tdpo"``,
``"tdpo2"``, ``"sparsepo"``) or any callable with the same signature.

Layout of TRL's batch (TRL 1.0 to 1.16): ``input_ids``, ``attention_mask`` and ``completion_mask`` are
``[2B, T]``, right-padded, rows ``[0, B)`` the chosen and ``[B, 2B)`` the rejected completions of the same
prompts. Position ``t`` of the per-token tensors handed to the loss is the log-prob of token ``t + 1``
(``[B, T - 1]``, mask ``completion_mask[:, 1:]``).

TRL is an optional extra (``pip install 'tokensmith[trl]'``): ``import tokensmith`` never imports it, this
module imports it when it is installed and otherwise still imports (constructing :class:`TokenDPOTrainer` then
raises an ``ImportError`` saying what to install).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tokensmith.alignment import losses as L
from tokensmith.alignment.trainer import LOSSES, LossInputs
from tokensmith.models import ModelAdapter, gather_logprobs, token_kl
from tokensmith.models.logprobs import shift_target_mask

_INSTALL = "TokenDPOTrainer needs TRL 1.x: pip install 'tokensmith[trl]' (or pip install 'trl>=1.16,<2')"

try:
    import trl
    from trl import DPOTrainer as _DPOTrainer
except ImportError as _e:  # the module still imports (API docs, doctest collection); construction says why not
    trl = None
    _TRL_IMPORT_ERROR: ImportError | None = _e

    class _DPOTrainer:  # type: ignore[no-redef]
        """Stand-in base class when TRL is not installed: constructing raises ImportError."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(_INSTALL) from _TRL_IMPORT_ERROR
else:
    _TRL_IMPORT_ERROR = None

__all__ = ["TokenDPOTrainer", "TRLLossInputs", "check_trl_version", "SUPPORTED_TRL", "TESTED_TRL"]

#: TRL versions :class:`TokenDPOTrainer` accepts (the batch layout and trainer attributes it reads exist from
#: TRL 1.0 on; only :data:`TESTED_TRL` runs in the tests).
SUPPORTED_TRL = ">=1.0,<2"
#: the TRL version the tests run against.
TESTED_TRL = "1.16.0"

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


def check_trl_version(version: str | None = None) -> str:
    """Refuse a TRL outside :data:`SUPPORTED_TRL` (TRL 1.x).

    Args:
        version: the version string to check (default: the installed ``trl.__version__``, read at call time).

    Returns:
        The accepted version string.

    Raises:
        ImportError: TRL is not installed (and no ``version`` given).
        RuntimeError: the version is not 1.x (or cannot be parsed), naming the supported range.

    Examples:
        >>> check_trl_version("1.16.0")
        '1.16.0'
    """
    from packaging.version import InvalidVersion, Version

    if version is None and trl is None:
        raise ImportError(_INSTALL) from _TRL_IMPORT_ERROR
    v = str(trl.__version__ if version is None else version)
    try:
        major = Version(v).release[0]
    except (InvalidVersion, IndexError):
        major = None
    if major != 1:
        raise RuntimeError(
            f"TokenDPOTrainer supports TRL {SUPPORTED_TRL} (TRL 1.x; tested with {TESTED_TRL}), found trl {v}: it "
            "overrides DPOTrainer.compute_loss and reads TRL 1.x's batch layout. Install a supported TRL "
            "(pip install 'trl>=1.16,<2') or use tokensmith.alignment.TokenPreferenceTrainer, which needs no TRL"
        )
    return v


@dataclasses.dataclass
class TRLLossInputs(LossInputs):
    """:class:`~tokensmith.alignment.trainer.LossInputs` built from TRL's batch (``pb`` is None; ``policy`` and
    ``reference`` are the HF models, the reference None when it is the policy with its PEFT adapter disabled).

    Attributes:
        inputs: TRL's collated batch (``input_ids``, ``attention_mask``, ``completion_mask``, ...), ``[2B, T]``.
        model: the model ``compute_loss`` was called with.
    """

    inputs: Mapping[str, Any] | None = None
    model: Any = None

    def kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token D_KL(π_ref ‖ π_θ) of the chosen and the rejected completions (``[B, T - 1]``)."""
        if self._kl is None:
            raise ValueError(
                "this loss calls inputs.kl() but the trainer did not compute the per-token KL: pass needs_kl=True "
                "to TokenDPOTrainer for a callable loss that needs it"
            )
        return self._kl


def _resolve_loss(loss: str | Callable[..., Any], needs_kl: bool) -> tuple[Callable[..., Any], bool]:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable")
        return LOSSES[loss]
    if callable(loss):
        return loss, bool(needs_kl)
    raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")


def _check_args(args: Any) -> None:
    """Refuse DPOConfig settings that the replaced loss would silently ignore."""
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(
            "TokenDPOTrainer needs per-token reference log-probs, but precompute_ref_log_probs=True caches only "
            "TRL's per-sequence sums: set precompute_ref_log_probs=False (the reference runs live, no grad), or use "
            "TokenPreferenceTrainer, whose ReferenceCache stores per-token values"
        )
    lt = getattr(args, "loss_type", ["sigmoid"])
    lt = [lt] if isinstance(lt, str) else list(lt or ["sigmoid"])
    lw = getattr(args, "loss_weights", None)
    fdiv = getattr(args, "f_divergence_type", "reverse_kl")
    fdiv = str(getattr(fdiv, "value", fdiv))
    ignored = {
        "loss_type": ([str(getattr(x, "value", x)) for x in lt] != ["sigmoid"], lt),
        "loss_weights": (lw not in (None, [1.0]), lw),
        "ld_alpha": (getattr(args, "ld_alpha", None) is not None, getattr(args, "ld_alpha", None)),
        "f_divergence_type": (fdiv != "reverse_kl", fdiv),
        "use_weighting": (bool(getattr(args, "use_weighting", False)), True),
        "label_smoothing": (float(getattr(args, "label_smoothing", 0.0) or 0.0) != 0.0,
                            getattr(args, "label_smoothing", 0.0)),
    }
    bad = {k: v for k, (is_bad, v) in ignored.items() if is_bad}
    if bad:
        raise ValueError(
            f"TokenDPOTrainer replaces TRL's loss, so these DPOConfig settings would be ignored: {bad}. Leave them at "
            "their defaults and choose the loss with loss= (a name in tokensmith.alignment.trainer.LOSSES or a "
            "callable) and its options with loss_kwargs= (e.g. {'label_smoothing': 0.1} for 'dpo')"
        )


def _base_model(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class TokenDPOTrainer(_DPOTrainer):
    """``trl.DPOTrainer`` with any token-level loss of tokensmith on TRL's own batch.

    Per batch of ``B`` pairs (TRL's ``[chosen; rejected]`` rows), with Δ_t(y) = log π_θ(y_t∣x, y<t) −
    log π_ref(y_t∣x, y<t): L = loss(log π_θ, log π_ref, masks[, KL_t]); e.g. ``"dpo"`` L = −log σ(β·[Σ_t Δ_t(y_w)
    − Σ_t Δ_t(y_l)]) (Rafailov et al. 2023, Eq. 7; equals TRL's ``loss_type="sigmoid"``), ``"tdpo"`` adds the
    sequential KL D(x, y) = Σ_t D_KL(π_ref(·∣x, y<t) ‖ π_θ(·∣x, y<t)) (Zeng et al. 2024):
    L = −log σ(β·[u − (D(x, y_l) − D(x, y_w))]).

    Only ``compute_loss`` is overridden (the public ``transformers.Trainer`` hook TRL's training and prediction
    steps call). Per-token log-probs come from one forward per model: for losses without KL through TRL's fused
    LM head (``fused_lm_head=True``, in the TRL versions that have it; no ``[N, V]`` logits at all; the default
    off CPU, see ``logprobs``), otherwise from the logits at the completion positions only (``logits_to_keep`` with a boolean mask: ``[N, V]``, N the
    number of completion tokens, never ``2B × T × V``), read with :func:`tokensmith.models.gather_logprobs` and
    :func:`tokensmith.models.token_kl` (chunked, memory-lean backward). The reference is TRL's: ``ref_model``, or
    the policy with its PEFT adapter disabled when ``ref_model`` is None and the model is a ``PeftModel``; it runs
    under ``torch.no_grad()``. The loss's metrics (``rewards/*``, ``seq_kl/*`` ...) and ``logps/chosen``,
    ``logps/rejected`` go to TRL's metric store and are logged averaged between logging steps.

    Args:
        model: the policy (a ``transformers`` model, a ``PeftModel``, a model id, or a
            :class:`~tokensmith.models.ModelAdapter`, whose tokenizer becomes the default ``processing_class``).
        ref_model: the frozen reference (same tokenizer), a model or an adapter; None: TRL's default (the
            policy with its PEFT adapter disabled for a ``PeftModel``, otherwise a fresh copy loaded from the
            policy's ``name_or_path``).
        args: a ``trl.DPOConfig``; ``beta`` is the loss's β. ``precompute_ref_log_probs`` must be False and
            ``loss_type``, ``loss_weights``, ``ld_alpha``, ``f_divergence_type``, ``use_weighting``,
            ``label_smoothing`` at their defaults (they configure the loss this class replaces).
        loss: a name in :data:`~tokensmith.alignment.trainer.LOSSES` or a callable
            ``fn(inputs: TRLLossInputs, **loss_kwargs) -> (loss, metrics)``.
        loss_kwargs: extra keyword arguments of the loss (not ``beta``).
        needs_kl: for a callable loss: whether it calls ``inputs.kl()``.
        logprobs: how losses without KL get the per-token log-probs: ``"fused"`` TRL's fused LM head (no
            ``[N, V]`` logits), ``"logits"`` the logits at the completion positions, ``"auto"`` (default) fused
            except on CPU (where TRL's kernel scores every position). KL losses always use ``"logits"``.
        **kwargs: other ``trl.DPOTrainer`` arguments (``train_dataset``, ``eval_dataset``, ``processing_class``,
            ``peft_config``, ``callbacks``, ...).

    Raises:
        ImportError: TRL is not installed.
        RuntimeError: TRL is not 1.x (:func:`check_trl_version`).
        ValueError: an unknown loss name, ``beta`` in ``loss_kwargs``, β <= 0, a DPOConfig setting the replaced
            loss would ignore, prompt-learning PEFT (virtual tokens) with a KL loss.

    Examples:
        >>> import tokensmith as ts, tempfile, trl                            # doctest: +SKIP
        >>> from tokensmith.alignment.pairs import demo_pairs                 # doctest: +SKIP
        >>> pol, ref = ts.tiny("llama"), ts.tiny("llama")                     # doctest: +SKIP
        >>> args = trl.DPOConfig(tempfile.mkdtemp(), max_steps=3, report_to=[])  # doctest: +SKIP
        >>> tr = TokenDPOTrainer(pol, ref, args, loss="tdpo",                 # doctest: +SKIP
        ...                      train_dataset=demo_pairs(16).select_columns(["prompt", "chosen", "rejected"]))
        >>> tr.train()                                                         # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *,
        loss: str | Callable[..., Any] = "dpo",
        loss_kwargs: Mapping[str, Any] | None = None,
        needs_kl: bool = False,
        logprobs: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.trl_version = check_trl_version()
        if logprobs not in ("auto", "fused", "logits"):
            raise ValueError(f"logprobs must be 'auto', 'fused' or 'logits', got {logprobs!r}")
        loss_fn, nkl = _resolve_loss(loss, needs_kl)
        lkw = dict(loss_kwargs or {})
        if "beta" in lkw:
            raise ValueError("pass beta in the DPOConfig (args.beta), not in loss_kwargs")
        if args is not None:
            L._check_beta(args.beta)
            _check_args(args)
        if isinstance(model, ModelAdapter):
            kwargs.setdefault("processing_class", model.tokenizer)
            model = model.model
        if isinstance(ref_model, ModelAdapter):
            ref_model = ref_model.model
        super().__init__(model, ref_model, args, **kwargs)
        if args is None:
            _check_args(self.args)
        self.loss_fn, self.needs_kl, self.loss_kwargs = loss_fn, nkl, lkw
        from trl.trainer import utils as trl_utils

        # TRL's fused LM head (per-token log-probs without logits), for losses without KL: "auto" uses it off
        # CPU (on CPU it scores every position, not only the completion: ~7x slower than the logits path)
        has_fused = hasattr(trl_utils, "add_fused_lm_head")
        if logprobs == "fused" and not has_fused:
            raise ValueError(f"logprobs='fused' needs TRL's fused LM head, which trl {self.trl_version} lacks")
        self._use_fused = has_fused and (
            logprobs == "fused" or (logprobs == "auto" and self.accelerator.device.type != "cpu")
        )
        import transformers.modeling_utils as mu

        base = _base_model(self.accelerator.unwrap_model(self.model))
        self._keep_mask_ok = hasattr(mu, "slice_logits_to_keep") and (
            "logits_to_keep" in inspect.signature(type(base).forward).parameters
        )
        cfg = getattr(self.accelerator.unwrap_model(self.model), "active_peft_config", None)
        if getattr(cfg, "is_prompt_learning", False) and (self.needs_kl or not self._use_fused):
            raise ValueError(
                "prompt-learning PEFT (virtual tokens) is not supported with a KL loss or without TRL's fused LM head: "
                "use LoRA-style adapters, or a loss without KL"
            )

    # ---------------------------------------------------------------- reference
    def _reference(self) -> tuple[Any, contextlib.AbstractContextManager]:
        """The reference model and the context to run it in (TRL's convention)."""
        from accelerate.utils import is_peft_model

        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        if is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return self.model, use_adapter(unwrapped, adapter_name=name)
        raise RuntimeError(
            "no reference model: pass ref_model=, or train a PeftModel (its disabled adapter is the reference)"
        )

    def _no_ckpt(self) -> contextlib.AbstractContextManager:
        try:
            from trl.models.utils import disable_gradient_checkpointing
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
        return disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)

    def _completion_logits(self, model: Any, model_kwargs: dict[str, Any], keep: torch.Tensor) -> tuple[Any, Any]:
        """``[N, V]`` logits at the positions that predict a completion token, and the model output."""
        kw = dict(model_kwargs)
        if self._keep_mask_ok:
            kw["logits_to_keep"] = keep
        out = model(**kw)
        z = out.logits
        if z.dim() == 3:  # a forward without boolean logits_to_keep: full logits, keep the completion positions
            z = z[:, -keep.shape[1] :][keep.to(z.device)]
        return z, out

    # ---------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Per-token policy (with grad) and reference (no grad) log-probs of TRL's batch, then the loss; its
        metrics go to TRL's metric store (logged by ``log``)."""
        mode = "train" if self.model.training else "eval"
        cm = inputs["completion_mask"].bool()
        ids = inputs["input_ids"]
        mask = cm[:, 1:]  # mask[:, t]: token t + 1 is a completion token (predicted at position t)
        n_rows, T1 = mask.shape
        if n_rows % 2:
            raise ValueError(f"TRL's batch must hold chosen then rejected rows (an even count), got {n_rows}")
        B = n_rows // 2
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        aux = bool(getattr(self, "aux_loss_enabled", False))
        if aux:
            model_kwargs["output_router_logits"] = True
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        ref_model, ref_ctx = self._reference()
        kl = None
        if self.needs_kl or not self._use_fused:
            keep = shift_target_mask(cm)
            tgt = ids[:, 1:][mask]
            z, out = self._completion_logits(model, model_kwargs, keep)
            with torch.no_grad(), self._no_ckpt(), ref_ctx:
                zr, _ = self._completion_logits(ref_model, ref_kwargs, keep)
            zr = zr.to(z.device)
            tgt = tgt.to(z.device)
            m = mask.to(z.device)

            def full(v: torch.Tensor) -> torch.Tensor:
                return torch.zeros(m.shape, dtype=torch.float32, device=v.device).masked_scatter(m, v)

            pol_tok = full(gather_logprobs(z, tgt))
            with torch.no_grad():
                ref_tok = full(gather_logprobs(zr, tgt))
            if self.needs_kl:
                kl = full(token_kl(zr, z))  # D_KL(π_ref ‖ π_θ) per completion position, grad through π_θ
        else:
            labels = ids.masked_fill(~cm, -100)
            out = model(**model_kwargs, labels=labels, fused_lm_head=True)
            pol_tok = out.log_probs[:, -T1:].float()
            with torch.no_grad(), self._no_ckpt(), ref_ctx:
                ref_out = ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
            ref_tok = ref_out.log_probs[:, -T1:].float().to(pol_tok.device)
            m = mask.to(pol_tok.device)
        x = TRLLossInputs(
            pol_tok[:B], pol_tok[B:], ref_tok[:B], ref_tok[B:], m[:B], m[B:], float(self.beta), None,
            model, self.ref_model, inputs=inputs, model=model,
        )
        if kl is not None:
            x._kl = (kl[:B], kl[B:])
        loss, metrics = self.loss_fn(x, **self.loss_kwargs)
        if aux and getattr(out, "aux_loss", None) is not None:
            loss = loss + self.router_aux_loss_coef * out.aux_loss
            metrics = {**metrics, "aux_loss": out.aux_loss.detach()}
        with torch.no_grad():
            seq = (pol_tok * m).sum(-1)
            metrics = {**metrics, "logps/chosen": seq[:B].mean(), "logps/rejected": seq[B:].mean()}
        store = self._metrics[mode]
        dev = self.accelerator.device
        for k, v in metrics.items():
            t = v.detach().float().reshape(1) if isinstance(v, torch.Tensor) else torch.tensor([float(v)])
            store[k].append(self.accelerator.gather_for_metrics(t.to(dev)).mean().item())
        if return_outputs:  # prediction_step with prediction_loss_only=False wants logits (TRL does the same)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss
