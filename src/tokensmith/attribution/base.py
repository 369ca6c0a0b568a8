"""The method base class and the registry: ``method="name"`` works in ``attribute``, ``evaluate`` and the CLI.

A method is a dataclass holding its settings with one method to override,
:meth:`AttributionMethod.attribute_batch`, which takes an
:class:`~tokensmith.attribution.targets.AttributionProblem` and returns a :class:`MethodOutput` (the
``[rows × positions]`` scores and optional extras). Register it with :func:`register_method`::

    from dataclasses import dataclass
    from tokensmith.attribution import AttributionMethod, MethodOutput, register_method

    @register_method("uniform")
    @dataclass
    class Uniform(AttributionMethod):
        def attribute_batch(self, problem):
            return MethodOutput(problem.valid().float())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.attribution.targets import AttributionProblem

__all__ = ["AttributionMethod", "MethodOutput", "register_method", "get_method", "available_methods"]


@dataclass
class MethodOutput:
    """What :meth:`AttributionMethod.attribute_batch` returns.

    Attributes:
        scores: ``[R, L]`` attributions (entries outside ``problem.valid()`` are ignored and set to 0).
        target_scores: ``[R]`` row scores at the input (filled by ``attribute`` when None).
        baseline_scores: ``[R]`` row scores at the baseline (path methods).
        delta: ``[R]`` completeness error (path methods).
        valid: ``[R, L]`` a stricter validity mask (e.g. entries a perturbation could not measure).
        extra: JSON-friendly method data.
    """

    scores: torch.Tensor
    target_scores: torch.Tensor | None = None
    baseline_scores: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttributionMethod:
    """Base class: subclass as a dataclass (settings are its fields) and override :meth:`attribute_batch`.

    Class attributes:
        name: the registry name (set by :func:`register_method`).
        requires: adapter features the method needs (``adapter.capabilities()["features"]`` keys); a model
            without one gets a clear ValueError before any work.
        targets: the target kinds it accepts (``"tokens"``, ``"contrast"``, ``"callable"``, ``"label"``,
            ``"mask"``). Methods that score rows through ``problem.score_embeds`` / ``problem.score_ids`` take
            them all; ``"label"`` and ``"mask"`` rows come from the model's own forward, so ``"token_logprobs"``
            in ``requires`` is not needed for them.
        stochastic: the method uses the seed.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ("inputs_embeds",)
    targets: ClassVar[tuple[str, ...]] = ("tokens", "contrast", "callable", "label", "mask")
    stochastic: ClassVar[bool] = False

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings, JSON-friendly (tensors as shapes)."""
        out = {}
        for k, v in asdict(self).items():
            out[k] = f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else v
        return out

    def check(self, problem: AttributionProblem) -> None:
        """Raise a ValueError when the model or target kind does not suit the method."""
        from tokensmith.attribution.targets import FORWARD_KINDS

        feats = problem.adapter.capabilities()["features"]
        waived = {"token_logprobs"} if problem.kind in FORWARD_KINDS else set()
        missing = [r for r in self.requires if not feats.get(r) and r not in waived]
        if missing:
            raise ValueError(
                f"method {self.name!r} needs {missing} but {problem.adapter.name!r} does not provide it "
                f"(adapter.capabilities()['missing'] = {problem.adapter.capabilities()['missing']})"
            )
        if problem.kind not in self.targets:
            raise ValueError(f"method {self.name!r} does not take a {problem.kind} target (it takes {self.targets})")


_REGISTRY: dict[str, type[AttributionMethod]] = {}
M = TypeVar("M", bound=type[AttributionMethod])


def register_method(name: str, *aliases: str) -> Callable[[M], M]:
    """Class decorator registering an :class:`AttributionMethod` under ``name`` (and ``aliases``)."""

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
            raise TypeError("register_method decorates AttributionMethod subclasses")
        cls.name = name
        for n in (name, *aliases):
            _REGISTRY[n] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """Registered method names (aliases included)."""
    return sorted(_REGISTRY)


def get_method(method: str | AttributionMethod | type[AttributionMethod], **kwargs: Any) -> AttributionMethod:
    """An instance from a name, a class or an instance (``kwargs`` are its settings)."""
    if isinstance(method, AttributionMethod):
        if kwargs:
            raise TypeError("pass settings to the method instance, not to attribute(), when giving an instance")
        return method
    if isinstance(method, type) and issubclass(method, AttributionMethod):
        cls = method
    elif isinstance(method, str):
        if method not in _REGISTRY:
            raise ValueError(f"unknown attribution method {method!r}; registered: {', '.join(available_methods())}")
        cls = _REGISTRY[method]
    else:
        raise TypeError(f"method must be a name, an AttributionMethod class or instance, got {type(method).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"method {cls.name!r} has no setting(s) {unknown}; its settings are {sorted(names)}")
    return cls(**kwargs)
