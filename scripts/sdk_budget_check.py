#!/usr/bin/env python3
"""Budgets as the official OpenAI SDK sees them (run by tests/budgets.rs).

    sdk_budget_check.py BASE_URL KEY [ANTHROPIC_KEY]

The key's budget has room for one stream's first reservation and no more: the stream
is cut mid-way and the SDK raises an APIError with code `budget_exceeded` while
iterating; the next request (whose max_tokens cannot fit what is left) is refused with a RateLimitError of the same code, and the
SDK does not retry it (the relay sends `x-should-retry: false`). With ANTHROPIC_KEY (a
tenant whose budget holds one reservation on the `/anthropic` route), the same cut as
the Anthropic SDK sees it: an `error` event it raises while iterating. Prints one line
per check and exits non-zero on the first failure.
"""

import sys

import anthropic
import openai


def main() -> int:
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=2)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Write a long story"}],
        stream=True,
        extra_headers={"x-mock-chunks": "400", "x-mock-interval-ms": "2", "x-request-id": "sdk-cut"},
    )
    deltas = 0
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas += 1
        print("FAIL: the stream ended without an error")
        return 1
    except openai.APIError as e:
        if getattr(e, "code", None) != "budget_exceeded":
            print(f"FAIL: the stream raised {type(e).__name__} code={getattr(e, 'code', None)}: {e}")
            return 1
        print(f"ok: the stream raised APIError budget_exceeded after {deltas} deltas")
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=200,
            extra_headers={"x-request-id": "sdk-refused"},
        )
        print("FAIL: a request past the budget was served")
        return 1
    except openai.RateLimitError as e:
        if e.code != "budget_exceeded":
            print(f"FAIL: refused with code {e.code}")
            return 1
        print(f"ok: refused with RateLimitError budget_exceeded, retry-after {e.response.headers.get('retry-after')}")
    if len(sys.argv) > 3:
        return anthropic_cut(base, sys.argv[3])
    return 0


def anthropic_cut(base: str, key: str) -> int:
    an = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key=key, max_retries=0)
    deltas = 0
    try:
        with an.messages.stream(
            model="mock-claude",
            max_tokens=50,
            messages=[{"role": "user", "content": "Write a long story"}],
            extra_headers={"x-mock-chunks": "400", "x-mock-interval-ms": "2", "x-request-id": "sdk-anthropic-cut"},
        ) as s:
            for _ in s.text_stream:
                deltas += 1
        print("FAIL: the Anthropic stream ended without an error")
        return 1
    except anthropic.APIError as e:
        body = getattr(e, "body", None) or {}
        kind = (body.get("error") or {}).get("type") if isinstance(body, dict) else None
        if kind != "rate_limit_error" and "rate_limit_error" not in str(e):
            print(f"FAIL: the Anthropic stream raised {type(e).__name__}: {e!r} body={body!r}")
            return 1
        print(f"ok: the Anthropic stream raised {type(e).__name__} rate_limit_error after {deltas} deltas")
    return 0


if __name__ == "__main__":
    sys.exit(main())
