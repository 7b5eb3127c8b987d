"""What the ingress checks before a request costs anything: the API key, and a body within its size and time limits.

The key is vLLM's `--api-key` scheme: every route wants `Authorization: Bearer KEY`, compared in constant time. A
body is read as it arrives and refused (413) as soon as it passes `max_body_bytes`, before it is parsed; a declared
Content-Length over the limit is refused without reading a byte. A client that trickles its body gets 408 after
`body_timeout_s`. (Trickled headers never reach the ingress: see the README on slow clients.)
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

from raytrain.config import ConfigError
from serving.config import ApiSpec
from serving.protocol import ApiError

API_KEY_ENV = "RAYTRAIN_API_KEY"


def api_key(spec: ApiSpec, key: str = "api") -> str | None:
    """The key clients must send: `api_key`, else the contents of `api_key_file`, else $RAYTRAIN_API_KEY in the
    ingress replica's environment; None: the API is open."""
    if spec.api_key:
        return spec.api_key
    if spec.api_key_file:
        try:
            secret = Path(spec.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{key}.api_key_file: cannot read {spec.api_key_file} ({e.strerror})") from None
        if not secret:
            raise ConfigError(f"{key}.api_key_file: {spec.api_key_file} is empty")
        return secret
    return os.environ.get(API_KEY_ENV) or None


def authorize(request: Request, secret: str | None) -> None:
    """Nothing when the request carries the key (or none is set), else a 401 ApiError."""
    if secret is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret.encode()):
        raise ApiError(401, "a valid API key is required: send the header `Authorization: Bearer KEY`",
                       code="invalid_api_key")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, at most `max_bytes` (else 413), received in full within `timeout_s` (else 408)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body was not received within body_timeout_s={timeout_s:g}",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the whole body",
                       code="incomplete_body") from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than max_body_bytes={max_bytes}", code="request_too_large")
