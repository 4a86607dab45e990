"""A small HTTP reward server: one `Scorer` behind `POST /score`, so RL jobs on other nodes score on its GPUs.

    POST /score   {"prompts": [...], "completions": [...], "references": [...] (optional)}  ->  {"scores": [...]}
    GET  /health  {"status": "ok", "queued_requests": ..., "queued_completions": ...}  (no token needed)

Items are strings or TRL conversational message lists (`[{"role": ..., "content": ...}]`). Run it with
`python -m reward_models serve`. Every answer of the app is JSON, errors `{"error": "..."}` (Starlette exception
handlers): 400 malformed JSON (also nested too deep, not UTF-8, a non-numeric Content-Length), 401 missing/wrong
bearer token, 413 body, batch or tokens over the limit (tokens: refused on the character count first, before any
tokenizer reads the request, see `MAX_CHARS_PER_TOKEN`; then counted exactly), 422 payload of the wrong shape
(validated by the pydantic model `ScoreRequest`; the message names the field, e.g. `'prompts[0][1].content'`:
invalid Unicode, an item with nothing to score) or a request the scorer refuses (e.g. POLAR without references),
500 the scorer failed (the server keeps serving). A client that disconnects mid-body is one warning line.

Only uvicorn sees a request it cannot parse as HTTP (a malformed Content-Length or request line): it answers a
plain-text `400 Bad Request` ("Invalid HTTP request received.") and logs one warning; it has no public hook to
shape that answer, and the app never runs.

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
from dataclasses import dataclass, field
from typing import Annotated, Any

try:
    import anyio
    from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Tag, model_validator, with_config
    from pydantic_core import ErrorDetails, PydanticCustomError, ValidationError
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from typing_extensions import TypedDict  # pydantic validates typing.TypedDict only from Python 3.12
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        f"the reward server needs starlette, uvicorn and pydantic ({err}): pip install 'posttrain[serve]'"
    ) from err

from reward_models.errors import UserError
from reward_models.scoring import Scorer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH = 512
DEFAULT_MAX_TOKENS = 1024 * 1024  # per request: 512 completions of 2,048 tokens
DEFAULT_CHUNK = 64  # completions per scorer call, gathered across requests
# A request with more characters than this many per token of the budget is refused before any tokenizer reads it.
# Tokenizers average 3-5 characters a token on prose and code; only long runs of one character (whitespace, "====")
# pack more, so a request averaging over 8 is mostly such runs. The bound costs nothing, where tokenising a 15 MB
# completion whole, only to refuse it, took 30-60 s.
MAX_CHARS_PER_TOKEN = 8
_FIELDS = ("prompts", "completions", "references")


class PayloadError(Exception):
    """A request the server refuses, with its HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates no model can read
        raise PydanticCustomError("unicode", "is not valid Unicode: lone surrogate {char} at {at}",
                                  {"char": repr(text[err.start]), "at": err.start}) from None  # fmt: skip
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # strict: the models' config


@with_config(ConfigDict(strict=True, extra="allow"))  # other message keys (name, ...) pass on to the scorer
class Message(TypedDict):
    role: Text
    content: Text


