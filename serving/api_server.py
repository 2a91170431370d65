"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine, run by uvicorn.

Routes: POST /v1/chat/completions and /v1/completions (server-sent events when `stream` is set),
GET /v1/models, /health, /metrics (Prometheus text). With an API keys table, every /v1 route needs
`Authorization: Bearer <key>`; the key names the client the scheduler is fair to. Every client
error is a 4xx with OpenAI's error body; a client that goes away mid-request has its requests
aborted, which frees their pages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics as prometheus
from serving.adapters.http_routes import adapter_names, install_lora_routes
from serving.api_keys import ApiKeys, Client
from serving.async_engine import AsyncEngine, EngineDeadError
from serving.chat_prompt import MediaPromptBuilder, chat_prompt, completion_prompt
from serving.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_message,
)
from serving.openai_responses import (
    Choice,
    chat_logprobs,
    completion_logprobs,
    merged,
    new_id,
    now,
    usage,
)
from serving.request import Request, SamplingParams
from serving.scheduler import RateLimited

log = logging.getLogger("jvila.serving")

DEFAULT_CLIENT = Client("default")
# OpenAI's default sampling temperature when the request names none.
DEFAULT_TEMPERATURE = 1.0


@dataclasses.dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    max_context: int
    vocab_size: int
    api_keys: ApiKeys | None
    media_prompt: MediaPromptBuilder | None
    metrics: prometheus.ServerMetrics
    created: int


