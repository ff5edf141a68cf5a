//! The mock's Realtime API: `GET .../realtime?model=M` with `Upgrade: websocket`. After
//! the handshake it sends `session.created`, answers `session.update` with
//! `session.updated`, and each `response.create` with `response.created`, one audio
//! delta and one transcript delta per chunk (the knobs' count, pacing, chunk size, cut
//! and stall, as for a stream), and `response.done` with usage: 17 input tokens and 3
//! output tokens per chunk. Pings are answered, a close frame is echoed.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{audio_chunk, token, write_full, Flow, Knobs, Mock, Request};
use std::sync::atomic::Ordering;

/// RFC 6455's key suffix for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Input tokens the mock counts per response.
pub const INPUT_TOKENS: u64 = 17;
/// Output tokens per chunk.
pub const OUTPUT_PER_CHUNK: u64 = 3;
/// Largest client message the mock reads.
const MAX_MESSAGE: usize = 4 << 20;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// A frame as a server writes it (unmasked, unfragmented).
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65_536 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

enum Message {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Close(Vec<u8>),
}

/// Serves one session on `stream` after its handshake request `req`.
pub(super) async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mock: &Mock,
    stream: &mut S,
    pending: &mut Vec<u8>,
    req: &Request,
    knobs: Knobs,
) -> Flow {
    match handshake(mock, stream, req, knobs).await {
        Ok(model) => events(mock, stream, pending, knobs, &model).await,
        Err(flow) => flow,
    }
}

/// Answers the handshake (or the error the knobs ask for) and sends `session.created`;
/// returns the session's model.
async fn handshake<S: AsyncWrite + Unpin>(
    mock: &Mock,
    stream: &mut S,
    req: &Request,
    knobs: Knobs,
) -> Result<String, Flow> {
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let refuse =
        |status: u16, message: &str| super::error_body(super::Kind::Realtime, status, message);
    let Some(key) = header("sec-websocket-key") else {
        let body = refuse(400, "mock: not a WebSocket handshake");
        return Err(write_full(stream, 400, "application/json", body.as_bytes()).await);
    };
    if let Some(status) = knobs.status {
        let body = refuse(status, "mock: error requested by x-mock-status");
        return Err(
            mock.finish(write_full(stream, status, "application/json", body.as_bytes()).await)
        );
    }
    let protocol = header("sec-websocket-protocol")
        .and_then(|p| p.split(',').map(str::trim).find(|p| *p == "realtime"))
        .map_or(String::new(), |p| {
            format!("sec-websocket-protocol: {p}\r\n")
        });
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n{protocol}x-mock-provider: 1\r\n\r\n",
        accept_key(key)
    );
    let model = req
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .unwrap_or("gpt-realtime-mock")
        .to_string();
    let created = json!({"type": "session.created", "event_id": "event_mock_0", "session": {"id": "sess_mock", "object": "realtime.session", "model": model}});
    if stream.write_all(head.as_bytes()).await.is_err() || send(stream, &created).await.is_err() {
        return Err(mock.cancelled());
    }
    Ok(model)
}

/// The client's events, each answered, until it closes or goes away.
async fn events<S: AsyncRead + AsyncWrite + Unpin>(
    mock: &Mock,
    stream: &mut S,
    pending: &mut Vec<u8>,
    knobs: Knobs,
    model: &str,
) -> Flow {
    let mut responses = 0u64;
    loop {
        let Some(message) = read_message(stream, pending).await else {
            return mock.cancelled();
        };
        let flow = match message {
            Message::Close(payload) => {
                let _ = stream.write_all(&server_frame(0x8, &payload)).await;
                let _ = stream.flush().await;
                mock.stats.completed.fetch_add(1, Ordering::Relaxed);
                return Flow::Close;
            }
            Message::Ping(p) => write(stream, &server_frame(0xa, &p)).await,
            Message::Text(t) => {
                let event: Value = serde_json::from_slice(&t).unwrap_or(Value::Null);
                match event["type"].as_str() {
                    Some("response.create") => {
                        responses += 1;
                        respond(mock, stream, pending, knobs, responses).await
                    }
                    Some("session.update") => {
                        let updated = json!({"type": "session.updated", "event_id": "event_mock_u", "session": {"id": "sess_mock", "object": "realtime.session", "model": model}});
                        send(stream, &updated)
                            .await
                            .map_or(Flow::Close, |()| Flow::Continue)
                    }
                    _ => Flow::Continue,
                }
            }
        };
        if let Flow::Close = flow {
            return Flow::Close;
        }
    }
}

