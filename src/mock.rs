//! The mock provider: OpenAI chat completions, Anthropic messages and audio speech, as
//! JSON and as streams (and the Responses API, embeddings, transcriptions and a Realtime
//! WebSocket, see [`realtime`]), for tests, benchmarks and the first-run demo. No
//! network needed.
//!
//! Knobs come as request headers (defaults in [`Knobs::default`]):
//! `x-mock-chunks` (content events or audio chunks), `x-mock-interval-ms` (pacing),
//! `x-mock-first-delay-ms` (before the first byte), `x-mock-chunk-bytes` (audio chunk
//! size), `x-mock-status` (answer this error status), `x-mock-cut-after` (drop the
//! connection after N content events), `x-mock-stall-after` (after N content events,
//! send nothing more and keep the connection open), `x-mock-stamp: 1` (each content delta is the
//! send time in nanoseconds since the Unix epoch, for latency measurement).
//!
//! `POST /mock/control` (that exact path) with `{"status": 500, "key_status":
//! {"sk-a": 429}, "retry_after": 2}` makes every model request, or those carrying a given
//! key, answer that error (429s with `Retry-After`) until changed; `{}` restores normal
//! answers. For tests of failover and circuit breaking.
//!
//! With `expected_key` set, a request must carry it (`Authorization: Bearer`, `x-api-key`
//! or `api-key`) or it gets 401. `GET /mock/stats` (that exact path) returns counters as JSON: requests,
//! completed, cancelled (the client went away before the answer ended), cut, auth
//! failures, and the headers of the last model request, credentials replaced by
//! [`credential_digest`]s (the mock keeps no key value).
//!
//! The mock is a test double: its stats and control paths answer only on its own
//! listener's exact paths, so a relay route (whose upstream path has the route's base in
//! front, and whose endpoints do not list them) does not reach them. With a control key
//! (`--control-key`), they also need `x-mock-control-key` with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{sleep_until, Instant};

mod realtime;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    pub chunks: usize,
    pub interval: Duration,
    pub first_delay: Duration,
    pub chunk_bytes: usize,
    pub status: Option<u16>,
    pub cut_after: Option<usize>,
    pub stall_after: Option<usize>,
    pub stamp: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            chunks: 8,
            interval: Duration::from_millis(20),
            first_delay: Duration::ZERO,
            chunk_bytes: 4096,
            status: None,
            cut_after: None,
            stall_after: None,
            stamp: false,
        }
    }
}

#[derive(Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub cut: AtomicU64,
    pub auth_failures: AtomicU64,
    last_headers: Mutex<Vec<(String, String)>>,
    /// Model requests by the provider key they carried.
    by_key: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Errors the mock answers on request (`/mock/control`).
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Control {
    pub status: Option<u16>,
    pub key_status: std::collections::BTreeMap<String, u16>,
    pub retry_after: Option<u64>,
}

impl MockStats {
    pub fn to_json(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .last_headers
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "cancelled": self.cancelled.load(Ordering::Relaxed),
            "cut": self.cut.load(Ordering::Relaxed),
            "auth_failures": self.auth_failures.load(Ordering::Relaxed),
            "last_headers": headers,
            "by_key": *self.by_key.lock().expect("stats lock"),
        })
    }
}

pub struct Mock {
    pub expected_key: Option<String>,
    /// When set, `/mock/stats` and `/mock/control` need `x-mock-control-key` with it.
    pub control_key: Option<String>,
    pub defaults: Knobs,
    pub stats: MockStats,
    pub control: Mutex<Control>,
}

impl Mock {
    pub fn new(expected_key: Option<String>) -> Arc<Mock> {
        Mock::with_control_key(expected_key, None)
    }

    pub fn with_control_key(
        expected_key: Option<String>,
        control_key: Option<String>,
    ) -> Arc<Mock> {
        Arc::new(Mock {
            expected_key,
            control_key,
            defaults: Knobs::default(),
            stats: MockStats::default(),
            control: Mutex::new(Control::default()),
        })
    }

