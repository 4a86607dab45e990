"""The HTTP reward server, its `remote` client reward, the CLI, and the `sequence_classifier` reward."""

import contextlib
import json
import logging
import re
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from posttrain.errors import RewardError  # noqa: E402
from reward_models import resolve_reward  # noqa: E402
from reward_models.remote import remote_reward  # noqa: E402
from reward_models.scoring import Scorer  # noqa: E402
from reward_models.server import create_app  # noqa: E402


class LengthScorer:
    """Score = len(completion), plus len(reference) / 1000 when references are sent."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []
        self.delay = delay

    def score(self, prompts, completions, references=None):
        self.calls.append(len(completions))
        time.sleep(self.delay)
        refs = references or [""] * len(completions)
        return [len(c) + len(r) / 1000 for c, r in zip(completions, refs)]


class ExplodingOnce(LengthScorer):
    def score(self, prompts, completions, references=None):
        if not self.calls:
            self.calls.append(-1)
            raise RuntimeError("CUDA out of memory")
        return super().score(prompts, completions, references)


class Flaky:
    """ASGI wrapper: answers 503 to the first `failures` requests to /score, then passes through."""

    def __init__(self, app, failures: int):
        self.app, self.failures, self.seen = app, failures, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/score":
            self.seen += 1
            if self.seen <= self.failures:
                body = b'{"error": "warming up"}'
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@contextlib.contextmanager
def serving(app, **config):
    """Run `app` under a real uvicorn on a free localhost port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def post(client, payload, **kwargs):
    return client.post("/score", content=json.dumps(payload), **kwargs)


def test_fake_scorer_satisfies_the_protocol():
    assert isinstance(LengthScorer(), Scorer)


def test_score_round_trip_with_and_without_references():
    client = TestClient(create_app(LengthScorer()))
    response = post(client, {"prompts": ["p", "q"], "completions": ["abc", "de"]})
    assert response.status_code == 200
    assert response.json() == {"scores": [3.0, 2.0]}
    response = post(client, {"prompts": ["p"], "completions": ["abc"], "references": ["four"]})
    assert response.json() == {"scores": [3.004]}
    messages = [{"role": "user", "content": "hi"}]
    response = post(client, {"prompts": [messages], "completions": ["xy"]})
    assert response.json() == {"scores": [2.0]}
    assert client.get("/health").json()["status"] == "ok"


def test_malformed_json_is_400():
    scorer = LengthScorer()
    response = TestClient(create_app(scorer)).post("/score", content=b'{"prompts": ["p"], "completions": [')
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]
    assert scorer.calls == []


