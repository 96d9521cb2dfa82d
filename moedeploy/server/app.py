"""The OpenAI-compatible HTTP API over the engine.

    POST /v1/completions, /v1/chat/completions ─► validate (protocol.py) ─► tokenize ─► Engine.submit
         ◄── JSON, or server-sent events ending with `data: [DONE]` ◄── updates via the event loop
    GET /v1/models, /health (200 only while the engine loop runs), /metrics (Prometheus)

The server knows nothing of experts or batching: it submits token ids and a SamplingParams, reads updates,
and aborts a request when its client goes away. Every failure, from malformed JSON to a full queue, is
answered in one shape (errors.py), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.engine import ContextTooLong, Engine, QueueFull
from ..engine.request import Update
from ..errors import OptionError
from . import errors
from .chat import chat_prompt
from .errors import APIError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, Reply

ENGINE_CHECK_S = 1.0  # how often a waiting handler checks that the engine loop is still alive


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # what clients send as `model` and /v1/models lists
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    request_timeout: float = 600.0  # seconds from arrival after which a request ends with an error (504)
    max_body_bytes: int = 1 << 20  # larger bodies get 413 before they are parsed
    shutdown_grace: float = 10.0  # seconds in-flight requests may finish after SIGTERM before they are aborted


def create_app(engine: Engine, tokenizer, config: ServerConfig) -> FastAPI:
    """The app for a constructed engine; the engine thread starts and stops with the app's lifespan."""
    metrics = Metrics(engine, config.model_name)

    @asynccontextmanager
    async def lifespan(app):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        if not engine.alive:
            engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, config.shutdown_grace)

    app = FastAPI(title="moedeploy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    errors.install(app)

    def authorized(request: Request) -> None:
        if config.api_key is not None and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def known(model: str) -> None:
        if model != config.model_name:
            raise APIError(404, f"the model '{model[:64]}' does not exist; this server serves '{config.model_name}'",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "moedeploy",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        known(body.model)
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt).input_ids
        return await serve(request, body, prompt, body.max_tokens, Reply(config.model_name, chat=False))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        known(body.model)
        prompt = chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.max_model_len - len(prompt), 1)
        return await serve(request, body, prompt, max_tokens, Reply(config.model_name, chat=True))

    async def serve(request: Request, body, prompt: list[int], max_tokens: int, reply: Reply):
        try:
            params = body.sampling(max_tokens)
            generation = Generation(engine, prompt, params, config.request_timeout, metrics, app.state.mailbox)
        except ContextTooLong as ex:
            raise APIError(400, str(ex), param="input_tokens", code="context_length_exceeded") from ex
        except QueueFull as ex:
            raise APIError(429 if engine.accepting else 503, str(ex), headers={"Retry-After": "1"}) from ex
        except OptionError as ex:  # an empty prompt or token ids outside the vocabulary
            raise APIError(400, str(ex), param="messages" if reply.chat else "prompt") from ex
        metrics.prompt_tokens.inc(len(prompt))
        watcher = asyncio.create_task(generation.watch(request))
        if body.stream:
            return StreamingResponse(stream(generation, watcher, reply, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, last = "", None
            async for update in generation.updates():
                text += update.text
                last = update
        finally:
            watcher.cancel()
        if last.finish_reason in ("stop", "length"):
            return JSONResponse(reply.whole(text, last.finish_reason, last.prompt_tokens, last.completion_tokens))
        raise failure(last)

    async def stream(generation: Generation, watcher: asyncio.Task, reply: Reply, include_usage: bool):
        try:
            first = True
            try:
                async for update in generation.updates():
                    if update.finish_reason in (None, "stop", "length"):
                        if update.text or first or update.finish_reason:
                            yield sse(reply.chunk(update.text, update.finish_reason, first=first))
                            first = False
                        if update.finish_reason and include_usage:
                            yield sse(reply.usage_chunk(update.prompt_tokens, update.completion_tokens))
                    else:
                        raise failure(update)
            except APIError as error:  # after the headers: the error is the stream's last event
                yield sse(errors.body(error.status, error.message, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            generation.abort()  # a no-op once it finished; else the client went away mid-stream

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def failure(update: Update) -> APIError:
    """The error a request that did not finish normally answers with."""
    if update.finish_reason == "timeout":
        return APIError(504, update.error or "the request timed out", code="timeout")
    if update.finish_reason == "abort":
        return APIError(499 if update.error is None else 503, update.error or "the client closed the request")
    return APIError(500, update.error or "generation failed", code="engine_error")


class Mailbox:
    """Updates from the engine thread to the event loop, one wake-up of the loop per batch: a step gives every
    running request a token, and waking the loop once per request would cost a system call each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Update]] = []

    def post(self, queue: asyncio.Queue, update: Update) -> None:  # engine thread
        with self.lock:
            self.pending.append((queue, update))
            first = len(self.pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, update in pending:
            queue.put_nowait(update)


class Generation:
    """One request in flight, seen from the event loop: updates from the engine thread arrive on a queue."""

    def __init__(self, engine: Engine, prompt: list[int], params, timeout: float, metrics: Metrics, mailbox: Mailbox):
        self.engine = engine
        self.metrics = metrics
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.ended = False  # its final update was read
        self.aborted = False
        observe = metrics.timer()

        def on_update(update: Update) -> None:  # engine thread
            observe(update)
            mailbox.post(self.queue, update)

        self.request = engine.submit(prompt, params, on_update, timeout)

    async def updates(self):
        """The request's updates, up to and including the final one; an error if the engine loop dies."""
        while not self.ended:
            try:
                update = await asyncio.wait_for(self.queue.get(), ENGINE_CHECK_S)
            except TimeoutError:
                if not self.engine.alive:
                    self.ended = True
                    raise APIError(503, "the engine loop stopped; the request cannot finish") from None
                continue
            self.ended = update.finish_reason is not None
            yield update

    async def watch(self, request: Request) -> None:
        """Abort the request when its client disconnects (runs until cancelled)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return self.abort()

    def abort(self) -> None:
        """The client went away before the end: the engine frees the request's slot and KV at its next step."""
        if not self.ended and not self.aborted:
            self.aborted = True
            self.metrics.disconnects.inc()
            self.engine.abort(self.request.id)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        error = errors.body(413, f"the request body exceeds {self.limit} bytes")
        await JSONResponse(error, status_code=413)(scope, None, send)