def _item_tag(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "messages" if isinstance(value, list) else None


# The discriminator picks the union member by the JSON type, so a wrong item is one error, not one per member.
Item = Annotated[Annotated[Text, Tag("text")] | Annotated[list[Message], Tag("messages")],
                 Discriminator(_item_tag, custom_error_type="item_type",
                               custom_error_message="must be a string or a list of {role, content} string messages")]  # fmt: skip


class ScoreRequest(BaseModel):
    """The body of `POST /score`. Strict: a number is not a string, and an unknown field (a misspelt
    'references') is an error rather than silently dropped."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompts: list[Item]
    completions: list[Item]
    references: list[Item] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> ScoreRequest:
        for name, values in (("prompts", self.prompts), ("references", self.references)):
            if values is not None and len(values) != len(self.completions):
                raise PydanticCustomError(
                    "length", f"'{name}' has {len(values)} items but 'completions' has {len(self.completions)}"
                )
        for i, (prompt, completion) in enumerate(zip(self.prompts, self.completions)):
            if not _text(prompt) and not _text(completion):
                raise PydanticCustomError(
                    "nothing_to_score", f"'prompts[{i}]' and 'completions[{i}]' are both empty: nothing to score"
                )
        return self

    def characters(self) -> int:
        """Characters of every text in the request (message roles and contents): the free token-budget bound."""
        items = [*self.prompts, *self.completions, *(self.references or [])]
        return sum(len(x) if isinstance(x, str) else sum(len(m["role"]) + len(m["content"]) for m in x) for x in items)


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
    completions in one request and `max_tokens` their tokens: refused unread above `MAX_CHARS_PER_TOKEN`
    characters a token, else counted with the scorer's tokenizer when it has `count_tokens` (the built-in scorers
    do), else estimated as UTF-8 bytes / 4 (413: split the request; the `remote` reward does so with its
    `batch_size`). `chunk` is the most completions per scorer call (`FairScheduler`); `schedule="fifo"` scores
    whole requests one at a time in arrival order instead (the server's earlier behaviour, kept as the baseline of
    scripts/bench_reward_server.py).
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
        if token is not None:
            _check_token(request, token)
        payload = _parse(await _read_body(request, max_body_bytes), max_batch)
        if not payload.completions:
            return JSONResponse({"scores": []})
        _check_tokens(scorer, payload, max_tokens)
        job = Job(payload.prompts, payload.completions, payload.references)
        await scheduler.run(job)
        return _answer(job)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **scheduler.load()})

    routes = [Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])]
    handlers = {PayloadError: _refused, ClientDisconnect: _disconnected, HTTPException: _http_error, Exception: _crash}
    return Starlette(routes=routes, exception_handlers=handlers)


def _answer(job: Job) -> JSONResponse:
    if isinstance(job.error, UserError):  # the scorer refuses the request as sent (written for the user)
        return _error(422, str(job.error))
    if isinstance(job.error, PayloadError):
        return _error(job.error.status, str(job.error))
    if job.error is not None:
        return _error(500, f"scorer raised {type(job.error).__name__}: {job.error}")
    return JSONResponse({"scores": job.scores}, headers={"X-Queue-Wait-Ms": f"{job.waited_ms:.1f}"})


# Starlette's exception handlers: every refusal, Starlette's own 404/405 and a crash answer the same JSON shape.


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PayloadError)
    return _error(exc.status, str(exc))


async def _disconnected(request: Request, exc: Exception) -> JSONResponse:
    client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
    log.warning("client %s disconnected %s (%s %s): request dropped", client, exc, request.method, request.url.path)
    return _error(400, "client disconnected before sending the whole body")  # never delivered: the client is gone


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}")


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


def _check_tokens(scorer: Any, payload: ScoreRequest, limit: int) -> None:
    """413 when the request holds more than `limit` tokens. First the free bound on its characters, so that no
    tokenizer reads a request far over the budget; then the scorer's own count, else UTF-8 bytes / 4."""
    chars = payload.characters()
    if chars > limit * MAX_CHARS_PER_TOKEN:
        raise PayloadError(413, f"request of {chars} characters exceeds the server's per-request budget of {limit} "
                                f"tokens (refused unread above {MAX_CHARS_PER_TOKEN} characters a token); split it")  # fmt: skip
    count = getattr(scorer, "count_tokens", None)
    if count is not None:
        n = int(count(payload.prompts, payload.completions, payload.references))
        how = "tokens"
    else:
        texts = [*payload.prompts, *payload.completions, *(payload.references or [])]
        n = sum(len(json.dumps(t, ensure_ascii=False).encode()) for t in texts) // 4
        how = "tokens (estimated as UTF-8 bytes / 4)"
    if n > limit:
        raise PayloadError(413, f"request of {n} {how} exceeds the server's per-request budget of {limit}; split it")


async def _read_body(request: Request, limit: int) -> bytes:
    # Refuse on the declared length first, then count while streaming (chunked bodies declare none), so an
    # oversize request is never held in memory whole (Starlette's `request.body()` has no bound).
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():  # uvicorn refuses these before the app; kept for other ASGI servers
            raise PayloadError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise PayloadError(413, f"request body of {int(declared)} bytes exceeds the server's limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadError(413, f"request body exceeds the server's limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as err:  # for `_disconnected`'s log line
        raise ClientDisconnect(f"after {size} of {declared or 'an undeclared number of'} body bytes") from err
    return b"".join(chunks)


def _parse(body: bytes, max_batch: int) -> ScoreRequest:
    # json.loads, not pydantic's model_validate_json: jiter refuses a "\ud800" escape as invalid JSON at a column,
    # where `_valid_unicode` names the field, and json's own messages (and its RecursionError) say what is wrong.
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PayloadError(400, f"malformed JSON: {err}") from err
    except RecursionError as err:
        raise PayloadError(400, "malformed JSON: nested deeper than the server parses") from err
    completions = payload.get("completions") if isinstance(payload, dict) else None
    if isinstance(completions, list) and len(completions) > max_batch:  # a limit (413), checked before validating
        raise PayloadError(
            413, f"batch of {len(completions)} completions exceeds the server's max_batch of {max_batch}; split it"
        )
    try:
        return ScoreRequest.model_validate(payload)
    except ValidationError as err:
        raise PayloadError(422, _explain(err)) from None


# pydantic error types whose message this server words itself: "'<field>' <phrase>, got <kind of value>".
_PHRASES = {"list_type": "must be a list", "string_type": "must be a string",
            "dict_type": "must be a {role, content} message object"}  # fmt: skip
_TAGS = ("text", "messages")  # the `Item` union's tags, in pydantic's error locations


def _explain(err: ValidationError) -> str:
    """pydantic's errors as one message naming each field (the first three)."""
    errors = err.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:  # a misspelt 'references' must not be silently dropped
        return f"unknown field(s) {unknown}; allowed: {', '.join(_FIELDS)}"
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(_say(e) for e in errors[:3]) + more


def _say(error: ErrorDetails) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "model_type":
        return f"the body must be a JSON object with 'prompts' and 'completions', got {_kind(error['input'])}"
    if not loc:  # ScoreRequest's own checks: their messages name the fields
        return error["msg"]
    # loc: ("prompts", 0, "messages", 1, "content"), with the union's tags: 'prompts[0][1].content'
    where = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:] if p not in _TAGS)
    if kind == "missing":
        return f"missing field '{where}'" + (" (a list of strings or message lists)" if len(loc) == 1 else "")
    if kind in _PHRASES or kind == "item_type":
        return f"'{where}' {_PHRASES.get(kind, error['msg'])}, got {_kind(error['input'])}"
    return f"'{where}' {error['msg']}"


def _text(item: Any) -> str:
    return item if isinstance(item, str) else "".join(m["content"] for m in item)


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
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