def test_oversize_body_is_413_whether_declared_or_streamed():
    scorer = LengthScorer()
    client = TestClient(create_app(scorer, max_body_bytes=100))
    big = {"prompts": ["p"], "completions": ["x" * 200]}
    response = post(client, big)
    assert response.status_code == 413
    assert "exceeds the server's limit of 100" in response.json()["error"]

    def chunks():  # no Content-Length: the server must count while reading
        yield b'{"prompts": ["p"], "completions": ["'
        for _ in range(10):
            yield b"x" * 50
        yield b'"]}'

    response = client.post("/score", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"] == "request body exceeds the server's limit of 100 bytes"
    assert scorer.calls == []
    assert post(client, {"prompts": ["p"], "completions": ["x"]}).status_code == 200


def test_batch_over_max_batch_is_413():
    client = TestClient(create_app(LengthScorer(), max_batch=2))
    response = post(client, {"prompts": ["p"] * 3, "completions": ["c"] * 3})
    assert response.status_code == 413
    assert "max_batch of 2" in response.json()["error"]


def test_bearer_token_is_required_when_set():
    scorer = LengthScorer()
    client = TestClient(create_app(scorer, token="s3cret"))
    payload = {"prompts": ["p"], "completions": ["abc"]}
    missing = post(client, payload)
    assert missing.status_code == 401
    assert "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = post(client, payload, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "wrong bearer token"
    assert scorer.calls == []
    right = post(client, payload, headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert right.json() == {"scores": [3.0]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [({"prompts": ["p", "q"], "completions": ["c"]}, "'prompts' has 2 items but 'completions' has 1"),
     ({"prompts": ["p"], "completions": ["c"], "references": []}, "'references' has 0 items but 'completions' has 1"),
     ({"prompts": ["p"]}, "missing field 'completions'"),
     ({"prompts": "p", "completions": ["c"]}, "'prompts' must be a list, got a string"),
     ({"prompts": ["p"], "completions": [3]}, "'completions[0]' must be a string or a list of"),
     ({"prompts": ["p"], "completions": ["c"], "reference": ["r"]}, "unknown field(s) ['reference']"),
     (["p", "c"], "the body must be a JSON object")],
)  # fmt: skip
def test_payload_of_the_wrong_shape_is_422_naming_the_field(payload, message):
    response = post(TestClient(create_app(LengthScorer())), payload)
    assert response.status_code == 422
    assert message in response.json()["error"]


def test_scorer_failure_is_500_and_the_server_keeps_serving():
    client = TestClient(create_app(ExplodingOnce()))
    payload = {"prompts": ["p"], "completions": ["abc"]}
    failed = post(client, payload)
    assert failed.status_code == 500
    assert failed.json()["error"] == "scorer raised RuntimeError: CUDA out of memory"
    assert post(client, payload).json() == {"scores": [3.0]}


def test_remote_reward_round_trip_through_a_real_server_in_batches():
    scorer = LengthScorer()
    with serving(create_app(scorer, token="tok", max_batch=2)) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("RM_TOKEN", "tok")
        reward = resolve_reward("remote")
        completions = ["a", "bb", "ccc", "dddd", "eeeee"]
        scores = reward(["p"] * 5, completions, url=url, token_env="RM_TOKEN", batch_size=2,
                        reference_column="reference", reference=["r"] * 5, answer=["unused"] * 5)  # fmt: skip
    assert scores == [1.001, 2.001, 3.001, 4.001, 5.001]
    assert scorer.calls == [2, 2, 1]  # split under the server's max_batch


def test_remote_reward_retries_after_a_503():
    scorer = LengthScorer()
    flaky = Flaky(create_app(scorer), failures=2)
    with serving(flaky) as url:
        scores = remote_reward(["p"], ["abc"], url=url, retries=2, backoff=0.01)
    assert scores == [3.0]
    assert flaky.seen == 3


def test_remote_reward_gives_up_after_its_retries():
    flaky = Flaky(create_app(LengthScorer()), failures=10)
    with serving(flaky) as url:
        with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\).*503: warming up"):
            remote_reward(["p"], ["abc"], url=url, retries=1, backoff=0.01)
    assert flaky.seen == 2


def test_remote_reward_times_out_and_retries():
    scorer = LengthScorer(delay=0.5)
    with serving(create_app(scorer)) as url:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\) \(timeout 0.1 s\).*timed out"):
            remote_reward(["p"], ["abc"], url=url, timeout=0.1, retries=1, backoff=0.01)
        assert time.monotonic() - start < 0.5  # did not wait for the slow scorer
    assert len(scorer.calls) >= 1


def test_remote_reward_does_not_retry_a_4xx_and_quotes_the_server():
    flaky = Flaky(create_app(LengthScorer(), token="tok"), failures=0)
    with serving(flaky) as url:
        with pytest.raises(RewardError, match=r"refused the request \(401\): missing bearer token"):
            remote_reward(["p"], ["abc"], url=url, retries=3, backoff=0.01)
    assert flaky.seen == 1


def test_remote_reward_connection_refused_is_retried_then_explained():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\).*(refused|Connection)"):
        remote_reward(["p"], ["abc"], url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01)