    /// Accepts connections until the task is dropped. `tls` wraps each connection.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let mock = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            mock.connection(stream).await;
                        }
                    }
                    None => mock.connection(tcp).await,
                }
            });
        }
    }

    async fn connection<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) {
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        loop {
            let req = match read_request(&mut stream, &mut buf).await {
                Some(r) => r,
                None => return,
            };
            let keep_alive = !req.close;
            match self.handle(&mut stream, &mut buf, req).await {
                Flow::Continue if keep_alive => continue,
                _ => return,
            }
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        req: Request,
    ) -> Flow {
        if let Some(flow) = self.control_request(stream, &req).await {
            return flow;
        }
        let Some(kind) = Kind::of_path(&req.path) else {
            let body = json!({"error": {"message": format!("mock: no endpoint {}", req.path), "type": "invalid_request_error", "param": null, "code": "unknown_url"}});
            return write_full(stream, 404, "application/json", body.to_string().as_bytes()).await;
        };
        let key = self.count_model_request(&req.headers);
        if let Some(flow) = self.forced_error(stream, kind, key.as_ref()).await {
            return flow;
        }

        if let Some(expected) = &self.expected_key {
            if !carries_key(&req.headers, expected) {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                let body = error_body(kind, 401, "mock: wrong or missing provider key");
                return write_full(stream, 401, "application/json", body.as_bytes()).await;
            }
        }
        if kind == Kind::Realtime {
            let knobs = knobs_from(&req.headers, self.defaults);
            return realtime::session(self, stream, pending, &req, knobs).await;
        }
        let ask = Ask::read(kind, &req, self.defaults);

        let start = Instant::now();
        if !ask.knobs.first_delay.is_zero()
            && self
                .wait_until(stream, pending, start + ask.knobs.first_delay)
                .await
                .is_err()
        {
            return self.cancelled();
        }
        if let Some(status) = ask.knobs.status {
            let body = error_body(kind, status, "mock: error requested by x-mock-status");
            return self
                .finish(write_full(stream, status, "application/json", body.as_bytes()).await);
        }
        if !ask.streaming {
            let doc = ask.json_answer();
            return self.finish(
                write_full(stream, 200, "application/json", doc.to_string().as_bytes()).await,
            );
        }
        self.stream_answer(stream, pending, &ask, start).await
    }

    /// `/mock/stats` and `/mock/control` (None for any other path).
    async fn control_request<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        req: &Request,
    ) -> Option<Flow> {
        let control_path = req.path == "/mock/stats" || req.path == "/mock/control";
        if control_path && !self.control_allowed(&req.headers) {
            let body = json!({"error": {"message": "mock: wrong or missing x-mock-control-key", "type": "authentication_error", "param": null, "code": "invalid_control_key"}});
            return Some(
                write_full(stream, 401, "application/json", body.to_string().as_bytes()).await,
            );
        }
        if req.path == "/mock/stats" {
            let body = self.stats.to_json().to_string();
            return Some(write_full(stream, 200, "application/json", body.as_bytes()).await);
        }
        if req.path != "/mock/control" {
            return None;
        }
        if !req.body.is_empty() {
            match serde_json::from_slice::<Control>(&req.body) {
                Ok(c) => *self.control.lock().expect("control lock") = c,
                Err(e) => {
                    let body = json!({"error": e.to_string()}).to_string();
                    return Some(
                        write_full(stream, 400, "application/json", body.as_bytes()).await,
                    );
                }
            }
        }
        let body = serde_json::to_string(&*self.control.lock().expect("control lock"))
            .expect("serializes");
        Some(write_full(stream, 200, "application/json", body.as_bytes()).await)
    }

    /// Counts a model request in the stats (its headers redacted, its key as a digest);
    /// the provider key it carries.
    fn count_model_request(&self, headers: &[(String, String)]) -> Option<String> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        *self.stats.last_headers.lock().expect("stats lock") = redacted(headers);
        let key = presented_key(headers);
        if let Some(k) = &key {
            *self
                .stats
                .by_key
                .lock()
                .expect("stats lock")
                .entry(credential_digest(k))
                .or_default() += 1;
        }
        key
    }

    /// The error `/mock/control` set for every request or for this `key`, answered
    /// (None when there is none).
    async fn forced_error<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        kind: Kind,
        key: Option<&String>,
    ) -> Option<Flow> {
        let (status, retry_after) = {
            let c = self.control.lock().expect("control lock");
            let by_key = key.and_then(|k| c.key_status.get(k).copied());
            by_key.or(c.status).map(|s| (s, c.retry_after))
        }?;
        let body = error_body(kind, status, "mock: error set by /mock/control");
        let extra = match (status, retry_after) {
            (429, Some(secs)) => format!("retry-after: {secs}\r\n"),
            _ => String::new(),
        };
        Some(self.finish(
            write_full_with(stream, status, "application/json", &extra, body.as_bytes()).await,
        ))
    }

    /// A streamed answer: the head, then each event of the plan at its time, then the
    /// chunked terminator; or a cut or stall where the knobs ask for one.
    async fn stream_answer<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        ask: &Ask,
        start: Instant,
    ) -> Flow {
        let content_type = if ask.kind == Kind::Audio {
            "audio/mpeg"
        } else {
            "text/event-stream"
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-mock-provider: 1\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return self.cancelled();
        }
        let knobs = ask.knobs;
        let mut events = EventPlan::new(
            ask.kind,
            &ask.model,
            ask.prompt_tokens,
            knobs,
            ask.include_usage,
        );
        let mut content_sent = 0usize;
        while let Some(event) = events.next_event() {
            if event.content {
                if let Flow::Close = self.pace(stream, pending, knobs, start, content_sent).await {
                    return Flow::Close;
                }
                content_sent += 1;
            }
            let data = (events.render)(&event, knobs.stamp);
            if write_chunk(stream, &data).await.is_err() {
                return self.cancelled();
            }
        }
        if stream.write_all(b"0\r\n\r\n").await.is_err() {
            return self.cancelled();
        }
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        Flow::Continue
    }

    /// Before content event `content_sent`: the cut or stall planned there (counted,
    /// `Flow::Close`), else the wait until the event is due (`Flow::Close`, counted as
    /// cancelled, when the client goes away meanwhile).
    async fn pace<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        knobs: Knobs,
        start: Instant,
        content_sent: usize,
    ) -> Flow {
        if knobs.cut_after == Some(content_sent) {
            // Drop the connection without the chunked terminator.
            let _ = stream.flush().await;
            self.stats.cut.fetch_add(1, Ordering::Relaxed);
            return Flow::Close;
        }
        if knobs.stall_after == Some(content_sent) {
            // Silent, connection open, until the client gives up (at most 10 min).
            let _ = stream.flush().await;
            let until = Instant::now() + Duration::from_secs(600);
            let _ = self.wait_until(stream, pending, until).await;
            return self.cancelled();
        }
        let due = start + knobs.first_delay + knobs.interval * content_sent as u32;
        if self.wait_until(stream, pending, due).await.is_err() {
            return self.cancelled();
        }
        Flow::Continue
    }

    /// Counts an answer the client did not take to its end.
    fn cancelled(&self) -> Flow {
        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        Flow::Close
    }

    fn finish(&self, flow: Flow) -> Flow {
        match flow {
            Flow::Continue => self.stats.completed.fetch_add(1, Ordering::Relaxed),
            Flow::Close => self.stats.cancelled.fetch_add(1, Ordering::Relaxed),
        };
        flow
    }

    /// Sleeps until `due` while watching the client: Err when it closed the connection.
    /// Bytes it sends meanwhile (a pipelined request) are kept in `pending`.
    async fn wait_until<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        due: Instant,
    ) -> Result<(), ()> {
        let mut probe = [0u8; 1024];
        loop {
            tokio::select! {
                _ = sleep_until(due) => return Ok(()),
                r = stream.read(&mut probe) => match r {
                    Ok(0) | Err(_) => return Err(()),
                    Ok(n) => pending.extend_from_slice(&probe[..n]),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OpenAi,
    Anthropic,
    Audio,
    /// Speech asked for with `stream_format: "sse"`: `speech.audio.*` events.
    SpeechSse,
    /// The Responses API (`/v1/responses`).
    Responses,
    Embeddings,
    /// `/v1/audio/transcriptions`: a multipart upload; JSON, or `transcript.text.*`
    /// events when its `stream` field is true.
    Transcription,
    /// `/v1/realtime`: a WebSocket session ([`realtime`]).
    Realtime,
}

impl Kind {
    /// The endpoint a path ends in.
    fn of_path(path: &str) -> Option<Kind> {
        if path.ends_with("/chat/completions") {
            Some(Kind::OpenAi)
        } else if path.ends_with("/messages") {
            Some(Kind::Anthropic)
        } else if path.ends_with("/audio/speech") {
            Some(Kind::Audio)
        } else if path.ends_with("/responses") {
            Some(Kind::Responses)
        } else if path.ends_with("/embeddings") {
            Some(Kind::Embeddings)
        } else if path.ends_with("/audio/transcriptions") {
            Some(Kind::Transcription)
        } else if path.ends_with("/realtime") {
            Some(Kind::Realtime)
        } else {
            None
        }
    }
}

/// What a model request asks for, from its headers and body.
struct Ask {
    kind: Kind,
    knobs: Knobs,
    model: String,
    streaming: bool,
    include_usage: bool,
    prompt_tokens: u64,
}

impl Ask {
    fn read(kind: Kind, req: &Request, defaults: Knobs) -> Ask {
        let body: Value = if kind == Kind::Transcription {
            multipart_fields(&req.body)
        } else {
            serde_json::from_slice(&req.body).unwrap_or(Value::Null)
        };
        let kind = match kind {
            Kind::Audio if body["stream_format"] == "sse" => Kind::SpeechSse,
            k => k,
        };
        Ask {
            kind,
            knobs: knobs_from(&req.headers, defaults),
            model: body["model"].as_str().unwrap_or("mock-model").to_string(),
            streaming: matches!(body["stream"], Value::Bool(true))
                || body["stream"] == "true"
                || matches!(kind, Kind::Audio | Kind::SpeechSse),
            include_usage: body["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false),
            prompt_tokens: (req.body.len() / 4).max(1) as u64,
        }
    }

    /// The whole answer of a request that did not ask for a stream.
    fn json_answer(&self) -> Value {
        let chunks = self.knobs.chunks;
        let text = (0..chunks).map(|i| token(i, false)).collect::<String>();
        let (model, prompt, out) = (&self.model[..], self.prompt_tokens, chunks as u64);
        match self.kind {
            Kind::OpenAi => openai_json(model, &text, prompt, out),
            Kind::Responses => responses_json(model, &text, prompt, out, "completed"),
            Kind::Embeddings => json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0125, -0.0311, 0.0047]}],
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}
            }),
            Kind::Transcription => json!({
                "text": text,
                "usage": transcription_usage(prompt, out)
            }),
            _ => anthropic_json(model, &text, prompt, out),
        }
    }
}

