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

from tokensmith.attribution import (  # noqa: F401  (register methods, CLI command, demo section)
    cli,
    decomposition,
    gradient,
    internals,
    lens,
    perturbation,
    reagent,
    report,
    surrogate,
)
from tokensmith.attribution.api import attribute, run_method
from tokensmith.attribution.base import (
    AttributionMethod,
    MethodOutput,
    available_methods,
    get_method,
    register_method,
)
from tokensmith.attribution.dataset import AttributionRecords, attribute_dataset, read_records
from tokensmith.attribution.decomposition import ALTI, DecompositionRollout, GlobEnc
from tokensmith.attribution.evaluate import (
    METRICS,
    compare_methods,
    evaluate,
    evaluate_against_spans,
    plausibility,
)
from tokensmith.attribution.gradient import (
    InputXGradient,
    IntegratedGradients,
    LayerIntegratedGradients,
    Saliency,
    SmoothGrad,
)
from tokensmith.attribution.internals import Attention, AttentionNorm, AttentionRollout
from tokensmith.attribution.lens import DirectLogitAttribution, LogitLensResult, logit_lens
from tokensmith.attribution.perturbation import Occlusion, ShapleySampling
from tokensmith.attribution.quadrature import quadrature
from tokensmith.attribution.reagent import ReAGent
from tokensmith.attribution.result import AttributionResult, token_groups
from tokensmith.attribution.siamese import (
    PairAttribution,
    integrated_jacobians,
    integrated_jacobians_pairwise,
)
from tokensmith.attribution.steering import (
    GrainsDifferences,
    SteeringVectors,
    grains_differences,
    grains_directions,
    grains_fit,
    grains_steer,
)
from tokensmith.attribution.surrogate import LIME, KernelSHAP
from tokensmith.attribution.targets import AttributionProblem, Contrast, Label, MaskFill, prepare

__all__ = [
    "attribute",
    "run_method",
    "attribute_dataset",
    "AttributionRecords",
    "read_records",
    "evaluate",
    "compare_methods",
    "plausibility",
    "evaluate_against_spans",
    "METRICS",
    "prepare",
    "AttributionResult",
    "AttributionProblem",
    "AttributionMethod",
    "MethodOutput",
    "Contrast",
    "Label",
    "MaskFill",
    "integrated_jacobians",
    "integrated_jacobians_pairwise",
    "PairAttribution",
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
    "KernelSHAP",
    "LIME",
    "ReAGent",
    "Attention",
    "AttentionRollout",
    "AttentionNorm",
    "DecompositionRollout",
    "GlobEnc",
    "ALTI",
    "DirectLogitAttribution",
    "logit_lens",
    "LogitLensResult",
    "grains_fit",
    "grains_differences",
    "grains_directions",
    "grains_steer",
    "SteeringVectors",
    "GrainsDifferences",
    "quadrature",
    "token_groups",
]
