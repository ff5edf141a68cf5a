#!/usr/bin/env python3
"""The official OpenAI and Anthropic Python SDKs, unchanged, against a running relay.

Usage: sdk_check.py RELAY_URL RELAY_KEY [ROUTE_PREFIX...]
Route prefixes default to the shipped configuration's mock routes. Exits non-zero
on the first check that fails, printing what it saw.
"""
import sys

import anthropic
import openai


def main() -> int:
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2]
    oa_prefix, an_prefix, audio_prefix = (sys.argv[3:6] + [None] * 3)[:3]
    oa_prefix = oa_prefix or "/mock/openai/v1"
    an_prefix = an_prefix or "/mock/anthropic"
    audio_prefix = audio_prefix or "/mock/audio/v1"

    oa = openai.OpenAI(base_url=base + oa_prefix, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "Say hello"}]

    # Streaming with usage, as SDK users ask for it.
    text, usage = "", None
    stream = oa.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    check(text == "Hello from the mock provider, token stream.", f"openai stream text {text!r}")
    check(usage is not None and usage.completion_tokens == 8, f"openai usage {usage}")

    # Non-streaming, and the request id the relay returns.
    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    done = raw.parse()
    check(done.choices[0].finish_reason == "stop", f"openai json {done}")
    check(len(raw.headers.get("x-request-id", "")) > 0, "x-request-id missing")

    # Text to speech, streamed to bytes.
    audio = openai.OpenAI(base_url=base + audio_prefix, api_key=key, max_retries=0)
    with audio.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Hello there"
    ) as resp:
        size = sum(len(b) for b in resp.iter_bytes())
    check(size == 8 * 4096, f"audio bytes {size}")

    # Refusals raise the SDK's own exceptions.
    bad = openai.OpenAI(base_url=base + oa_prefix, api_key="sk-wrong", max_retries=0)
    expect_raise(openai.AuthenticationError, lambda: bad.chat.completions.create(model="m", messages=messages))
    nowhere = openai.OpenAI(base_url=base + "/no/such/route", api_key=key, max_retries=0)
    expect_raise(openai.NotFoundError, lambda: nowhere.chat.completions.create(model="m", messages=messages))

    an = anthropic.Anthropic(base_url=base + an_prefix, api_key=key, max_retries=0)
    with an.messages.stream(
        model="mock-claude", max_tokens=64, messages=messages
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    check(streamed == "Hello from the mock provider, token stream.", f"anthropic stream {streamed!r}")
    check(final.usage.output_tokens == 8 and final.stop_reason == "end_turn", f"anthropic final {final}")
    msg = an.messages.create(model="mock-claude", max_tokens=64, messages=messages)
    check(msg.content[0].text.startswith("Hello"), f"anthropic json {msg}")
    bad_an = anthropic.Anthropic(base_url=base + an_prefix, api_key="sk-wrong", max_retries=0)
    expect_raise(anthropic.AuthenticationError,
                 lambda: bad_an.messages.create(model="m", max_tokens=8, messages=messages))
    print("sdk check: openai", openai.__version__, "and anthropic", anthropic.__version__, "work through the relay")
    return 0


def check(ok: bool, what: str) -> None:
    if not ok:
        print("sdk check failed:", what, file=sys.stderr)
        sys.exit(1)


def expect_raise(kind, call) -> None:
    try:
        call()
    except kind:
        return
    except Exception as e:  # noqa: BLE001 - report what was raised instead
        check(False, f"expected {kind.__name__}, got {type(e).__name__}: {e}")
    check(False, f"expected {kind.__name__}, nothing was raised")


if __name__ == "__main__":
    sys.exit(main())
