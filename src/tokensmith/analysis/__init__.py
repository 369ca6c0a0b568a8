"""tokensmith.analysis — token-level diagnostics of models, streamed over a corpus, as tidy DataFrames.

- :mod:`~tokensmith.analysis.lens`: the logit lens per layer and position (:func:`logit_lens`) and its corpus
  statistics per layer (:func:`logit_lens_stats`);
- :mod:`~tokensmith.analysis.frequency`: per-token loss by token-frequency bucket across models or checkpoints
  (:func:`token_loss_by_frequency`, :func:`frequency_bias`);
- :mod:`~tokensmith.analysis.nonlinearity`: LLM-Microscope's per-token nonlinearity between consecutive layers
  (:func:`token_nonlinearity`), a contextualisation score (:func:`contextualization`), by token class;
- :mod:`~tokensmith.analysis.probes`: the next-token prediction residual per layer (:func:`prediction_residual_by_layer`);
- :mod:`~tokensmith.analysis.geometry`: anisotropy, whitening, effective rank, TwoNN intrinsic dimension, k-NN
  overlap (:func:`token_geometry` over a corpus, with a shuffled control);
- :mod:`~tokensmith.analysis.sweeps`: layer deletion / swap sweeps (:func:`layer_intervention_sweep`);
- :mod:`~tokensmith.analysis.features`: per-token features (log-prob, entropy, rank, max-prob) as a
  ``datasets.Dataset`` (:func:`next_token_features`);
- :func:`find_undertrained_tokens` is :func:`tokensmith.tokenization.find_undertrained_tokens` (one implementation).

Every diagnostic returns an :class:`AnalysisFrame` (a ``pandas.DataFrame`` with ``kind``, ``meta`` and a
``.plot()``); corpora are streamed through :mod:`~tokensmith.analysis.stream` (:class:`Moments`,
:class:`TokenSample`), never held as all hidden states at once. Layers are hidden-state depths ``0..L``
(HF's ``hidden_states`` convention, ``0`` = embeddings).

    >>> import tokensmith as ts
    >>> from tokensmith import analysis
    >>> ad = ts.tiny("llama")
    >>> lens = analysis.logit_lens(ad, "The capital of France is")
    >>> sorted(set(lens.layer)) == [0, 1, 2]
    True
"""

from tokensmith.analysis import demo  # noqa: F401  (registers the report section)
from tokensmith.analysis.features import FEATURE_COLUMNS, next_token_features
from tokensmith.analysis.frames import AnalysisFrame, make_frame, plot_kinds, register_plot
from tokensmith.analysis.frequency import (
    frequency_bias,
    merge_order_frequencies,
    plot_loss_by_frequency,
    token_loss_by_frequency,
)
from tokensmith.analysis.geometry import (
    METRICS,
    TwoNNResult,
    Whitening,
    anisotropy,
    effective_rank,
    entropy_effective_rank,
    knn_overlap,
    plot_geometry,
    shuffle_tokens,
    token_geometry,
    twonn,
    whiten,
)
from tokensmith.analysis.lens import logit_lens, logit_lens_stats, plot_logit_lens, plot_logit_lens_stats
from tokensmith.analysis.nonlinearity import (
    by_class,
    contextualization,
    linear_map_residuals,
    linearity_scores,
    plot_contextualization,
    plot_nonlinearity,
    token_nonlinearity,
)
from tokensmith.analysis.probes import (
    law_fit,
    plot_prediction_residual,
    prediction_residual_by_layer,
    ridge_prediction_residual,
)
from tokensmith.analysis.stream import (
    CorpusBatch,
    HiddenBatch,
    Moments,
    TokenSample,
    iter_batches,
    resolve_layers,
    stream_hidden,
)
from tokensmith.analysis.sweeps import layer_intervention_sweep, plot_layer_sweep
from tokensmith.analysis.token_classes import CLASSES, STOPWORDS, token_class, token_classes
from tokensmith.tokenization import find_undertrained_tokens

__all__ = [
    "AnalysisFrame",
    "CLASSES",
    "CorpusBatch",
    "FEATURE_COLUMNS",
    "HiddenBatch",
    "METRICS",
    "Moments",
    "STOPWORDS",
    "TokenSample",
    "TwoNNResult",
    "Whitening",
    "anisotropy",
    "by_class",
    "contextualization",
    "effective_rank",
    "entropy_effective_rank",
    "find_undertrained_tokens",
    "frequency_bias",
    "iter_batches",
    "knn_overlap",
    "law_fit",
    "layer_intervention_sweep",
    "linear_map_residuals",
    "linearity_scores",
    "logit_lens",
    "logit_lens_stats",
    "make_frame",
    "merge_order_frequencies",
    "next_token_features",
    "plot_contextualization",
    "plot_geometry",
    "plot_kinds",
    "plot_layer_sweep",
    "plot_logit_lens",
    "plot_logit_lens_stats",
    "plot_loss_by_frequency",
    "plot_nonlinearity",
    "plot_prediction_residual",
    "prediction_residual_by_layer",
    "register_plot",
    "resolve_layers",
    "ridge_prediction_residual",
    "shuffle_tokens",
    "stream_hidden",
    "token_class",
    "token_classes",
    "token_geometry",
    "token_loss_by_frequency",
    "token_nonlinearity",
    "twonn",
    "whiten",
]
