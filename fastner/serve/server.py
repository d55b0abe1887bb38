"""`fastner serve MODEL ...`: start the model process (fastner.serve.worker: it loads the tagger
once), build the app, run uvicorn. `--in-process` loads the tagger in this process instead.

uvicorn owns SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests finish
(their jobs are still queued or running on the model worker) for up to GRACEFUL_SHUTDOWN_SECONDS
and cancels those left (each answered 503: fastner.serve.shutdown), then runs the app's shutdown,
which drains the worker, joins it and stops the model process, and finally re-raises the signal:
the process ends with the status of one terminated by SIGTERM (-15 to a Python parent, 143 to a
shell), as process supervisors expect.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fastner.serve.config import MAX_TIMEOUT_S, MAX_WAIT_MS, PRECISIONS, ServeConfig, precision_name

GRACEFUL_SHUTDOWN_SECONDS = 30
ONEDNN_PRIMITIVE_CACHE = 32
# The server process's GIL switch interval with the model in a process of its own (CPython's
# default: 5 ms). The batcher thread's turn between two batches (take the answers off the pipe,
# send the next batch) needs the GIL, which the event loop thread holds under load; a waiting
# thread asks for it only after one interval. Measured at 32 clients (int8, 1 thread, Intel Xeon
# family 6 model 167, 2 cores): the model process idle between batches 13-14% -> 10.3% of the run,
# batching on 5,979 -> 6,103 documents/s (median of 6 alternating rounds; 20 us measured the same
# as 100 us). Not set with --in-process: there the model's own thread would be asked to yield.
SWITCH_INTERVAL_S = 1e-4
OMP_WAIT_POLICY = "PASSIVE"  # the model process's (see run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options (imports nothing heavy: the CLI parser builds fast).
    Numbers are checked by the CLI's own argparse types (`fastner: error: argument --port: ...`);
    ServeConfig checks them again for callers of create_app."""
    from fastner.cli_parser import COUNT, THREADS, _float_in, _int_from

    defaults = ServeConfig()
    parser.add_argument("model", help="tagger directory (read once at startup)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_int_from(0, 65535), default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--precision", type=precision_name, choices=PRECISIONS, default=defaults.precision,
                        help="fp32 (as trained), int8 or bf16 (the recurrent encoder quantized; CPU only), as "
                             f"fastner tag takes them, or float64 (the whole model) (default {defaults.precision})")
    parser.add_argument("--max-batch-tokens", type=COUNT, default=defaults.max_batch_tokens,
                        help=f"tokens per model call (default {defaults.max_batch_tokens})")
    parser.add_argument("--max-wait-ms", type=_float_in(0, MAX_WAIT_MS), default=defaults.max_wait_ms,
                        help=f"longest a request waits for others to share its model call (default {defaults.max_wait_ms:g})")
    parser.add_argument("--max-queue", type=COUNT, default=defaults.max_queue,
                        help=f"queued requests before answering 503 (default {defaults.max_queue})")
    parser.add_argument("--no-batching", action="store_true", help="one request per model call (a baseline)")
    parser.add_argument("--max-documents", type=COUNT, default=defaults.max_documents,
                        help=f"documents per request (default {defaults.max_documents})")
    parser.add_argument("--max-document-tokens", type=COUNT, default=defaults.max_document_tokens,
                        help=f"tokens per document (default {defaults.max_document_tokens})")
    parser.add_argument("--max-request-tokens", type=COUNT, default=defaults.max_request_tokens,
                        help=f"tokens per request, all documents together (default {defaults.max_request_tokens})")
    parser.add_argument("--max-body-bytes", type=COUNT, default=defaults.max_body_bytes,
                        help=f"request body limit (default {defaults.max_body_bytes})")
    parser.add_argument("--body-timeout-s", type=_float_in(0, MAX_TIMEOUT_S, low_open=True),
                        default=defaults.body_timeout_s,
                        help="408 once no part of a request body has come for this long: a stalled upload, not a "
                             f"slow one (default {defaults.body_timeout_s:g})")
    parser.add_argument("--header-timeout-s", type=_float_in(0, MAX_TIMEOUT_S, low_open=True),
                        default=defaults.header_timeout_s,
                        help="408 and the connection closed unless a request's line and headers have come this long "
                             "after the connection opened or the previous answer (default "
                             f"{defaults.header_timeout_s:g})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--threads", type=THREADS, default=1, help="torch threads of the model worker (default 1)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the model on a thread of the server's own process instead of a child process of "
                             "its own (sharing the GIL with the HTTP side: slower under load; a baseline)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default warning)")


def run(args) -> int:
    try:
        import uvicorn

        from fastner.serve.app import create_app
        from fastner.serve.connection import HeaderTimeoutProtocol  # noqa: F401 - needs httptools: said here
    except ImportError as err:
        raise ImportError(f"fastner serve needs FastAPI, uvicorn and httptools ({err}): pip install 'fastner[serve]'") from None
    import torch

    from fastner.serve.model import load_tagger
    from fastner.serve.worker import ModelProcess

    # oneDNN caches a compiled primitive per input shape (the char CNN's convolution sees a new
    # shape in nearly every batch), up to 1024 of them: measured as the server's memory growing
    # ~10 MiB a minute for minutes under load. Batches rarely repeat a shape, so a small cache
    # costs nothing measurable (CPU per document unchanged) and keeps memory flat. Read by oneDNN
    # at its first primitive, i.e. after this line: the model has not run yet.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE))
    # OpenMP's worker threads spin for a while after each parallel region before they sleep
    # (libgomp's default while OMP_WAIT_POLICY is unset): in the model process at --threads 2 they
    # spun on the cores that the HTTP side and its clients need. Measured at 32 clients (int8, 2
    # cores, Intel Xeon family 6 model 167; 3 alternating rounds): batching on 3,239 -> 5,297
    # docs/s median, on / direct 52% -> 85%; at --threads 1 (no worker threads) no change (7
    # rounds, medians within 3%, either way). Read by the model process's OpenMP when that process
    # imports torch, after this line; a value the user set is kept. (--in-process: this
    # process's OpenMP has started already, so there it changes nothing.)
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    config = ServeConfig(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         threads=args.threads, batching=not args.no_batching, max_body_bytes=args.max_body_bytes,
                         body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
                         max_documents=args.max_documents, max_document_tokens=args.max_document_tokens,
                         max_request_tokens=args.max_request_tokens,
                         precision=args.precision)
    # the event loop's thread runs no model code; one thread keeps it off the worker's cores
    torch.set_num_threads(1)
    if args.in_process:
        model = load_tagger(args.model, args.device, config.precision)
    else:
        # the child inherits the environment (the oneDNN cache's size above); a model that does
        # not load raises here as Tagger.load does (fastner: error: ... from the CLI)
        model = ModelProcess(args.model, args.device, config.precision, config.threads).start()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(model, config)
    print(json.dumps({"serving": args.model, "url": f"http://{args.host}:{args.port}/", "precision": config.precision,
                      "batching": config.batching, "threads": config.threads,
                      "model_process": not args.in_process}), file=sys.stderr, flush=True)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                **uvicorn_options(config))
    return 0


def uvicorn_options(config: ServeConfig, graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_SECONDS) -> dict:
    """uvicorn's settings for `config` (besides the address and the logging): its HTTP protocol
    with the header timeout (fastner.serve.connection), and the graceful shutdown's period. The
    tests run uvicorn with these (and a shorter period)."""
    from fastner.serve.connection import protocol_class

    return {"http": protocol_class(config.header_timeout_s), "timeout_graceful_shutdown": graceful_shutdown_s}
