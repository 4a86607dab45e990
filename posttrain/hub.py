"""`posttrain push RUN --repo-id ID`: a finished run on the Hugging Face Hub, in one commit.

The repo gets final/ at its root (its README.md is the run's model card, `posttrain.model_card`) and the run's report
under report/ (report.md with its plots, eval/'s sample grids, the resolved recipe), where the card's links point.
The Hub is reached through huggingface_hub, which reads `HF_ENDPOINT`, `HF_TOKEN` (or the token `hf auth login`
saved) and `HF_HUB_OFFLINE`. A run without a complete final/ is refused before anything is sent; offline mode, a
missing or refused token and an unreachable Hub each end in one line saying what to do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.model_card import CARD_NAME, report_files
from posttrain.runs import RunDir, loadable_model_dir

_NOTHING = "no file was uploaded"


class PushError(PosttrainError):
    """The run can't be pushed, or the Hub refused it."""


@dataclass
class Pushed:
    repo_url: str
    commit_url: str
    files: list[str]  # paths in the repo


def upload_plan(run: RunDir) -> dict[str, Path]:
    """Path in the repo -> local file: final/'s files at the root, the report under report/. A run dir without a
    complete final/ (config and weights, or a diffusion stack's unet) is refused."""
    if not run.path.is_dir():
        raise PushError(f"{run.path}: no such run dir ({_NOTHING})")
    if not run.final.is_dir():
        raise PushError(f"{run.final}: no such dir, the run has not finished (train it, or continue it with "
                        f"`posttrain train RECIPE --resume`); {_NOTHING}")  # fmt: skip
    if not loadable_model_dir(run.final):
        raise PushError(f"{run.final}: not a complete model dir (no config and weights); {_NOTHING}")
    if not (run.final / CARD_NAME).is_file():
        print(f"warning: {run.final / CARD_NAME} is missing (a run from before model cards): the repo gets no card",
              file=sys.stderr)  # fmt: skip
    files = {p.relative_to(run.final).as_posix(): p for p in sorted(run.final.rglob("*")) if p.is_file()}
    files.update(report_files(run))
    return files


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    store: str | Path | None = None,
) -> Pushed:
    """Create `repo_id` when missing (private when asked; an existing repo keeps its visibility) and commit the run's
    `upload_plan` to it, on branch `revision` (created when missing) or main. With a results `store`, the card first
    gets (or refreshes) a section with the store's results for final/ (`posttrain eval` runs after training)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run = RunDir(run_dir)
    files = upload_plan(run)
    if store is not None:
        add_store_results(run, Path(store))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, not when huggingface_hub was imported
    step = run.final_step()
    message = f"posttrain push {run.path.name}" + (f" (step {step})" if step is not None else "")
    with hub_errors(api.endpoint, repo_id):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return Pushed(repo_url=str(repo_url), commit_url=str(info.commit_url), files=sorted(files))


def add_store_results(run: RunDir, store: Path) -> None:
    """final/README.md with the results store's section for this model (written back atomically, so the local card
    is the uploaded one); a card-less run is left as it is."""
    from posttrain.model_card import store_table, with_store_table
    from posttrain.runs import write_atomic

    if not store.is_file():
        raise PushError(f"{store}: no results store there (--store names one `posttrain eval` wrote); {_NOTHING}")
    card = run.final / CARD_NAME
    if not card.is_file():
        return
    text = card.read_text()
    updated = with_store_table(text, store_table(store, run.final))
    if updated != text:
        write_atomic(card, updated)


@contextmanager
def hub_errors(endpoint: str, repo_id: str) -> Iterator[None]:
    """huggingface_hub's errors as one-line `PushError`s that say what to do."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transport = HfHubHTTPError.__bases__[0]  # the HTTP library's own base error (httpx's): connection, timeout
    try:
        yield
    except OfflineModeIsEnabled:
        raise PushError(f"HF_HUB_OFFLINE is set, so huggingface_hub reaches no Hub: unset it (`unset HF_HUB_OFFLINE`) "
                        f"to push; {_NOTHING}") from None  # fmt: skip
    except HfHubHTTPError as err:
        raise PushError(_refusal(err, endpoint, repo_id, token_found=get_token() is not None)) from None
    except ValueError as err:
        if CARD_NAME not in str(err):  # the Hub validates the card's metadata before the commit
            raise
        raise PushError(f"the Hub refused final/{CARD_NAME}: {' '.join(str(err).split())}; {_NOTHING}") from None
    except (transport, OSError) as err:
        raise PushError(f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}): check the network, or "
                        f"HF_ENDPOINT; {_NOTHING}") from None  # fmt: skip


def _refusal(err, endpoint: str, repo_id: str, token_found: bool) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        why = "the token was not accepted" if token_found else "no Hugging Face token was found"
        return (f"the Hub at {endpoint} refused the request (HTTP 401): {why}; log in with `hf auth login` or set "
                f"HF_TOKEN to a token with write access; {_NOTHING}")  # fmt: skip
    if status == 403:
        return f"no write access to {repo_id} (HTTP 403): use a token that may write there (HF_TOKEN); {_NOTHING}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the Hub at {endpoint} answered HTTP {status} for {repo_id}: {first}; {_NOTHING}"
