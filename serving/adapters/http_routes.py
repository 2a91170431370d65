"""LoRA adapter routes of the OpenAI-compatible server, with vLLM's names and bodies.

POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...} reads a PEFT directory (under the
server's adapter root) off the event loop, checks it against the base model and registers it
between engine steps; POST /v1/unload_lora_adapter {"lora_name": ...} forgets it (refused while
requests wait for it or run with it). Both answer vLLM's plain-text success line, and every
refusal is a 4xx with OpenAI's error body; nothing else in the server is touched by a refusal.
"""

from __future__ import annotations

import asyncio

import fastapi
import pydantic
from fastapi.responses import PlainTextResponse

from serving.adapters.store import AdapterError, AdapterInUse, UnknownAdapter
from serving.openai_protocol import APIError


class LoadLoraAdapter(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1, max_length=256)
    lora_path: str = pydantic.Field(min_length=1)


class UnloadLoraAdapter(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's optional field; names are what identify adapters here


def install_lora_routes(app: fastapi.FastAPI, state, authenticate) -> None:
    """Add the two routes; `state.engine` is the AsyncEngine, `state.model_name` the base model's name."""

    def store():
        engine = state.engine.engine
        if engine.adapters is None:
            raise APIError(400, "this server was started without LoRA support (jvila serve --lora / --lora-root)",
                           code="lora_disabled")
        return engine.adapters.store

    auth = [fastapi.Depends(authenticate)]

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoraAdapter):
        adapters = store()
        if body.lora_name == state.model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        if body.lora_name in adapters:
            raise APIError(400, f"a LoRA adapter named {body.lora_name!r} is already loaded", param="lora_name",
                           code="adapter_exists")
        try:
            adapter = await asyncio.to_thread(adapters.read, body.lora_path)
            await state.engine.call(lambda engine: engine.adapters.add(body.lora_name, adapter))
        except AdapterError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoraAdapter):
        store()
        try:
            await state.engine.call(lambda engine: engine.adapters.remove(body.lora_name))
        except UnknownAdapter as e:
            raise APIError(404, str(e), param="lora_name", code="adapter_not_found") from None
        except AdapterInUse as e:
            raise APIError(409, str(e), param="lora_name", code="adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def adapter_names(state) -> list[str]:
    """Names of the loaded adapters (read from the event loop; the engine thread only adds and removes)."""
    adapters = state.engine.engine.adapters
    return [] if adapters is None else list(adapters.store.names)
