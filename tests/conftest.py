"""Suite-wide set-up: simulated devices and an offline, deterministic environment."""

import os

# Must be set before JAX initialises its backend: multi-device code is tested on 8 simulated CPUs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
