"""A small HTTP reward server: one `Scorer` behind `POST /score`, so RL jobs on other nodes score on its GPUs.

    POST /score   {"prompts": [...], "completions": [...], "references": [...] (optional)}  ->  {"scores": [...]}
    GET  /health  {"status": "ok"}  (no token needed: it says nothing but that the server is up)

Items are strings or TRL conversational message lists (`[{"role": ..., "content": ...}]`). Every answer is JSON,
errors `{"error": "..."}`: 400 malformed JSON (also nested too deep, a bad Content-Length: see `JsonErrorsH11`),
401 missing/wrong bearer token, 413 body, batch or tokens over the limit, 422 payload of the wrong shape (the
message names the field: invalid Unicode, an item with nothing to score) or a request the scorer refuses (e.g.
POLAR without references), 500 the scorer failed (the server keeps serving). Run it with
`python -m reward_models serve`.

Scheduling (`FairScheduler`): one model scores one batch at a time, and each scorer call gathers up to `chunk`
completions round-robin from every waiting request, so a large request is scored a chunk at a time between the
small ones that arrive meanwhile instead of holding them for its whole duration, and small requests share calls.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
DEFAULT_MAX_TOKENS = 1024 * 1024  # per request: 512 completions of 2,048 tokens
DEFAULT_CHUNK = 64  # completions per scorer call, gathered across requests
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
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk: int = DEFAULT_CHUNK,
    schedule: str = "fair",
) -> Starlette:
    """An ASGI app serving `scorer`. With `token`, `/score` requires `Authorization: Bearer <token>` (the scheme in
    any case, RFC 7235).

    `max_body_bytes` bounds the request body (413 before reading more than that); `max_batch` bounds the
    completions in one request and `max_tokens` their tokens, counted with the scorer's tokenizer when it has
    `count_tokens` (the built-in scorers do), else as UTF-8 bytes / 4 (413: split the request; the `remote` reward
    does so with its `batch_size`). `chunk` is the most completions per scorer call (`FairScheduler`);
    `schedule="fifo"` scores whole requests one at a time in arrival order instead (the server's earlier
    behaviour, kept as the baseline of scripts/bench_reward_server.py).
    """
    if min(max_body_bytes, max_batch, max_tokens, chunk) <= 0:
        raise ValueError(
            f"max_body_bytes, max_batch, max_tokens and chunk must be positive, got {max_body_bytes}, {max_batch}, "
            f"{max_tokens} and {chunk}"
        )
    if token is not None and not token.strip():
        raise ValueError("token is empty: pass None to serve without one")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    scheduler = SCHEDULES[schedule](scorer, chunk)

    async def score(request: Request) -> JSONResponse:
        try:
            if token is not None:
                _check_token(request, token)
            body = await _read_body(request, max_body_bytes)
            prompts, completions, references = _parse(body, max_batch)
            _check_tokens(scorer, prompts, completions, references, max_tokens)
        except PayloadError as err:
            return _error(err.status, str(err))
        if not completions:
            return JSONResponse({"scores": []})
        job = Job(prompts, completions, references)
        await scheduler.run(job)
        headers = {"X-Queue-Wait-Ms": f"{job.waited_ms:.1f}"}
        if isinstance(job.error, UserError):  # the scorer refuses the request as sent (written for the user)
            return _error(422, str(job.error))
        if isinstance(job.error, PayloadError):
            return _error(job.error.status, str(job.error))
        if job.error is not None:
            return _error(500, f"scorer raised {type(job.error).__name__}: {job.error}")
        return JSONResponse({"scores": job.scores}, headers=headers)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **scheduler.load()})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own 404/405 as JSON too, so clients parse one error shape.
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    routes = [Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash})


@dataclass
class Job:
    """One request's completions on their way through the scheduler."""

    prompts: list[Any]
    completions: list[Any]
    references: list[Any] | None
    scores: list[float | None] = field(init=False)
    next: int = 0  # first completion not yet handed to a scorer call
    done: int = 0
    error: Exception | None = None
    arrived: float = field(default_factory=time.monotonic)
    waited_ms: float = 0.0  # from arrival to the first scorer call that took some of its completions

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.completions)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done == len(self.completions)


