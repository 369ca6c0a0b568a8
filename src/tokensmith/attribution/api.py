"""``attribute(adapter, inputs, target=..., method=...)``: one entry point for every method and target."""

from __future__ import annotations

from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, get_method
from tokensmith.attribution.progress import progress_scope
from tokensmith.attribution.result import AttributionResult, versions
from tokensmith.attribution.targets import AttributionProblem, prepare

__all__ = ["attribute", "run_method"]


def run_method(problem: AttributionProblem, method: AttributionMethod) -> AttributionResult:
    """Run ``method`` on a prepared problem and label its output (the second half of :func:`attribute`)."""
    method.check(problem)
    out = method.attribute_batch(problem)
    R, L = problem.n_rows, len(problem.encoded)
    if tuple(out.scores.shape) != (R, L):
        raise ValueError(f"method {method.name!r} returned scores of shape {list(out.scores.shape)}, expected {[R, L]}")
    valid = problem.valid()
    if out.valid is not None:
        valid = valid & out.valid.bool()
    scores = torch.where(valid, out.scores.float().cpu(), torch.zeros(R, L))
    target_scores = out.target_scores if out.target_scores is not None else problem.full_scores()
    enc = problem.encoded
    cfg = method.config()
    return AttributionResult(
        scores=scores,
        valid=valid,
        tokens=list(enc.tokens),
        ids=enc.input_ids.clone(),
        offsets=list(enc.offsets),
        segments=enc.segments(),
        special=enc.special_mask.clone(),
        sources=problem.sources.clone(),
        target_positions=problem.target_positions.clone(),
        target_labels=list(problem.target_labels),
        text=enc.text,
        spans={k: (v.start, v.end) for k, v in enc.spans.items()},
        method=method.name,
        config=cfg,
        target_scores=target_scores.float().cpu(),
        baseline_scores=None if out.baseline_scores is None else out.baseline_scores.float().cpu(),
        delta=None if out.delta is None else out.delta.float().cpu(),
        seed=cfg.get("seed") if method.stochastic else None,
        versions=versions(),
        extra={**out.extra, **problem.meta, "target_kind": problem.kind,
               **({"row_ids": problem.row_ids.tolist()} if problem.row_ids is not None else {})},
    )


def attribute(
    adapter: Any,
    inputs: Any,
    target: Any = None,
    method: str | AttributionMethod | type[AttributionMethod] = "integrated_gradients",
    *,
    chat: bool = False,
    target_span: tuple[int, int] | None = None,
    include_template: bool = False,
    max_new_tokens: int = 16,
    batch_size: int | None = None,
    encode_kwargs: dict[str, Any] | None = None,
    progress: bool | None = True,
    **method_kwargs: Any,
) -> AttributionResult:
    """Attribute the target rows to the source tokens of ``inputs``.

    Args:
        adapter: a :class:`~tokensmith.models.ModelAdapter`.
        inputs: a prompt (str or list of str / :class:`~tokensmith.models.Slot` pieces; a user turn with
            ``chat=True``) or an :class:`~tokensmith.models.Encoded` (slots and spans kept).
        target: a continuation string (encoded jointly with the prompt), ``"generate"``, token ids,
            :class:`~tokensmith.attribution.Contrast`, a callable ``fn(outputs, problem)``, or None to use an
            ``Encoded``'s own target (see :mod:`tokensmith.attribution.targets`).
        method: a registered name (:func:`available_methods`), an :class:`AttributionMethod` class or
            instance. ``method_kwargs`` are its settings (e.g. ``n_steps=64`` for IG).
        chat: render ``inputs`` through the chat template (``target`` becomes the assistant answer).
        target_span: characters ``(start, end)`` of the target string whose tokens become rows.
        include_template: also attribute to template and special tokens (default: they are flagged, held
            at their real embeddings by gradient methods and never perturbed).
        max_new_tokens: for ``target="generate"``.
        batch_size: micro-batch size for the method's forwards.
        encode_kwargs: passed to ``adapter.encode`` (``system=``, ``boundary=``, ...).
        progress: a progress bar over the method's forwards, drawn only once a run has lasted 2 s
            (``False``: never; ``None``: inherit the enclosing scope, e.g. :func:`attribute_dataset`'s).

    Returns:
        :class:`AttributionResult` with a ``[rows × tokens]`` score matrix.

    Raises:
        ValueError: empty inputs or target, a target that tokenizes to nothing, a sequence beyond the
            model's context, an unknown method (the message lists the registered ones), a method the model
            cannot support, a NaN/inf baseline.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.attribution import attribute
        >>> ad = ts.tiny("llama")
        >>> res = attribute(ad, "The capital of France is", target=" Paris", method="ig", n_steps=8)
        >>> res.shape[0] == len(res.target_labels) and res.delta is not None
        True
    """
    m = get_method(method, **method_kwargs)
    problem = prepare(
        adapter, inputs, target, chat=chat, target_span=target_span, include_template=include_template,
        max_new_tokens=max_new_tokens, batch_size=batch_size, encode_kwargs=encode_kwargs,
    )
    with progress_scope(progress):
        return run_method(problem, m)
