#!/usr/bin/env python3
"""A standard-library smoke test of `dsv4 serve` on any device (for GPU machines without the
`openai` package that tools/server_client_test.py needs): greedy determinism, a prefix-cache
hit that resumes from a snapshot, and concurrent streaming and non-streaming requests.

usage: serve_smoke.py DSV4_BINARY [serve args, e.g. --device cuda]
Exits non-zero on any failure.
"""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, stream=False):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(dict(body, stream=stream)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    text, done = "", False
    for line in raw.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            for c in json.loads(line[6:]).get("choices", []):
                text += c.get("delta", {}).get("content") or ""
    if not done:
        raise AssertionError("stream ended without [DONE]")
    return text


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    port = free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--max-running", "16", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
        system = "You are a careful assistant. " * 40  # a prefix of several snapshot blocks
        body = {
            "model": "dsv4-demo",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "Count to five."},
            ],
            "max_tokens": 24,
            "temperature": 0,
        }
        first = post(port, body)
        computed = metric(port, "dsv4_prefill_tokens_total")
        prompt = metric(port, "dsv4_prompt_tokens_total")
        again = post(port, body)
        computed2 = metric(port, "dsv4_prefill_tokens_total") - computed
        prompt2 = metric(port, "dsv4_prompt_tokens_total") - prompt
        assert first == again, f"greedy output changed on a prefix-cache hit: {first!r} vs {again!r}"
        assert computed2 < prompt2, f"no prefix-cache hit: {computed2} of {prompt2} prompt tokens computed"
        print(f"greedy repeat equal; the repeat computed {computed2:.0f} of {prompt2:.0f} prompt tokens")
        streamed = post(port, body, stream=True)
        assert streamed == first, f"streamed text differs: {streamed!r} vs {first!r}"
        # Concurrent requests, half streaming, each a different prompt.
        results, errors = {}, []

        def one(i):
            try:
                b = dict(body, messages=[{"role": "user", "content": f"Request {i}: say hi."}])
                results[i] = post(port, b, stream=i % 2 == 1)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(f"request {i}: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 24 and all(isinstance(v, str) for v in results.values())
        failed = metric(port, "dsv4_requests_failed_total")
        assert failed == 0, f"{failed} requests failed"
        print(f"24 concurrent requests answered; {metric(port, 'dsv4_forward_steps_total'):.0f} steps")
        print("serve smoke test passed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