class FairScheduler:
    """One scorer call at a time, each gathering up to `chunk` completions round-robin over the waiting requests.

    Requests wait for the scoring slot in arrival order (anyio's lock is fair); whoever holds it scores a batch made
    of an equal share of every waiting request (of the same kind: with or without references), not only its own,
    then releases it. A large request thus takes many turns, and a small one that arrives meanwhile is scored in
    the next call. When a call with several requests fails, each request's part is scored again alone, so an error
    reaches only the request that caused it. Hand-written: Starlette and uvicorn have no batching, and this is
    small enough not to need a serving framework.
    """

    def __init__(self, scorer: Scorer, chunk: int):
        self.scorer, self.chunk = scorer, chunk
        self.jobs: list[Job] = []
        self.lock = threading.Lock()  # guards `jobs` and the jobs' counters
        self.slot = anyio.Lock()

    def load(self) -> dict[str, int]:
        with self.lock:
            return {"queued_requests": len(self.jobs), "queued_completions": sum(len(j.completions) - j.done
                                                                                for j in self.jobs)}  # fmt: skip

    async def run(self, job: Job) -> None:
        with self.lock:
            self.jobs.append(job)
        try:
            while not job.finished:
                async with self.slot:
                    if job.finished:  # scored by other requests' turns while it waited
                        break
                    batch = self._take()
                    if not batch:  # cannot happen: an unfinished job always has completions left to hand out
                        raise RuntimeError("reward server scheduler: nothing to score for an unfinished request")
                    await anyio.to_thread.run_sync(self._score, batch)
        finally:
            with self.lock:
                self.jobs.remove(job)

    def _take(self) -> list[tuple[Job, int, int]]:
        """(job, start, end) parts of the next call: round-robin over the waiting jobs of the oldest one's kind."""
        with self.lock:
            waiting = [j for j in self.jobs if j.next < len(j.completions) and j.error is None]
            if not waiting:
                return []
            kind = waiting[0].references is not None
            waiting = [j for j in waiting if (j.references is not None) == kind]
            budget, parts = self.chunk, {}
            while budget > 0 and waiting:
                share = max(1, budget // len(waiting))
                for j in list(waiting):
                    n = min(share, budget, len(j.completions) - j.next)
                    part = parts.setdefault(id(j), [j, j.next, j.next])
                    part[2] += n
                    j.next += n
                    budget -= n
                    if j.next == len(j.completions):
                        waiting.remove(j)
                    if budget == 0:
                        break
            now = time.monotonic()
            for j, start, _ in parts.values():
                if start == 0:  # its first completions: how long it queued
                    j.waited_ms = (now - j.arrived) * 1000
            return [(j, a, b) for j, a, b in parts.values()]

    def _score(self, batch: list[tuple[Job, int, int]]) -> None:
        try:
            self._call(batch)
        except Exception as err:
            if len(batch) == 1:
                self._fail(batch[0][0], err)
                return
            for part in batch:  # find whose completions made it fail
                try:
                    self._call([part])
                except Exception as alone:
                    self._fail(part[0], alone)

    def _call(self, batch: list[tuple[Job, int, int]]) -> None:
        prompts = [p for j, a, b in batch for p in j.prompts[a:b]]
        completions = [c for j, a, b in batch for c in j.completions[a:b]]
        refs = None if batch[0][0].references is None else [r for j, a, b in batch for r in j.references[a:b]]
        values = _check_scores(self.scorer.score(prompts, completions, refs), len(completions))
        offset = 0
        with self.lock:
            for j, a, b in batch:
                j.scores[a:b] = values[offset : offset + b - a]
                j.done += b - a
                offset += b - a

    def _fail(self, job: Job, err: Exception) -> None:
        if not isinstance(err, (UserError, PayloadError)):
            log.error("scorer raised on a batch of %d: %s: %s", len(job.completions), type(err).__name__, err)
        with self.lock:
            job.error = err


class WholeRequestFIFO(FairScheduler):
    """Whole requests, one scorer call each, in arrival order (a large request holds every later one)."""

    def _take(self) -> list[tuple[Job, int, int]]:
        with self.lock:
            job = next((j for j in self.jobs if j.next < len(j.completions) and j.error is None), None)
            if job is None:
                return []
            start, job.next = job.next, len(job.completions)
            if start == 0:
                job.waited_ms = (time.monotonic() - job.arrived) * 1000
            return [(job, start, job.next)]


SCHEDULES = {"fair": FairScheduler, "fifo": WholeRequestFIFO}


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _check_token(request: Request, expected: str) -> None:
    given = request.headers.get("authorization")
    if given is None:
        raise PayloadError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, credentials = given.strip().partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 7235, section 2.1)
        raise PayloadError(
            401, f"unsupported authorization scheme {scheme[:20]!r}: send 'Authorization: Bearer <token>'"
        )
    # Constant time: no guessing the token byte by byte.
    if not hmac.compare_digest(credentials.strip().encode("utf-8", "replace"), expected.encode()):
        raise PayloadError(401, "wrong bearer token")


