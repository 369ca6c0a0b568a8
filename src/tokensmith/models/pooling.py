"""Sequence pooling over hidden states: pure functions over tensors.

``pool`` turns per-token hidden states ``[B, T, H]`` into one vector per sequence ``[B, H]``
using the attention mask, so that padding never leaks into the result; ``l2_normalize``
rescales to unit length. Together they reproduce sentence-transformers' encoders (e.g.
all-MiniLM-L6-v2 is mean pooling followed by L2 normalisation) and the layer-averaged
variant of WhiteningBERT (average first and last layer, then mean-pool).

``sentence_embedding`` is the one model-aware convenience here (tokenize, forward, pool).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["POOLING_METHODS", "PoolingConfig", "l2_normalize", "pool", "sentence_embedding"]

POOLING_METHODS = ("mean", "cls", "last", "max")


def _select_layers(hidden_states: Tensor | Sequence[Tensor], layers: Sequence[int] | int | None) -> Tensor:
    """Return one ``[B, T, H]`` tensor: the given tensor, or the mean of the chosen layers."""
    if isinstance(hidden_states, Tensor) and hidden_states.dim() == 3:
        if layers is not None:
            raise ValueError(
                "layers= needs the hidden states of several layers (a sequence such as "
                "outputs.hidden_states, or a [L, B, T, H] tensor); got one [B, T, H] tensor"
            )
        return hidden_states
    if isinstance(hidden_states, Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(
                f"hidden_states must be [B, T, H], [L, B, T, H] or a sequence of [B, T, H]; "
                f"got shape {tuple(hidden_states.shape)}"
            )
        stack: Sequence[Tensor] = list(hidden_states.unbind(0))
    else:
        stack = list(hidden_states)
    if not stack:
        raise ValueError("hidden_states is an empty sequence")
    if layers is None:
        chosen = [stack[-1]]
    else:
        idx = [layers] if isinstance(layers, int) else list(layers)
        if not idx:
            raise ValueError("layers= is empty")
        n = len(stack)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"layer index {i} out of range for {n} hidden-state layers")
        chosen = [stack[i] for i in idx]
    for h in chosen:
        if h.dim() != 3:
            raise ValueError(f"each layer's hidden states must be [B, T, H]; got {tuple(h.shape)}")
    if len(chosen) == 1:
        return chosen[0]
    return torch.stack(chosen, 0).mean(0)


def pool(
    hidden_states: Tensor | Sequence[Tensor],
    attention_mask: Tensor,
    method: str = "mean",
    layers: Sequence[int] | int | None = None,
) -> Tensor:
    r"""Pool token hidden states into one vector per sequence, ignoring padding.

    With mask :math:`m_{bt} \in \{0, 1\}` and hidden states :math:`h_{bt} \in \mathbb{R}^H`:

    - ``"mean"``: :math:`e_b = \sum_t m_{bt} h_{bt} / \sum_t m_{bt}` (sentence-transformers'
      mean pooling).
    - ``"cls"``: the first attended token, :math:`h_{b,t_0}` with :math:`t_0 = \min\{t : m_{bt}=1\}`
      (position 0 under right padding; correct under left padding too).
    - ``"last"``: the last attended token, :math:`t_1 = \max\{t : m_{bt}=1\}` (the usual choice
      for decoder-only models); correct under left and right padding.
    - ``"max"``: elementwise :math:`\max_{t : m_{bt}=1} h_{bt}`.

    ``layers`` (WhiteningBERT-style layer averaging): when ``hidden_states`` holds several
    layers (e.g. ``outputs.hidden_states``, whose element 0 is the embedding output), first
    average the listed layers elementwise, :math:`\bar h = \frac{1}{|S|}\sum_{l \in S} h^{(l)}`,
    then pool. ``layers=(1, -1)`` averages the first transformer layer and the last. With
    ``layers=None`` the last element is used.

    Args:
        hidden_states: ``[B, T, H]``, ``[L, B, T, H]``, or a sequence of ``[B, T, H]`` tensors.
        attention_mask: ``[B, T]``, 1 (or True) for real tokens, 0 for padding.
        method: ``"mean"``, ``"cls"``, ``"last"`` or ``"max"``.
        layers: indices into the layer sequence to average (negative indices allowed).

    Returns:
        ``[B, H]`` in the dtype of the hidden states (means are accumulated in float32).

    Raises:
        ValueError: unknown method, shape mismatch, or a row with no attended token.

    Examples:
        >>> import torch
        >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])   # B=1, T=3, H=2
        >>> m = torch.tensor([[1, 1, 0]])                               # last position is padding
        >>> pool(h, m, "mean")
        tensor([[2., 1.]])
        >>> pool(h, m, "last")
        tensor([[3., 2.]])
        >>> pool([h, 3 * h], m, "mean", layers=(0, 1))                  # average of two layers
        tensor([[4., 2.]])
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"Unknown pooling method {method!r}; choose one of {', '.join(POOLING_METHODS)}")
    h = _select_layers(hidden_states, layers)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(h.shape[:2]):
        raise ValueError(
            f"attention_mask must be [B, T] = {tuple(h.shape[:2])}; got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=h.device).bool()
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no attended token (attention_mask all zero)")
    B, T, _ = h.shape
    if method == "mean":
        w = mask.to(torch.float32).unsqueeze(-1)
        summed = (h.to(torch.float32) * w).sum(1)
        return (summed / counts.to(torch.float32).unsqueeze(-1)).to(h.dtype)
    if method == "max":
        neg = torch.finfo(h.dtype).min
        return h.masked_fill(~mask.unsqueeze(-1), neg).amax(1)
    positions = torch.arange(T, device=h.device).expand(B, T)
    if method == "cls":
        idx = torch.where(mask, positions, T).amin(-1)
    else:  # "last"
        idx = torch.where(mask, positions, -1).amax(-1)
    return h[torch.arange(B, device=h.device), idx]


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    r"""Scale vectors to unit Euclidean length: :math:`x / \max(\lVert x \rVert_2, \epsilon)`.

    Args:
        x: any tensor.
        dim: the dimension holding the vectors.
        eps: lower bound on the norm (a zero vector stays zero).

    Examples:
        >>> import torch
        >>> l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    return torch.nn.functional.normalize(x, p=2.0, dim=dim, eps=eps)


@dataclass(frozen=True)
class PoolingConfig:
    """How a model turns token states into a sentence embedding.

    Attributes:
        method: one of :data:`POOLING_METHODS`.
        normalize: L2-normalise the pooled vector.
        layers: layers to average before pooling (``None``: the last hidden state).
        max_length: truncate inputs to this many tokens (``None``: the tokenizer's limit).
    """

    method: str = "mean"
    normalize: bool = False
    layers: tuple[int, ...] | None = None
    max_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in POOLING_METHODS:
            raise ValueError(f"Unknown pooling method {self.method!r}; choose one of {POOLING_METHODS}")

    @classmethod
    def from_sentence_transformers(
        cls, path: str | Path, *, missing_ok: bool = False
    ) -> PoolingConfig | None:
        """Read the pooling of a sentence-transformers model directory.

        Reads ``modules.json`` (a ``Normalize`` module means L2 normalisation), the Pooling
        module's ``config.json`` and ``sentence_bert_config.json`` (``max_seq_length``).

        Args:
            path: the model directory.
            missing_ok: return ``None`` instead of raising when it is not a
                sentence-transformers directory.

        Raises:
            ValueError: not a sentence-transformers directory (unless ``missing_ok``), or a
                pooling mode this module does not implement.
        """
        path = Path(path)
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            if missing_ok:
                return None
            raise ValueError(f"{path} has no modules.json; not a sentence-transformers model directory")
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        pooling_dir = None
        normalize = False
        for m in modules:
            kind = str(m.get("type", ""))
            if kind.endswith(".Pooling"):
                pooling_dir = path / m.get("path", "")
            elif kind.endswith(".Normalize"):
                normalize = True
        if pooling_dir is None or not (pooling_dir / "config.json").is_file():
            if missing_ok:
                return None
            raise ValueError(f"{path} has no Pooling module config")
        cfg = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8"))
        modes = {
            "mean": cfg.get("pooling_mode_mean_tokens", False),
            "cls": cfg.get("pooling_mode_cls_token", False),
            "max": cfg.get("pooling_mode_max_tokens", False),
            "last": cfg.get("pooling_mode_lasttoken", False),
        }
        unsupported = [
            k
            for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
            if cfg.get(k, False)
        ]
        chosen = [k for k, v in modes.items() if v]
        if unsupported or len(chosen) != 1:
            raise ValueError(
                f"Unsupported sentence-transformers pooling in {pooling_dir}: {cfg} "
                "(exactly one of mean / cls / max / lasttoken is supported)"
            )
        max_length = None
        sbert = path / "sentence_bert_config.json"
        if sbert.is_file():
            max_length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        return cls(method=chosen[0], normalize=normalize, max_length=max_length, extra=cfg)


@torch.no_grad()
def sentence_embedding(
    model: Any,
    tokenizer: Any,
    texts: str | Sequence[str],
    normalize: bool = True,
    *,
    method: str = "mean",
    layers: Sequence[int] | int | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Embed texts with a transformers encoder: tokenize, forward, :func:`pool`, normalise.

    With ``method="mean", normalize=True`` and ``max_length=256`` this is what
    sentence-transformers computes for all-MiniLM-L6-v2.

    Args:
        model: a transformers model returning ``last_hidden_state`` / ``hidden_states``.
        tokenizer: its tokenizer (its ``padding_side`` is respected; pooling is correct
            either way).
        texts: one string or a list of strings.
        normalize: L2-normalise each embedding.
        method: see :func:`pool`.
        layers: see :func:`pool` (indices into ``outputs.hidden_states``, whose element 0 is
            the embedding output).
        max_length: truncation length (default: the tokenizer's ``model_max_length``).
        batch_size: texts per forward pass.

    Returns:
        ``[N, H]`` float tensor on the model's device (``[1, H]`` for a single string).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    if device.type == "meta" and hasattr(model, "get_input_embeddings"):
        # offloaded by accelerate (device_map "cpu"/"disk"): inputs go where the embedding's hook computes
        from tokensmith.models.offload import execution_device

        device = execution_device(model.get_input_embeddings(), "")
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        outputs = model(**batch, output_hidden_states=True, return_dict=True)
        last = getattr(outputs, "last_hidden_state", None)
        hidden = outputs.hidden_states if (layers is not None or last is None) else last
        emb = pool(hidden, batch["attention_mask"], method, layers)
        out.append(l2_normalize(emb) if normalize else emb)
    if not out:
        raise ValueError("texts is empty")
    return torch.cat(out, 0)
