"""The gateway in front of the OpenAI service: API keys, per-key rate limits, response cache.

    authenticate(headers) -> key      401 without a known key; 429 over its request budget
    answer(endpoint, body, key)       a cache hit answers here, without the router or a replica;
                                      a miss reserves tokens, generates, settles, and stores

A hit is answered from the cache entry with a fresh `id` and `created` (streams replay its
chunks); `Answer.cache` says "hit" or "miss" for requests that could be cached, else None.
Handle calls from other Ray jobs come from inside the cluster and pass no key.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from pagedserve.cluster import cache_replay
from pagedserve.cluster.api_keys import UNKNOWN_KEY_NAME, ApiKey, KeyRing, load_api_keys
from pagedserve.cluster.gateway_metrics import GatewayMetrics
from pagedserve.cluster.openai_echo import shown_prompt_key
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_tools import tool_mode
from pagedserve.cluster.rate_limits import RateLimiter
from pagedserve.cluster.response_cache import cache_key, is_deterministic, model_fingerprint
from pagedserve.cluster.service import OpenAIService, Prepared
from pagedserve.cluster.tiered_cache import TieredCache
from pagedserve.config import ClusterConfig
from pagedserve.replicas.models.registry import resolve_model_dir

logger = logging.getLogger(__name__)
CACHE_HEADER = "x-pagedserve-cache"
CACHE_LEVEL_HEADER = "x-pagedserve-cache-level"
NO_KEY_SCOPE = "-"  # callers without a key: auth off, or handle calls from inside the cluster


def served_model_id(config: ClusterConfig) -> str:
    """The model's identity in cache keys: its path plus a fingerprint of its files."""
    model_dir = resolve_model_dir(config.engine.model, progress=False)
    return f"{model_dir.resolve()}@{model_fingerprint(model_dir)}"


@dataclass
class Answer:
    result: dict | AsyncIterator[dict]
    cache: str | None = None  # "hit" | "miss" | None (not cacheable, or the cache is off)
    level: str | None = None  # "l1" | "l2" on a hit

    def headers(self) -> dict[str, str]:
        headers = {} if self.cache is None else {CACHE_HEADER: self.cache}
        if self.level is not None:
            headers[CACHE_LEVEL_HEADER] = self.level
        return headers


