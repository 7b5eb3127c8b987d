"""The Serve application: an OpenAI-compatible FastAPI ingress in front of one deployment per model.

`build_app` is the import path a Serve config names (`serving.app:build_app`, args `{"models": {name: fields}}`).
The ingress checks the API key and reads the body within its limits (`guard.py`), validates the request
(`protocol.py`), routes it by `model` (`NAME`, or `NAME:ADAPTER` for one of that model's LoRA adapters, which the
replica applies per request) to that model's deployment (`model.py`, which holds the engine), bounds it by the
model's `request_timeout_s` (then 504, and the replica stops generating for it), turns Serve's backpressure, failed
replicas and models without a replica (`health.py`) into 503 with Retry-After, and writes `stream: true` responses as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. No response carries an exception's text:
unexpected errors are logged with an id that the 500 answer quotes.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime. Everything the
ingress uses is defined above it: `serve.ingress` pickles the FastAPI app, with the globals it sees, at import.)
"""

import asyncio
import logging
import time
from dataclasses import asdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from serving.config import INGRESS, ModelSpec, api_spec, check_model, deployment_name, model_args, model_spec
from serving.guard import api_key, authorize, read_body
from serving.health import DOWN, HEALTHY, ReplicaProbe
from serving.model import ModelServer
from serving.protocol import (ApiError, ChatRequest, CompletionRequest, chunk, completion_body, new_id, parse, shown,
                              sse, usage_chunk)

log = logging.getLogger("ray.serve")
T = TypeVar("T")
FAILED_RETRY_AFTER_S = 1.0  # a failed replica's requests go to a healthy or restarted one
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

api = FastAPI(title="raytrain OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers())


@api.exception_handler(HTTPException)
async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception) -> JSONResponse:
    return JSONResponse(internal_error(e, "unexpected error").body(), 500)


def internal_error(e: BaseException, what: str) -> ApiError:
    """A 500 that quotes the id of the logged error, never its text (which may hold paths, internals or input)."""
    ref = new_id("error")
    log.error("%s [%s]", what, ref, exc_info=e)
    return ApiError(500, f"internal error (logged as {ref})", code="internal_error")


def unavailable(model: str) -> ApiError:
    return ApiError(503, f"model {model!r} has no running replica; retry", code="unavailable",
                    retry_after_s=FAILED_RETRY_AFTER_S)


def choice(job: dict[str, Any], j: int) -> dict[str, Any]:
    """Sample j of a prompt: with a seed, seeded seed + j (vLLM's rule), so n choices differ and repeat."""
    seed = job["params"].get("seed")
    if seed is None or j == 0:
        return job
    seed += j
    return {**job, "params": {**job["params"], "seed": seed - 2 ** 64 if seed >= 2 ** 64 else seed}}


class Deadline:
    """What a request waits within: its time budget (past it, a 504 ApiError), and its model having a replica (when
    the model is down, a 503 ApiError at once rather than a wait for the replacement)."""

    def __init__(self, seconds: float, model: str, down: asyncio.Event) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds
        self.model, self.down = model, down

    async def run(self, awaitable: Awaitable[T]) -> T:
        work, down = asyncio.ensure_future(awaitable), asyncio.ensure_future(self.down.wait())
        try:
            await asyncio.wait((work, down), timeout=max(0.0, self.end - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            if not work.done():
                work.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        if self.down.is_set():
            raise unavailable(self.model)
        raise ApiError(504, f"the request took longer than request_timeout_s={self.seconds:g}", code="timeout")


def raise_request_error(answer: dict[str, Any]) -> None:
    """A model replica's {error} answer (its RequestError's args) as the client's ApiError."""
    if "error" in answer:
        message, param, code, status = answer["error"]
        raise ApiError(status, message, param, code)


def cancel(responses: list[DeploymentResponse] | list[DeploymentResponseGenerator]) -> None:
    """Stop the replicas working on requests nobody will read. Best effort: `cancel()` of a request that already
    failed raises that request's error again, which the caller is handling already."""
    for response in responses:
        try:
            response.cancel()
        except Exception:  # noqa: S110 - see the docstring
            pass


def api_error(e: BaseException, model: str) -> ApiError:
    """The client's view of a failure on the way to or inside a model replica."""
    cause = e.cause if isinstance(e, RayTaskError) else e
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, BackPressureError):
        return ApiError(503, f"model {model!r} is at capacity; retry later", code="overloaded",
                        retry_after_s=cause.retry_after_s or FAILED_RETRY_AFTER_S)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError)):
        return ApiError(503, f"the replica of model {model!r} serving this request failed; retry", code="unavailable",
                        retry_after_s=FAILED_RETRY_AFTER_S)
    return internal_error(e, f"a request to model {model!r} failed")


