"""Norms as affine maps with frozen statistics, and where they sit around each attention block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tokensmith.models.norms import attention_norms, norm_form
from tokensmith.models.structure import is_norm_module
from tokensmith.models.tiny import TINY_ARCHS


def _randomised(m: nn.Module, seed: int) -> nn.Module:
    m = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * 0.5 + 0.3)
    return m


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_norm_form_reproduces_every_norm_and_splits_linearly(arch, shared_tiny, torch_one_thread):
    ad = shared_tiny(arch)
    mods = [m for m in ad.model.modules() if is_norm_module(m) and next(m.parameters(), None) is not None]
    assert mods
    g = torch.Generator().manual_seed(1)
    for k, m in enumerate(mods[:4]):
        m = _randomised(m, k)  # default init (γ = 1, β = 0) would hide a swapped or dropped parameter
        f = norm_form(m)
        d = f.weight.numel() if f.weight is not None else f.bias.numel()
        u = torch.randn(5, d, generator=g, dtype=torch.float64) * 3 + 1
        with torch.no_grad():
            ref = m(u.float()).double()
        torch.testing.assert_close(f(u), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
        # N(Σ_j z_j) = Σ_j γ⊙C(z_j)/s(u) + β with s frozen at u
        parts = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
        parts[-1] = u - parts[:-1].sum(0)
        split = f.linear(parts, f.scale(u)).sum(0) + f.beta(d)
        torch.testing.assert_close(split, f(u), atol=1e-10, rtol=0)


def test_norm_form_refuses_other_normalisations():
    class L1Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / x.abs().mean(-1, keepdim=True)

    with pytest.raises(ValueError, match="not a LayerNorm/RMSNorm"):
        norm_form(L1Norm())


EXPECTED = {  # module paths (relative to the layer) of (pre, post, post_residual)
    "llama": ("input_layernorm", None, None),
    "qwen2": ("input_layernorm", None, None),
    "gpt2": ("ln_1", None, None),
    "gpt_neox": ("input_layernorm", None, None),
    "gemma3": ("input_layernorm", "post_attention_layernorm", None),
    "bert": (None, None, "attention.output.LayerNorm"),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_attention_norms_found_by_probe(arch, shared_tiny, torch_one_thread):
    ad = shared_tiny(arch)
    for i in range(ad.structure.num_layers):
        layer = ad.structure.layers[i]
        got = attention_norms(ad, i)
        for field, path in zip(("pre", "post", "post_residual"), EXPECTED[arch], strict=True):
            want = layer.get_submodule(path) if path else None
            assert getattr(got, field) is want, (arch, i, field)
    # the pre-norm's output is exactly what the attention module receives
    if EXPECTED[arch][0]:
        seen: dict[str, torch.Tensor] = {}
        a, pre = ad.structure.attn[0], attention_norms(ad, 0).pre
        h1 = pre.register_forward_hook(lambda m, a_, o: seen.__setitem__("norm", o))
        h2 = a.register_forward_pre_hook(
            lambda m, args, kw: seen.__setitem__("attn", args[0] if args else kw["hidden_states"]), with_kwargs=True)
        try:
            with torch.no_grad():
                ad.forward(ad.encode("a b c").input_ids[None])
        finally:
            h1.remove()
            h2.remove()
        torch.testing.assert_close(seen["attn"], seen["norm"])
