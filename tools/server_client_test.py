#!/usr/bin/env python3
"""Drives `dsv4 serve` with the official `openai` Python client: chat and completions,
streaming and not, tools, errors, API key; then a bounded load test (many concurrent streams
for a fixed time) checking that no response is lost or corrupted.

usage: server_client_test.py DSV4_BINARY [--load-streams 32] [--load-seconds 30]
Exits non-zero on any failure. The server runs the built-in demo model (random weights), so
the checks compare outputs across requests (greedy determinism) rather than against text.
"""
import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request

import openai

KEY = "test-key"
MODEL = "dsv4-demo"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, port):
    proc = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--api-key", KEY, "--max-running", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok  {what}")


def functional(base):
    c = openai.OpenAI(base_url=base, api_key=KEY)
    check([m.id for m in c.models.list().data] == [MODEL], "models lists the served model")

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = r.choices[0].message.content
    check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8,
          "chat: 8 tokens, finish_reason length")
    parts, usage = [], None
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
    check("".join(parts) == text, "chat: streamed text equals the non-streamed text")
    check(usage is not None and usage.total_tokens == r.usage.total_tokens,
          "chat: usage in the last stream chunk")
    long_msgs = [{"role": "system", "content": "You are a careful assistant. " * 40},
                 {"role": "user", "content": "Hello again!"}]
    first = c.chat.completions.create(model=MODEL, messages=long_msgs, max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    again = c.chat.completions.create(model=MODEL, messages=long_msgs, max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    check(again.usage.prompt_tokens_details.cached_tokens >= 64
          and again.choices[0].message.content == first.choices[0].message.content,
          "chat: a repeated long prompt reuses the prefix cache, same output")

    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                  reasoning_effort="high", extra_body={"ignore_eos": True})
    check(r.choices[0].message.model_extra.get("reasoning_content") is not None,
          "chat: thinking mode returns reasoning_content")

    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, logprobs=True,
                                  top_logprobs=2, temperature=0.7, seed=1, n=2,
                                  extra_body={"ignore_eos": True})
    check(len(r.choices) == 2 and len(r.choices[0].logprobs.content) == 3
          and len(r.choices[0].logprobs.content[0].top_logprobs) == 2,
          "chat: n=2 with logprobs/top_logprobs")

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0,
                                  tools=tools, tool_choice="auto")
    check(r.usage.prompt_tokens > plain.usage.prompt_tokens + 50,
          "chat: tools are rendered into the prompt")
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0,
                                       tools=tools, stream=True)
    finishes = [ch.finish_reason for chunk in stream for ch in chunk.choices if ch.finish_reason]
    check(finishes in (["length"], ["stop"], ["tool_calls"]), "chat: tools with streaming")

    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    ctext = r.choices[0].text
    s = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                             stream=True, extra_body={"ignore_eos": True})
    check("".join(ch.choices[0].text for ch in s if ch.choices) == ctext,
          "completions: streamed text equals the non-streamed text")
    ids = [0, 5000, 6000, 7000]
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=3, logprobs=2, temperature=0)
    check(r.usage.prompt_tokens == 4 and len(r.choices[0].logprobs.tokens) == 3,
          "completions: token-id prompt with logprobs")

    for what, kwargs, exc in [
        ("unknown field", dict(extra_body={"bogus": 1}), openai.BadRequestError),
        ("mistyped field", dict(extra_body={"top_k": "many"}), openai.BadRequestError),
        ("prompt over the context", dict(messages=[{"role": "user", "content": "hi " * 70000}]),
         openai.BadRequestError),
    ]:
        try:
            c.chat.completions.create(model=MODEL, **({"messages": msgs} | kwargs), max_tokens=2)
            check(False, f"{what} is refused")
        except exc as e:
            check(e.status_code == 400 and "message" in e.body, f"{what}: 400 with an error body")
    try:
        c.chat.completions.create(model="nope", messages=msgs, max_tokens=1)
        check(False, "unknown model is refused")
    except openai.NotFoundError:
        check(True, "unknown model: 404")
    try:
        openai.OpenAI(base_url=base, api_key="wrong").models.list()
        check(False, "wrong key is refused")
    except openai.AuthenticationError:
        check(True, "wrong API key: 401")


async def load(base, streams, seconds):
    """`streams` concurrent streaming clients for `seconds`; every response must be complete
    and equal to the reference output of its prompt (greedy)."""
    c = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=600)
    prompts = [f"Request {k}: " + "words " * (3 + 11 * k) for k in range(8)]

    async def one(prompt, stream):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
        if not stream:
            r = await c.completions.create(**kw)
            return r.choices[0].text, r.choices[0].finish_reason
        text, finish = [], None
        async for chunk in await c.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                text.append(ch.text)
                finish = ch.finish_reason or finish
        return "".join(text), finish

    refs = [(await one(p, False))[0] for p in prompts]
    counts = {"ok": 0, "bad": 0}
    deadline = time.time() + seconds

    async def client(i):
        k = i
        while time.time() < deadline:
            k = (k + 5) % len(prompts)
            try:
                text, finish = await one(prompts[k], True)
                good = text == refs[k] and finish == "length"
            except Exception as e:  # a lost response
                print(f"client {i}: {e!r}", file=sys.stderr)
                good = False
            counts["ok" if good else "bad"] += 1

    t = time.time()
    await asyncio.gather(*(client(i) for i in range(streams)))
    el = time.time() - t
    print(f"load: {streams} streams for {el:.1f} s: {counts['ok']} complete and correct, "
          f"{counts['bad']} lost or corrupted ({counts['ok'] * 16 / el:.1f} tok/s)")
    check(counts["bad"] == 0 and counts["ok"] >= streams, "load: zero lost or corrupted responses")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--load-streams", type=int, default=32)
    ap.add_argument("--load-seconds", type=float, default=30)
    a = ap.parse_args()
    port = free_port()
    proc = start_server(a.binary, port)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        functional(base)
        if a.load_seconds > 0:
            asyncio.run(load(base, a.load_streams, a.load_seconds))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            check(r.status == 200, "server healthy after the load")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
