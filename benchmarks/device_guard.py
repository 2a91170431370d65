"""The start every device benchmark shares: say what it runs on, refuse the wrong machine."""

from __future__ import annotations

import sys

import jax


def require_backend(backend: str, dry_run: bool) -> None:
    """Print jax's version and devices; exit 2 unless on `backend` or in a `--dry-run`."""
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
    if not dry_run and jax.default_backend() != backend:
        print(f"no {backend.upper()}: use --dry-run on CPU", flush=True)
        sys.exit(2)
