"""Read and write Hugging Face model directories (config.json + safetensors + tokenizer files).

Tensors keep their stored dtype in both directions: bfloat16 and float8 come back as `ml_dtypes`
numpy arrays, which plain numpy cannot hold, so a read → write → read round trip is bit-identical.
Written directories load with `transformers.AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jvila.checkpoints.atomic import atomic_directory
from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.hf_form import (
    CAUSAL_LM_ARCHITECTURES,
    TOKENIZER_FILENAMES,
    HFCheckpoint,
    check_tensor_shapes,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' own default shard size.
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
# safetensors dtypes that plain numpy represents; the rest are read through JAX into ml_dtypes.
_NUMPY_NATIVE = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
_FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def read_hf_dir(path: str | os.PathLike) -> HFCheckpoint:
    """config.json, every safetensors tensor (one file or an indexed set of shards) and tokenizer files."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model directory: {config_file} not found")
    config = json.loads(config_file.read_text(encoding="utf-8"))

    tensors = {}
    for shard in _weight_files(path):
        tensors |= _read_safetensors(shard)

    return HFCheckpoint(config=config, tensors=tensors, tokenizer_files=read_tokenizer_files_at(path))


def read_tokenizer_files_at(path: pathlib.Path) -> dict[str, str | bytes]:
    """The tokenizer files an HF directory holds (an empty dict when it holds none)."""
    files: dict[str, str | bytes] = {}
    for name in TOKENIZER_FILENAMES:
        file = path / name
        if file.is_file():
            data = file.read_bytes()
            files[name] = data if name.endswith(".model") else data.decode("utf-8")
    return files


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index_file} names shards that do not exist: {missing}")
        return shards
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds PyTorch pickle weights; only safetensors are read")
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    tensors = {}
    with safe_open(file, framework="numpy") as numpy_view:
        jax_names = []
        for name in numpy_view.keys():
            if numpy_view.get_slice(name).get_dtype() in _NUMPY_NATIVE:
                tensors[name] = numpy_view.get_tensor(name)
            else:
                jax_names.append(name)
    if jax_names:
        with safe_open(file, framework="flax") as jax_view:
            for name in jax_names:
                tensors[name] = np.asarray(jax_view.get_tensor(name))
    return tensors


def write_hf_dir(
    ckpt: HFCheckpoint,
    path: str | os.PathLike,
    *,
    dtype: str | np.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write `ckpt` as an HF model directory at `path` (replaced only with `overwrite`).

    `dtype` ("float32", "float16", "bfloat16") casts floating-point tensors and sets the config's
    `torch_dtype`; by default tensors keep their dtypes. Weights above `max_shard_bytes` are split
    into shards listed by model.safetensors.index.json. The directory appears only once complete.
    """
    if ckpt.config.get("model_type") in CAUSAL_LM_ARCHITECTURES:
        check_tensor_shapes(ckpt, require_all=False)
    config = dict(ckpt.config)
    tensors = ckpt.tensors
    if dtype is not None:
        target = _float_dtype(dtype)
        tensors = {name: _cast_float(array, target) for name, array in tensors.items()}
        config["torch_dtype"] = target.name
        if "dtype" in config:  # transformers 5 writes `dtype` where older versions wrote `torch_dtype`
            config["dtype"] = target.name

    with atomic_directory(path, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _write_weights(tensors, staging, max_shard_bytes)
        for name, content in ckpt.tokenizer_files.items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content, encoding="utf-8")
    return pathlib.Path(path)


def _float_dtype(dtype: str | np.dtype) -> np.dtype:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _FLOAT_DTYPES:
        raise CheckpointError(f"unsupported checkpoint dtype {name!r}; supported: {sorted(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[name]


def _cast_float(array: np.ndarray, target: np.dtype) -> np.ndarray:
    is_float = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    return array.astype(target) if is_float else array


def _write_weights(tensors: dict[str, np.ndarray], out_dir: pathlib.Path, max_shard_bytes: int) -> None:
    # transformers expects the "pt" format tag in the safetensors metadata.
    metadata = {"format": "pt"}
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(_contiguous(tensors, shards[0]), out_dir / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(_contiguous(tensors, names), out_dir / shard_name, metadata=metadata)
        weight_map |= {name: shard_name for name in names}
    index = {
        "metadata": {"total_size": sum(int(a.nbytes) for a in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _plan_shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `max_shard_bytes` (a bigger tensor sits alone)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, array in tensors.items():
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += array.nbytes
    return shards


def _contiguous(tensors: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(tensors[name]) for name in names}