/// One response: its events at the knobs' pace, or the cut or stall they ask for.
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mock: &Mock,
    stream: &mut S,
    pending: &mut Vec<u8>,
    knobs: Knobs,
    n: u64,
) -> Flow {
    let id = format!("resp_mock_{n}");
    let created = json!({"type": "response.created", "event_id": format!("event_{n}_c"), "response": {"id": id, "object": "realtime.response", "status": "in_progress"}});
    if send(stream, &created).await.is_err() {
        return mock.cancelled();
    }
    let start = Instant::now();
    for i in 0..knobs.chunks {
        if knobs.cut_after == Some(i) {
            mock.stats.cut.fetch_add(1, Ordering::Relaxed);
            return Flow::Close;
        }
        if knobs.stall_after == Some(i) {
            let _ = mock
                .wait_until(stream, pending, Instant::now() + Duration::from_secs(600))
                .await;
            return mock.cancelled();
        }
        let due = start + knobs.first_delay + knobs.interval * i as u32;
        if mock.wait_until(stream, pending, due).await.is_err() {
            return mock.cancelled();
        }
        let audio =
            base64::engine::general_purpose::STANDARD.encode(audio_chunk(i, knobs.chunk_bytes));
        let delta = json!({"type": "response.output_audio.delta", "event_id": format!("event_{n}_{i}a"), "response_id": id, "delta": audio});
        let words = json!({"type": "response.output_audio_transcript.delta", "event_id": format!("event_{n}_{i}t"), "response_id": id, "delta": token(i, knobs.stamp)});
        if send(stream, &delta).await.is_err() || send(stream, &words).await.is_err() {
            return mock.cancelled();
        }
    }
    let out = OUTPUT_PER_CHUNK * knobs.chunks as u64;
    let done = json!({"type": "response.done", "event_id": format!("event_{n}_d"), "response": {
        "id": id, "object": "realtime.response", "status": "completed", "output": [],
        "usage": {"total_tokens": INPUT_TOKENS + out, "input_tokens": INPUT_TOKENS, "output_tokens": out,
            "input_token_details": {"cached_tokens": 0, "text_tokens": INPUT_TOKENS, "audio_tokens": 0},
            "output_token_details": {"text_tokens": knobs.chunks, "audio_tokens": out - knobs.chunks as u64}}}});
    send(stream, &done)
        .await
        .map_or_else(|()| mock.cancelled(), |()| Flow::Continue)
}

/// Sends `event` with its `type` first, as OpenAI writes its events (serde_json's own
/// order is alphabetical).
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, event: &Value) -> Result<(), ()> {
    let mut rest = event.clone();
    let kind = rest
        .as_object_mut()
        .and_then(|o| o.remove("type"))
        .unwrap_or(Value::Null);
    let rest = rest.to_string();
    let text = match rest.strip_prefix('{').filter(|r| *r != "}") {
        Some(r) => format!("{{\"type\":{kind},{r}"),
        None => format!("{{\"type\":{kind}}}"),
    };
    match write(stream, &server_frame(0x1, text.as_bytes())).await {
        Flow::Continue => Ok(()),
        Flow::Close => Err(()),
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, frame: &[u8]) -> Flow {
    match stream.write_all(frame).await {
        Ok(()) if stream.flush().await.is_ok() => Flow::Continue,
        _ => Flow::Close,
    }
}

/// The next whole client message (fragments joined, unmasked); `None` when the client
/// went away or broke the framing.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Message> {
    let mut text = Vec::new();
    loop {
        let (fin, opcode, payload) = read_frame(stream, buf).await?;
        match opcode {
            0x8 => return Some(Message::Close(payload)),
            0x9 => return Some(Message::Ping(payload)),
            0xa => continue,
            _ => {
                text.extend_from_slice(&payload);
                if text.len() > MAX_MESSAGE {
                    return None;
                }
                if fin {
                    return Some(Message::Text(text));
                }
            }
        }
    }
}

async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(bool, u8, Vec<u8>)> {
    fill(stream, buf, 2).await?;
    let (b0, b1) = (buf[0], buf[1]);
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let masked = b1 & 0x80 != 0;
    let head = 2 + ext + if masked { 4 } else { 0 };
    fill(stream, buf, head).await?;
    let len = match ext {
        2 => u16::from_be_bytes([buf[2], buf[3]]) as usize,
        8 => usize::try_from(u64::from_be_bytes(buf[2..10].try_into().ok()?)).ok()?,
        _ => (b1 & 0x7f) as usize,
    };
    if len > MAX_MESSAGE {
        return None;
    }
    fill(stream, buf, head + len).await?;
    let mask: Option<[u8; 4]> =
        masked.then(|| [buf[head - 4], buf[head - 3], buf[head - 2], buf[head - 1]]);
    let mut payload: Vec<u8> = buf.drain(..head + len).skip(head).collect();
    if let Some(k) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    Some((b0 & 0x80 != 0, b0 & 0x0f, payload))
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>, want: usize) -> Option<()> {
    let mut chunk = [0u8; 16_384];
    while buf.len() < want {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
