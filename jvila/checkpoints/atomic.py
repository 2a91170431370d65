"""Directory writes that either complete or leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from jvila.checkpoints.errors import CheckpointError


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary directory beside `dst`; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
    tmp.rename(dst)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()