enum Flow {
    Continue,
    Close,
}

struct Request {
    path: String,
    /// What follows `?` in the target (empty when nothing does).
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl Mock {
    fn control_allowed(&self, headers: &[(String, String)]) -> bool {
        match &self.control_key {
            None => true,
            Some(want) => headers.iter().any(|(k, v)| {
                k == "x-mock-control-key"
                    && subtle::ConstantTimeEq::ct_eq(v.as_bytes(), want.as_bytes()).into()
            }),
        }
    }
}

/// What the mock keeps of a credential: `sha256:` and the first 16 hex digits of its
/// SHA-256, enough for a test to tell which key arrived, useless to anyone else.
pub fn credential_digest(value: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(value.as_bytes());
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Headers that carry credentials, kept only as digests.
const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "proxy-authorization",
];

fn redacted(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            if CREDENTIAL_HEADERS.contains(&k.as_str()) {
                (k.clone(), credential_digest(v))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

/// The provider key a request carries, from any of the headers providers use.
fn presented_key(headers: &[(String, String)]) -> Option<String> {
    headers.iter().find_map(|(k, v)| match k.as_str() {
        "authorization" => v.strip_prefix("Bearer ").map(str::to_string),
        "x-api-key" | "api-key" => Some(v.clone()),
        _ => None,
    })
}

fn carries_key(headers: &[(String, String)], expected: &str) -> bool {
    headers.iter().any(|(k, v)| match k.as_str() {
        "authorization" => v.strip_prefix("Bearer ") == Some(expected),
        "x-api-key" | "api-key" => v == expected,
        _ => false,
    })
}

fn knobs_from(headers: &[(String, String)], mut k: Knobs) -> Knobs {
    let num = |name: &str| -> Option<u64> {
        headers
            .iter()
            .find(|(h, _)| h == name)
            .and_then(|(_, v)| v.trim().parse().ok())
    };
    if let Some(v) = num("x-mock-chunks") {
        k.chunks = v.min(1_000_000) as usize;
    }
    if let Some(v) = num("x-mock-interval-ms") {
        k.interval = Duration::from_millis(v);
    }
    if let Some(v) = num("x-mock-first-delay-ms") {
        k.first_delay = Duration::from_millis(v);
    }
    if let Some(v) = num("x-mock-chunk-bytes") {
        k.chunk_bytes = v.clamp(1, 1 << 20) as usize;
    }
    if let Some(v) = num("x-mock-status") {
        k.status = u16::try_from(v).ok().filter(|s| (200..600).contains(s));
    }
    if let Some(v) = num("x-mock-cut-after") {
        k.cut_after = Some(v as usize);
    }
    if let Some(v) = num("x-mock-stall-after") {
        k.stall_after = Some(v as usize);
    }
    if let Some(v) = num("x-mock-stamp") {
        k.stamp = v == 1;
    }
    k
}

const WORDS: [&str; 8] = [
    "Hello",
    " from",
    " the",
    " mock",
    " provider",
    ",",
    " token",
    " stream.",
];

fn token(i: usize, stamp: bool) -> String {
    if stamp {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        nanos.to_string()
    } else {
        WORDS[i % WORDS.len()].to_string()
    }
}

fn error_body(kind: Kind, status: u16, message: &str) -> String {
    match kind {
        Kind::Anthropic => {
            let t = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": t, "message": message}}).to_string()
        }
        _ => {
            let t = if status == 429 {
                "rate_limit_exceeded"
            } else if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            };
            json!({"error": {"message": message, "type": t, "param": null, "code": null}})
                .to_string()
        }
    }
}

fn openai_json(model: &str, text: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage_json(prompt, completion),
        "system_fingerprint": "fp_mock"
    })
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

/// A whole Responses API answer (also the `response` of its terminal event).
fn responses_json(model: &str, text: &str, input: u64, output: u64, status: &str) -> Value {
    json!({
        "id": "resp_mock",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "error": null,
        "incomplete_details": null,
        "model": model,
        "output": [{"type": "message", "id": "msg_mock", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input + output
        }
    })
}

fn transcription_usage(input: u64, output: u64) -> Value {
    json!({
        "type": "tokens",
        "input_tokens": input,
        "input_token_details": {"text_tokens": 0, "audio_tokens": input},
        "output_tokens": output,
        "total_tokens": input + output
    })
}

/// The text fields of a `multipart/form-data` body as a JSON object: enough to read
/// `model` and `stream` of a transcription upload.
fn multipart_fields(body: &[u8]) -> Value {
    let fields = crate::request_info::form_fields(body)
        .into_iter()
        .map(|(name, value)| {
            (
                String::from_utf8_lossy(name).into_owned(),
                Value::String(String::from_utf8_lossy(value).into_owned()),
            )
        })
        .collect();
    Value::Object(fields)
}

fn anthropic_json(model: &str, text: &str, input: u64, output: u64) -> Value {
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output}
    })
}

