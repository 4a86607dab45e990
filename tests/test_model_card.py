"""final/README.md, a run's Hub model card (parsed back with huggingface_hub's ModelCard), and `posttrain push`
against a local stand-in of the Hub API: what it uploads, and the one-line errors (no final/, offline, no or a
refused token, no Hub there)."""

import base64
import dataclasses
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from posttrain.cli import main
from posttrain.model_card import card_metadata, held_out_table, report_files
from posttrain.registry import get_spec
from posttrain.runs import RunDir
from posttrain.train import train_recipe
from posttrain.trainers.lifecycle import finish
from tests.test_trainers import load, sft_recipe

CARD = {"license": "apache-2.0", "tags": ["arithmetic"], "datasets": ["openai/gsm8k"], "language": ["en"]}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT run (8 steps, held-out before and after) with a `card:` section: (run dir, recipe, result)."""
    tmp = tmp_path_factory.mktemp("card")
    data = sft_recipe(tmp, max_steps=8, save_steps=100, logging_steps=4)
    data["data"]["train"]["n"], data["data"]["eval"]["n"] = 256, 32
    data["card"] = CARD
    recipe = load(tmp, data)
    result = train_recipe(recipe)
    return RunDir(tmp / "run"), recipe, result


def _eval_json_metrics(run: RunDir, tag: str) -> dict[str, float]:
    saved = json.loads((run.eval_dir / f"arith.{tag}.json").read_text())
    metrics = {"eval/arith/accuracy": saved["accuracy"]}
    metrics.update({f"eval/arith/accuracy[{s}]": v["accuracy"] for s, v in saved["slices"].items()})
    return metrics


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| eval/")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_a_finished_run_has_a_model_card_the_hub_library_parses(sft_run):
    run, recipe, _ = sft_run
    card = ModelCard.load(run.final / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["datasets"] == ["openai/gsm8k"]
    assert meta["tags"] == ["posttrain", "sft", "arithmetic"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a tiny model built on the fly: no hub id to name
    assert get_spec("sft").paper in card.text and "https://arxiv.org/abs/2203.02155" in card.text
    # The resolved recipe, verbatim, in a yaml block.
    block = re.search(r"```yaml\n(.*?)```", card.text, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load((run.path / "recipe.resolved.yaml").read_text())
    # The eval table: the run's own before/after numbers, per metric, as eval/*.json saved them.
    rows = _table_rows(card.text)
    before, after = _eval_json_metrics(run, "before"), _eval_json_metrics(run, "after")
    assert set(rows) == set(before) == set(after)
    for key, (b, a, change) in rows.items():
        assert float(b) == pytest.approx(before[key], abs=5e-4) and float(a) == pytest.approx(after[key], abs=5e-4)
        assert float(change) == pytest.approx(after[key] - before[key], abs=5e-4)
    # Figures link where `posttrain push` puts the report.
    assert "![curves](report/curves.png)" in card.text and "report/curves.png" in report_files(run)
    assert "AutoModelForCausalLM.from_pretrained(repo)" in card.text


def test_the_eval_table_compares_the_last_before_and_after_records():
    records = [
        {"step": 0, "stage": "s:before", "eval/x/accuracy": 0.25, "time": 1.0},
        {"step": 5, "stage": "s", "loss": 1.0},
        {"step": 9, "stage": "s:after", "eval/x/accuracy": 0.5, "time": 2.0},
        {"step": 9, "stage": "s:after", "eval/x/accuracy": 0.625, "eval/x/score": 3.0, "flag": True},  # resumed
        {"step": 9, "stage": "other:after", "eval/x/accuracy": 0.0},
    ]
    rows = _table_rows("\n".join(held_out_table(records, "s")))
    assert rows == {"eval/x/accuracy": ["0.25", "0.625", "+0.375"], "eval/x/score": ["–", "3", "–"]}
    assert "No held-out evaluation" in held_out_table(records, "nothing")[0]


def test_base_model_metadata_is_a_hub_id_never_a_local_path(sft_run, tiny_model_dir):
    run, recipe, _ = sft_run
    spec = get_spec("sft")

    def base(path, card_base=None):
        edited = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=path, tiny=None),
                                     card=dataclasses.replace(recipe.card, base_model=card_base))  # fmt: skip
        return card_metadata(edited, spec, run.final).to_dict().get("base_model")

    assert base(str(tiny_model_dir)) is None
    assert base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base(str(tiny_model_dir), card_base="Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_a_card_that_cannot_be_written_costs_a_warning_not_the_run(sft_run, tmp_path, monkeypatch, capsys):
    run, recipe, result = sft_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.path, copy.path)
    (copy.final / "README.md").unlink()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("posttrain.model_card.build_model_card", broken)
    finish(copy, recipe, result)
    assert "warning: no model card written" in capsys.readouterr().err
    assert (copy.path / "report.md").exists() and (copy.final / "model.safetensors").exists()
    assert not (copy.final / "README.md").exists()


# ------------------------------------------------------------------------------------ a stand-in of the Hub API


class StandInHub(ThreadingHTTPServer):
    """The endpoints huggingface_hub's create_repo, create_branch and create_commit call, with every file sent
    inline (preupload answers "regular"): repos[repo_id][branch] = {path: bytes}."""

    def __init__(self, token: str | None = "hf_stand_in"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token, self.repos, self.created, self.requests = token, {}, [], []
        self.card_errors: list[str] = []  # what /api/validate-yaml finds wrong in a README's metadata

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._answer(401 if not self._authorized() else 404, {"error": "stand-in"})

    def do_POST(self):
        hub, body = self.server, self._body()
        hub.requests.append(("POST", self.path))
        if not self._authorized():
            return self._answer(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            hub.created.append(payload)
            hub.repos.setdefault(repo_id, {"main": {}})
            return self._answer(200, {"url": f"{hub.url}/{repo_id}"})
        if self.path == "/api/validate-yaml":
            errors = [{"message": m} for m in hub.card_errors]
            return self._answer(400 if errors else 200, {"errors": errors, "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^/?]+)(\?.*)?", self.path)
        if not match or match.group(1) not in hub.repos:
            return self._answer(404, {"error": f"stand-in: no {self.path}"})
        repo, action, rev = match.group(1), match.group(2), match.group(3)
        if action == "branch":
            hub.repos[repo].setdefault(rev, dict(hub.repos[repo]["main"]))
            return self._answer(200, {})
        if action == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]  # fmt: skip
            return self._answer(200, {"files": files})
        if rev not in hub.repos[repo]:
            return self._answer(404, {"error": f"stand-in: no branch {rev}"})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                hub.repos[repo][rev][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        self._answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with huggingface_hub pointed at it: online, token hf_stand_in, no saved token file."""
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when huggingface_hub was imported
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


