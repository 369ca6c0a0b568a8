"""tokensmith.attribution — which input tokens matter for an output, with one ``attribute()`` for every method.

    >>> import tokensmith as ts
    >>> from tokensmith.attribution import attribute
    >>> ad = ts.tiny("llama")
    >>> res = attribute(ad, "The capital of France is", target=" Paris", method="input_x_gradient")
    >>> res.scores.shape[1] == len(res.tokens)
    True

Layers: pure functions (:mod:`~tokensmith.attribution.quadrature`, :func:`token_groups`), methods over an
:class:`AttributionProblem` (gradient, perturbation, internals), and :func:`attribute` / :func:`evaluate`
on top. New methods subclass :class:`AttributionMethod` and :func:`register_method`.
"""

from tokensmith.attribution import cli, gradient, internals, perturbation, report  # noqa: F401  (registers the methods)  # noqa: F401  (registers the CLI command and the demo section)
from tokensmith.attribution.api import attribute, run_method
from tokensmith.attribution.base import (
    AttributionMethod,
    MethodOutput,
    available_methods,
    get_method,
    register_method,
)
from tokensmith.attribution.evaluate import METRICS, compare_methods, evaluate, plausibility
from tokensmith.attribution.gradient import (
    InputXGradient,
    IntegratedGradients,
    LayerIntegratedGradients,
    Saliency,
    SmoothGrad,
)
from tokensmith.attribution.internals import Attention, AttentionNorm, AttentionRollout
from tokensmith.attribution.perturbation import Occlusion, ShapleySampling
from tokensmith.attribution.quadrature import quadrature
from tokensmith.attribution.result import AttributionResult, token_groups
from tokensmith.attribution.targets import AttributionProblem, Contrast, prepare

__all__ = [
    "attribute",
    "run_method",
    "evaluate",
    "compare_methods",
    "plausibility",
    "METRICS",
    "prepare",
    "AttributionResult",
    "AttributionProblem",
    "AttributionMethod",
    "MethodOutput",
    "Contrast",
    "register_method",
    "get_method",
    "available_methods",
    "Saliency",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "LayerIntegratedGradients",
    "Occlusion",
    "ShapleySampling",
    "Attention",
    "AttentionRollout",
    "AttentionNorm",
    "quadrature",
    "token_groups",
]