def test_remote_reward_explains_a_missing_token_variable_or_column(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(RewardError, match="'NO_SUCH_TOKEN' .* is not set"):
        remote_reward(["p"], ["c"], url="http://127.0.0.1:1", token_env="NO_SUCH_TOKEN")
    with pytest.raises(RewardError, match="needs the dataset column 'reference'"):
        remote_reward(["p"], ["c"], url="http://127.0.0.1:1", reference_column="reference", answer=["1"])


def test_sequence_classifier_reward_batches_match_one_by_one_and_load_once(tiny_model_dir, monkeypatch):
    import transformers

    from reward_models.sequence_classifier import cached_scorer

    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(counting))
    cached_scorer.cache_clear()
    reward = resolve_reward("sequence_classifier")
    prompts = ["1+2=", "12+30=", "7+8=", "100+1=", "5+5="]
    completions = ["3", "42 and more words to pad", "15", "101", "1"]
    kw = {"model": str(tiny_model_dir), "batch_size": 2, "max_length": 64}
    batched = reward(prompts, completions, **kw)
    alone = [reward([p], [c], **kw)[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) > 1  # a real score per text, not a constant
    assert loads == [str(tiny_model_dir)]
    conversational = reward([[{"role": "user", "content": p}] for p in prompts],
                            [[{"role": "assistant", "content": c}] for c in completions], **kw)  # fmt: skip
    assert len(conversational) == 5 and loads == [str(tiny_model_dir)]
    cached_scorer.cache_clear()


def test_sequence_classifier_scorer_refuses_references(tiny_model_dir):
    from reward_models.sequence_classifier import cached_scorer

    scorer = cached_scorer(str(tiny_model_dir), 16, 64)
    with pytest.raises(RewardError, match="cannot use references"):
        scorer.score(["p"], ["c"], ["r"])
    # Through the server the refusal is the caller's 422, not a 500.
    response = post(TestClient(create_app(scorer)), {"prompts": ["p"], "completions": ["c"], "references": ["r"]})
    assert response.status_code == 422
    assert "cannot use references" in response.json()["error"]
    cached_scorer.cache_clear()


def test_cli_serves_a_sequence_classifier_with_a_token_from_the_environment(tiny_model_dir, monkeypatch, capsys):
    from reward_models.__main__ import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("RM_TOKEN", "tok")
    argv = ["serve", "--kind", "sequence_classifier", "--model", str(tiny_model_dir), "--token-env", "RM_TOKEN",
            "--max-batch", "4", "--max-length", "64"]  # fmt: skip
    assert main(argv) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8000)
    assert "warning" not in capsys.readouterr().err
    client = TestClient(served["app"])
    payload = {"prompts": ["1+2="], "completions": ["3"]}
    assert post(client, payload).status_code == 401
    response = post(client, payload, headers={"Authorization": "Bearer tok"})
    assert response.status_code == 200 and len(response.json()["scores"]) == 1
    assert post(client, {"prompts": ["p"] * 5, "completions": ["c"] * 5}, headers={"Authorization": "Bearer tok"}
                ).status_code == 413  # fmt: skip


def test_cli_warns_on_an_open_bind_without_a_token_and_refuses_an_unset_token_variable(
    tiny_model_dir, monkeypatch, capsys
):
    from reward_models.__main__ import main

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", "--kind", "sequence_classifier", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    assert "without a token" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    argv = ["serve", "--kind", "sequence_classifier", "--model", str(tiny_model_dir), "--token-env", "NO_SUCH_TOKEN"]
    assert main(argv) == 2
    assert "'NO_SUCH_TOKEN' is not set" in capsys.readouterr().err


