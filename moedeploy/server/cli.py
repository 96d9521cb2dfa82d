"""`moedeploy serve`: load a model, start the engine, serve the OpenAI API with uvicorn until SIGTERM or Ctrl-C.
Under torchrun (expert parallelism) rank 0 serves and the other ranks follow its steps (parallel/serve.py)."""

from __future__ import annotations

import os
import signal
import socket
import sys

from ..cliargs import add_load_options, load_options
from ..errors import MoeDeployError

DEMO_NAME = "moedeploy-demo"


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    s.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    s.add_argument("--served-model-name", help="the model's name in the API (default: the checkpoint directory's name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(default: $MOEDEPLOY_API_KEY, else no key)")
    s.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step (default 256)")
    s.add_argument("--max-running", type=int, help="requests batched at once (default 64, at most --max-batch-tokens)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    s.add_argument("--max-model-len", type=int, help="prompt + output tokens (default: the model's context)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request ends with 504")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    s.add_argument("--threads", type=int, help="torch threads for the model (default: every core but one, at least 1: "
                   "the HTTP loop needs a core, and torch's threads slow down sharply when they share one)")
    s.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds in-flight requests may finish after SIGTERM (default 10)")
    add_load_options(s)
    s.set_defaults(func=run)


def run(args) -> int:
    import torch
    import uvicorn
    from transformers import AutoTokenizer

    from ..api import DEMO_MODEL, load
    from ..engine import Engine, EngineConfig
    from .app import ServerConfig, create_app

    config = EngineConfig(max_batch_tokens=args.max_batch_tokens, max_running=args.max_running,
                          max_queue=args.max_queue, max_model_len=args.max_model_len)
    if args.threads is not None and args.threads < 1:
        raise MoeDeployError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads or max(len(os.sched_getaffinity(0)) - 1, 1))
    model = load(args.model, **load_options(args))
    group = model.moedeploy.group  # an expert-parallel server: rank 0 serves, the other ranks follow its steps
    if group is not None and group.rank > 0:
        from ..parallel.serve import follow

        steps = follow(model, group)
        print(f"moedeploy: rank {group.rank} stopped after {steps} steps", file=sys.stderr)
        return 0
    path = model.moedeploy.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine_tokenizer = AutoTokenizer.from_pretrained(path)  # its own: the Rust tokenizer is not shared across threads
    except (OSError, ValueError) as ex:
        raise MoeDeployError(f"{path} has no usable tokenizer ({type(ex).__name__}); save one with the checkpoint") from ex
    runner = None
    if group is not None:
        from ..parallel.serve import LeaderRunner

        runner = LeaderRunner(model, group)
    engine = Engine(model, engine_tokenizer, config, runner)
    name = args.served_model_name or (DEMO_NAME if path == DEMO_MODEL else path.resolve().name)
    server = ServerConfig(model_name=name, api_key=args.api_key or os.environ.get("MOEDEPLOY_API_KEY") or None,
                          request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                          shutdown_grace=args.shutdown_grace)
    app = create_app(engine, tokenizer, server)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"moedeploy: serving '{name}' at http://{host}:{port}/v1 (max batch tokens {config.max_batch_tokens}, "
          f"max model len {engine.max_model_len}, {torch.get_num_threads()} torch threads"
          + (f"; rank 0 of {group.world}, pid {os.getpid()}: SIGTERM it to stop every rank" if group else "") + ")",
          file=sys.stderr, flush=True)
    uvicorn_config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(args.shutdown_grace) + 1)
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn shuts down gracefully on these, then raises them again for the handler it found: make that
        # handler note the stop, so a requested stop exits 0 instead of dying by the signal
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    uvicorn.Server(uvicorn_config).run(sockets=[sock])
    if runner is not None:
        runner.stop()  # the engine has drained: release the other ranks
    print(f"moedeploy: stopped ({'signal ' + str(stopped[0]) if stopped else 'server exited'})", file=sys.stderr)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that the port is known (and connections queue) before the server loop starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it Nagle's algorithm holds each streamed token back until the client's delayed ACK (about 40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as ex:
        sock.close()
        raise MoeDeployError(f"cannot listen on {host}:{port} ({ex.strerror}); choose another --port or --host") from ex
    sock.listen(2048)
    return sock
