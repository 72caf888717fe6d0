"""API keys (config and env, constant-time lookup) and token-bucket rate limits, local and in a
real Redis that the test starts."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from redis_server import RedisServer, free_port

from pagedserve.cluster.api_keys import ApiKey, KeyRing, load_api_keys
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.rate_limits import RateLimiter, TokenBucket
from pagedserve.config import AuthConfig, ClusterConfig, RateLimitConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _auth(**kwargs) -> AuthConfig:
    return AuthConfig(**{"api_keys": [{"name": "alice", "key": "sk-alice-1234"}], **kwargs})


def test_keys_from_config_and_env():
    config = _auth(api_keys_env="TEST_KEYS", rate_limit={"requests_per_min": 5})
    keys = load_api_keys(config, {"TEST_KEYS": "bob:sk-bob-5678, carol:sk-carol-90"})
    assert [k.name for k in keys] == ["alice", "bob", "carol"]
    assert all(k.rate_limit.requests_per_min == 5 for k in keys)
    assert "sk-" not in repr(keys) and "sk-" not in repr(config)


@pytest.mark.parametrize("env, match", [
    ({}, "not set"),
    ({"TEST_KEYS": "bob"}, "entry 0"),
    ({"TEST_KEYS": "alice:sk-other-1234"}, "unique"),
])
def test_bad_env_keys_are_clear_errors_without_the_key(env, match):
    with pytest.raises(ValueError, match=match) as err:
        load_api_keys(_auth(api_keys_env="TEST_KEYS"), env)
    assert "sk-other" not in str(err.value)


def test_bad_auth_configs_are_refused():
    with pytest.raises(ValueError, match="api_keys or api_keys_env"):
        ClusterConfig(auth={})
    with pytest.raises(ValueError, match="unique"):
        AuthConfig(api_keys=[{"name": "a", "key": "12345678"}, {"name": "a", "key": "87654321"}])
    with pytest.raises(ValueError, match="extra"):
        ClusterConfig(cache={"enabled": True, "ttl": 3})
    assert ClusterConfig().cache.enabled is False and ClusterConfig().auth is None


def test_keyring_finds_only_the_exact_bearer_key():
    ring = KeyRing(load_api_keys(_auth(), {}))
    assert ring.lookup("Bearer sk-alice-1234").name == "alice"
    assert ring.lookup("bearer  sk-alice-1234 ").name == "alice"
    for header in (None, "", "Bearer", "Bearer sk-alice-123", "Basic sk-alice-1234",
                   "sk-alice-1234", "Bearer sk-alice-12345"):
        assert ring.lookup(header) is None, header


def test_token_bucket_refills_a_minute_budget():
    clock = Clock()
    bucket = TokenBucket(60, clock)
    assert all(bucket.take(1) == 0 for _ in range(60))
    assert bucket.take(1) == pytest.approx(1.0)
    clock.now += 2.5
    assert bucket.take(2) == 0 and bucket.take(1) == pytest.approx(0.5)
    bucket.take(-1000)  # a refund never overfills
    assert bucket.tokens == 60


def _key(name: str, **limits) -> ApiKey:
    return ApiKey(name, b"secret-key", RateLimitConfig(**limits))


def _admitted(limiter: RateLimiter, key: ApiKey, tries: int) -> tuple[int, list[float]]:
    async def run():
        ok, waits = 0, []
        for _ in range(tries):
            try:
                await limiter.admit(key)
                ok += 1
            except APIError as err:
                assert err.status == 429 and err.headers()["Retry-After"]
                waits.append(err.retry_after)
        return ok, waits

    return asyncio.run(run())


def test_limiter_without_redis_admits_the_limit_then_429():
    ok, waits = _admitted(RateLimiter(clock=Clock()), _key("a", requests_per_min=3), 5)
    assert ok == 3 and len(waits) == 2 and all(19 < w <= 20 for w in waits)


def test_redis_buckets_are_shared_by_every_limiter(redis_server):
    key = _key(f"shared-{time.monotonic_ns()}", requests_per_min=4)
    first = RateLimiter(redis_server.url)
    second = RateLimiter(redis_server.url)
    ok_first, _ = _admitted(first, key, 3)
    ok_second, waits = _admitted(second, key, 3)
    assert ok_first + ok_second == 4 and len(waits) == 2  # one budget, not one each


def test_token_reservations_and_refunds_in_redis(redis_server):
    key = _key(f"tokens-{time.monotonic_ns()}", tokens_per_min=100)
    limiter = RateLimiter(redis_server.url)

    async def run():
        await limiter.reserve(key, 80)
        with pytest.raises(APIError) as err:
            await limiter.reserve(key, 30)
        assert err.value.status == 429 and err.value.retry_after > 0
        await limiter.refund(key, 60)  # the request used 20 of its 80
        await limiter.reserve(key, 30)
        with pytest.raises(APIError, match="needs 101 tokens"):
            await limiter.reserve(key, 101)

    asyncio.run(run())


def test_redis_down_falls_back_to_local_buckets_within_the_timeout():
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.05)
    start = time.monotonic()
    ok, waits = _admitted(limiter, _key("down", requests_per_min=2), 3)
    assert ok == 2 and len(waits) == 1
    assert time.monotonic() - start < 1.0


def test_a_redis_that_never_answers_falls_back_within_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        limiter = RateLimiter(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.05)
        start = time.monotonic()
        ok, _ = _admitted(limiter, _key("slow", requests_per_min=5), 2)
        assert ok == 2 and time.monotonic() - start < 0.5


def test_request_leases_save_round_trips_and_never_overshoot(redis_server):
    key = _key(f"leased-{time.monotonic_ns()}", requests_per_min=200)  # leases of 4
    limiters = [RateLimiter(redis_server.url), RateLimiter(redis_server.url)]
    calls = []
    for limiter in limiters:
        script = limiter._script

        def counted(*args, script=script, **kwargs):
            calls.append(1)
            return script(*args, **kwargs)

        limiter._script = counted

    async def run():
        ok = 0
        for i in range(300):
            try:
                await limiters[i % 2].admit(key)
                ok += 1
            except APIError:
                pass
        return ok

    ok = asyncio.run(run())
    assert 200 <= ok <= 203  # the budget, plus what refills while this runs (3.3 per s)
    refused = 300 - ok  # each refusal asked Redis
    assert len(calls) - refused <= ok / 4 + 2  # one Redis call per lease of 4 admissions