def test_push_uploads_final_and_the_report_in_one_commit(sft_run, hub, capsys):
    run, _, _ = sft_run
    assert main(["push", str(run.path), "--repo-id", "me/sft-card", "--private"]) == 0
    uploaded = hub.repos["me/sft-card"]["main"]
    final = {p.relative_to(run.final).as_posix() for p in run.final.rglob("*") if p.is_file()}
    assert set(uploaded) == final | set(report_files(run))
    assert {"report/report.md", "report/curves.png", "report/recipe.resolved.yaml"} <= set(uploaded)
    assert uploaded["README.md"] == (run.final / "README.md").read_bytes()
    assert uploaded["model.safetensors"] == (run.final / "model.safetensors").read_bytes()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", uploaded["README.md"].decode()):
        assert link in uploaded  # every figure the card shows is in the repo
    [created] = hub.created
    assert (created["organization"], created["name"]) == ("me", "sft-card")
    assert created.get("visibility") == "private" or created.get("private") is True  # huggingface_hub 2 / 1
    assert [path for method, path in hub.requests if "/commit/" in path] == ["/api/models/me/sft-card/commit/main"]
    assert f"{hub.url}/me/sft-card" in capsys.readouterr().out


def test_push_to_a_branch_creates_it_and_commits_there(sft_run, hub):
    run, _, _ = sft_run
    assert main(["push", str(run.path), "--repo-id", "me/sft-card", "--revision", "v1"]) == 0
    assert hub.repos["me/sft-card"]["main"] == {}
    assert hub.repos["me/sft-card"]["v1"]["README.md"] == (run.final / "README.md").read_bytes()


def test_push_refuses_a_run_without_final(hub, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert main(["push", str(tmp_path / "run"), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / "final") in err and "has not finished" in err and len(err.splitlines()) == 1
    assert hub.requests == []  # refused before anything was sent


def test_push_offline_says_to_unset_hf_hub_offline(sft_run, hub, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(sft_run[0].path), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "unset HF_HUB_OFFLINE" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert hub.requests == []


@pytest.mark.parametrize("token", ["hf_wrong", None])
def test_push_without_a_valid_token_says_how_to_log_in(sft_run, hub, monkeypatch, capsys, token):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    assert main(["push", str(sft_run[0].path), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    why = "no Hugging Face token was found" if token is None else "the token was not accepted"
    assert "HTTP 401" in err and why in err and "hf auth login" in err and len(err.splitlines()) == 1
    assert hub.repos == {}


def test_push_to_an_unreachable_hub_says_so(sft_run, hub, monkeypatch, capsys):
    hub.shutdown()
    hub.server_close()  # nothing listens on its port any more
    assert main(["push", str(sft_run[0].path), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Hub at {hub.url}" in err and len(err.splitlines()) == 1


def test_push_of_a_card_the_hub_rejects_names_what_it_found(sft_run, hub, capsys):
    hub.card_errors = ['"license" must be one of the Hub\'s license ids']
    assert main(["push", str(sft_run[0].path), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "refused final/README.md" in err and "license" in err and len(err.splitlines()) == 1
    assert hub.repos["me/x"] == {"main": {}}  # the repo was created, nothing committed


def test_push_adds_the_results_store_s_evaluations_of_final_to_the_card_once(sft_run, hub, tmp_path, monkeypatch):
    """`posttrain eval` results of final/ (its path as given, from another working directory too) go into the card
    as a section, refreshed, not repeated, on the next push; other models' results stay out."""
    from posttrain.evaluation.store import ResultRecord, ResultsStore

    run, _, _ = sft_run
    store_path = tmp_path / "results.db"
    store = ResultsStore(store_path)
    store.add(ResultRecord(model=str(run.final), model_label="sft", benchmark="arith", suite="arithmetic",
                           settings={"n": 1}, metrics={"accuracy": 0.625, "accuracy_stderr": 0.02}, n=40))  # fmt: skip
    store.add(ResultRecord(model="someone/else", model_label="else", benchmark="arith", settings={"n": 1},
                           metrics={"accuracy": 0.111}, n=40))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["push", str(run.path), "--repo-id", "me/sft-store", "--store", str(store_path)]) == 0
    text = hub.repos["me/sft-store"]["main"]["README.md"].decode()
    assert text.count("## Benchmarks (results store)") == 1
    assert "| arith | arithmetic | accuracy | 0.625 | 40 |" in text and "0.111" not in text
    assert text.index("## Benchmarks (results store)") < text.index("## How to use")
    assert ModelCard.load(run.final / "README.md").text == ModelCard(text).text  # the local card is the uploaded one
    assert main(["push", str(run.path), "--repo-id", "me/x", "--store", str(tmp_path / "none.db")]) == 2
