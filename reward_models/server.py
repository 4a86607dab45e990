"""A small HTTP reward server: one `Scorer` behind `POST /score`, so RL jobs on other nodes score on its GPUs.

    POST /score   {"prompts": [...], "completions": [...], "references": [...] (optional)}  ->  {"scores": [...]}
    GET  /health  {"status": "ok"}  (no token needed: it says nothing but that the server is up)

Items are strings or TRL conversational message lists (`[{"role": ..., "content": ...}]`). Errors are JSON
`{"error": "..."}`: 400 malformed JSON, 401 missing/wrong bearer token, 413 body or batch over the limit,
422 payload of the wrong shape (the message names the field) or a request the scorer refuses (e.g. POLAR without
references), 500 the scorer failed (the server keeps serving). Run it with `python -m reward_models serve`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(f"the reward server needs starlette and uvicorn ({err}): pip install 'posttrain[serve]'") from err

from reward_models.errors import UserError
from reward_models.scoring import Scorer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH = 512
_FIELDS = ("prompts", "completions", "references")


class PayloadError(Exception):
    """A request the server refuses, with its HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(
    scorer: Scorer,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Starlette:
    """An ASGI app serving `scorer`. With `token`, `/score` requires `Authorization: Bearer <token>`.

    `max_body_bytes` bounds the request body (413 before reading more than that); `max_batch` bounds the
    completions in one request (413: the request is too large, split it; the `remote` reward does so with its
    `batch_size`).
    """
    if max_body_bytes <= 0 or max_batch <= 0:
        raise ValueError(f"max_body_bytes and max_batch must be positive, got {max_body_bytes} and {max_batch}")
    if token is not None and not token.strip():
        raise ValueError("token is empty: pass None to serve without one")
    # One model, one batch at a time: batches already fill the accelerator, and concurrent forwards on one model
    # would only contend for its memory. Scoring runs in a worker thread (off the event loop, so /health and
    # request parsing stay responsive) and this limiter of 1 makes requests queue for it in arrival order.
    limiter = anyio.CapacityLimiter(1)
    expected = f"Bearer {token}".encode() if token else None

    async def score(request: Request) -> JSONResponse:
        try:
            if expected is not None:
                _check_token(request, expected)
            body = await _read_body(request, max_body_bytes)
            prompts, completions, references = _parse(body, max_batch)
        except PayloadError as err:
            return _error(err.status, str(err))
        if not completions:
            return JSONResponse({"scores": []})
        try:
            scores = await anyio.to_thread.run_sync(scorer.score, prompts, completions, references, limiter=limiter)
        except UserError as err:  # the scorer refuses the request as sent (written for the user)
            return _error(422, str(err))
        except Exception as err:
            log.exception("scorer raised on a batch of %d", len(completions))
            return _error(500, f"scorer raised {type(err).__name__}: {err}")
        try:
            values = _check_scores(scores, len(completions))
        except PayloadError as err:
            log.error("%s", err)
            return _error(err.status, str(err))
        return JSONResponse({"scores": values})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own 404/405 as JSON too, so clients parse one error shape.
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    routes = [Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _check_token(request: Request, expected: bytes) -> None:
    given = request.headers.get("authorization")
    if given is None:
        raise PayloadError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.encode(), expected):  # constant time: no guessing the token byte by byte
        raise PayloadError(401, "wrong bearer token")


async def _read_body(request: Request, limit: int) -> bytes:
    # Refuse on the declared length first, then count while streaming (chunked bodies declare none), so an
    # oversize request is never held in memory whole.
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise PayloadError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise PayloadError(413, f"request body of {int(declared)} bytes exceeds the server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(413, f"request body exceeds the server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, max_batch: int) -> tuple[list[Any], list[Any], list[Any] | None]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PayloadError(400, f"malformed JSON: {err}") from err
    if not isinstance(payload, Mapping):
        raise PayloadError(
            422, f"the body must be a JSON object with 'prompts' and 'completions', got {_kind(payload)}"
        )
    unknown = sorted(set(payload) - set(_FIELDS))
    if unknown:  # a misspelt 'references' must not be silently dropped
        raise PayloadError(422, f"unknown field(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    prompts = _items(payload, "prompts")
    completions = _items(payload, "completions")
    references = _items(payload, "references") if payload.get("references") is not None else None
    if len(completions) > max_batch:
        raise PayloadError(
            413, f"batch of {len(completions)} completions exceeds the server's max_batch of {max_batch}; split it"
        )
    for name, values in (("prompts", prompts), ("references", references)):
        if values is not None and len(values) != len(completions):
            raise PayloadError(422, f"'{name}' has {len(values)} items but 'completions' has {len(completions)}")
    return prompts, completions, references


def _items(payload: Mapping, field: str) -> list[Any]:
    if field not in payload:
        raise PayloadError(422, f"missing field '{field}' (a list of strings or message lists)")
    values = payload[field]
    if not isinstance(values, list):
        raise PayloadError(422, f"'{field}' must be a list, got {_kind(values)}")
    for i, item in enumerate(values):
        if isinstance(item, str):
            continue
        if isinstance(item, list) and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in item
        ):
            continue
        raise PayloadError(
            422, f"'{field}[{i}]' must be a string or a list of {{role, content}} string messages, got {_kind(item)}"
        )
    return values


def _check_scores(scores: Any, n: int) -> list[float]:
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise PayloadError(500, f"scorer returned non-numeric scores ({err})") from err
    if len(values) != n:
        raise PayloadError(500, f"scorer returned {len(values)} scores for {n} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:  # JSON has no NaN/inf, and one would poison the trainer's advantages
        raise PayloadError(500, f"scorer returned non-finite scores at {bad[:10]}")
    return values


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