/// One event of a stream; `content` marks the paced events that carry output.
struct Event {
    step: Step,
    content: bool,
}

#[derive(Clone, Copy)]
enum Step {
    OpenAiRole,
    OpenAiContent(usize),
    OpenAiFinish,
    OpenAiUsage,
    OpenAiDone,
    AnthropicStart,
    AnthropicBlockStart,
    AnthropicPing,
    AnthropicDelta(usize),
    AnthropicBlockStop,
    AnthropicMessageDelta,
    AnthropicStop,
    Audio(usize),
    ResponsesCreated,
    ResponsesInProgress,
    ResponsesItemAdded,
    ResponsesPartAdded,
    ResponsesDelta(usize),
    ResponsesTextDone,
    ResponsesPartDone,
    ResponsesItemDone,
    ResponsesCompleted,
    TranscriptDelta(usize),
    TranscriptDone,
    SpeechDelta(usize),
    SpeechDone,
}

/// Renders one event's bytes; the flag asks for a send-time stamp as content.
type Render = Box<dyn Fn(&Event, bool) -> Vec<u8> + Send>;

/// The ordered events of one streamed answer and how to render them.
struct EventPlan {
    steps: std::vec::IntoIter<Event>,
    render: Render,
}

impl EventPlan {
    fn new(kind: Kind, model: &str, prompt: u64, k: Knobs, include_usage: bool) -> EventPlan {
        EventPlan {
            steps: steps(kind, k.chunks, include_usage).into_iter(),
            render: renderer(model, prompt, k, include_usage),
        }
    }