def test_cli_serves_a_polar_rm_that_needs_references(tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.models.tiny import build_tokenizer
    from reward_models.__main__ import main
    from reward_models.polar import PolarScorer, add_polar_tokens

    tokenizer = build_tokenizer("text")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    add_polar_tokens(model, tokenizer)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    assert main(["serve", "--kind", "polar", "--model", str(tmp_path / "rm"), "--device", "cpu"]) == 0
    client = TestClient(served["app"])
    payload = {"prompts": ["Q", "Q"], "completions": ["Paris", "Rome"], "references": ["Paris", "Paris"]}
    response = post(client, payload)
    assert response.status_code == 200
    expected = PolarScorer.from_pretrained(str(tmp_path / "rm"), device="cpu").score(
        payload["prompts"], payload["completions"], payload["references"]
    )
    assert response.json()["scores"] == pytest.approx(expected, abs=1e-5)
    refused = post(client, {"prompts": ["Q"], "completions": ["Paris"]})
    assert refused.status_code == 422
    assert "pass references" in refused.json()["error"]


def test_sequence_classifier_warns_when_the_head_is_untrained(tiny_model_dir):
    from reward_models.sequence_classifier import SequenceClassifierScorer

    with pytest.warns(UserWarning, match="no trained scalar head.*scores are random"):
        SequenceClassifierScorer(str(tiny_model_dir))


# ------------------------------------------------------------------ hostile requests, budgets and scheduling


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [(b"[" * 200_000 + b"]" * 200_000, 400, "nested deeper than the server parses"),
     (b'{"prompts": [' * 5000 + b'"p"' + b"]}" * 5000, 400, "nested deeper than the server parses"),
     (json.dumps({"prompts": [""], "completions": [""]}).encode(), 422, "'prompts[0]' and 'completions[0]' are both empty"),
     (b'{"prompts": ["p"], "completions": ["ok\\ud800"]}', 422, "'completions[0]' is not valid Unicode: lone surrogate"),
     (b'{"prompts": [[{"role": "user", "content": "\\udfff"}]], "completions": ["c"]}', 422,
      "'prompts[0][0].content' is not valid Unicode"),
     (b'{"prompts": ["p"], "completions": ["c"]', 400, "malformed JSON"),
     (b"\xff\xfe", 400, "malformed JSON")],
)  # fmt: skip
def test_hostile_bodies_get_a_json_error_naming_the_reason(body, status, words):
    scorer = LengthScorer()
    response = TestClient(create_app(scorer), raise_server_exceptions=False).post("/score", content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    assert scorer.calls == []


def test_an_unexpected_crash_is_still_json():
    class Broken:
        def score(self, prompts, completions, references=None):
            return [1.0] * len(completions)

        def count_tokens(self, *args):
            raise KeyError("boom")  # a bug outside the scorer call: caught by the app's last-resort handler

    response = post(
        TestClient(create_app(Broken()), raise_server_exceptions=False), {"prompts": ["p"], "completions": ["c"]}
    )
    assert response.status_code == 500 and response.json() == {"error": "internal error: KeyError"}


@pytest.mark.parametrize("header", ["Bearer tok", "bearer tok", "BEARER  tok ", "BeArEr tok"])
def test_the_auth_scheme_is_case_insensitive(header):
    response = post(TestClient(create_app(LengthScorer(), token="tok")), {"prompts": ["p"], "completions": ["abc"]},
                    headers={"Authorization": header})  # fmt: skip
    assert response.status_code == 200, response.json()


def test_another_auth_scheme_is_named():
    response = post(TestClient(create_app(LengthScorer(), token="tok")), {"prompts": ["p"], "completions": ["abc"]},
                    headers={"Authorization": "Basic dG9rOg=="})  # fmt: skip
    assert response.status_code == 401 and "unsupported authorization scheme 'Basic'" in response.json()["error"]


def test_a_request_over_the_token_budget_is_413_counted_by_the_scorer_or_estimated():
    class Counting(LengthScorer):
        def count_tokens(self, prompts, completions, references=None):
            return sum(len(c.split()) for c in completions)

    counting = Counting()
    client = TestClient(create_app(counting, max_tokens=10))
    assert post(client, {"prompts": ["p"] * 2, "completions": ["a b c d e"] * 2}).status_code == 200
    over = post(client, {"prompts": ["p"] * 3, "completions": ["a b c d e"] * 3})
    assert over.status_code == 413
    assert over.json()["error"] == "request of 15 tokens exceeds the server's per-request budget of 10; split it"
    assert counting.calls == [2]
    # Without count_tokens: UTF-8 bytes / 4 of the JSON strings, said so.
    estimated = post(
        TestClient(create_app(LengthScorer(), max_tokens=10)), {"prompts": ["p"], "completions": ["x" * 60]}
    )
    assert estimated.status_code == 413 and "estimated as UTF-8 bytes / 4" in estimated.json()["error"]


def test_the_built_in_scorer_counts_tokens_with_its_tokenizer(tiny_model_dir):
    from reward_models.sequence_classifier import SequenceClassifierScorer

    with pytest.warns(UserWarning, match="no trained scalar head"):
        scorer = SequenceClassifierScorer(str(tiny_model_dir), max_length=64)
    texts = [scorer.text("1+2=", "3"), scorer.text("10+20=", "30")]
    expected = sum(len(scorer.tokenizer(t)["input_ids"]) for t in texts)
    assert scorer.count_tokens(["1+2=", "10+20="], ["3", "30"]) == expected > 0


def test_a_malformed_content_length_is_refused_by_uvicorn_before_the_app():
    """h11 rejects the request before any ASGI app sees it, so uvicorn answers (plain text: it has no public hook
    for that body) and the scorer is never reached; the server keeps serving."""
    scorer = LengthScorer()
    with serving(create_app(scorer)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}")
            raw = b""
            while chunk := conn.recv(4096):
                raw += chunk
        assert remote_reward(["p"], ["abc"], url=url) == [3.0]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request received" in body
    assert scorer.calls == [1]


def test_a_client_that_disconnects_mid_body_is_one_log_line(caplog):
    scorer = LengthScorer()
    caplog.set_level(logging.INFO)

    def disconnected():
        return [r for r in caplog.records if "disconnected" in r.getMessage()]

    # log_config=None: uvicorn's own loggers propagate to caplog too, so a traceback it logs would be seen.
    with serving(create_app(scorer), log_config=None) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b'POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"prompts": [')
            time.sleep(0.2)  # the app is reading the body
        deadline = time.monotonic() + 10
        while not disconnected() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert remote_reward(["p"], ["abc"], url=url) == [3.0]  # and it keeps serving
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    (line,) = warnings
    assert line.name == "reward_models.server" and line.exc_info is None and line is disconnected()[0]
    assert re.search(r"disconnected after \d+ of 1000 body bytes \(POST /score\): request dropped", line.getMessage())
    assert scorer.calls == [1]


