"""Fixtures shared by the kernel tests."""

import pytest


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """Runs MLIR verification on every Triton module lowered during the test (catches ill-typed
    IR, e.g. mismatched loop-bound types, that would otherwise surface only at GPU compile
    time). Relies on a private hook; without it the test still checks the lowering."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
        lower = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):
        return None
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified
