"""One-call shortcuts over :func:`tokensmith.optimization.search` (nanoGCG-style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokensmith.models import Slot
from tokensmith.optimization.search import Constraints, Problem, SearchResult, search

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["gcg", "random_search", "suffix_problem"]

DEFAULT_SUFFIX = " !" * 20


def suffix_problem(
    adapter: ModelAdapter,
    prompt: str,
    target: str,
    *,
    suffix: str = DEFAULT_SUFFIX,
    chat: bool | None = None,
    system: str | None = None,
    position: str = "suffix",
    boundary: str = "split",
    constraints: Constraints | None = None,
    loss: str = "ce",
    **loss_kwargs: Any,
) -> Problem:
    """A :class:`Problem` with an adversarial slot after (or before) the user prompt.

    Args:
        adapter: a causal LM.
        prompt: the request (a user turn in chat mode).
        target: what the model should answer (e.g. ``"Sure, here is ..."``).
        suffix: the slot's initial text (default 20 × ``" !"``, as GCG).
        chat: render through the chat template (default: when the tokenizer has one).
        system: system message (chat mode).
        position: ``"suffix"`` (after the prompt) or ``"prefix"`` (before it).
        boundary: encoding boundary policy; ``"split"`` (default) tokenizes the slot on its own, so its ids
            do not merge with the prompt (the re-tokenization filter then checks the slot on its own).
        constraints: token constraints.
        loss: ``"ce"`` or ``"mellowmax"``.
        **loss_kwargs: other :class:`~tokensmith.optimization.search.TargetLoss` options.

    Raises:
        ValueError: an empty prompt or target.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is empty: give the request the slot is attached to")
    if not isinstance(target, str) or not target:
        raise ValueError("target is empty: give the text the model should produce, e.g. 'Sure, here is'")
    if chat is None:
        chat = getattr(adapter.tokenizer, "chat_template", None) is not None
    if position == "suffix":
        pieces = [prompt, Slot("suffix", suffix)]
    elif position == "prefix":
        pieces = [Slot("suffix", suffix.lstrip() if chat else suffix), prompt if prompt.startswith(" ") else " " + prompt]
    else:
        raise ValueError(f"position must be 'suffix' or 'prefix', got {position!r}")
    kw: dict[str, Any] = {"chat": chat, "boundary": boundary}
    if chat:
        kw["system"] = system
        kw["close_target"] = False
    enc = adapter.encode(pieces, target=target, **kw)
    return Problem(encoding=enc, constraints=constraints or Constraints(), loss_kwargs={"loss": loss, **loss_kwargs})


def gcg(
    adapter: ModelAdapter,
    prompt: str,
    target: str,
    *,
    suffix: str = DEFAULT_SUFFIX,
    chat: bool | None = None,
    system: str | None = None,
    steps: int = 250,
    search_width: int = 512,
    topk: int = 256,
    n_replace: int | str = 1,
    seed: int = 0,
    constraints: Constraints | None = None,
    loss: str = "ce",
    **kwargs: Any,
) -> SearchResult:
    """GCG suffix attack in one call (Zou et al. 2023; METHODS.md OPT-A1): optimise a suffix after
    ``prompt`` so that the model answers ``target``.

    Red-teaming tool: use it to evaluate models you are responsible for.

    Args:
        adapter: a causal LM.
        prompt: the request.
        target: the answer to elicit.
        suffix: the initial suffix text.
        chat: render through the chat template (default: when the tokenizer has one).
        system: system message.
        steps: steps.
        search_width: candidates per step.
        topk: tokens per position.
        n_replace: positions per candidate (int or ``"decay"``).
        seed: random seed.
        constraints: token constraints.
        loss: ``"ce"`` or ``"mellowmax"``.
        **kwargs: :func:`~tokensmith.optimization.search` options (``early_stop=``, ``buffer_size=``,
            ``time_limit=``, ``progress=``, ...).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> res = gcg(ad, "Say hi", " ok", suffix=" x x", steps=1, search_width=4, topk=2, progress=False)
        >>> res.method
        'gcg'
    """
    problem = suffix_problem(adapter, prompt, target, suffix=suffix, chat=chat, system=system,
                             constraints=constraints, loss=loss)
    return search(adapter, problem, "gcg", steps=steps, seed=seed, search_width=search_width, topk=topk,
                  n_replace=n_replace, **kwargs)


def random_search(
    adapter: ModelAdapter,
    prompt: str,
    target: str,
    *,
    suffix: str = DEFAULT_SUFFIX,
    chat: bool | None = None,
    steps: int = 250,
    search_width: int = 128,
    n_replace: int | str = 1,
    seed: int = 0,
    constraints: Constraints | None = None,
    **kwargs: Any,
) -> SearchResult:
    """Random-search suffix attack (Andriushchenko et al. 2024; METHODS.md OPT-A2): like :func:`gcg` with
    uniform swaps and no gradient.

    Args:
        adapter: a causal LM.
        prompt: the request.
        target: the answer to elicit.
        suffix: the initial suffix text.
        chat: render through the chat template.
        steps: steps.
        search_width: candidates per step.
        n_replace: positions per candidate.
        seed: random seed.
        constraints: token constraints.
        **kwargs: :func:`~tokensmith.optimization.search` options.
    """
    problem = suffix_problem(adapter, prompt, target, suffix=suffix, chat=chat, constraints=constraints)
    return search(adapter, problem, "random", steps=steps, seed=seed, search_width=search_width,
                  n_replace=n_replace, **kwargs)
