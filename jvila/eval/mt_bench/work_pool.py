"""Running requests `parallel` at a time: an OpenAI-compatible server batches concurrent requests."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable


def run_all(work: Callable, items: list, parallel: int) -> None:
    """work(item) for every item, `parallel` at a time; the first failure stops the rest and is raised."""
    if parallel == 1:
        for item in items:
            work(item)
        return
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(work, item) for item in items]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
