#!/usr/bin/env python3
"""Benchmark of a running `dsv4 serve`: throughput and latency percentiles at several
concurrencies, and cold vs warm time to first token on a repeated long prompt (prefix cache).

usage: bench_server.py --url http://127.0.0.1:8000 [--model dsv4-demo] [--concurrency 1,4,16]
       [--requests-per-client 8] [--prompt-tokens 64] [--max-tokens 32] [--long-prompt 4096]
Only the standard library: streams /v1/completions with token-id prompts and ignore_eos, so
every request generates exactly --max-tokens tokens.
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def stream(url, body):
    """Sends one streaming completion; returns (ttft_s, total_s, tokens, cached_tokens)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft, tokens, cached = None, 0, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        elif ttft is None and chunk["choices"]:
            ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    return ttft, total, tokens, cached


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def body(model, prompt, max_tokens):
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def level(a, conc, rng):
    results, lock = [], threading.Lock()

    def client():
        for _ in range(a.requests_per_client):
            prompt = [rng.randrange(1000, 120000) for _ in range(a.prompt_tokens)]
            r = stream(a.url, body(a.model, prompt, a.max_tokens))
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    lat = [r[1] for r in results]
    itl = [(r[1] - r[0]) / max(1, r[2] - 1) for r in results]
    toks = sum(r[2] for r in results)
    print(f"| {conc:>3} | {len(results):>4} | {toks / wall:8.1f} | {len(results) / wall:6.2f} | "
          f"{pct(ttft, 50) * 1e3:7.0f} / {pct(ttft, 90) * 1e3:7.0f} / {pct(ttft, 99) * 1e3:7.0f} | "
          f"{pct(itl, 50) * 1e3:6.1f} / {pct(itl, 90) * 1e3:6.1f} / {pct(itl, 99) * 1e3:6.1f} | "
          f"{pct(lat, 50):6.2f} / {pct(lat, 90):6.2f} / {pct(lat, 99):6.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="dsv4-demo")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-prompt", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = random.Random(0)
    print(f"prompt {a.prompt_tokens} tokens, {a.max_tokens} generated per request, "
          f"{a.requests_per_client} requests per client\n")
    print("| conc | reqs | out tok/s | req/s | TTFT ms p50 / p90 / p99 | "
          "inter-token ms p50 / p90 / p99 | latency s p50 / p90 / p99 |")
    print("|---|---|---|---|---|---|---|")
    for conc in [int(c) for c in a.concurrency.split(",")]:
        level(a, conc, rng)

    print(f"\ncold vs warm TTFT, {a.long_prompt}-token prompt, max_tokens 1:")
    ratios = []
    for k in range(a.repeats):
        prompt = [rng.randrange(1000, 120000) for _ in range(a.long_prompt)]
        cold, _, _, c0 = stream(a.url, body(a.model, prompt, 1))
        warm, _, _, c1 = stream(a.url, body(a.model, prompt, 1))
        ratios.append(cold / warm)
        print(f"  run {k}: cold {cold * 1e3:8.1f} ms (cached {c0}), warm {warm * 1e3:7.1f} ms "
              f"(cached {c1}) -> {cold / warm:6.1f}x")
    print(f"  median speed-up {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
