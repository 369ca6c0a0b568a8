"""Shared fixtures. Names are unique per owner; shared adapters are read-only (build your own to mutate)."""

from __future__ import annotations

import pytest

import tokensmith as ts


@pytest.fixture(scope="session")
def shared_tiny():
    """``shared_tiny(arch, seed=0)`` -> a cached tiny adapter. Do not mutate it (no new tokenizer
    template, no spec changes, no weight edits); hooks/probes inside ``with`` blocks are fine."""
    cache: dict[tuple[str, int], ts.ModelAdapter] = {}

    def get(arch: str, seed: int = 0) -> ts.ModelAdapter:
        key = (arch, seed)
        if key not in cache:
            cache[key] = ts.tiny(arch, seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_shared():
    """The bundled SmolLM2-135M-Instruct adapter (read-only, loaded once per session)."""
    return ts.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module with one intra-op thread: on a small shared CPU, tiny models are ~50x faster this
    way (OpenMP workers otherwise wait on each other for every 64-wide matmul). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def random_norm_tiny_factory():
    """``get(arch, seed, norm_seed)`` -> a tiny adapter (cached per module) whose norm weights and biases are
    perturbed at random: the default γ = 1, β = 0 would hide a dropped γ or a misplaced β."""
    import torch

    cache: dict[tuple[str, int, int], ts.ModelAdapter] = {}

    def get(arch: str, seed: int, norm_seed: int) -> ts.ModelAdapter:
        key = (arch, seed, norm_seed)
        if key not in cache:
            ad = ts.tiny(arch, seed=seed)
            g = torch.Generator().manual_seed(norm_seed)
            with torch.no_grad():
                for n, p in ad.model.named_parameters():
                    if "norm" in n.lower() or ".ln" in n.lower():
                        p.add_(torch.randn(p.shape, generator=g) * 0.3)
            cache[key] = ad
        return cache[key]

    return get