    fn next_event(&mut self) -> Option<Event> {
        self.steps.next()
    }
}

/// The events of a streamed answer of `kind` with `chunks` content events, in order.
fn steps(kind: Kind, chunks: usize, include_usage: bool) -> Vec<Event> {
    let mut steps = Vec::with_capacity(chunks + 8);
    let plain = |step| Event {
        step,
        content: false,
    };
    let paced = |step| Event {
        step,
        content: true,
    };
    match kind {
        Kind::OpenAi => {
            steps.push(plain(Step::OpenAiRole));
            steps.extend((0..chunks).map(|i| paced(Step::OpenAiContent(i))));
            steps.push(plain(Step::OpenAiFinish));
            if include_usage {
                steps.push(plain(Step::OpenAiUsage));
            }
            steps.push(plain(Step::OpenAiDone));
        }
        Kind::Anthropic => {
            steps.push(plain(Step::AnthropicStart));
            steps.push(plain(Step::AnthropicBlockStart));
            steps.push(plain(Step::AnthropicPing));
            steps.extend((0..chunks).map(|i| paced(Step::AnthropicDelta(i))));
            steps.push(plain(Step::AnthropicBlockStop));
            steps.push(plain(Step::AnthropicMessageDelta));
            steps.push(plain(Step::AnthropicStop));
        }
        Kind::Audio => steps.extend((0..chunks).map(|i| paced(Step::Audio(i)))),
        Kind::Responses => {
            steps.push(plain(Step::ResponsesCreated));
            steps.push(plain(Step::ResponsesInProgress));
            steps.push(plain(Step::ResponsesItemAdded));
            steps.push(plain(Step::ResponsesPartAdded));
            steps.extend((0..chunks).map(|i| paced(Step::ResponsesDelta(i))));
            steps.push(plain(Step::ResponsesTextDone));
            steps.push(plain(Step::ResponsesPartDone));
            steps.push(plain(Step::ResponsesItemDone));
            steps.push(plain(Step::ResponsesCompleted));
        }
        Kind::Transcription => {
            steps.extend((0..chunks).map(|i| paced(Step::TranscriptDelta(i))));
            steps.push(plain(Step::TranscriptDone));
        }
        Kind::SpeechSse => {
            steps.extend((0..chunks).map(|i| paced(Step::SpeechDelta(i))));
            steps.push(plain(Step::SpeechDone));
        }
        // Answered whole, never streamed.
        Kind::Embeddings | Kind::Realtime => {}
    }
    steps
}

