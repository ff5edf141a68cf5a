#!/usr/bin/env python3
"""The official OpenAI and Anthropic Python SDKs, unchanged, against a running relay.

Usage: sdk_check.py RELAY_URL RELAY_KEY [OPENAI_PREFIX ANTHROPIC_PREFIX AUDIO_PREFIX]
Route prefixes default to the shipped configuration's mock routes; `-` is the relay's
root (one base URL: `OpenAI(base_url=RELAY/v1)` and `Anthropic(base_url=RELAY)`).
Exits non-zero on the first check that fails, printing what it saw. Its last lines are
`requests: {...}`, the relay's x-request-id of each API call by name, and `sessions:
{...}`, the x-request-id this script gave each WebSocket session (the SDK does not show
the handshake's answer), so that the caller can check each call's row.
"""
import json
import sys
import uuid

import anthropic
import openai


def main() -> int:
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2]
    prefixes = sys.argv[3:6] or ["/mock/openai/v1", "/mock/anthropic", "/mock/audio/v1"]
    oa_prefix, an_prefix, audio_prefix = ("" if p == "-" else p for p in prefixes)
    ids = {}

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

    # The Responses API, streamed: typed events, usage on response.completed.
    raw = oa.responses.with_raw_response.create(model="gpt-4o-mini", input="Say hello", stream=True)
    ids["responses_stream"] = raw.headers.get("x-request-id")
    text, completed, numbers = "", None, []
    for event in raw.parse():
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            completed = event.response
    check(text == "Hello from the mock provider, token stream.", f"responses stream text {text!r}")
    check(completed is not None and completed.usage.output_tokens == 8, f"responses completed {completed}")
    check(numbers == list(range(len(numbers))), f"responses sequence numbers {numbers}")
    raw = oa.responses.with_raw_response.create(model="gpt-4o-mini", input="Say hello")
    ids["responses_json"] = raw.headers.get("x-request-id")
    resp = raw.parse()
    check(resp.output_text.startswith("Hello") and resp.usage.input_tokens > 0, f"responses json {resp}")

    raw = oa.embeddings.with_raw_response.create(model="text-embedding-3-small", input="Say hello")
    ids["embeddings"] = raw.headers.get("x-request-id")
    emb = raw.parse()
    check(len(emb.data[0].embedding) == 3 and emb.usage.prompt_tokens > 0, f"embeddings {emb}")

    # Transcription: a multipart upload, answered as JSON and as a stream.
    audio_file = ("hello.wav", b"RIFF" + bytes(range(256)) * 64, "audio/wav")
    tr = openai.OpenAI(base_url=base + audio_prefix, api_key=key, max_retries=0)
    raw = tr.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=audio_file)
    ids["transcription_json"] = raw.headers.get("x-request-id")
    check(raw.parse().text.startswith("Hello"), f"transcription {raw.parse()}")
    raw = tr.audio.transcriptions.with_raw_response.create(
        model="gpt-4o-transcribe", file=audio_file, stream=True)
    ids["transcription_stream"] = raw.headers.get("x-request-id")
    text, done = "", None
    for event in raw.parse():
        if event.type == "transcript.text.delta":
            text += event.delta
        elif event.type == "transcript.text.done":
            done = event
    check(text == "Hello from the mock provider, token stream." and done is not None
          and done.usage.output_tokens == 8, f"transcription stream {text!r} {done}")

    # Speech as SSE events of base64 audio.
    with tr.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello there", stream_format="sse"
    ) as resp:
        ids["speech_sse"] = resp.headers.get("x-request-id")
        body = b"".join(resp.iter_bytes())
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    check(kinds == ["speech.audio.delta"] * 8 + ["speech.audio.done"], f"speech sse events {kinds}")

    # The Realtime API over a WebSocket (the SDK's `websockets` client): two responses.
    sessions = {"realtime": "sdk-realtime-" + uuid.uuid4().hex}
    with oa.realtime.connect(model="gpt-realtime",
                             extra_headers={"x-request-id": sessions["realtime"]}) as conn:
        first = conn.recv()
        check(first.type == "session.created" and first.session.model == "gpt-realtime",
              f"realtime first event {first}")
        for _ in range(2):
            conn.response.create()
            audio, done = 0, None
            for event in conn:
                if event.type == "response.output_audio.delta":
                    audio += 1
                elif event.type == "response.done":
                    done = event
                    break
            check(audio == 8 and done.response.usage.output_tokens == 24,
                  f"realtime response: {audio} audio deltas, {done}")
    bad_rt = openai.OpenAI(base_url=base + oa_prefix, api_key="sk-wrong", max_retries=0)
    try:
        with bad_rt.realtime.connect(model="gpt-realtime") as conn:
            conn.recv()
        check(False, "a realtime session with a wrong key was opened")
    except Exception as e:  # noqa: BLE001 - the handshake's refusal, as websockets raises it
        check("401" in str(e), f"realtime with a wrong key: {type(e).__name__}: {e}")

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
    raw = an.messages.with_raw_response.create(model="mock-claude", max_tokens=64, messages=messages)
    ids["anthropic_json"] = raw.headers.get("x-request-id")
    msg = raw.parse()
    check(msg.content[0].text.startswith("Hello"), f"anthropic json {msg}")
    bad_an = anthropic.Anthropic(base_url=base + an_prefix, api_key="sk-wrong", max_retries=0)
    expect_raise(anthropic.AuthenticationError,
                 lambda: bad_an.messages.create(model="m", max_tokens=8, messages=messages))
    print("sdk check: openai", openai.__version__, "and anthropic", anthropic.__version__, "work through the relay")
    print("requests:", json.dumps(ids))
    print("sessions:", json.dumps(sessions))
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
