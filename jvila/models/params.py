"""Flat dotted-path views of a model's parameters, the form checkpoints are converted in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvila.config import LLMConfig
from jvila.models.llm import LLM


def flat_params(model_or_state) -> dict[str, jax.Array]:
    """{"layers.0.attn.q_proj": array, ...} from a model or its parameter state."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state) for v in [v.get_value()]}


def abstract_model(cfg: LLMConfig, *, param_dtype=jnp.float32, compute_dtype=jnp.float32) -> LLM:
    """The model's structure with shape-only parameters (no memory, no random init)."""
    return nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, compute_dtype=compute_dtype))


def check_params(expected: dict, params: dict) -> None:
    """Raise ValueError unless `params` has exactly the expected names and shapes."""
    if set(expected) != set(params):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"parameter names differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in params.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the model's {expected[name].shape}")


def model_from_params(cfg: LLMConfig, params: dict[str, np.ndarray], *, param_dtype=jnp.float32,
                      compute_dtype=jnp.float32) -> LLM:
    """Build the model around given flat params, checking names and shapes; values cast to param_dtype."""
    model = abstract_model(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype)
    state = nnx.state(model, nnx.Param)
    check_params(flat_params(state), params)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params[".".join(str(k) for k in path)], dtype=param_dtype))
    nnx.update(model, state)
    return model