class CountingChars(LengthScorer):
    """count_tokens: one token a character (like the tiny model's tokenizer), its calls recorded."""

    def __init__(self):
        super().__init__()
        self.counted: list[int] = []

    def count_tokens(self, prompts, completions, references=None):
        self.counted.append(len(completions))
        return sum(len(p) + len(c) for p, c in zip(prompts, completions))


def test_a_request_far_over_the_token_budget_is_refused_before_it_is_tokenised():
    from reward_models.server import MAX_CHARS_PER_TOKEN

    scorer = CountingChars()
    client = TestClient(create_app(scorer, max_tokens=100))
    over = post(client, {"prompts": ["p"], "completions": ["x" * (100 * MAX_CHARS_PER_TOKEN)]})
    assert over.status_code == 413
    assert over.json()["error"].startswith(
        f"request of {100 * MAX_CHARS_PER_TOKEN + 1} characters exceeds the server's per-request budget of 100 tokens"
    )
    assert scorer.counted == [] and scorer.calls == []
    # Under the character bound: counted exactly (and refused on the count).
    counted = post(client, {"prompts": ["p"], "completions": ["x" * 200]})
    assert counted.status_code == 413 and counted.json()["error"].startswith("request of 201 tokens exceeds")
    assert scorer.counted == [1] and scorer.calls == []
    assert post(client, {"prompts": ["p"], "completions": ["x" * 99]}).json() == {"scores": [99.0]}
    assert scorer.counted == [1, 1] and scorer.calls == [1]


def test_the_built_in_scorer_does_not_tokenise_a_request_far_over_the_budget(tiny_model_dir):
    from reward_models.sequence_classifier import SequenceClassifierScorer

    with pytest.warns(UserWarning, match="no trained scalar head"):
        scorer = SequenceClassifierScorer(str(tiny_model_dir), max_length=64)
    tokenizer, calls = scorer.tokenizer, []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            calls.append(sum(map(len, texts)))
            return tokenizer(texts, **kwargs)

    scorer.tokenizer = Spy()
    client = TestClient(create_app(scorer, max_tokens=64))
    assert post(client, {"prompts": ["1+2="], "completions": ["3" * 1000]}).status_code == 413
    assert calls == []
    assert post(client, {"prompts": ["1+2="], "completions": ["3"]}).status_code == 200
    assert calls == [5, 5]  # counted, then scored: the spy sees the tokenizer's calls