def create_app(engine: AsyncEngine, tokenizer, *, model_name: str, max_context: int, vocab_size: int,
               api_keys: ApiKeys | None = None, media_prompt: MediaPromptBuilder | None = None) -> fastapi.FastAPI:
    """The app; its lifespan starts the engine thread and stops it on shutdown."""
    state = ServerState(engine, tokenizer, model_name, max_context, vocab_size, api_keys, media_prompt,
                        prometheus.ServerMetrics(), now())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = fastapi.FastAPI(title="jvila", lifespan=lifespan)
    app.state.server = state
    _install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=state.metrics)

    def authenticate(authorization: str | None = fastapi.Header(default=None)) -> Client:
        if state.api_keys is None:
            return DEFAULT_CLIENT
        scheme, _, key = (authorization or "").partition(" ")
        client = state.api_keys.client_for(key.strip()) if scheme.lower() == "bearer" else None
        if client is None:
            message = ("missing API key: send 'Authorization: Bearer <key>'" if not authorization
                       else "invalid API key")
            raise APIError(401, message, code="invalid_api_key")
        return client

    @app.get("/health")
    async def health():
        if not state.engine.healthy:
            return JSONResponse({"status": "error", "detail": repr(state.engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        engine_metrics = await state.engine.call(lambda e: e.metrics()) if state.engine.healthy else {}
        return PlainTextResponse(prometheus.render(state.metrics, engine_metrics, model=state.model_name),
                                 media_type=prometheus.CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(client: Client = fastapi.Depends(authenticate)):
        cards = [_model_card(state)] + [_model_card(state, adapter) for adapter in adapter_names(state)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, client: Client = fastapi.Depends(authenticate)):
        return _model_card(state, _check_model(state, model_id))

    install_lora_routes(app, state, authenticate)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request,
                               client: Client = fastapi.Depends(authenticate)):
        return await chat_completion(state, body, request, client)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: fastapi.Request,
                          client: Client = fastapi.Depends(authenticate)):
        _check_model(state, body.model)
        prompts = [(completion_prompt(state.tokenizer, p, vocab_size=state.vocab_size, index=i), None, None)
                   for i, p in enumerate(body.prompts)]
        return await _generate(state, request, body, prompts, client, chat=False)

    return app


def serve(app: fastapi.FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app on uvicorn until interrupted (Ctrl-C or SIGTERM: a graceful shutdown, then return)."""
    # Access logs are logs: to stderr with the rest (uvicorn's default sends them to stdout).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        # uvicorn re-raises the signal once it has shut down; the shutdown was clean, so say so and return.
        log.info("server stopped")


class ServerThread:
    """The app on uvicorn in a background thread, on a socket bound before start (port 0 = any free one).

    For embedding the server in another program, and for tests and benchmarks on loopback.
    """

    def __init__(self, app: fastapi.FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        # log_config=None: an embedded server must not replace the host program's logging handlers
        # (uvicorn's default config closes them, pytest's capture streams included).
        config = uvicorn.Config(app, log_level=log_level, log_config=None, timeout_graceful_shutdown=5,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="jvila-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
        if self._thread.is_alive():
            raise RuntimeError(f"the HTTP server did not stop within {timeout_s}s")


# ---- generation ---------------------------------------------------------------------------------


async def chat_completion(state: ServerState, body: ChatCompletionRequest, http_request: fastapi.Request,
                          client: Client):
    """One chat completion as POST /v1/chat/completions serves it; the Arena's answers come from here too."""
    _check_model(state, body.model)
    prompt_ids, embeddings, mask = chat_prompt(state.tokenizer, body.messages, model_name=state.model_name,
                                               media_prompt=state.media_prompt)
    prompts = [(prompt_ids, embeddings, mask)]
    return await _generate(state, http_request, body, prompts, client, chat=True)


def served_model_names(state: ServerState) -> list[str]:
    """The model names this server answers to (the ones /v1/models lists): the base model, then its adapters."""
    return [state.model_name, *adapter_names(state)]


async def _generate(state: ServerState, http_request: fastapi.Request, body, prompts, client: Client, *, chat: bool):
    max_tokens = [_max_tokens(state, body, len(ids)) for ids, _, _ in prompts]
    choices = await _submit(state, body, prompts, max_tokens, client)
    prompt_tokens = sum(len(ids) for ids, _, _ in prompts)
    state.metrics.count_tokens(prompt=prompt_tokens)
    response_id = new_id("chatcmpl" if chat else "cmpl")
    echo_texts = ([state.tokenizer.decode(ids, skip_special_tokens=False) for ids, _, _ in prompts]
                  if not chat and body.echo else None)
    if body.stream:
        events = _stream_events(state, body, choices, response_id, prompt_tokens, chat=chat, echo_texts=echo_texts)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collect = asyncio.create_task(_collect(state, choices))
    disconnect = asyncio.create_task(_wait_for_disconnect(http_request))
    try:
        await asyncio.wait([collect, disconnect], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not collect.done():  # the client went away: abort (merged's clean-up frees every request)
        collect.cancel()
        state.metrics.count_disconnect()
        with contextlib.suppress(asyncio.CancelledError):
            await collect
        return JSONResponse(error_body("client disconnected"), status_code=499)
    try:
        collect.result()
    except EngineDeadError as e:
        raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
    return _full_response(state, body, choices, response_id, prompt_tokens, chat=chat, echo_texts=echo_texts)


def _max_tokens(state: ServerState, body, prompt_len: int) -> int:
    room = state.max_context - prompt_len
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {state.max_context} tokens; the prompt has "
                            f"{prompt_len}, leaving no room for a completion", param="messages" if
                       isinstance(body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    asked = body.requested_max_tokens
    explicit = "max_tokens" in body.model_fields_set or getattr(body, "max_completion_tokens", None) is not None
    if asked is None:
        return room
    if asked > room:
        if not explicit:  # the completions default (16) shrinks to what the context leaves
            return room
        raise APIError(400, f"this model's maximum context length is {state.max_context} tokens; you asked for "
                            f"{prompt_len + asked} ({prompt_len} in the prompt, {asked} for the completion)",
                       param="max_tokens", code="context_length_exceeded")
    return asked


async def _submit(state: ServerState, body, prompts, max_tokens: list[int], client: Client) -> list[Choice]:
    base_id = new_id("req")
    choices: list[Choice] = []
    try:
        for p, ((ids, embeddings, mask), limit) in enumerate(zip(prompts, max_tokens)):
            for k in range(body.n):
                index = p * body.n + k
                params = _sampling_params(body, limit, k)
                adapter = _check_model(state, body.model)
                # Without API keys each adapter is its own client, as in the VTC artifact.
                who = adapter if adapter is not None and state.api_keys is None else client.name
                request = Request(f"{base_id}-{index}", ids, params, client=who, arrival_time=time.monotonic(),
                                  input_embeddings=embeddings, embedding_mask=mask, adapter=adapter)
                stream = await state.engine.submit(request)
                choices.append(Choice(index, stream, state.tokenizer, stop=body.stop_strings, prompt_index=p))
    except BaseException as e:
        for choice in choices:
            choice.stream.abort()
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        if isinstance(e, ValueError):  # the engine's or the scheduler's refusal
            status, code = (429, "rate_limit_exceeded") if isinstance(e, RateLimited) else (400, None)
            raise APIError(status, str(e), code=code) from None
        raise
    return choices


def _sampling_params(body, max_tokens: int, k: int) -> SamplingParams:
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    # n > 1 with a seed: each choice its own reproducible stream (choice k uses seed + k).
    seed = None if body.seed is None else body.seed + k
    logprobs = body.num_logprobs if isinstance(body, ChatCompletionRequest) else body.logprobs
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=body.stop_strings,
                          ignore_eos=body.ignore_eos, logprobs=logprobs)


async def _collect(state: ServerState, choices: list[Choice]) -> None:
    async with contextlib.aclosing(merged(choices)) as outputs:
        async for choice, out in outputs:
            choice.update(out)
            state.metrics.count_tokens(completion=len(out.new_token_ids))


async def _wait_for_disconnect(http_request: fastapi.Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


def _full_response(state, body, choices: list[Choice], response_id: str, prompt_tokens: int, *, chat: bool,
                   echo_texts) -> dict:
    out_choices = []
    for c in choices:
        if chat:
            out_choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text.text, "refusal": None},
                "logprobs": chat_logprobs(state.tokenizer, c.logprobs) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            })
        else:
            prefix = echo_texts[c.prompt_index] if echo_texts else ""
            logprobs = (completion_logprobs(state.tokenizer, c.logprobs, decode=c.decode, token_ids=c.token_ids,
                                            first=0, text_offset=len(prefix))
                        if body.logprobs is not None else None)
            out_choices.append({"index": c.index, "text": prefix + c.text.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": state.model_name,
        "choices": out_choices,
        "usage": usage(prompt_tokens, choices),
        "system_fingerprint": None,
    }


async def _stream_events(state, body, choices: list[Choice], response_id: str, prompt_tokens: int, *, chat: bool,
                         echo_texts) -> AsyncIterator[str]:
    created = now()
    include_usage = body.include_usage_in_stream
    # Chat asks with a flag, completions with a count (0 = the sampled token's logprob alone).
    wants_logprobs = body.logprobs if chat else body.logprobs is not None

    def chunk(choice_payloads: list[dict], *, usage_value=None) -> str:
        payload = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": state.model_name, "choices": choice_payloads,
                   "system_fingerprint": None}
        if include_usage:
            payload["usage"] = usage_value
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chat_choice(c: Choice, delta: dict, logprobs=None, finish=None) -> dict:
        return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def text_choice(c: Choice, text: str, logprobs=None, finish=None) -> dict:
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    completed = False
    try:
        for c in choices:  # the role (chat) or the echoed prompt (completions) come first
            if chat:
                yield chunk([chat_choice(c, {"role": "assistant", "content": ""})])
            elif echo_texts:
                yield chunk([text_choice(c, echo_texts[c.prompt_index])])
        async with contextlib.aclosing(merged(choices)) as outputs:
            async for choice, out in outputs:
                before = len(choice.token_ids)
                delta, new_logprobs = choice.update(out)
                state.metrics.count_tokens(completion=len(out.new_token_ids))
                if not delta and not choice.done and not (new_logprobs and wants_logprobs):
                    continue  # text held back (a partial character or stop string): nothing to send yet
                logprobs = None
                if chat and wants_logprobs:
                    logprobs = chat_logprobs(state.tokenizer, new_logprobs)
                elif wants_logprobs:
                    prefix = len(echo_texts[choice.prompt_index]) if echo_texts else 0
                    logprobs = completion_logprobs(state.tokenizer, new_logprobs, decode=choice.decode,
                                                   token_ids=choice.token_ids, first=before, text_offset=prefix)
                if chat:
                    delta_body = {"content": delta} if delta else {}
                    yield chunk([chat_choice(choice, delta_body, logprobs, choice.finish_reason)])
                else:
                    yield chunk([text_choice(choice, delta, logprobs, choice.finish_reason)])
        if include_usage:
            yield chunk([], usage_value=usage(prompt_tokens, choices))
        yield "data: [DONE]\n\n"
        completed = True
    except EngineDeadError as e:
        completed = True
        yield f"data: {json.dumps(error_body(str(e), type='server_error', code='engine_unavailable'))}\n\n"
    finally:
        if not completed:
            # The client went away (the stream was cancelled or closed): free every request now.
            for c in choices:
                c.stream.abort()
            state.metrics.count_disconnect()


# ---- checks, errors, counting -------------------------------------------------------------------


def _check_model(state: ServerState, model: str) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model); 404 for any other name."""
    if model == state.model_name:
        return None
    if model in adapter_names(state):
        return model
    raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}"
                   + (" and its LoRA adapters" if adapter_names(state) else ""),
                   param="model", code="model_not_found")


def _model_card(state: ServerState, adapter: str | None = None) -> dict:
    card = {"id": adapter or state.model_name, "object": "model", "created": state.created, "owned_by": "jvila",
            "max_model_len": state.max_context}
    if adapter is not None:  # vLLM's card for an adapter: its base model as parent
        card.update(root=adapter, parent=state.model_name)
    return card


def _install_error_handlers(app: fastapi.FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("unhandled error serving %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {exc!r}", type="server_error"), status_code=500)


_COUNTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                            "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


class _CountRequests:
    """Pure ASGI middleware (no response buffering, so streams stay streams): counts answers by status."""

    def __init__(self, app, metrics: prometheus.ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # Unknown paths share one label, so that probing clients cannot grow the label set.
            path = scope["path"] if scope["path"] in _COUNTED_PATHS else "other"
            self.metrics.count_request(path, status.get("code", 499))
