"""jvila: the VILA family of visual language models in JAX. `jvila.load(NAME_OR_DIR)` opens a checkpoint."""


def __getattr__(name: str):
    # Lazy, so that `import jvila.cli` (and `jvila --help`) starts without importing JAX.
    if name == "load":
        from jvila.api import load

        return load
    raise AttributeError(f"module 'jvila' has no attribute {name!r}")


__all__ = ["load"]
