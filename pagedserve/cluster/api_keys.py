"""API keys: who a request's `Authorization: Bearer <key>` belongs to.

Keys come from the config and from an environment variable (`name:key,name:key`). A key is
compared in constant time against every known key, so the time of a refusal says nothing
about how close a guess was. Keys are never logged: logs and metrics use the key's name, or
`key_hash_prefix` where no name is known.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from pagedserve.config import AuthConfig, RateLimitConfig

UNKNOWN_KEY_NAME = "unknown"


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: bytes
    rate_limit: RateLimitConfig

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"ApiKey(name={self.name!r})"


def key_hash_prefix(key: str) -> str:
    """A short, non-reversible tag of a key, for logs about keys without a name."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_env_keys(text: str, env_name: str) -> list[tuple[str, str]]:
    """`name:key,name:key` → [(name, key)]; ValueError naming the variable (never the key)."""
    pairs = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, key = item.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ValueError(f"${env_name}: entry {i} is not of the form name:key")
        pairs.append((name.strip(), key.strip()))
    return pairs


def load_api_keys(config: AuthConfig, environ: dict[str, str] | None = None) -> list[ApiKey]:
    """Every key from the config and its environment variable; names must be unique."""
    environ = os.environ if environ is None else environ
    keys = [ApiKey(k.name, k.key.get_secret_value().encode(), k.rate_limit or config.rate_limit)
            for k in config.api_keys]
    if config.api_keys_env is not None:
        text = environ.get(config.api_keys_env)
        if text is None:
            raise ValueError(f"auth.api_keys_env names ${config.api_keys_env}, which is not set")
        keys += [ApiKey(name, key.encode(), config.rate_limit)
                 for name, key in parse_env_keys(text, config.api_keys_env)]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ValueError(f"API key names must be unique, got {sorted(names)}")
    if not keys:
        raise ValueError("auth is configured but holds no API keys")
    return keys


class KeyRing:
    """`lookup(authorization header) -> ApiKey | None`, constant-time over all keys."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    def lookup(self, authorization: str | None) -> ApiKey | None:
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for key in self.keys:  # no early exit: every key is compared, every time
            if hmac.compare_digest(given, key.secret) and given:
                found = key
        return found
