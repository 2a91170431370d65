"""Suite-wide set-up: simulated devices and an offline, deterministic environment."""

import os

# Must be set before JAX initialises its backend: multi-device code is tested on 8 simulated CPUs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def jvila_cache(tmp_path_factory):
    """One conversion cache for the whole run, outside the user's home."""
    path = tmp_path_factory.mktemp("jvila_cache")
    os.environ["JVILA_CACHE"] = str(path)
    return path
