"""The HTTP and handle front door: OpenAI routes on FastAPI inside a Serve deployment.

    POST /v1/chat/completions, POST /v1/completions (both with `stream: true` SSE),
    GET /v1/models, /v1/models/{id}, /healthz and /health (alive), /readyz (a warm replica
    exists), /metrics (Prometheus); POST /tokenize, /detokenize (vLLM's)

Python callers use the same logic through `serve.get_app_handle("pagedserve")`:
`chat_completions(body)` / `completions(body)` return the response dict, or, when the body says
`"stream": true` and the call uses `handle.options(stream=True)`, yield the chunk dicts.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type.
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve.cluster.client_disconnect import DisconnectOnCancelledReceive
from pagedserve.cluster.dispatch import Dispatcher
from pagedserve.cluster.gateway import Answer, Gateway, served_model_id
from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.node_exports import NodeExports
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_responses import models_list
from pagedserve.cluster.openai_sse import SSE_DONE, sse_error, sse_event
from pagedserve.cluster.openai_tokenize import detokenize, tokenize
from pagedserve.cluster.request_body import parse_json_body
from pagedserve.cluster.service import OpenAIService, load_model_info
from pagedserve.config import ClusterConfig

logger = logging.getLogger(__name__)
OTHER_ROUTE = "other"  # the `endpoint` tag of a request to no route of ours
api = FastAPI(title="pagedserve", docs_url=None, redoc_url=None)
api.add_middleware(DisconnectOnCancelledReceive)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    """Unknown routes and methods get OpenAI-shaped errors too, counted like any other."""
    error = APIError(err.status_code, str(err.detail), "invalid_request_error")
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_request(err.status_code, endpoint=OTHER_ROUTE)
    return _error_response(error)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    return _error_response(APIError.bad_request(f"invalid request: {err.errors()}"))


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError.too_large(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError.too_large(f"request body exceeds the {limit}-byte limit")
    return parse_json_body(body)


def _error_response(err: APIError) -> Response:
    """The error as JSON with non-ASCII escaped: a message may quote the client's input, which
    can hold lone surrogates that UTF-8 (Starlette's JSONResponse) cannot encode."""
    return Response(json.dumps(err.to_dict()), status_code=err.status, headers=err.headers(),
                    media_type="application/json")


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except APIError as err:
        yield sse_error(err)
    except Exception:
        logger.exception("stream failed")
        yield sse_error(APIError.server_error())
    yield SSE_DONE


async def _sse_body(chunks: AsyncIterator[dict]) -> str:
    return "".join([event async for event in _sse(chunks)])


# Helpers above are defined before the class on purpose: Serve serializes the decorated class
# with the module globals that exist at decoration time.
@serve.ingress(api)
class IngressDeployment:
    """Validates and tokenizes requests, admits them through the router, streams the replies."""

    def __init__(self, config: dict, router, replicas, canary_replicas=None) -> None:
        self.config = ClusterConfig(**config)
        self.router = router
        self.metrics = IngressMetrics()
        self.node_exports = NodeExports()
        api.state.metrics = self.metrics  # for the errors of routes that do not exist
        self.created = int(time.time())
        warm = self.config.warm_prefixes
        dispatcher = Dispatcher(router, replicas, self.config.engine.block_size,
                                self.config.router.retry_after_s,
                                warm.max_tokens if warm.top_k > 0 else 0, canary_replicas,
                                admission=self.config.router.policy == "admission")
        self.service = OpenAIService(self.config, load_model_info(self.config), dispatcher,
                                     self.metrics)
        self.gateway = Gateway(self.config, self.service, served_model_id(self.config),
                               self.metrics.registry)

    async def chat_completions(self, body: dict) -> "dict | AsyncIterator[dict]":
        """Handle API: a `chat.completion` dict, or chunk dicts when `body["stream"]`."""
        return (await self.gateway.answer("chat", body, None)).result

    async def completions(self, body: dict) -> "dict | AsyncIterator[dict]":
        """Handle API: a `text_completion` dict, or chunk dicts when `body["stream"]`."""
        return (await self.gateway.answer("completions", body, None)).result

    @api.post("/v1/chat/completions")
    async def http_chat_completions(self, request: Request) -> Response:
        return await self._http(request, "chat")

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._http(request, "completions")

    @api.get("/v1/models")
    async def http_models(self, request: Request) -> Response:
        if (refused := await self._refused(request, "models")) is not None:
            return refused
        return JSONResponse(models_list(self.service.models(), self.created))

    @api.get("/v1/models/{model_id:path}")
    async def http_model(self, model_id: str, request: Request) -> Response:
        """One model (`models.retrieve`); an OpenAI-shaped 404 for a model not served."""
        if (refused := await self._refused(request, "models")) is not None:
            return refused
        if model_id not in self.service.models():
            self.metrics.count_request(404, endpoint="models")
            return _error_response(APIError.model_not_found(model_id))
        return JSONResponse(models_list([model_id], self.created)["data"][0])

    @api.post("/tokenize")
    async def http_tokenize(self, request: Request) -> Response:
        return await self._tokenizer_route(request, "tokenize")

    @api.post("/detokenize")
    async def http_detokenize(self, request: Request) -> Response:
        return await self._tokenizer_route(request, "detokenize")

    async def _tokenizer_route(self, request: Request, endpoint: str) -> Response:
        """vLLM's tokenizer routes (`openai_tokenize.py`), checked and counted like the rest."""
        try:
            await self.gateway.authenticate(request.headers)
            body = await _read_json(request, self.config.max_request_bytes)
            if isinstance(body, dict):
                self.service.check_model_name(body.get("model"))
            model = self.service.model
            answer = (tokenize(body, model.tokenizer, model.max_model_len)
                      if endpoint == "tokenize"
                      else detokenize(body, model.tokenizer, model.vocab_size))
        except APIError as err:
            self.metrics.count_request(err.status, endpoint=endpoint)
            return _error_response(err)
        self.metrics.count_request(200, endpoint=endpoint)
        return JSONResponse(answer)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/health")
    async def health(self) -> Response:
        """vLLM's liveness route (load tools probe it first): 200, empty body."""
        return Response(status_code=200)

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ready = await self.router.num_ready_replicas.remote()
        status = 200 if ready > 0 else 503
        return JSONResponse({"ready": ready > 0, "replicas": ready}, status_code=status)

    @api.get("/metrics")
    async def prometheus_metrics(self, request: Request) -> Response:
        if (refused := await self._refused(request, "metrics")) is not None:
            return refused
        stats, cluster = await asyncio.gather(self.router.stats.remote(),
                                              self.node_exports.families())
        notes = [f"not answering, skipped: {url}" for url in sorted(self.node_exports.failing)]
        return Response(self.metrics.render(stats, cluster, notes), media_type=CONTENT_TYPE_LATEST)

    async def _refused(self, request: Request, endpoint: str) -> Response | None:
        """The 401/429 response for a caller the gateway refuses (counted), else None."""
        try:
            await self.gateway.authenticate(request.headers)
        except APIError as err:
            self.metrics.count_request(err.status, endpoint=endpoint)
            return _error_response(err)
        return None

    async def _http(self, request: Request, endpoint: str) -> Response:
        try:  # errors before the body is parsed are counted here, later ones by the service
            key = await self.gateway.authenticate(request.headers)
            body = await _read_json(request, self.config.max_request_bytes)
        except APIError as err:
            self.metrics.count_request(err.status, endpoint=endpoint)
            return _error_response(err)
        try:
            answer: Answer = await self.gateway.answer(endpoint, body, key)
        except APIError as err:
            return _error_response(err)
        except Exception:
            logger.exception("request failed")
            self.metrics.count_request(500, endpoint=endpoint)
            return _error_response(APIError.server_error())
        if isinstance(answer.result, dict):
            return JSONResponse(answer.result, headers=answer.headers())
        if answer.cache == "hit":  # a replayed stream is all in memory: one body, one message
            return Response(await _sse_body(answer.result), media_type="text/event-stream",
                            headers=answer.headers())
        return StreamingResponse(_sse(answer.result), media_type="text/event-stream",
                                 headers=answer.headers())