def _check_tokens(scorer: Any, prompts: list, completions: list, references: list | None, limit: int) -> None:
    """413 when the request holds more than `limit` tokens (the scorer's own count, else UTF-8 bytes / 4)."""
    count = getattr(scorer, "count_tokens", None)
    if count is not None:
        n = int(count(prompts, completions, references))
        how = "tokens"
    else:
        texts = [*prompts, *completions, *(references or [])]
        n = sum(len(json.dumps(t, ensure_ascii=False).encode()) for t in texts) // 4
        how = "tokens (estimated as UTF-8 bytes / 4)"
    if n > limit:
        raise PayloadError(413, f"request of {n} {how} exceeds the server's per-request budget of {limit}; split it")


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
    except RecursionError as err:
        raise PayloadError(400, "malformed JSON: nested deeper than the server parses") from err
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
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not _text(prompt) and not _text(completion):
            raise PayloadError(422, f"'prompts[{i}]' and 'completions[{i}]' are both empty: nothing to score")
    return prompts, completions, references


def _text(item: Any) -> str:
    return item if isinstance(item, str) else "".join(m["content"] for m in item)


def _items(payload: Mapping, field: str) -> list[Any]:
    if field not in payload:
        raise PayloadError(422, f"missing field '{field}' (a list of strings or message lists)")
    values = payload[field]
    if not isinstance(values, list):
        raise PayloadError(422, f"'{field}' must be a list, got {_kind(values)}")
    for i, item in enumerate(values):
        if isinstance(item, list) and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in item
        ):
            strings = [s for m in item for s in (m["role"], m["content"])]
        elif isinstance(item, str):
            strings = [item]
        else:
            raise PayloadError(
                422,
                f"'{field}[{i}]' must be a string or a list of {{role, content}} string messages, got {_kind(item)}",
            )
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates no model can read
                raise PayloadError(
                    422, f"'{field}[{i}]' is not valid Unicode: lone surrogate {text[err.start]!r} at {err.start}"
                ) from err
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


def json_errors_h11() -> type:
    """uvicorn's h11 protocol, answering the requests it rejects before the app sees them (a malformed
    Content-Length, a broken request line) with a JSON body like every other error of this server, instead of
    uvicorn's plain text. Pass it as `uvicorn.run(..., http=json_errors_h11())`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"bad request: {msg} (malformed request line or headers)"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # fmt: skip
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):  # fmt: skip
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorsH11
