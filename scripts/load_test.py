#!/usr/bin/env python
"""Load generator for ``covid-lightning serve``: N requests from C concurrent clients, latency and throughput.

python scripts/load_test.py --url http://127.0.0.1:8000/predict --images data/samples -n 200 -c 8
python scripts/load_test.py --url ... --images DIR --glob "*/images/*.png" --json results.json

Standard library only: each client is a thread with its own keep-alive ``http.client`` connection and posts the
images of the folder in turn as raw bytes (``Content-Type`` from the file extension). Any answer other than
200, and any connection error, counts as an error. Prints p50/p95/p99 latency, requests/s and the error count;
``--json PATH`` (or ``-`` for stdout) writes the same numbers as JSON. Exit status 1 when there were errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@dataclass
class LoadResult:
    """Summary of one load run (latencies in milliseconds)."""

    url: str
    requests: int
    concurrency: int
    errors: int
    statuses: dict[str, int]
    wall_s: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    first_errors: list[str] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of ``values`` (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def find_images(folder: str | Path, pattern: str = "**/*") -> list[Path]:
    """PNG/JPEG files under ``folder`` matching ``pattern``, sorted."""
    files = sorted(p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in CONTENT_TYPES)
    if not files:
        raise FileNotFoundError(f"No PNG/JPEG images matching {pattern!r} under {folder}.")
    return files


def run_load(
    url: str,
    images: Sequence[Path],
    requests: int = 200,
    concurrency: int = 8,
    timeout: float = 60.0,
) -> LoadResult:
    """Post ``requests`` images (cycling through ``images``) from ``concurrency`` threads; return the summary."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Expected an http(s) URL, got {url!r}.")
    connection_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    payloads = [(p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in images]

    lock = threading.Lock()
    next_index = 0
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    first_errors: list[str] = []

    def take() -> int | None:
        nonlocal next_index
        with lock:
            if next_index >= requests:
                return None
            next_index += 1
            return next_index - 1

    def client() -> None:
        conn = None
        while (i := take()) is not None:
            body, content_type = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = connection_cls(parts.hostname, parts.port, timeout=timeout)
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                text = response.read()
                status = str(response.status)
                error = None if response.status == 200 else f"HTTP {status}: {text[:200]!r}"
            except (OSError, http.client.HTTPException) as err:
                status, error = type(err).__name__, repr(err)
                if conn is not None:
                    conn.close()
                conn = None
            elapsed = time.perf_counter() - start
            with lock:
                statuses[status] += 1
                if error is None:
                    latencies.append(elapsed)
                elif len(first_errors) < 5:
                    first_errors.append(error)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, name=f"load-client-{k}") for k in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = [1000 * x for x in latencies]
    return LoadResult(
        url=url,
        requests=requests,
        concurrency=concurrency,
        errors=requests - len(latencies),
        statuses=dict(statuses),
        wall_s=wall,
        rps=requests / wall if wall > 0 else float("nan"),
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms) if ms else float("nan"),
        max_ms=max(ms) if ms else float("nan"),
        first_errors=first_errors,
    )


def format_result(result: LoadResult) -> str:
    """One human-readable line (plus the first errors, if any)."""
    line = (
        f"{result.requests} requests, {result.concurrency} concurrent: "
        f"p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"{result.rps:.1f} req/s, {result.errors} errors ({result.wall_s:.2f} s)"
    )
    return "\n".join([line, *(f"  error: {e}" for e in result.first_errors)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/predict", help="endpoint (default: %(default)s)")
    parser.add_argument("--images", required=True, type=Path, help="folder of PNG/JPEG images to post")
    parser.add_argument("--glob", default="**/*", help="pattern under --images (default: %(default)s)")
    parser.add_argument("-n", "--requests", type=int, default=200, help="total requests (default: 200)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent first and not counted (default: 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (default: 60)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file ('-': stdout)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")

    images = find_images(args.images, args.glob)
    if args.warmup:
        run_load(args.url, images, args.warmup, min(args.concurrency, args.warmup), args.timeout)
    result = run_load(args.url, images, args.requests, args.concurrency, args.timeout)
    print(format_result(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(asdict(result), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
