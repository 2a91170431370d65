"""Random adapters for the LoRA tests: every A and B drawn fresh (B is not zero, unlike a fresh PEFT adapter)."""

import numpy as np

from jvila.models.lora import Adapter, LoraConfig, module_shape


def random_adapter(cfg, rank, modules, rng, *, alpha=None, use_rslora=False, layers=None, std=0.1) -> Adapter:
    """An adapter of this rank on `modules` of `layers` (default: all), weights ~ N(0, std²)."""
    config = LoraConfig(rank, alpha if alpha is not None else 2.0 * rank, use_rslora=use_rslora,
                        target_modules=tuple(modules))
    weights = {}
    for layer in range(cfg.num_layers) if layers is None else layers:
        weights[layer] = {}
        for module in modules:
            d_in, d_out = module_shape(cfg, module)
            weights[layer][module] = (std * rng.standard_normal((d_in, rank)).astype(np.float32),
                                      std * rng.standard_normal((rank, d_out)).astype(np.float32))
    return Adapter(config, weights)
