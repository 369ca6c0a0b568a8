"""Reference hidden states for the streaming tests: every depth of one unpadded text from the plain HF model."""

from __future__ import annotations

import torch


def depth_states(ad, ids: list[int]) -> list[torch.Tensor]:
    """Depths 0..L of one unpadded text, float32: ``hidden_states[0]`` and each block's output (torch forward
    hooks), so depth L is before the final norm, as in :func:`tokensmith.analysis.stream.stream_hidden`."""
    outs: list[torch.Tensor] = []

    def rec(_m, _a, o):
        outs.append((o[0] if isinstance(o, tuple) else o).detach())

    hs = [layer.register_forward_hook(rec) for layer in ad.structure.layers]
    try:
        with torch.no_grad():
            res = ad.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return [res.hidden_states[0][0].float()] + [o[0].float() for o in outs]
