"""`python -m reward_models serve`: run the HTTP reward server (reward_models/server.py) on one reward model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from reward_models.errors import UserError

KINDS = ("polar", "sequence_classifier")


def parser() -> argparse.ArgumentParser:
    from reward_models.server import DEFAULT_CHUNK, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS

    top = argparse.ArgumentParser(prog="python -m reward_models", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a reward model over HTTP (POST /score, GET /health)")
    serve.add_argument("--kind", choices=KINDS, required=True, help="what the model is")
    serve.add_argument("--model", required=True, help="local reward model dir")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    # The token never goes on the command line: other users of the machine can read it in `ps`.
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--token-env", metavar="VAR", help="require the bearer token held in environment variable VAR")
    token.add_argument("--token-file", metavar="PATH", type=Path, help="require the bearer token stored in PATH")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most completions per request")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    serve.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens in one request")
    serve.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                       help="most completions per scorer call, gathered round-robin across waiting requests")  # fmt: skip
    serve.add_argument("--schedule", choices=("fair", "fifo"), default="fair",
                       help="fair: chunks round-robin across requests; fifo: whole requests in arrival order")  # fmt: skip
    serve.add_argument("--batch-size", type=int, default=16, help="forward-pass batch size on the model")
    serve.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    serve.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return top


def read_token(args: argparse.Namespace) -> str | None:
    if args.token_env:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise UserError(f"--token-env: environment variable '{args.token_env}' is not set or empty")
        return token
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as err:
            raise UserError(f"--token-file: cannot read {args.token_file}: {err}") from err
        if not token:
            raise UserError(f"--token-file: {args.token_file} is empty")
        return token
    return None


def load_scorer(kind: str, model: str, *, batch_size: int, max_length: int | None, device: str | None) -> Any:
    if not Path(model).is_dir():  # else transformers answers with a hub repo-id message that misleads here
        what = "is a file, not a model dir" if Path(model).exists() else "no such directory"
        raise UserError(f"--model {model}: {what} (the server loads a local reward model dir)")
    if kind == "polar":
        from reward_models.polar import PolarScorer  # lazily: only a POLAR server needs it

        return PolarScorer.from_pretrained(model, max_length=max_length, batch_size=batch_size, device=device)
    from reward_models.sequence_classifier import SequenceClassifierScorer

    kwargs: dict[str, Any] = {"batch_size": batch_size, "device": device}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return SequenceClassifierScorer.from_pretrained(model, **kwargs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from reward_models.server import create_app

    token = read_token(args)
    if token is None and not is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without a token: anyone who can reach port {args.port} can use "
            "this GPU; set --token-env or --token-file",
            file=sys.stderr,
        )
    scorer = load_scorer(
        args.kind, args.model, batch_size=args.batch_size, max_length=args.max_length, device=args.device
    )
    app = create_app(scorer, token=token, max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                     max_tokens=args.max_tokens, chunk=args.chunk, schedule=args.schedule)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
