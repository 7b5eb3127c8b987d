"""The model deployment: each replica holds one `Engine` (the project's generation engine) for one model.

A request is tokenized (chat messages through the model's chat template) and checked against the model's limits on
its own, so one bad request never fails another: a text longer than the token limit could hold is refused before it
is tokenized, token ids outside the vocabulary are refused, and preparation runs in its own thread, one request at a
time, so the replica's event loop keeps answering while a long prompt is tokenized. Then the request joins the
engine's running batch at the next step (continuous batching: `Engine.astream`, stepped by the engine's own thread
while the replica keeps accepting requests). A streamed request yields what its row produced since its previous
item at most every `stream_interval_s`, so a busy replica sends fewer, larger items through Ray. A request whose
caller goes away (client disconnect, timeout) is cancelled at the engine's next step. A chat request with `rag`
documents becomes a fork-join prompt (`raytrain/infer/rag.py`): superposition prompting or naive RAG, per request or
as the model's engine is configured; the replica's engine keeps the path cache, so documents sent again are not
recomputed. A request may name one of the model's document stores (`document_stores`: files read and tokenized as
the replica starts, their document KV computed into the path cache then with `warm_document_stores`, or into shard
actors with `store_shards`) instead of sending documents. A request for `NAME:adapter` runs with that LoRA adapter
of the replica's base (`adapters` in the model's config, `adapter_slots` of them in memory at once, all checked
against the base at startup); requests of different adapters share one batch.

A vision-language checkpoint (`job=vlm`) is held by a `VLMEngine` instead: chat messages may carry one image (a
base64 `data:` URL), rendered through the chat template around it; its requests are generated a call at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import TemplateError
from ray import serve

from raytrain.checkpoint.hf import is_compressed_checkpoint, read_model_config
from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.engine import Completion, Engine, Request
from raytrain.infer.forkjoin import ForkJoinPrompt
from raytrain.infer.path_shards import join_kept, prune
from raytrain.infer.rag import chat_template, forkjoin_prompt, read_documents
from raytrain.infer.sampling import SamplingError, SamplingParams
from raytrain.infer.vlm import VLMEngine, VLMRequest
from raytrain.models.vlm import VLMConfig
from serving.config import ModelSpec, model_spec
from serving.device import model_device
from serving.shards import start_shards


class RequestError(Exception):
    """A client error found here (prompt too long, limits, template); answered as {"error": args}, which the ingress
    turns into an OpenAI error with this status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message, param, code, status)


def load_engine(spec: ModelSpec, key: str = "model") -> Engine | VLMEngine:
    """The engine of one model, by weight format (the one place a compressed format plugs in), or a VLM's."""
    device, dtype = model_device(spec)
    if isinstance(read_model_config(spec.checkpoint), VLMConfig):
        if spec.adapters:
            raise RaytrainError(f"{key}.adapters: LoRA adapters are served on language models; "
                                f"{spec.checkpoint} is a vision-language model")
        return VLMEngine.from_checkpoint(spec.checkpoint, device=device, dtype=dtype, tokenizer=spec.tokenizer)
    compressed = spec.weights == "compressed"
    if compressed and not is_compressed_checkpoint(spec.checkpoint):
        raise RaytrainError(f"weights=compressed: {spec.checkpoint} holds no compressed weights (make one with "
                            "`raytrain compress`, or serve it with weights=dense)")
    return Engine.from_checkpoint(spec.checkpoint, spec.engine, device=device, dtype=dtype, tokenizer=spec.tokenizer,
                                  keep_compressed=compressed, adapters=spec.adapters,
                                  adapter_slots=spec.adapter_slots, adapters_key=f"{key}.adapters")


