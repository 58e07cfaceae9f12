"""``blip2-export serve``: an OpenAI-compatible HTTP server over one runtime and its batch scheduler.

    POST /v1/chat/completions   OpenAI chat completions (see runtime.serving.protocol), stream or not
    GET  /v1/models             the one model this server holds
    GET  /health                200 while taking requests, 503 while shutting down
    GET  /metrics               Prometheus: queue depth, batch size, tokens/s, latency histograms

Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client) on top of the runtime; never torch.

Bounded everywhere: a body over ``max_body_mb`` is a 413, a full queue a 429 with ``Retry-After``, a request
past ``timeout`` a 504 (its slot freed), a caller that disconnects frees its slot, and SIGTERM (or SIGINT)
finishes the requests in flight while new ones are refused (503, and the listening socket closes).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import Blip2Error, InputError, LimitError, require
from runtime.pipeline import Blip2Runtime
from runtime.serving.metrics import ServerMetrics
from runtime.serving.protocol import (
    ApiError,
    ChatRequest,
    Choice,
    Completion,
    error_body,
    parse_chat_request,
    sse,
)
from runtime.serving.scheduler import (
    Draining,
    Event,
    QueueFull,
    Request,
    RequestTimeout,
    Scheduler,
    SchedulerConfig,
)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    timeout: float = 120.0  # seconds per request, submission to last token
    max_body_mb: float = 20.0
    kv_capacity: int | None = None
    admit_window: float = 0.05  # seconds newcomers may wait to be admitted together (see the scheduler)
    model_name: str | None = None  # default: the bundle folder's name

    def validate(self) -> ServeConfig:
        if not 0 <= self.port <= 65535:
            raise Blip2Error(f"port {self.port} is not a TCP port (0-65535)")
        if self.max_body_mb <= 0:
            raise Blip2Error(f"max_body_mb must be > 0 (got {self.max_body_mb})")
        if self.timeout <= 0:
            raise Blip2Error(f"timeout must be > 0 seconds (got {self.timeout})")
        return self

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_batch=self.max_batch, max_queue=self.max_queue, timeout=self.timeout,
                               kv_capacity=self.kv_capacity, admit_window=self.admit_window)


async def _disconnected(receive) -> None:
    """Return once the caller has gone (the ASGI server says ``http.disconnect``)."""
    while (await receive()).get("type") != "http.disconnect":
        pass


def _error_status(e: BaseException) -> ApiError:
    """The HTTP answer of a request that failed inside the scheduler."""
    if isinstance(e, RequestTimeout):
        return ApiError(504, str(e), type="timeout", code="timeout")
    if isinstance(e, Draining):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, (InputError, LimitError)):
        return ApiError(400, str(e))
    return ApiError(500, str(e) if isinstance(e, Blip2Error) else "internal error", type="server_error")


class Service:
    """What the HTTP routes call: the runtime, the scheduler and the metrics of one server."""

    def __init__(self, rt, config: ServeConfig):
        self.rt = rt
        self.config = config
        self.model = config.model_name or Path(rt.bundle).resolve().name
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(rt, config.scheduler(), self.metrics)
        self.metrics.bind(self.scheduler)

    # -- admission ---------------------------------------------------------------------------------
    def _prepare(self, chat: ChatRequest):
        """Image -> pixel values, prompt -> ids, generation configs (in a worker thread: CPU work)."""
        try:
            pv = self.rt.pixel_values([chat.image])
        except InputError as e:
            raise ApiError(400, f"the image cannot be used: {e}", param="messages", code="invalid_image") from None
        try:
            configs = [self.rt.generation_config(**chat.overrides(i)) for i in range(chat.n)]
            ids = self.rt.encode_prompts([chat.prompt], configs[0])[0]
            for c in configs:
                self.scheduler.check(ids, c)
        except Blip2Error as e:
            raise ApiError(400, str(e)) from None
        return pv, ids, configs

    async def submit(self, chat: ChatRequest) -> tuple[list[Request], asyncio.Queue]:
        if self.scheduler.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if chat.model is not None and chat.model != self.model:
            raise ApiError(404, f"model {chat.model!r} is not served here (this server has {self.model!r})",
                           param="model", code="model_not_found")
        from starlette.concurrency import run_in_threadpool

        pv, ids, configs = await run_in_threadpool(self._prepare, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs: list[Request] = []
        try:
            for i, cfg in enumerate(configs):
                def on_event(ev: Event, i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))

                reqs.append(self.scheduler.submit(Request(pv, chat.prompt, ids, cfg, on_event, stop=chat.stop,
                                                           stream=chat.stream)))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Draining as e:
            for r in reqs:
                r.cancel()
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except Blip2Error as e:
            for r in reqs:
                r.cancel()
            raise ApiError(400, str(e)) from None
        return reqs, events

    def completion(self, ids: list[int], n: int) -> Completion:
        prompt_tokens = self.rt.manifest.model.num_query_tokens + len(ids)
        return Completion(f"chatcmpl-{uuid.uuid4().hex}", self.model, prompt_tokens, [Choice() for _ in range(n)])

    # -- answers -----------------------------------------------------------------------------------
    async def answer(self, chat: ChatRequest, reqs: list[Request], events: asyncio.Queue, receive):
        """Wait for every choice; None when the caller went away (its requests are cancelled).

        ``receive`` is the ASGI receive of the request, whose body was read: its next message is the
        disconnect."""
        comp = self.completion(reqs[0].prompt_ids, len(reqs))
        pending = len(reqs)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while pending:
                got = asyncio.ensure_future(events.get())
                await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    self.metrics.disconnects.inc()
                    return None
                i, ev = got.result()
                if ev.kind == "error":
                    raise _error_status(ev.error)
                if ev.kind == "done":
                    comp.choices[i] = Choice(ev.text, ev.finish_reason, len(ev.token_ids))
                    pending -= 1
            return comp.response()
        finally:
            gone.cancel()
            for r in reqs:
                r.cancel()  # no-op for finished requests; frees the slots of the others

    async def stream(self, chat: ChatRequest, reqs: list[Request], events: asyncio.Queue) -> AsyncIterator[bytes]:
        comp = self.completion(reqs[0].prompt_ids, len(reqs))
        pending = len(reqs)
        finished = False
        try:
            for i in range(len(reqs)):
                yield sse(comp.chunk(i, {"role": "assistant", "content": ""}))
            while pending:
                i, ev = await events.get()
                if ev.kind == "token":
                    if ev.text:
                        yield sse(comp.chunk(i, {"content": ev.text}))
                elif ev.kind == "done":
                    comp.choices[i] = Choice(ev.text, ev.finish_reason, len(ev.token_ids))
                    yield sse(comp.chunk(i, {}, ev.finish_reason))
                    pending -= 1
                else:
                    err = _error_status(ev.error)
                    self.metrics.responses.labels(str(err.status)).inc()
                    yield sse({"error": {**err.body()["error"], "status": err.status}})
                    finished = True
                    return
            if chat.include_usage:
                yield sse(comp.usage_chunk())
            yield sse("[DONE]")
            finished = True
        finally:
            if not finished:
                self.metrics.disconnects.inc()
            for r in reqs:
                r.cancel()


def create_app(rt, config: ServeConfig, *, echo=None):
    """The ASGI app serving ``rt`` (a :class:`runtime.pipeline.Blip2Runtime`). ``echo``: where the request
    counts go at shutdown (one JSON line)."""
    fastapi = require("fastapi", "serve")
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse

    config = config.validate()
    service = Service(rt, config)
    limit = int(config.max_body_mb * 1024 * 1024)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.drain()
            await asyncio.get_running_loop().run_in_executor(None, service.scheduler.close, config.timeout)
            if echo is not None:
                echo(json.dumps({"served": service.scheduler.counts}))

    app = fastapi.FastAPI(title="blip2-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if request.url.path.endswith("/chat/completions"):
            service.metrics.responses.labels(str(e.status)).inc()
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type=kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", type="server_error"), status_code=500)

    async def read_body(request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise ApiError(413, f"the request body of {int(size)} bytes exceeds the server's limit of {limit} "
                                "bytes (--max-body-mb)", code="body_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"the request body exceeds the server's limit of {limit} bytes (--max-body-mb)",
                               code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def chat_completions(request):
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"send the request as application/json (got {ctype})")
        chat = parse_chat_request(await read_body(request))
        reqs, events = await service.submit(chat)
        if chat.stream:
            service.metrics.responses.labels("200").inc()
            return StreamingResponse(service.stream(chat, reqs, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await service.answer(chat, reqs, events, request.receive)
        if body is None:
            return Response(status_code=499)
        service.metrics.responses.labels("200").inc()
        return JSONResponse(body)

    chat_completions.__annotations__["request"] = fastapi.Request  # resolved here, not from a string
    app.post("/v1/chat/completions")(chat_completions)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model, "object": "model", "created": 0,
                                            "owned_by": "blip2-export"}]}

    @app.get("/health")
    async def health():
        s = service.scheduler
        body = {"status": "draining" if s.draining else "ok", "queue": s.waiting, "running": s.running}
        return JSONResponse(body, status_code=503 if s.draining else 200)

    @app.get("/metrics")
    async def metrics():
        data, ctype = service.metrics.render()
        return Response(data, media_type=ctype)

    return app


def serve(bundle: str | Path, config: ServeConfig, *, precision: str = "fp32", backend: str = "ort",
          echo=print, **backend_options) -> dict:
    """Load ``bundle`` and serve it until SIGTERM/SIGINT (which finish the requests in flight)."""

    config = config.validate()
    rt = Blip2Runtime(bundle, precision=precision, backend=backend, timeout=config.timeout, **backend_options)
    return run_app(rt, config, echo=echo)


def run_app(rt, config: ServeConfig, *, echo=print) -> dict:
    """Serve the loaded runtime ``rt`` until SIGTERM/SIGINT; returns the scheduler's request counts (uvicorn
    raises the signal again once the requests in flight are answered: the process ends by it)."""
    uvicorn = require("uvicorn", "serve")
    app = create_app(rt, config, echo=echo)
    service: Service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.scheduler.drain()  # refuse new requests at once; in-flight ones finish
            super().handle_exit(sig, frame)

    extra = max(64, config.max_batch + config.max_queue)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=int(config.timeout) + 5, limit_concurrency=extra + 32,
                        lifespan="on")
    sched = service.scheduler
    kv = f"{sched.cache.nbytes / 2**20:.1f} MiB KV cache" if sched.cache is not None else "serial (no KV slots)"
    echo(f"serving {service.model} ({rt.manifest.family.value}, {rt.precision}) on "
         f"http://{config.host}:{config.port}/v1  max_batch={config.max_batch} max_queue={config.max_queue} "
         f"timeout={config.timeout:g}s, {kv}")
    Server(uv).run()
    return dict(sched.counts)
