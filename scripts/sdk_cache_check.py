#!/usr/bin/env python3
"""The response cache as the official OpenAI SDK sees it (run by tests/cache.rs).

    sdk_cache_check.py BASE_URL KEY

A JSON request and a streamed request, each sent twice: the second comes from the
cache (`x-relay-cache: hit`), byte for byte the first, and the SDK reads both alike.
Prints one line per check and exits non-zero on the first failure.
"""

import sys

import openai

ASK = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], temperature=0)


def main() -> int:
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0)
    answers = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ASK)
        answers.append((raw.headers.get("x-relay-cache"), raw.http_response.content, raw.parse()))
    if [a[0] for a in answers] != ["miss", "hit"]:
        print(f"FAIL: json cache headers {[a[0] for a in answers]}")
        return 1
    if answers[0][1] != answers[1][1] or answers[0][2].choices[0].message.content != answers[1][2].choices[0].message.content:
        print("FAIL: the cached JSON answer differs")
        return 1
    print("ok: a repeated JSON request came from the cache, byte for byte")
    streams = []
    for _ in range(2):
        with client.chat.completions.with_streaming_response.create(stream=True, **ASK) as r:
            streams.append((r.headers.get("x-relay-cache"), b"".join(r.iter_bytes())))
    if [s[0] for s in streams] != ["miss", "hit"] or streams[0][1] != streams[1][1]:
        print(f"FAIL: stream cache headers {[s[0] for s in streams]}, identical {streams[0][1] == streams[1][1]}")
        return 1
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **ASK)
        if c.choices
    )
    if not text:
        print("FAIL: the SDK read no content from the cached stream")
        return 1
    print(f"ok: a repeated stream came from the cache byte for byte; the SDK read {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
