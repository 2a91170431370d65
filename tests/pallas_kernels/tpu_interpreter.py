"""What the TPU interpreter's race detector saw, for the kernel tests that run with it on."""

try:  # private: where the interpreter records its race detector's findings
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpreter
except ImportError:  # pragma: no cover - layout of a future jax
    _interpreter = None


def assert_no_races():
    """Fails if the last interpreted kernel had a DMA racing a read or write of its buffer.

    A jax that records races elsewhere (or not at all) makes this a no-op: the numeric checks
    of each test still stand on their own.
    """
    races = getattr(_interpreter, "races", None)
    assert races is None or not races.races_found, "the interpreter saw a DMA/compute race"