/// How each event of an answer for `model` renders.
fn renderer(model: &str, prompt: u64, k: Knobs, include_usage: bool) -> Render {
    let model = model.to_string();
    let chunks = k.chunks as u64;
    let chunk_bytes = k.chunk_bytes;
    let usage_field = if include_usage { ",\"usage\":null" } else { "" };
    Box::new(move |e: &Event, stamp: bool| -> Vec<u8> {
        let openai = |delta: String, finish: &str| {
            format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage_field}}}\n\n"
            )
            .into_bytes()
        };
        let sse = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n").into_bytes();
        match e.step {
            Step::OpenAiRole => openai(
                "{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}".into(),
                "null",
            ),
            Step::OpenAiContent(i) => openai(
                json!({"content": token(i, stamp)}).to_string(),
                "null",
            ),
            Step::OpenAiFinish => openai("{}".into(), "\"stop\""),
            Step::OpenAiUsage => format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}\",\"system_fingerprint\":\"fp_mock\",\"choices\":[],\"usage\":{}}}\n\n",
                usage_json(prompt, chunks)
            )
            .into_bytes(),
            Step::OpenAiDone => b"data: [DONE]\n\n".to_vec(),
            Step::AnthropicStart => sse(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
            ),
            Step::AnthropicBlockStart => sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            Step::AnthropicPing => sse("ping", json!({"type": "ping"})),
            Step::AnthropicDelta(i) => sse(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token(i, stamp)}}),
            ),
            Step::AnthropicBlockStop => sse(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            Step::AnthropicMessageDelta => sse(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": chunks}}),
            ),
            Step::AnthropicStop => sse("message_stop", json!({"type": "message_stop"})),
            Step::Audio(i) => audio_chunk(i, chunk_bytes),
            Step::SpeechDelta(i) => {
                use base64::Engine;
                let audio = base64::engine::general_purpose::STANDARD.encode(audio_chunk(i, chunk_bytes));
                sse("speech.audio.delta", json!({"type": "speech.audio.delta", "audio": audio}))
            }
            Step::SpeechDone => sse(
                "speech.audio.done",
                json!({"type": "speech.audio.done", "usage": {"input_tokens": prompt, "output_tokens": chunks, "total_tokens": prompt + chunks}}),
            ),
            Step::TranscriptDelta(i) => sse(
                "transcript.text.delta",
                json!({"type": "transcript.text.delta", "delta": token(i, stamp), "logprobs": []}),
            ),
            Step::TranscriptDone => sse(
                "transcript.text.done",
                json!({"type": "transcript.text.done", "text": full_text(chunks), "usage": transcription_usage(prompt, chunks)}),
            ),
            step => responses_event(step, &model, prompt, chunks, stamp),
        }
    })
}