@serve.deployment
class ModelServer:
    def __init__(self, name: str, args: dict[str, Any]) -> None:
        self.name, self.args = name, args
        self.spec = model_spec(args, f"models.{name}")
        self.engine = load_engine(self.spec, f"models.{name}")
        self.vision = isinstance(self.engine, VLMEngine)
        self.chat_template = chat_template(self.engine.tokenizer, self.spec.chat_template)
        # no text beyond this many characters tokenizes into max_prompt_tokens tokens or fewer
        self.max_prompt_chars = self.spec.limits.max_prompt_tokens * longest_token_chars(self.engine.tokenizer)
        self.preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.stores = load_stores(self.spec, f"models.{name}", self.vision)
        self.store_ids: dict[str, list[list[int]]] = {}  # store -> its documents' token ids
        self.shards: dict[str, list[Any]] = {}  # store -> its shard actors (`store_shards`)
        self._ready_stores(f"models.{name}")

    # ---- called by the ingress ------------------------------------------------------------------------------

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """One whole completion: {text, finish_reason, prompt_tokens, completion_tokens}, or {error} (a client
        error is an answer, not a replica failure, so Serve does not log it as one)."""
        try:
            request = await self._prepare(job)
        except RequestError as e:
            return {"error": e.args}
        await self._fork_on_shards(request, job)
        async for deltas in self.engine.astream([request]):
            done = deltas[-1].completion
            if done is not None:
                kept = {"kept_documents": done.superposition.kept} if done.superposition is not None else {}
                return {"text": done.text, **_counts(done), **kept}
        raise RuntimeError("the engine ended without a completion")

    async def stream(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """{prompt_tokens} once the request is accepted (or {error}), then {text} pieces; the last adds
        finish_reason and counts."""
        try:
            request = await self._prepare(job)
        except RequestError as e:
            yield {"error": e.args}
            return
        await self._fork_on_shards(request, job)
        yield {"prompt_tokens": len(request.forkjoin.flat() if request.forkjoin is not None else request.prompt)}
        loop, text, sent = asyncio.get_running_loop(), "", 0.0
        async for deltas in self.engine.astream([request]):
            text += "".join(d.text for d in deltas)
            done = deltas[-1].completion
            if done or loop.time() - sent >= self.spec.stream_interval_s:
                yield {"text": text, **(_counts(done) if done else {})}
                text, sent = "", loop.time()

    def info(self) -> dict[str, Any]:
        engine = self.spec.engine
        modes = [mode for mode, on in (("lazyllm", engine.lazy), ("specstream", engine.specstream is not None)) if on]
        return {"context_window": self.engine.context_window, "max_batch_size": engine.max_batch_size,
                "decoding": "+".join(modes) or "plain", "weights": self.spec.weights,
                "rag": "superposition" if engine.superposition.enabled else "naive",
                "adapters": list(self.spec.adapters), "adapter_slots": self.spec.adapter_slots,
                "document_stores": {name: len(documents) for name, documents in self.stores.items()},
                "store_shards": self.spec.store_shards.count}

    def stats(self) -> dict[str, Any]:
        """Engine steps run, how many decode steps carried each number of sequences, the path cache, adapters loaded
        so far, and with Speculative Streaming its forward passes, the tokens its trees gave and how many draft tokens
        each tree step accepted."""
        cache, adapters = self.engine.superposer.cache, self.engine.adapters
        out = {"steps": self.engine.steps, "decode_rows": dict(self.engine.decode_rows),
               "path_cache": cache.stats() if cache is not None else None,
               "adapter_loads": adapters.loads if adapters is not None else 0}
        if (spec := self.engine.speculative) is not None:
            out["specstream"] = {"forwards": spec.forwards, "tokens": spec.tokens, "accepted": dict(spec.accepted)}
        return out

    async def _fork_on_shards(self, request: Request, job: dict[str, Any]) -> None:
        """A superposed question over a sharded store: every shard scores its paths at once, the top-k over all of
        them are kept, and only their KV comes here (`path_shards`), for the engine to join and decode."""
        shards = self.shards.get((job.get("rag") or {}).get("store"))
        if not shards or not self.engine.superposed(request):
            return
        prompt, name = request.forkjoin, uuid.uuid4().hex
        scores = await asyncio.gather(*(s.score.remote(name, prompt.preamble, prompt.query) for s in shards))
        kept = prune(scores, self.engine.superposer.keep(prompt))
        taken = await asyncio.gather(*(s.take.remote(name, k, prompt.preamble, prompt.query)
                                       for s, k in zip(shards, kept)))
        prompt.kept_paths = join_kept(self.engine.superposer, prompt, scores, kept, taken)

    # ---- request preparation ----------------------------------------------------------------------------------

    async def _prepare(self, job: dict[str, Any]) -> Request:
        return await asyncio.get_running_loop().run_in_executor(self.preparing, self.prepare, job)

    def prepare(self, job: dict[str, Any]) -> Request | VLMRequest:
        """An engine request from the ingress's job (prompt or messages, and the sampling fields), within limits."""
        adapter = job.get("adapter")
        if adapter is not None and adapter not in self.spec.adapters:
            raise RequestError(f"model {self.name}:{adapter} does not exist; adapters of {self.name!r}: "
                               f"{', '.join(self.spec.adapters) or 'none'}", "model", "model_not_found", 404)
        if adapter is not None and job.get("rag") is not None:
            raise RequestError(f"rag: requests with rag run on the base model; use model {self.name!r}", "rag",
                               "invalid_value")
        image = self._image(job.get("images") or [])
        if job.get("rag") is not None and self.vision:
            raise RequestError(f"rag: model {self.name!r} is a vision-language model; rag takes a language model",
                               "rag", "invalid_value")
        if job.get("rag") is not None:
            prompt_param = "rag.documents" if job["rag"].get("store") is None else "rag.store"
            ids, forkjoin = None, self._forkjoin(job)
            length, needed = len(forkjoin.flat()), self._needed(forkjoin)
        else:
            prompt_param = "messages" if job.get("messages") is not None else "prompt"
            ids, forkjoin = self._prompt_ids(job, prompt_param), None
            length = needed = len(ids)
        limits, window = self.spec.limits, self.engine.context_window
        if length > limits.max_prompt_tokens:
            raise RequestError(f"{prompt_param}: the prompt has {length} tokens; model {self.name!r} accepts at "
                               f"most {limits.max_prompt_tokens}", prompt_param, "context_length_exceeded")
        room = window - needed
        if room < 1:
            raise RequestError(f"{prompt_param}: the prompt's {needed} tokens fill the context window of model "
                               f"{self.name!r} ({window} tokens)", prompt_param, "context_length_exceeded")
        params = dict(job["params"])
        max_tokens = params.pop("max_tokens")
        max_tokens = min(limits.max_output_tokens, room) if max_tokens is None else max_tokens
        if max_tokens > limits.max_output_tokens:
            raise RequestError(f"max_tokens={max_tokens} exceeds the limit of model {self.name!r}, "
                               f"{limits.max_output_tokens} tokens", "max_tokens", "invalid_value")
        if max_tokens > room:
            raise RequestError(f"max_tokens: the context window of model {self.name!r} is {window} tokens; the "
                               f"prompt needs {needed} and max_tokens asks for {max_tokens} more", "max_tokens",
                               "context_length_exceeded")
        try:
            sampling = SamplingParams(max_new_tokens=max_tokens, **params)
        except SamplingError as e:
            raise RequestError(str(e), e.field, "invalid_value") from None
        if self.vision:
            try:
                return self.engine.request(ids, sampling, image)
            except RaytrainError as e:
                raise RequestError(f"{prompt_param}: {e}", prompt_param, "invalid_value") from None
        if forkjoin is None:
            return Request(ids, sampling, adapter=adapter)
        request = Request(params=sampling, forkjoin=forkjoin)
        try:
            self.engine.encode(request)  # what the checks above cannot see (e.g. more hops than documents)
        except RaytrainError as e:
            raise RequestError(f"rag: {e}", "rag") from None
        return request

    def _forkjoin(self, job: dict[str, Any]) -> ForkJoinPrompt:
        """The fork-join prompt of a rag job: earlier messages, then the instruction, the documents and the last
        (user) message as the question."""
        rag, messages = job["rag"], job["messages"]
        documents, param, encoded = self._documents(rag)
        chars = sum(len(m["content"]) for m in messages) + sum(map(len, documents))
        if chars > self.max_prompt_chars:
            raise RequestError(f"{param}: {chars} characters of documents and messages are more than model "
                               f"{self.name!r} accepts (at most {self.spec.limits.max_prompt_tokens} tokens, which "
                               f"this tokenizer never spells in more than {self.max_prompt_chars} characters)",
                               param, "context_length_exceeded")
        try:
            prompt = forkjoin_prompt(self.engine.tokenizer, documents if encoded is None else [],
                                     messages[-1]["content"], self.spec.rag_instruction, messages[:-1],
                                     self.chat_template)
        except (TemplateError, RaytrainError) as e:
            raise RequestError(f"messages: the chat template rejected them ({e})", "messages") from None
        if encoded is not None:
            prompt.documents = encoded
        prompt.superpose = None if rag["mode"] is None else rag["mode"] == "superposition"
        prompt.top_k = rag["top_k"]
        return prompt

    def _documents(self, rag: dict[str, Any]) -> tuple[list[str], str, list[list[int]] | None]:
        """The job's documents, sent or from the named store, the field they came from, and a store's documents as
        token ids (tokenized once, as the store loaded)."""
        if rag.get("store") is None:
            return rag["documents"], "rag.documents", None
        if rag["store"] not in self.stores:
            raise RequestError(f"rag.store: model {self.name!r} has no document store {rag['store']!r}; its stores: "
                               f"{', '.join(self.stores) or 'none'}", "rag.store", "invalid_value")
        return self.stores[rag["store"]], "rag.store", self.store_ids[rag["store"]]

    def _ready_stores(self, key: str) -> None:
        """Fail on a store no request could use (its documents past `limits.max_prompt_tokens`, or past the context
        window), naming it; with superposition on and `warm_document_stores`, each store's preamble and document KV
        go into the path cache by a one-token request over it (a question's query copies are computed per request
        anyway), so that the first real question is warm. With `store_shards`, each store's shard actors start
        here instead, each warming its own part."""
        warm = self.spec.warm_document_stores and self.spec.engine.superposition.enabled
        for name, documents in self.stores.items():
            prompt = forkjoin_prompt(self.engine.tokenizer, documents, "", self.spec.rag_instruction,
                                     template=self.chat_template)
            self.store_ids[name] = prompt.documents
            if len(prompt.flat()) > self.spec.limits.max_prompt_tokens:
                raise ConfigError(f"{key}.document_stores.{name}: its documents make a prompt of "
                                  f"{len(prompt.flat())} tokens; limits.max_prompt_tokens is "
                                  f"{self.spec.limits.max_prompt_tokens}")
            if self.spec.store_shards.count > 1:
                warmup = (prompt.preamble, prompt.query) if self.spec.warm_document_stores else None
                self.shards[name] = start_shards(self.args, key, self.spec, self.engine.superposer.paths(prompt),
                                                 warmup)
                continue
            if not warm:
                continue
            try:
                self.engine.generate([Request(params=SamplingParams(max_new_tokens=1, temperature=0),
                                              forkjoin=prompt)])
            except RaytrainError as e:
                raise ConfigError(f"{key}.document_stores.{name}: {e}") from None

    def _needed(self, prompt: ForkJoinPrompt) -> int:
        """Context entries the prompt needs before its output: the naive prompt's length, or with superposition
        its worst case over the pruning outcomes."""
        if self.engine.superposed(Request(forkjoin=prompt)):
            return self.engine.superposer.bound(prompt)
        return len(prompt.flat())

    def _image(self, urls: list[str]) -> bytes | None:
        """The request's image, decoded from its base64 data URL (a VLM takes one image, a language model none)."""
        if not urls:
            return None
        if not self.vision:
            raise RequestError(f"messages: model {self.name!r} is a language model; it takes no images", "messages",
                               "invalid_value")
        if len(urls) > 1:
            raise RequestError(f"messages: {len(urls)} images; model {self.name!r} takes one per request", "messages",
                               "invalid_value")
        head, _, data = urls[0].partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            raise RequestError("image_url.url: only base64 data URLs (data:image/...;base64,...) are accepted",
                               "image_url.url", "invalid_value")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image_url.url: the data URL is not valid base64", "image_url.url",
                               "invalid_value") from None

    def _prompt_ids(self, job: dict[str, Any], param: str) -> list[int]:
        tokenizer = self.engine.tokenizer
        prompt = job.get(param)
        if param == "prompt" and not isinstance(prompt, str):
            return self._token_ids(prompt)
        chars = len(prompt) if param == "prompt" else sum(len(m["content"]) for m in prompt)
        if chars > self.max_prompt_chars:
            raise RequestError(f"{param}: {chars} characters are more than model {self.name!r} accepts (at most "
                               f"{self.spec.limits.max_prompt_tokens} tokens, which this tokenizer never spells in "
                               f"more than {self.max_prompt_chars} characters)", param, "context_length_exceeded")
        try:
            if param == "messages" and self.vision:
                return self.engine.tokenize(self.engine.chat_ids(job["messages"], self.chat_template))
            if param == "messages":
                ids = tokenizer.apply_chat_template(job["messages"], chat_template=self.chat_template,
                                                    add_generation_prompt=True, tokenize=True, return_dict=False)
                return self.engine.tokenize(list(ids))
            return self.engine.tokenize(job["prompt"])
        except TemplateError as e:
            raise RequestError(f"messages: the chat template rejected them ({e})", "messages") from None
        except RaytrainError as e:
            raise RequestError(f"{param}: {e}", param) from None

    def _token_ids(self, ids: list[int]) -> list[int]:
        """A prompt given as token ids, all inside the vocabulary (an id outside it would fail the whole batch)."""
        vocab = self.engine.model.cfg.vocab_size
        outside = next((i for i in ids if not 0 <= i < vocab), None)
        if outside is not None:
            raise RequestError(f"prompt: token id {outside} is outside the vocabulary of model {self.name!r} "
                               f"(0 to {vocab - 1})", "prompt", "invalid_value")
        return self.engine.tokenize(ids)


def load_stores(spec: ModelSpec, key: str, vision: bool) -> dict[str, list[str]]:
    """Each document store's documents, read from its file as this replica sees it, at most `limits.max_documents`
    (what one request may send)."""
    if spec.document_stores and vision:
        raise ConfigError(f"{key}.document_stores: rag takes a language model; {spec.checkpoint} is a "
                          "vision-language model")
    stores = {}
    for name, path in spec.document_stores.items():
        stores[name] = read_documents(path, f"{key}.document_stores.{name}")
        if len(stores[name]) > spec.limits.max_documents:
            raise ConfigError(f"{key}.document_stores.{name}: {path} holds {len(stores[name])} documents; a request "
                              f"takes at most limits.max_documents={spec.limits.max_documents}")
    return stores


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters any vocabulary entry spells. Tokens as the vocabulary writes them are at least as long as
    the text they stand for (byte-level BPE writes one character per byte; byte fallbacks read `<0x41>`), so no
    token covers more text than this."""
    return max(map(len, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))


def _counts(c: Completion) -> dict[str, Any]:
    return {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": len(c.token_ids)}