async def merge(streams: list[DeploymentResponseGenerator], deadline: Deadline) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, item) from several streams as items arrive, within the deadline; the first error wins."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: DeploymentResponseGenerator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, None, None))
        except Exception as e:
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item, error = await deadline.run(queue.get())
            if error is not None:
                raise error
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, models: dict[str, DeploymentHandle], specs: dict[str, dict[str, Any]], api_args: dict[str, Any],
                 scale_to_zero: list[str]) -> None:
        self.handles = models
        self.specs: dict[str, ModelSpec] = {name: model_spec(a, f"models.{name}") for name, a in specs.items()}
        self.api = api_spec(api_args, "api")
        self.api_key = api_key(self.api)
        self.replicas = ReplicaProbe(models, self.api.probe_timeout_s, scale_to_zero)
        self.watching = asyncio.get_running_loop().create_task(self.replicas.watch(self.api.probe_interval_s))
        self.created = int(time.time())

    @api.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """200 while at least one replica of every model answers (or the model may scale to zero), else 503."""
        authorize(request, self.api_key)
        models = await self.replicas.check()
        ok = all(state in HEALTHY for state in models.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": models}, 200 if ok else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        authorize(request, self.api_key)
        return {"object": "list", "data": [self._model_card(name) for name in self._served()]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        authorize(request, self.api_key)
        self._route(model)
        return self._model_card(model)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req = parse(CompletionRequest, await self._body(request))
        params = req.sampling(req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        return await self._answer(req, [{"prompt": p, "params": params} for p in req.prompts], chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        req = parse(ChatRequest, await self._body(request))
        job = {"messages": [m.plain() for m in req.messages],
               "images": [url for m in req.messages for url in m.image_urls()],
               "params": req.sampling(req.max_completion_tokens or req.max_tokens)}
        if req.rag is not None:
            base, _ = self._route(req.model)
            most = self.specs[base].limits.max_documents
            if req.rag.documents is not None and len(req.rag.documents) > most:
                raise ApiError(400, f"rag.documents: {len(req.rag.documents)} documents; model {base!r} takes "
                               f"at most {most} per request", "rag.documents", "invalid_value")
            job["rag"] = req.rag.model_dump()
        return await self._answer(req, [job], chat=True)

    async def _body(self, request: Request) -> bytes:
        authorize(request, self.api_key)
        return await read_body(request, self.api.max_body_bytes, self.api.body_timeout_s)

    def _served(self) -> list[str]:
        """Every `model` value a request may name: each model, then each of its adapters as `model:adapter`."""
        return [m for name, spec in self.specs.items() for m in (name, *(f"{name}:{a}" for a in spec.adapters))]

    def _model_card(self, name: str) -> dict[str, Any]:
        """OpenAI's model object (no checkpoint path: where the weights live is no client's business); an adapter's
        `parent` is its base model."""
        base, adapter = name.partition(":")[::2]
        limits = self.specs[base].limits
        return {"id": name, "object": "model", "created": self.created, "owned_by": "raytrain",
                **({"parent": base} if adapter else {}),
                "max_prompt_tokens": limits.max_prompt_tokens, "max_output_tokens": limits.max_output_tokens}

    def _route(self, model: str) -> tuple[str, str | None]:
        """(model, adapter or None) of a request's `model` field; 404 naming it when nothing serves it."""
        base, colon, adapter = model.partition(":")
        if base not in self.handles or (colon and adapter not in self.specs[base].adapters):
            raise ApiError(404, f"model {shown(model)!r} does not exist; served: {', '.join(self._served())}",
                           "model", "model_not_found")
        return base, adapter or None

    # ---- routing ----------------------------------------------------------------------------------------------

    async def _answer(self, req: CompletionRequest | ChatRequest, prompts: list[dict[str, Any]], chat: bool) -> Any:
        name, adapter = self._route(req.model)
        limits = self.specs[name].limits
        choices = len(prompts) * req.n
        if choices > limits.max_choices:
            raise ApiError(400, f"n: {len(prompts)} prompt(s) x n={req.n} asks for {choices} choices; model "
                           f"{req.model!r} answers at most {limits.max_choices} per request", "n", "invalid_value")
        down = self.replicas.down[name]
        if down.is_set() and (await self.replicas.check())[name] == DOWN:  # still down, by a fresh probe
            raise unavailable(req.model)
        # choice i*n + j: sample j of prompt i
        jobs = [{**choice(job, j), "adapter": adapter} for job in prompts for j in range(req.n)]
        deadline = Deadline(limits.request_timeout_s, req.model, down)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return await self._stream(rid, req, self.handles[name], jobs, deadline, chat)
        handle = self.handles[name]
        responses = [handle.generate.remote(job) for job in jobs]
        try:
            results = await deadline.run(asyncio.gather(*responses))
        except BaseException as e:
            cancel(responses)
            raise api_error(e, req.model) from None
        for i, r in enumerate(results):
            raise_request_error(r)
            r["sample"] = i % req.n
        return completion_body(rid, req.model, results, chat)

    async def _stream(self, rid: str, req: CompletionRequest | ChatRequest, model: DeploymentHandle,
                      jobs: list[dict[str, Any]], deadline: Deadline, chat: bool) -> StreamingResponse:
        handle = model.options(stream=True)
        streams = [handle.stream.remote(job) for job in jobs]
        try:  # the first item says the replica accepted the request, so errors still get their status code
            firsts = await deadline.run(asyncio.gather(*(s.__anext__() for s in streams)))
        except BaseException as e:
            cancel(streams)
            raise api_error(e, req.model) from None
        for first in firsts:
            raise_request_error(first)
        prompt_tokens = sum(f["prompt_tokens"] for i, f in enumerate(firsts) if i % req.n == 0)
        events = self._events(rid, req, streams, deadline, chat, prompt_tokens)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(self, rid: str, req: CompletionRequest | ChatRequest, streams: list[DeploymentResponseGenerator],
                      deadline: Deadline, chat: bool, prompt_tokens: int) -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            if chat:
                for i in range(len(streams)):
                    yield sse(chunk(rid, req.model, i, "", None, chat, role=True))
            async for i, item in merge(streams, deadline):
                if item["text"]:
                    yield sse(chunk(rid, req.model, i, item["text"], None, chat))
                if "finish_reason" in item:
                    completion_tokens += item["completion_tokens"]
                    yield sse(chunk(rid, req.model, i, None, item["finish_reason"], chat))
            if req.include_usage:
                yield sse(usage_chunk(rid, req.model, chat, prompt_tokens, completion_tokens))
            yield sse("[DONE]")
        except Exception as e:  # the status line is sent already: the error goes into the stream
            yield sse(api_error(e, req.model).body())
            yield sse("[DONE]")
        finally:  # also when the client disconnects: stop generating
            cancel(streams)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application of a Serve config's args: one `ModelServer` deployment per model behind the ingress."""
    models = args.get("models") or {}
    if not models:
        raise ValueError("args.models is empty: serve at least one model")
    specs = {}
    for name, fields in models.items():
        spec = model_spec(fields, f"args.models.{name}")
        check_model(name, spec, f"args.models.{name}")
        specs[name] = model_args(spec)
    api_args = asdict(api_spec(args.get("api") or {}, "args.api"))
    servers = {name: ModelServer.options(name=deployment_name(name)).bind(name, fields)
               for name, fields in specs.items()}
    return OpenAIIngress.options(name=INGRESS).bind(servers, specs, api_args, list(args.get("scale_to_zero") or []))