@pytest.mark.parametrize(
    ("payload", "message"),
    [({"prompts": [[{"role": "user"}]], "completions": ["c"]}, "missing field 'prompts[0][0].content'"),
     ({"prompts": [[{"role": 3, "content": "x"}]], "completions": ["c"]}, "'prompts[0][0].role' must be a string, got a number"),
     ({"prompts": [["hi"]], "completions": ["c"]}, "'prompts[0][0]' must be a {role, content} message object, got a string"),
     ({"prompts": ["p"], "completions": ["c"], "references": "r"}, "'references' must be a list, got a string"),
     ({"prompts": ["p", "q"], "completions": [None, {"text": "c"}]},
      "'completions[0]' must be a string or a list of {role, content} string messages, got null; "
      "'completions[1]' must be a string or a list of {role, content} string messages, got an object"),
     ({"prompts": ["p"] * 5, "completions": [1] * 5}, "'completions[2]' must be a string or a list of {role, "
      "content} string messages, got a number (and 2 more)"),
     ({"prompts": ["p"], "completions": ["c"], "reference": [], "extra": 1},
      "unknown field(s) ['extra', 'reference']; allowed: prompts, completions, references"),
     ({"prompts": ["p"], "completions": ["c"], "references": ["r", "s"]}, "'references' has 2 items but 'completions' has 1")],
)  # fmt: skip
def test_pydantic_errors_are_one_message_naming_each_field(payload, message):
    response = post(TestClient(create_app(LengthScorer())), payload)
    assert response.status_code == 422
    assert message in response.json()["error"], response.json()["error"]


def test_messages_and_null_references_pass_to_the_scorer_as_sent():
    class Recording(LengthScorer):
        def score(self, prompts, completions, references=None):
            self.seen = (prompts, references)
            return super().score(prompts, [c if isinstance(c, str) else "" for c in completions], references)

    scorer = Recording()
    prompt = [{"role": "user", "content": "hi", "name": "ann"}]
    response = post(TestClient(create_app(scorer)), {"prompts": [prompt], "completions": ["ab"], "references": None})
    assert response.json() == {"scores": [2.0]} and scorer.seen == ([prompt], None)


def test_a_large_request_does_not_hold_a_small_one_for_its_whole_duration():
    """80 completions at 4 per scorer call (20 calls of 50 ms, ~1 s) against 1 completion sent 150 ms later: the
    small one is answered within a few calls, long before the large one."""
    scorer = LengthScorer(delay=0.05)
    done = {}
    with serving(create_app(scorer, chunk=4)) as url:

        def send(name, n):
            begin = time.monotonic()
            done[name] = (remote_reward(["p"] * n, ["ab"] * n, url=url, batch_size=100), time.monotonic() - begin,
                          time.monotonic())  # fmt: skip

        large = threading.Thread(target=send, args=("large", 80))
        large.start()
        time.sleep(0.15)
        send("small", 1)
        large.join(30)
    assert done["large"][0] == [2.0] * 80 and done["small"][0] == [2.0]
    assert done["small"][1] < 0.4, done["small"][1]  # whole-request FIFO would make it wait ~0.85 s
    assert done["small"][2] < done["large"][2] - 0.3
    assert sum(scorer.calls) == 81 and max(scorer.calls) == 4  # never more than a chunk per call


def test_in_a_shared_call_an_error_reaches_only_the_request_that_caused_it():
    import anyio

    from reward_models.errors import UserError
    from reward_models.server import FairScheduler, Job

    class Picky(LengthScorer):
        def score(self, prompts, completions, references=None):
            if "bad" in completions:
                raise UserError("cannot score 'bad'")
            return super().score(prompts, completions, references)

    scorer = Picky()
    scheduler = FairScheduler(scorer, chunk=8)
    good, bad, other = Job(["p"] * 3, ["a", "bb", "ccc"], None), Job(["p"], ["bad"], None), Job(["p"], ["r"], ["x"])
    scheduler.jobs += [good, bad, other]
    assert scheduler.load() == {"queued_requests": 3, "queued_completions": 5}
    batch = scheduler._take()
    assert [(j is good, a, b) for j, a, b in batch] == [(True, 0, 3), (False, 0, 1)]  # same kind only: no refs
    anyio.run(lambda: anyio.to_thread.run_sync(scheduler._score, batch))
    assert good.scores == [1.0, 2.0, 3.0] and good.error is None and good.finished
    assert isinstance(bad.error, UserError) and bad.scores == [None]
    assert scorer.calls == [3]  # the shared call failed; then good alone (3) succeeded, bad alone failed
    assert other.next == 0  # with references: the next call's


def test_health_reports_the_queue():
    assert TestClient(create_app(LengthScorer())).get("/health").json() == {
        "status": "ok", "queued_requests": 0, "queued_completions": 0}  # fmt: skip


def test_cli_names_a_missing_model_dir(tmp_path, capsys):
    from reward_models.__main__ import main

    assert main(["serve", "--kind", "sequence_classifier", "--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
