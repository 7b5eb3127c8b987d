"""The Serve application: an OpenAI-compatible FastAPI ingress in front of one deployment per model.

`build_app` is the import path a Serve config names (`serving.app:build_app`, args `{"models": {name: fields}}`).
The ingress validates each request (`protocol.py`), routes it by `model` to that model's deployment
(`model.py`, which holds the engine), bounds it by the model's `request_timeout_s` (then 504, and the replica stops
generating for it), turns Serve's backpressure and failed replicas into 503 with Retry-After, and writes
`stream: true` responses as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime. Everything the
ingress uses is defined above it: `serve.ingress` pickles the FastAPI app, with the globals it sees, at import.)
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from serving.config import INGRESS, ModelSpec, check_model, deployment_name, model_args, model_spec
from serving.model import ModelServer
from serving.protocol import (ApiError, ChatRequest, CompletionRequest, chunk, completion_body, new_id, parse, sse,
                              usage_chunk)

log = logging.getLogger("ray.serve")
T = TypeVar("T")
FAILED_RETRY_AFTER_S = 1.0  # a failed replica's requests go to a healthy or restarted one
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

api = FastAPI(title="raytrain OpenAI-compatible API")


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers())


@api.exception_handler(HTTPException)
async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=e)
    return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").body(), 500)


def choice(job: dict[str, Any], j: int) -> dict[str, Any]:
    """Sample j of a prompt: with a seed, seeded seed + j (vLLM's rule), so n choices differ and repeat."""
    seed = job["params"].get("seed")
    if seed is None or j == 0:
        return job
    seed += j
    return {**job, "params": {**job["params"], "seed": seed - 2 ** 64 if seed >= 2 ** 64 else seed}}


class Deadline:
    """A request's time budget; awaiting past it raises a 504 ApiError."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    async def run(self, awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, max(0.0, self.end - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than request_timeout_s={self.seconds:g}",
                           code="timeout") from None


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
        return ApiError(503, f"model {model!r} is at capacity ({cause.message}); retry later", code="overloaded",
                        retry_after_s=cause.retry_after_s or FAILED_RETRY_AFTER_S)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError)):
        return ApiError(503, f"the replica of model {model!r} serving this request failed; retry", code="unavailable",
                        retry_after_s=FAILED_RETRY_AFTER_S)
    log.exception("request to model %r failed", model, exc_info=e)
    return ApiError(500, f"internal error while serving model {model!r}: {type(cause).__name__}: {cause}",
                    code="internal_error")


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
    def __init__(self, models: dict[str, DeploymentHandle], specs: dict[str, dict[str, Any]]) -> None:
        self.handles = models
        self.specs: dict[str, ModelSpec] = {name: model_spec(a, f"models.{name}") for name, a in specs.items()}
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every model deployment is healthy (Serve's own health checks), else 503."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications[serve.get_replica_context().app_name]
        models = {name: app.deployments[deployment_name(name)].status.value for name in self.handles}
        ok = all(s == "HEALTHY" for s in models.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": models}, 200 if ok else 503)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "raytrain", "root": spec.checkpoint,
             "max_prompt_tokens": spec.limits.max_prompt_tokens, "max_output_tokens": spec.limits.max_output_tokens}
            for name, spec in self.specs.items()]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req = parse(CompletionRequest, await request.body())
        params = req.sampling(req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        return await self._answer(req, [{"prompt": p, "params": params} for p in req.prompts], chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        req = parse(ChatRequest, await request.body())
        job = {"messages": [m.plain() for m in req.messages],
               "params": req.sampling(req.max_completion_tokens or req.max_tokens)}
        return await self._answer(req, [job], chat=True)

    # ---- routing ----------------------------------------------------------------------------------------------

    async def _answer(self, req: CompletionRequest | ChatRequest, prompts: list[dict[str, Any]], chat: bool) -> Any:
        if req.model not in self.handles:
            raise ApiError(404, f"model {req.model!r} does not exist; served: {', '.join(self.handles)}", "model",
                           "model_not_found")
        limits = self.specs[req.model].limits
        jobs = [choice(job, j) for job in prompts for j in range(req.n)]  # choice i*n + j: sample j of prompt i
        if len(jobs) > limits.max_choices:
            raise ApiError(400, f"n: {len(prompts)} prompt(s) x n={req.n} asks for {len(jobs)} choices; model "
                           f"{req.model!r} answers at most {limits.max_choices} per request", "n", "invalid_value")
        deadline = Deadline(limits.request_timeout_s)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return await self._stream(rid, req, jobs, deadline, chat)
        handle = self.handles[req.model]
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

    async def _stream(self, rid: str, req: CompletionRequest | ChatRequest, jobs: list[dict[str, Any]],
                      deadline: Deadline, chat: bool) -> StreamingResponse:
        handle = self.handles[req.model].options(stream=True)
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
    servers = {name: ModelServer.options(name=deployment_name(name)).bind(name, fields)
               for name, fields in specs.items()}
    return OpenAIIngress.options(name=INGRESS).bind(servers, specs)
