"""Load test of `fastner serve`, on loopback only, bounded in requests and seconds.

    python -m fastner.serve.loadtest MODEL [--documents eng.testa] [--clients 32] [--seconds 10]
    python -m fastner.serve.loadtest MODEL --soak 300        # memory over a 5-minute run

Each scenario starts a real `fastner serve` process (fastner.serve.process) and drives it from
this process with C concurrent keep-alive HTTP/1.1 clients (a minimal asyncio client: an HTTP
library's own per-request cost would be measured as the server's). It reports documents/s,
tokens/s, p50/p95/p99 latency and error counts for dynamic batching on and off at 1 and 2 torch
threads, and the throughput of calling the model directly (fastner.serve.model.predict_documents,
the server's own model call) on batches of the size the server formed. Every response is
checked against a direct call on the same text: a lost, mismatched or swapped answer counts as
an error. Then: the latency of a single 30-token sentence at half the measured capacity (an
open-loop arrival rate, latency counted from the scheduled send), and an overload run past a
small queue, where the excess must get 503 with Retry-After, not timeouts or a crash.

The documents are sentences of a CoNLL file (the dev file: never the held-out test file),
detokenized into raw text, so a request carries a realistic CoNLL-length document.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from fastner.serve.config import PRECISIONS, ServeConfig, precision_name
from fastner.serve.process import HOST, ServerProcess

REQUEST_TIMEOUT = 30.0
SCORE_TOLERANCE = 1e-3  # batch composition changes float sums in the last digits, not the tags
MAX_REQUESTS = 500_000  # per scenario, whatever --seconds says

_NO_SPACE_BEFORE = {",", ".", ":", ";", "!", "?", "%", ")", "]", "}", "'s", "'S", "n't", "'", "'re", "'ve", "'ll", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "US$"}


def detokenize(tokens: Sequence[str]) -> str:
    """CoNLL tokens -> raw text: no space before `,` `.` `'s` `%` and the like, none after `(` `$`."""
    out: List[str] = []
    for token in tokens:
        if out and token not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(token)
    return "".join(out)


def load_documents(path: Optional[str], limit: int = 2000) -> List[str]:
    """Raw-text documents: the sentences of a CoNLL file, else of the generated demo corpus."""
    if path:
        from fastner.data.conll import read_conll

        sentences = [s.tokens for s in read_conll(path, max_sentences=limit)]
    else:
        from fastner.demo import generate_corpus

        sentences = [s.tokens for s in generate_corpus(limit, 0, seed=11)[0]]
    # -DOCSTART- lines and one-token headlines are not articles' sentences
    return [detokenize(tokens) for tokens in sentences if len(tokens) > 2 and tokens[0] != "-DOCSTART-"]


# ---- a minimal keep-alive HTTP/1.1 client ----------------------------------------------------------

# uvicorn closes a keep-alive connection idle for 5 s (its default timeout_keep_alive, which
# `fastner serve` keeps). A request written into a connection the server is closing at that moment
# is lost in flight, so the client does what HTTP clients do: it stops reusing a connection well
# before the server's limit (one load-test run lost an answer that way at load 8).
REUSE_IDLE_SECONDS = 2.0


def run_clients(coroutine):
    """asyncio.run on uvloop where it is installed (the serve extra has it; so does the server):
    the load generator shares the machine's cores with the server it measures, and on the stock
    loop its clients took ~0.10 ms of CPU a request (AMD EPYC Zen 4, 2026-12-07)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.idle_since = 0.0  # time.monotonic() when the last answer was read

    async def request(self, path: str, body: bytes) -> Tuple[int, Dict[str, str], bytes]:
        if self.writer is not None and time.monotonic() - self.idle_since > REUSE_IDLE_SECONDS:
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        # The whole head in one read (a readline per header line cost the client ~0.01 ms of
        # CPU a request: it shares the 2 cores with the server it measures).
        try:
            lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        except asyncio.IncompleteReadError as err:
            raise ConnectionError("the server closed the connection") from err
        status = int(lines[0].split()[1])
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.idle_since = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# ---- one run -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    latencies: List[float] = field(default_factory=list)  # seconds, answered 200 and matching
    documents: int = 0
    tokens: int = 0
    status: Dict[int, int] = field(default_factory=dict)
    mismatched: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    missing_retry_after: int = 0
    seconds: float = 0.0

    def record_status(self, status: int) -> None:
        self.status[status] = self.status.get(status, 0) + 1

    def summary(self) -> dict:
        ordered = sorted(self.latencies)

        def percentile(p: float) -> Optional[float]:
            if not ordered:
                return None
            return round(1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

        return {
            "seconds": round(self.seconds, 2),
            "answered": len(self.latencies),
            "documents_per_s": round(self.documents / self.seconds, 1) if self.seconds else 0.0,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": percentile(50), "p95_ms": percentile(95), "p99_ms": percentile(99),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "mismatched": self.mismatched, "timeouts": self.timeouts, "connection_errors": self.connection_errors,
            "missing_retry_after": self.missing_retry_after,
        }


def same_entities(got: List[dict], want: List[dict]) -> bool:
    if [(e["start"], e["end"], e["label"], e["text"]) for e in got] != \
            [(e["start"], e["end"], e["label"], e["text"]) for e in want]:
        return False
    return all(abs(a["score"] - b["score"]) <= SCORE_TOLERANCE for a, b in zip(got, want))


class Workload:
    """The documents, their token counts and the direct model call's answer for each."""

    def __init__(self, tagger, documents: Sequence[str]):
        from fastner.serve.model import count_tokens, predict_documents

        self.documents = list(documents)
        self.tokens = [count_tokens(text) for text in self.documents]
        self.expected = []
        for begin in range(0, len(self.documents), 256):
            self.expected.extend(e["entities"] for e in predict_documents(tagger, self.documents[begin:begin + 256]))

    async def send(self, connection: Connection, index: int, outcome: Outcome) -> Optional[int]:
        """One request for document `index`; checks the answer. Returns the HTTP status (None: no answer)."""
        body = json.dumps({"documents": [{"id": index, "text": self.documents[index]}]}).encode()
        try:
            status, headers, payload = await asyncio.wait_for(connection.request("/v1/entities", body), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            outcome.timeouts += 1
            connection.close()
            return None
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            outcome.connection_errors += 1
            connection.close()
            return None
        outcome.record_status(status)
        if status == 503 and "retry-after" not in headers:
            outcome.missing_retry_after += 1
        if status == 200:
            documents = json.loads(payload)["documents"]
            if len(documents) != 1 or documents[0].get("id") != index \
                    or not same_entities(documents[0]["entities"], self.expected[index]):
                outcome.mismatched += 1
                return -1
            outcome.documents += 1
            outcome.tokens += self.tokens[index]
        return status


@contextlib.contextmanager
def _frozen_collector():
    """For a measured run: what this process holds (torch, the model of the direct runs, the
    workload) out of the cyclic collector's reach, as the server does after its warm-up
    (fastner/serve/app.py), and given back after. A full collection over it took 48-106 ms here,
    and one falling inside an open-loop run stalled the client's clock for that long (p99 of one
    sentence at half capacity 95-152 ms against a p95 of 14-24 ms, 19-21 ms with this; AMD EPYC
    Zen 4, 2026-12-06): the load generator's pause, not the server's."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def closed_loop(workload: Workload, port: int, clients: int, seconds: float,
                      max_requests: int = MAX_REQUESTS) -> Outcome:
    """`clients` connections, each sending its next request as soon as the last is answered."""
    outcome = Outcome()
    sent = 0

    async def client(number: int) -> None:
        nonlocal sent
        connection = Connection(port)
        rng = random.Random(number)
        try:
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                index = rng.randrange(len(workload.documents))
                began = time.perf_counter()
                if await workload.send(connection, index, outcome) == 200:
                    outcome.latencies.append(time.perf_counter() - began)
        finally:
            connection.close()

    with _frozen_collector():
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(n) for n in range(clients)))
        outcome.seconds = time.perf_counter() - started
    return outcome


async def open_loop(workload: Workload, port: int, indices: Sequence[int], rate: float, seconds: float) -> Outcome:
    """Requests at a fixed rate whatever the answers do; latency from each scheduled send time
    (a slow answer delays no later request, so queueing is not hidden)."""
    outcome = Outcome()
    idle: List[Connection] = []
    total = min(int(rate * seconds), MAX_REQUESTS)

    async def one(scheduled: float, index: int) -> None:
        connection = idle.pop() if idle else Connection(port)
        if await workload.send(connection, index, outcome) == 200:
            outcome.latencies.append(time.perf_counter() - scheduled)
        idle.append(connection)

    tasks = []
    with _frozen_collector():
        started = time.perf_counter()
        for number in range(total):
            scheduled = started + number / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(scheduled, indices[number % len(indices)])))
        await asyncio.gather(*tasks)
        outcome.seconds = time.perf_counter() - started
    for connection in idle:
        connection.close()
    return outcome


def batch_stats(port: int) -> Tuple[float, float]:
    """(model calls, documents in them) so far, from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("fastner_batch_documents_count ", "fastner_batch_documents_sum ")):
            name, value = line.split()
            values[name] = float(value)
    return values["fastner_batch_documents_count"], values["fastner_batch_documents_sum"]


# ---- scenarios -----------------------------------------------------------------------------------------

def serve_run(model: str, workload: Workload, clients: int, seconds: float, threads: int, batching: bool,
              extra: Sequence[str] = ()) -> dict:
    args = ["--threads", str(threads), *([] if batching else ["--no-batching"]), *extra]
    with ServerProcess(model, args) as server:
        # a short warm-up at the same load, not counted
        run_clients(closed_loop(workload, server.port, clients, min(2.0, seconds / 4)))
        calls_before, documents_before = batch_stats(server.port)
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        outcome = run_clients(closed_loop(workload, server.port, clients, seconds))
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        calls, documents = batch_stats(server.port)
    result = outcome.summary()
    result.update(_cpu_per_document(server_cpu, outcome.documents), client_cpu_ms_per_doc=
                  round(1000 * client_cpu / outcome.documents, 3) if outcome.documents else None)
    calls -= calls_before
    result.update(scenario=f"serve, batching {'on' if batching else 'off'}", threads=threads, clients=clients,
                  model_calls=int(calls), mean_batch_documents=round((documents - documents_before) / calls, 1) if calls else 0.0)
    return result


def direct_run(tagger, workload: Workload, batch_documents: int, seconds: float, threads: int) -> dict:
    """The model called directly (no HTTP, no queue) on batches of `batch_documents` documents."""
    import torch

    from fastner.serve.model import predict_documents

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = random.Random(0)
    documents = tokens = 0
    try:
        predict_documents(tagger, workload.documents[:batch_documents])  # warm-up
        with _frozen_collector():  # as in the server, whose model call this stands for
            started, cpu = time.perf_counter(), time.process_time()
            while time.perf_counter() - started < seconds:
                index = [rng.randrange(len(workload.documents)) for _ in range(batch_documents)]
                predict_documents(tagger, [workload.documents[i] for i in index])
                documents += len(index)
                tokens += sum(workload.tokens[i] for i in index)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        torch.set_num_threads(previous)
    return {"scenario": f"direct predict, batches of {batch_documents}", "threads": threads, "clients": 0,
            "seconds": round(elapsed, 2), "documents_per_s": round(documents / elapsed, 1),
            "tokens_per_s": round(tokens / elapsed, 1), **_cpu_per_document(cpu, documents)}


def _cpu_per_document(cpu_seconds: float, documents: int) -> dict:
    return {"cpu_ms_per_doc": round(1000 * cpu_seconds / documents, 3) if documents else None}


def latency_run(model: str, workload: Workload, capacity_tokens: float, seconds: float, extra: Sequence[str] = ()) -> dict:
    """One ~30-token sentence a request at half of the measured capacity (batching on, 1 thread).
    Capacity is counted in tokens/s: a 30-token sentence is about twice the mean document."""
    indices = [i for i, n in enumerate(workload.tokens) if 28 <= n <= 32] or \
              sorted(range(len(workload.tokens)), key=lambda i: abs(workload.tokens[i] - 30))[:20]
    rate = max(1.0, capacity_tokens / 2 / statistics.mean(workload.tokens[i] for i in indices))
    with ServerProcess(model, ["--threads", "1", *extra]) as server:
        run_clients(open_loop(workload, server.port, indices, rate, min(2.0, seconds / 4)))
        outcome = run_clients(open_loop(workload, server.port, indices, rate, seconds))
    result = outcome.summary()
    result.update(scenario=f"one 30-token sentence a request at {rate:.0f} requests/s (half capacity)",
                  threads=1, clients=0, rate=round(rate, 1),
                  mean_tokens=round(statistics.mean(workload.tokens[i] for i in indices), 1))
    return result


def overload_run(model: str, workload: Workload, clients: int, seconds: float, max_queue: int,
                 extra: Sequence[str] = ()) -> dict:
    """More clients than the queue holds: the excess must be answered 503, nothing else."""
    with ServerProcess(model, ["--threads", "1", "--max-queue", str(max_queue), *extra]) as server:
        outcome = run_clients(closed_loop(workload, server.port, clients, seconds))
        exit_code = server.stop()
    result = outcome.summary()
    result.update(scenario=f"overload: {clients} clients, --max-queue {max_queue}", threads=1, clients=clients,
                  server_exit=exit_code)
    return result


def soak_run(model: str, workload: Workload, clients: int, seconds: float, sample_every: float = 10.0,
             extra: Sequence[str] = ()) -> dict:
    """A long closed-loop run sampling the server's resident memory."""
    samples: List[Tuple[float, int]] = []
    with ServerProcess(model, ["--threads", "1", *extra]) as server:
        async def sampler(started: float) -> None:
            while time.perf_counter() - started < seconds:
                samples.append((round(time.perf_counter() - started, 1), server.rss_bytes()))
                await asyncio.sleep(sample_every)

        async def both() -> Outcome:
            started = time.perf_counter()
            task = asyncio.ensure_future(sampler(started))
            outcome = await closed_loop(workload, server.port, clients, seconds)
            await task
            return outcome

        outcome = run_clients(both())
        samples.append((round(outcome.seconds, 1), server.rss_bytes()))
    result = outcome.summary()
    mib = [(t, round(rss / 2**20, 1)) for t, rss in samples]
    after_first_minute = [m for t, m in mib if t >= min(60.0, seconds / 5)]
    result.update(scenario=f"soak {seconds:.0f} s, {clients} clients", threads=1, clients=clients, rss_mib=mib,
                  rss_start_mib=mib[0][1], rss_end_mib=mib[-1][1], rss_max_mib=max(m for _, m in mib),
                  rss_growth_after_warmup_mib=round(after_first_minute[-1] - after_first_minute[0], 1)
                  if after_first_minute else None)
    return result


# ---- report -------------------------------------------------------------------------------------------

def table(results: Sequence[dict]) -> str:
    header = ("| scenario | threads | clients | docs/s | tokens/s | p50 ms | p95 ms | p99 ms | docs/call "
              "| CPU ms/doc | errors |")
    lines = [header, "|" + "---|" * 11]
    for r in results:
        status = r.get("status", {})
        errors = (r.get("mismatched", 0) + r.get("timeouts", 0) + r.get("connection_errors", 0)
                  + sum(v for k, v in status.items() if k not in ("200", "503")))
        rejected = status.get("503", 0)
        error_text = f"{errors}" + (f" (+{rejected} x 503)" if rejected else "")
        lines.append(f"| {r['scenario']} | {r['threads']} | {r['clients'] or '-'} | {r['documents_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r.get('p50_ms') or '-'} | {r.get('p95_ms') or '-'} | "
                     f"{r.get('p99_ms') or '-'} | {r.get('mean_batch_documents', '-')} | {r.get('cpu_ms_per_doc') or '-'} | "
                     f"{error_text if 'status' in r else '-'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastner.serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="tagger directory")
    parser.add_argument("--documents", help="CoNLL file whose sentences become the documents (default: the demo corpus)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured run")
    parser.add_argument("--threads", default="1,2", help="torch threads to compare (default 1,2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the batching on/off/direct rows this many times, interleaved, so that "
                             "load from other processes hits on and off alike (default 1)")
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-queue", type=int, default=8)
    parser.add_argument("--capacity-tokens", type=float, default=None,
                        help="skip the throughput runs: the latency run takes half of this many tokens/s")
    parser.add_argument("--soak", type=float, default=0.0, help="only a soak run of this many seconds (memory)")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="every server's --max-wait-ms (default: fastner serve's own)")
    parser.add_argument("--precision", type=precision_name, choices=PRECISIONS, default=ServeConfig.precision,
                        help="every server's --precision, and the model of the direct runs and of the answers' "
                             f"checks (default {ServeConfig.precision})")
    parser.add_argument("--in-process", action="store_true",
                        help="every server with --in-process: the model on a thread of the server's process")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 3600 or args.soak > 4 * 3600 \
            or not 1 <= args.rounds <= 20:
        parser.error("--clients must be in 1..1024, --seconds in (0, 3600], --soak at most 4 hours, --rounds in 1..20")
    if args.max_wait_ms is not None and args.max_wait_ms < 0:
        parser.error("--max-wait-ms must be >= 0")
    extra = [] if args.max_wait_ms is None else ["--max-wait-ms", f"{args.max_wait_ms:g}"]
    extra += ["--precision", args.precision] + (["--in-process"] if args.in_process else [])

    import torch

    import fastner
    from fastner.serve.model import load_tagger

    torch.set_num_threads(1)
    tagger = load_tagger(args.model, "cpu", args.precision)
    workload = Workload(tagger, load_documents(args.documents))
    cpu = _cpu_name()
    load_start = list(os.getloadavg())
    print(f"loadtest: {len(workload.documents)} documents, mean {statistics.mean(workload.tokens):.1f} tokens; "
          f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; fastner {fastner.__version__}, "
          f"torch {torch.__version__}; precision {args.precision}", file=sys.stderr)
    results: List[dict] = []

    def report(result: dict) -> None:
        result["load_average_1min"] = round(os.getloadavg()[0], 2)  # at the end of the run: contention
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)

    if args.soak:
        report(soak_run(args.model, workload, args.soak_clients, args.soak, extra=extra))
    else:
        capacity = args.capacity_tokens
        if capacity is None:
            for _ in range(args.rounds):
                for threads in [int(t) for t in args.threads.split(",")]:
                    batched = serve_run(args.model, workload, args.clients, args.seconds, threads, batching=True,
                                        extra=extra)
                    report(batched)
                    report(serve_run(args.model, workload, args.clients, args.seconds, threads, batching=False,
                                     extra=extra))
                    report(direct_run(tagger, workload, max(1, round(batched["mean_batch_documents"])), args.seconds,
                                      threads))
                    report(direct_run(tagger, workload, 1, args.seconds, threads))
            capacity = results[0]["tokens_per_s"]
        report(latency_run(args.model, workload, capacity, args.seconds, extra=extra))
        report(overload_run(args.model, workload, args.overload_clients, args.seconds, args.overload_queue,
                            extra=extra))
    print(table(results))
    failures = [r["scenario"] for r in results
                if r.get("mismatched") or r.get("timeouts") or r.get("connection_errors") or r.get("missing_retry_after")
                or any(k not in ("200", "503") for k in r.get("status", {}))]
    if args.json:
        with open(args.json, "w") as handle:
            command = " ".join(["python -m fastner.serve.loadtest", *(sys.argv[1:] if argv is None else argv)])
            json.dump({"machine": cpu, "cpus": os.cpu_count(), "command": command, "precision": args.precision,
                       "model_process": not args.in_process,
                       "load_average": {"start": load_start, "end": list(os.getloadavg())}, "results": results},
                      handle, indent=1)
    if failures:
        print(f"loadtest: lost, mismatched or failed answers in: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
