"""Fixtures of the optimization tests: the shared tiny adapters (read-only) by name."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llama(shared_tiny):
    return shared_tiny("llama")


@pytest.fixture(scope="module")
def bert(shared_tiny):
    return shared_tiny("bert")