/// The text of an answer with `chunks` content events, as its final events repeat it.
fn full_text(chunks: u64) -> String {
    (0..chunks as usize).map(|i| token(i, false)).collect()
}

/// One event of a streamed Responses answer: named, typed, numbered in order (its
/// `sequence_number`), deltas padded by an `obfuscation` field as OpenAI's are.
fn responses_event(step: Step, model: &str, prompt: u64, chunks: u64, stamp: bool) -> Vec<u8> {
    let text = || full_text(chunks);
    let part = |text: String| json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text});
    let item = |status: &str, content: Value| json!({"id": "msg_mock", "type": "message", "status": status, "role": "assistant", "content": content});
    let in_progress = || {
        let mut r = responses_json(model, "", prompt, 0, "in_progress");
        r["output"] = json!([]);
        r["usage"] = Value::Null;
        r
    };
    let (kind, mut data) = match step {
        Step::ResponsesCreated => (
            "response.created",
            json!({"response": in_progress(), "sequence_number": 0}),
        ),
        Step::ResponsesInProgress => (
            "response.in_progress",
            json!({"response": in_progress(), "sequence_number": 1}),
        ),
        Step::ResponsesItemAdded => (
            "response.output_item.added",
            json!({"output_index": 0, "item": item("in_progress", json!([])), "sequence_number": 2}),
        ),
        Step::ResponsesPartAdded => (
            "response.content_part.added",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "part": part(String::new()), "sequence_number": 3}),
        ),
        Step::ResponsesDelta(i) => {
            let delta = token(i, stamp);
            let pad = "x".repeat(1 + (i * 7) % 12);
            (
                "response.output_text.delta",
                json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": delta, "logprobs": [], "obfuscation": pad, "sequence_number": 4 + i as u64}),
            )
        }
        Step::ResponsesTextDone => (
            "response.output_text.done",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "text": text(), "logprobs": [], "sequence_number": 4 + chunks}),
        ),
        Step::ResponsesPartDone => (
            "response.content_part.done",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "part": part(text()), "sequence_number": 5 + chunks}),
        ),
        Step::ResponsesItemDone => (
            "response.output_item.done",
            json!({"output_index": 0, "item": item("completed", json!([part(text())])), "sequence_number": 6 + chunks}),
        ),
        _ => (
            "response.completed",
            json!({"response": responses_json(model, &text(), prompt, chunks, "completed"), "sequence_number": 7 + chunks}),
        ),
    };
    data["type"] = Value::String(kind.into());
    format!("event: {kind}\ndata: {data}\n\n").into_bytes()
}

