"""Sharing a prefix KV cache across rows (kvcache.expand / kvcache.extend), on every tiny causal architecture.

``extend(adapter, expand(prefill(prefix), N, length), length, new)`` must equal the uncached forward of
``prefix[:length] ⊕ new`` at the new positions: the same model, different kernels (cached attention over
fewer query rows), so the logits agree to fp32 rounding over all layers; a wrong position (off by one) or a
wrong cache length changes them by orders of magnitude more (asserted).
"""

from __future__ import annotations

import pytest
import torch

from tests.tolerance import assert_fp32_close
from tokensmith.models import kvcache

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CAUSAL = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox"]


@pytest.mark.parametrize("arch", CAUSAL)
def test_expand_extend_equals_uncached_forward(shared_tiny, arch):
    ad = shared_tiny(arch)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 300, (1, 9), generator=g)
    new = torch.randint(5, 300, (3, 5), generator=g)
    cache, _ = kvcache.prefill(ad, {"input_ids": prefix})
    before = [t.clone() for t in kvcache.layer_kv(cache, 0)]
    d = ad.structure.hidden_size
    L = ad.structure.num_layers
    for length in (9, 4):
        full = torch.cat([prefix[:, :length].expand(3, -1), new], 1)
        with torch.no_grad():
            ref = ad.forward(full).logits[:, length:]
            out = kvcache.extend(ad, kvcache.expand(cache, 3, length), length, new).logits
            kept = kvcache.extend(ad, kvcache.expand(cache, 3, length), length, new,
                                  logits_to_keep=torch.tensor([1, 4])).logits
        assert_fp32_close(out, ref, width=d, depth=L + 1)
        assert_fp32_close(kept, ref[:, [1, 4]], width=d, depth=L + 1)
        # a wrong past length (positions shifted by one) is far outside the bound
        with torch.no_grad():
            wrong = kvcache.extend(ad, kvcache.expand(cache, 3, length), length + 1, new).logits
        assert (wrong - ref).abs().max() > 1e-3
    # the shared cache is never modified
    after = kvcache.layer_kv(cache, 0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert after[0].shape[-2] == 9


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_extend_with_embeddings_keeps_gradients(shared_tiny, arch):
    ad = shared_tiny(arch)
    prefix = torch.arange(10, 17)[None]
    new = torch.arange(20, 24)[None]
    cache, _ = kvcache.prefill(ad, {"input_ids": prefix})
    e = ad.embed(new).detach().requires_grad_(True)
    out = kvcache.extend(ad, kvcache.expand(cache, 1), 7, inputs_embeds=e, logits_to_keep=1).logits
    (g,) = torch.autograd.grad(out.sum(), e)
    e2 = ad.embed(new).detach().requires_grad_(True)
    full = torch.cat([ad.embed(prefix).detach(), e2], 1)
    out2 = ad.forward(inputs_embeds=full, logits_to_keep=1).logits
    (g2,) = torch.autograd.grad(out2.sum(), e2)
    assert_fp32_close(g, g2, width=ad.structure.hidden_size, depth=ad.structure.num_layers + 1)


def test_expand_errors(shared_tiny):
    ad = shared_tiny("llama")
    cache, _ = kvcache.prefill(ad, {"input_ids": torch.arange(5, 12)[None]})
    with pytest.raises(ValueError, match="outside"):
        kvcache.expand(cache, 2, 0)
    with pytest.raises(ValueError, match="outside"):
        kvcache.expand(cache, 2, 8)
    two = kvcache.expand(cache, 2)
    with pytest.raises(ValueError, match="batch 1 or 3"):
        kvcache.expand(two, 3)
    with pytest.raises(ValueError, match="exactly one"):
        kvcache.extend(ad, kvcache.expand(cache, 1), 7)
    kvcache.evict(cache, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="evicted"):
        kvcache.expand(cache, 2)


def test_expand_refuses_to_crop_a_rolled_window(shared_tiny):
    from tokensmith.models.tiny import GEMMA3_SLIDING_WINDOW

    ad = shared_tiny("gemma3")
    T = GEMMA3_SLIDING_WINDOW + 6
    cache, _ = kvcache.prefill(ad, {"input_ids": torch.arange(5, 5 + T)[None]})
    kvcache.expand(cache, 2)  # whole cache: fine
    with pytest.raises(ValueError, match="rolled"):
        kvcache.expand(cache, 2, T - 3)
