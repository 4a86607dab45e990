"""The `remote` reward: score completions on a reward server (`python -m reward_models serve`) over HTTP.

Standard library only (urllib), so a training job needs nothing extra to call a server.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from reward_models.errors import RewardError
from reward_models.registry import register

# Transient: the server is starting, restarting, overloaded, or the network dropped the connection.
_TRANSIENT = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)


@register("remote", column_options=("reference_column",), service_option="url")
def remote_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    url: str,
    token_env: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    reference_column: str | None = None,
    batch_size: int = 64,
    **columns: Any,
) -> list[float]:
    """Scores from a reward server at `url` (its base URL, e.g. http://rm-node:8000).

    The bearer token is read from the environment variable `token_env` (never from the recipe). Each request of
    at most `batch_size` completions (keep it at or under the server's --max-batch) gets `timeout` seconds; on a
    connection error, a timeout or a 5xx it is retried up to `retries` times, waiting `backoff`, 2x`backoff`, ...
    seconds. A 4xx is the request's fault and raises at once with the server's message. `reference_column`
    names the dataset column sent as references (POLAR needs one; a classic RM server refuses them).
    """
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/score"):
        endpoint += "/score"
    headers = {"Content-Type": "application/json"}
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise RewardError(f"reward 'remote': environment variable '{token_env}' (token_env) is not set")
        headers["Authorization"] = f"Bearer {token}"
    references = None
    if reference_column is not None:
        if reference_column not in columns:
            raise RewardError(
                f"reward 'remote' needs the dataset column '{reference_column}' (reference_column); "
                f"columns passed: {', '.join(sorted(columns)) or 'none'}"
            )
        references = [_wire(r) for r in columns[reference_column]]
    if batch_size <= 0:
        raise RewardError(f"reward 'remote': batch_size must be positive, got {batch_size}")
    scores: list[float] = []
    for start in range(0, len(completions), batch_size):
        end = start + batch_size
        payload: dict[str, Any] = {
            "prompts": [_wire(p) for p in prompts[start:end]],
            "completions": [_wire(c) for c in completions[start:end]],
        }
        if references is not None:
            payload["references"] = references[start:end]
        scores.extend(_post(endpoint, payload, headers, timeout, retries, backoff))
    return scores


def _wire(item: Any) -> Any:
    """A prompt/completion/reference as the server accepts it: a string, or messages with string contents."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and all(isinstance(m, Mapping) and "content" in m for m in item):
        return [{"role": str(m.get("role", "user")), "content": _content_text(m["content"])} for m in item]
    return str(item)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # multimodal content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


def _post(endpoint: str, payload: dict, headers: dict[str, str], timeout: float, retries: int, backoff: float):
    data = json.dumps(payload).encode()
    n = len(payload["completions"])
    for attempt in range(retries + 1):
        request = urllib.request.Request(endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # before URLError: HTTPError is one
            message = _server_message(err)
            if err.code < 500:
                raise RewardError(f"reward 'remote': {endpoint} refused the request ({err.code}): {message}") from err
            problem = f"{err.code}: {message}"
        except _TRANSIENT as err:
            reason = getattr(err, "reason", err)
            problem = f"{type(reason).__name__}: {reason}"
        except json.JSONDecodeError as err:
            raise RewardError(f"reward 'remote': {endpoint} answered with malformed JSON ({err})") from err
        else:
            scores = body.get("scores") if isinstance(body, Mapping) else None
            if not isinstance(scores, list) or len(scores) != n:
                raise RewardError(f"reward 'remote': {endpoint} answered {str(body)[:200]!r}; expected {n} scores")
            return scores
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise RewardError(
        f"reward 'remote': {endpoint} failed after {retries + 1} attempt(s) (timeout {timeout} s); last error {problem}"
    )


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read()
    except Exception:
        return str(err.reason)
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500] or str(err.reason)
    return str(body.get("error", body)) if isinstance(body, Mapping) else str(body)