/// Deterministic bytes for audio chunk `i`, so streams can be compared byte for byte.
pub fn audio_chunk(i: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|j| (j.wrapping_mul(31).wrapping_add(i.wrapping_mul(7))) as u8)
        .collect()
}

async fn write_chunk<S: AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(data.len() + 12);
    framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    stream.write_all(&framed).await?;
    stream.flush().await
}

async fn write_full<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Flow {
    write_full_with(stream, status, content_type, "", body).await
}

/// `extra`: more header lines, each ending in CRLF.
async fn write_full_with<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
) -> Flow {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    match stream.write_all(&out).await {
        Ok(()) if stream.flush().await.is_ok() => Flow::Continue,
        _ => Flow::Close,
    }
}

/// Parsed headers as owned (lower-case name, value) pairs.
pub fn owned_headers(headers: &[httparse::Header]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Reads one request (head and body) from `stream`, starting with bytes already in `buf`.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Request> {
    let mut chunk = [0u8; 8192];
    let (head_len, path, headers) = loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers = owned_headers(req.headers);
                break (n, req.path.unwrap_or("/").to_string(), headers);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return None,
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    buf.drain(..head_len);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(stream, buf).await?
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if len > MAX_BODY {
            return None;
        }
        while buf.len() < len {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len).collect()
    };
    let (path, query) = path.split_once('?').unwrap_or((&path, ""));
    Some(Request {
        query: query.to_string(),
        path: path.to_string(),
        headers,
        body,
        close,
    })
}

async fn read_chunked<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Need a size line.
        let line_end = loop {
            if let Some(i) = memchr::memmem::find(buf, b"\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if body.len() + size > MAX_BODY {
            return None;
        }
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..need);
        if size == 0 {
            return Some(body);
        }
    }
}

/// Builds a TLS acceptor from PEM certificate chain and key files.
pub fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{cert}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_all(kind: Kind, chunks: usize, include_usage: bool) -> String {
        let k = Knobs {
            chunks,
            ..Knobs::default()
        };
        let mut plan = EventPlan::new(kind, "m", 10, k, include_usage);
        let mut out = Vec::new();
        while let Some(e) = plan.next_event() {
            out.extend((plan.render)(&e, false));
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn openai_stream_has_role_content_finish_usage_done() {
        let s = render_all(Kind::OpenAi, 2, true);
        let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 6);
        assert!(events[0].contains("\"role\":\"assistant\""));
        assert!(events[1].contains("\"content\":\"Hello\""));
        assert!(events[3].contains("\"finish_reason\":\"stop\""));
        let usage: Value = serde_json::from_str(events[4].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        assert_eq!(events[5], "data: [DONE]");
        // Every other chunk carries "usage":null, as OpenAI sends it.
        assert!(events[1].ends_with("\"usage\":null}"));
        assert!(!render_all(Kind::OpenAi, 2, false).contains("usage"));
    }

    #[test]
    fn anthropic_stream_has_the_full_event_sequence() {
        let s = render_all(Kind::Anthropic, 3, false);
        let names: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(s.contains("\"output_tokens\":3"));
    }

    #[test]
    fn knobs_parse_from_headers() {
        let h = vec![
            ("x-mock-chunks".to_string(), "3".to_string()),
            ("x-mock-interval-ms".to_string(), "50".to_string()),
            ("x-mock-status".to_string(), "503".to_string()),
            ("x-mock-cut-after".to_string(), "1".to_string()),
        ];
        let k = knobs_from(&h, Knobs::default());
        assert_eq!(k.chunks, 3);
        assert_eq!(k.interval, Duration::from_millis(50));
        assert_eq!(k.status, Some(503));
        assert_eq!(k.cut_after, Some(1));
    }

    #[test]
    fn key_check_accepts_the_three_header_styles() {
        let h = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(carries_key(&h("authorization", "Bearer k1"), "k1"));
        assert!(carries_key(&h("x-api-key", "k1"), "k1"));
        assert!(carries_key(&h("api-key", "k1"), "k1"));
        assert!(!carries_key(&h("authorization", "k1"), "k1"));
    }
}
