"""Shared fixtures: one GPU device per test session, tiny HF reference models cached per spec.

Real shaders run here on whatever Vulkan/Metal/DX12 adapter wgpu finds; in CI that is Mesa's
lavapipe (and a second pass on SwiftShader, WebGPU's browser limits). Set WGPU_BACKEND_TYPE=Vulkan
so a missing driver fails loudly instead of silently skipping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def gpu():
    from voxtral_wgpu.gpu import Gpu

    g = Gpu()
    limits = g.limits
    # WebGPU core: our shaders never need more than 256 invocations per workgroup
    assert limits["max-compute-invocations-per-workgroup"] >= 256
    return g


_REFS: dict = {}


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory):
    """``tiny_ref(spec, delay_ms)`` -> a cached hf_reference.Reference with its model directory."""
    from hf_reference import build_model

    def get(spec, delay_ms=480):
        key = (spec, delay_ms)
        if key not in _REFS:
            d = tmp_path_factory.mktemp(f"tiny_{abs(hash(key)) % 10**8}")
            _REFS[key] = build_model(spec, d, delay_ms=delay_ms)
        return _REFS[key]

    return get


_MODELS: dict = {}


@pytest.fixture(scope="session")
def tiny_model(tiny_ref, gpu):
    """``tiny_model(spec, delay_ms)`` -> (voxtral_wgpu Model, Reference), both cached."""
    import voxtral_wgpu

    def get(spec, delay_ms=480):
        key = (spec, delay_ms)
        if key not in _MODELS:
            ref = tiny_ref(spec, delay_ms)
            _MODELS[key] = (voxtral_wgpu.load(ref.out_dir, gpu=gpu, progress=False), ref)
        return _MODELS[key]

    return get


GPU_FIXTURES = {"gpu", "tiny_model"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs shaders ``gpu``: CI's second pass (SwiftShader) selects them from
    the op and GGUF test files."""
    for item in items:
        if GPU_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gpu)