class Gateway:
    """Keys, limits and the response cache, each off unless its config section says so."""

    def __init__(self, config: ClusterConfig, service: OpenAIService, model_id: str,
                 registry: CollectorRegistry) -> None:
        self.service = service
        self.model_id = model_id
        self.metrics = GatewayMetrics(registry)
        auth, cache = config.auth, config.cache
        self.keys = KeyRing(load_api_keys(auth)) if auth is not None else None
        self.limiter = (RateLimiter(auth.redis_url, auth.redis_timeout_s)
                        if auth is not None else None)
        self.cache = TieredCache.from_config(cache, self.metrics) if cache.enabled else None
        self.global_scope = cache.scope == "global"
        self.max_entry_bytes = cache.max_entry_bytes

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key (None when auth is off); APIError 401 or 429."""
        if self.keys is None:
            return None
        key = self.keys.lookup(headers.get("authorization"))
        if key is None:
            self.metrics.auth_rejection(UNKNOWN_KEY_NAME, 401)
            raise APIError.unauthorized()
        try:
            await self.limiter.admit(key)
        except APIError as err:
            self.metrics.auth_rejection(key.name, err.status)
            raise
        return key

    async def answer(self, endpoint: str, body: object, key: ApiKey | None) -> Answer:
        prepare = (self.service.prepare_chat if endpoint == "chat"
                   else self.service.prepare_completions)
        prepared = prepare(body)
        await self.service.check_structured(prepared)
        ckey = self._cache_key(prepared, key)
        if ckey is not None:
            found = await self.cache.get(ckey)
            stored = _decode(found[0]) if found is not None else None
            if stored is not None:
                self.service.metrics.count_request(200, endpoint=prepared.endpoint)
                return Answer(self._replay(prepared, stored), "hit", found[1])
        result = await self._generate(prepared, key)
        if isinstance(result, dict):
            if ckey is not None and not prepared.output.stream.aborted:
                await self._store(ckey, result)
        else:
            result = self._teed(prepared, result, ckey, key)
        return Answer(result, None if ckey is None else "miss")

    def _cache_key(self, prepared: Prepared, key: ApiKey | None) -> str | None:
        params = prepared.jobs[0].params
        if self.cache is None or not is_deterministic(params) or tool_mode(prepared.request):
            return None  # (a replayed answer is content: tool calls are not cached)
        scope = "*" if self.global_scope else (key.name if key is not None else NO_KEY_SCOPE)
        prompts = [job.prompt_token_ids for job in prepared.jobs]
        return cache_key(self.model_id, prepared.endpoint, scope, prompts, params,
                         shown_prompt_key(prepared.request))

    def _replay(self, prepared: Prepared, stored: dict) -> dict | AsyncIterator[dict]:
        request_id, created = uuid.uuid4().hex, int(time.time())
        if not prepared.request.stream:
            return cache_replay.unary_response(stored, request_id, created)
        chunks = cache_replay.replay_chunks(stored, request_id, created,
                                            prepared.request.include_usage)
        return _iterate(chunks)

    async def _generate(self, prepared: Prepared, key: ApiKey | None):
        """Reserve the tokens, generate; a unary answer settles its tokens at once."""
        reserved = _token_cost(prepared)
        if key is not None:
            try:
                await self.limiter.reserve(key, reserved)
            except APIError as err:
                self.metrics.auth_rejection(key.name, err.status)
                raise
        try:
            result = await self.service.respond(prepared)
        except BaseException:
            await self._settle(key, reserved, 0)
            raise
        if isinstance(result, dict):
            await self._settle(key, reserved, result["usage"]["total_tokens"])
        return result

    async def _teed(self, prepared: Prepared, chunks: AsyncIterator[dict], ckey: str | None,
                    key: ApiKey | None) -> AsyncIterator[dict]:
        """The live chunks, folded on the side into the unary response to store. A stream
        that fails, is aborted or that the client leaves stores nothing."""
        stream = prepared.output
        folder = _folder(prepared)
        try:
            async for chunk in chunks:
                if chunk["choices"]:
                    folder.add_chunk(chunk)
                yield chunk
        finally:
            used = prepared.prompt_tokens + stream.completion_tokens
            await self._settle(key, _token_cost(prepared), used)
        if ckey is not None and not stream.aborted:
            response = folder.response(prepared.prompt_tokens)
            response["usage"] = stream.usage(prepared.prompt_tokens)
            await self._store(ckey, response)

    async def _store(self, ckey: str, response: dict) -> None:
        entry = cache_replay.to_entry(response)
        if len(entry) <= self.max_entry_bytes:
            await self.cache.put(ckey, entry)

    async def _settle(self, key: ApiKey | None, reserved: int, used: int) -> None:
        if key is not None and reserved > used:
            await self.limiter.refund(key, reserved - used)


def _token_cost(prepared: Prepared) -> int:
    """What a generation may use: every prompt, plus max_tokens for each of its choices."""
    return sum(len(job.prompt_token_ids) + (job.params.max_tokens or 0) * job.params.n
               for job in prepared.jobs)


def _folder(prepared: Prepared):
    """A response builder that folds a stream's chunks into the unary response."""
    from pagedserve.cluster.openai_responses import ChatResponseBuilder, CompletionResponseBuilder

    kind = ChatResponseBuilder if prepared.endpoint == "chat" else CompletionResponseBuilder
    return kind.for_request(*prepared.output_args)


def _decode(entry: bytes) -> dict | None:
    try:
        return cache_replay.from_entry(entry)
    except ValueError:  # not an entry of ours: a miss, and generation overwrites it
        logger.warning("response cache: an entry that is not JSON; treated as a miss")
        return None


async def _iterate(chunks: list[dict]) -> AsyncIterator[dict]:
    for chunk in chunks:
        yield chunk
