//! Request stage (`request_body_filter`): what the request body says about the call
//! (model, stream flag, token cap, whether usage was asked for), read while the body
//! flows to the upstream. The body is copied up to a cap and parsed once at its end;
//! larger bodies pass unread and the model is then taken from the response.

/// Request bodies up to this size are read for their fields.
pub const MAX_READ: usize = 1 << 20;

/// A body announced at most this long is read whole before the upstream is chosen, so
/// its fields are known at once and a rewrite keeps `content-length` framing. Pingora
/// replays such a body from its retry buffer (64 KiB), which this stays under.
pub const EARLY_READ_MAX: usize = 60 * 1024;

/// The body length a request announces in `content-length`, if it does.
pub fn content_length(req: &pingora_http::RequestHeader) -> Option<usize> {
    req.headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The announced length of a POST body that can be read early, if any.
pub fn early_read_len(req: &pingora_http::RequestHeader) -> Option<usize> {
    early_read_len_up_to(req, EARLY_READ_MAX)
}

/// The same, for bodies up to `max` bytes (a budgeted tenant's, whose model and size
/// must be known before it is forwarded).
pub fn early_read_len_up_to(req: &pingora_http::RequestHeader, max: usize) -> Option<usize> {
    if req.method != http::Method::POST {
        return None;
    }
    content_length(req).filter(|len| *len <= max)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub include_usage: bool,
    /// `stream_options` is in the body (an object or `null`).
    pub stream_options_present: bool,
    /// `store` as sent (`None`: absent or `null`).
    pub store: Option<bool>,
    pub store_present: bool,
}

/// Collects a request body as it flows upstream and reads it at the end. In hold mode
/// (the route may rewrite the body: usage for a chat stream, `store: false`) the body is
/// held back and sent in one piece at its end, rewritten as needed; a held body over
/// [`MAX_READ`] is released unchanged and passes through, unless `store` must be
/// rewritten, which it then refuses (`BodyEnd::unreadable`).
#[derive(Default)]
pub struct BodyCollector {
    buf: Vec<u8>,
    too_large: bool,
    rewrite: Rewrite,
    /// The fields of a form upload too large to keep, read from its start.
    form: Option<Result<RequestInfo, FieldProblem>>,
}

/// What the filter does with one request body chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyStep {
    /// Send the chunk as it is.
    Pass,
    /// Send this instead (held bytes, possibly rewritten; empty to send nothing yet).
    Replace(bytes::Bytes),
}

/// The end of a request body, read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BodyEnd {
    pub info: Option<RequestInfo>,
    /// The relay added `stream_options.include_usage`: the usage chunk it brings must
    /// not reach the client.
    pub usage_added: bool,
    /// The whole body was read and is not JSON.
    pub invalid_json: bool,
    /// A field the relay reads is there twice or has the wrong type.
    pub problem: Option<FieldProblem>,
    /// The body is too large to be read, and the route must rewrite it.
    pub unreadable: bool,
}

impl BodyCollector {
    /// Starts over for a new attempt (a retry replays the body from its start).
    pub fn reset(&mut self, rewrite: Rewrite) {
        self.buf.clear();
        self.too_large = false;
        self.rewrite = rewrite;
        self.form = None;
    }

    fn hold(&self) -> bool {
        self.rewrite.any()
    }

    /// The end of a body too large to read: what its start said, if it was a form.
    fn past_cap(&mut self) -> BodyEnd {
        let (info, problem) = match self.form.take() {
            None => (None, None),
            Some(Ok(info)) => (Some(info), None),
            Some(Err(p)) => (None, Some(p)),
        };
        BodyEnd {
            unreadable: self.rewrite.store_off,
            info,
            problem,
            ..BodyEnd::default()
        }
    }

    /// A chunk that takes the body past [`MAX_READ`]: what was held goes (or, when
    /// `store` must be rewritten, nothing more does).
    fn outgrown(&mut self, chunk: &[u8], end: bool) -> (BodyStep, Option<BodyEnd>) {
        self.too_large = true;
        let held = std::mem::take(&mut self.buf);
        // An upload (an audio file to transcribe) has its fields before its file.
        self.form = read_form(&held).transpose();
        if !self.hold() {
            return (BodyStep::Pass, end.then(|| self.past_cap()));
        }
        if self.rewrite.store_off {
            // Refused at its end; nothing more is sent meanwhile.
            return (
                BodyStep::Replace(bytes::Bytes::new()),
                Some(self.past_cap()),
            );
        }
        let mut out = held;
        out.extend_from_slice(chunk);
        (BodyStep::Replace(out.into()), end.then(|| self.past_cap()))
    }

    /// Takes one chunk; `end` is set with the last one.
    pub fn step(&mut self, chunk: &[u8], end: bool) -> (BodyStep, Option<BodyEnd>) {
        if self.too_large {
            return (BodyStep::Pass, end.then(|| self.past_cap()));
        }
        if self.buf.len() + chunk.len() > MAX_READ {
            return self.outgrown(chunk, end);
        }
        self.buf.extend_from_slice(chunk);
        if !end {
            return if self.hold() {
                (BodyStep::Replace(bytes::Bytes::new()), None)
            } else {
                (BodyStep::Pass, None)
            };
        }
        let buf = std::mem::take(&mut self.buf);
        let (info, problem) = match read(&buf).and_then(|info| match info {
            None => read_form(&buf),
            info => Ok(info),
        }) {
            Ok(info) => (info, None),
            Err(p) => (None, Some(p)),
        };
        // Only a body that is not a JSON object pays for a second parse; serde skips the
        // bytes of strings it does not keep, so UTF-8 is checked on its own.
        let invalid_json = std::str::from_utf8(&buf).is_err()
            || (info.is_none() && problem.is_none() && !crate::gate::is_json(&buf));
        let mut end = BodyEnd {
            info,
            usage_added: false,
            invalid_json,
            problem,
            unreadable: false,
        };
        if !self.hold() {
            return (BodyStep::Pass, Some(end));
        }
        let rewritten = match &end.info {
            Some(i) => rewrite(&buf, i, self.rewrite),
            // Not a request object (the JSON gate answers) or refused already.
            None if self.rewrite.store_off && end.problem.is_none() && !end.invalid_json => {
                Err(FieldProblem("the body is not a JSON object".into()))
            }
            None => Ok(None),
        };
        match rewritten {
            Ok(Some(r)) => {
                end.usage_added = r.usage_added;
                (BodyStep::Replace(r.body.into()), Some(end))
            }
            Ok(None) => (BodyStep::Replace(buf.into()), Some(end)),
            Err(p) => {
                end.problem = Some(p);
                (BodyStep::Replace(bytes::Bytes::new()), Some(end))
            }
        }
    }
}

/// What the relay changes in a request body before it goes upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Ask for usage on a stream that does not (`stream_options.include_usage`).
    pub usage: bool,
    /// Send `"store": false` (the route's `store: force_off`).
    pub store_off: bool,
}

impl Rewrite {
    pub fn any(self) -> bool {
        self.usage || self.store_off
    }
}

/// A body rewritten for the upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub body: Vec<u8>,
    /// `include_usage` was added: the usage chunk must not reach the client.
    pub usage_added: bool,
}

/// The body as `rewrite` says it must go, or `None` when nothing needs to change. Every
/// byte the relay does not change stays as the client sent it: a missing field is
/// inserted before the closing brace, a present one (`store: true`, `stream_options:
/// null`) has its value replaced where it stands. Duplicate keys were refused when the
/// body was read, so there is one value to change. `Err` when `store` must be turned off
/// and cannot be (the body is refused rather than sent as it is); usage that cannot be
/// asked for leaves the body as it is (the row then says the usage is unknown).
pub fn rewrite(
    body: &[u8],
    info: &RequestInfo,
    rewrite: Rewrite,
) -> Result<Option<Rewritten>, FieldProblem> {
    let mut usage = rewrite.usage && info.stream && !info.include_usage;
    let store = rewrite.store_off && info.store != Some(false);
    let cannot_store =
        || FieldProblem("the body could not be rewritten with `store: false`".into());
    // (start, end, replacement) of the bytes that change.
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::with_capacity(2);
    if usage && info.stream_options_present {
        match top_level_value(body, "stream_options")
            .and_then(|(a, b)| with_include_usage(&body[a..b]).map(|v| (a, b, v)))
        {
            Some(edit) => edits.push(edit),
            None => usage = false,
        }
    }
    if store && info.store_present {
        let (a, b) = top_level_value(body, "store").ok_or_else(cannot_store)?;
        edits.push((a, b, b"false".to_vec()));
    }
    let mut inserts: Vec<&[u8]> = Vec::with_capacity(2);
    if usage && !info.stream_options_present {
        inserts.push(br#""stream_options":{"include_usage":true}"#);
    }
    if store && !info.store_present {
        inserts.push(br#""store":false"#);
    }
    if edits.is_empty() && inserts.is_empty() {
        return if store { Err(cannot_store()) } else { Ok(None) };
    }
    let close = match body.iter().rposition(|b| !b.is_ascii_whitespace()) {
        Some(i) if body[i] == b'}' => i,
        _ if store => return Err(cannot_store()),
        _ => return Ok(None),
    };
    if !inserts.is_empty() {
        let empty = body[..close]
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .is_some_and(|i| body[i] == b'{');
        let mut added = Vec::with_capacity(64);
        for (i, field) in inserts.iter().enumerate() {
            if i > 0 || !empty {
                added.push(b',');
            }
            added.extend_from_slice(field);
        }
        edits.push((close, close, added));
    }
    edits.sort_by_key(|e| e.0);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (a, b, with) in edits {
        out.extend_from_slice(&body[at..a]);
        out.extend_from_slice(&with);
        at = b;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Some(Rewritten {
        body: out,
        usage_added: usage,
    }))
}

/// `stream_options` as sent (`null` or an object) with `include_usage: true` in it.
fn with_include_usage(value: &[u8]) -> Option<Vec<u8>> {
    if value == b"null" {
        return Some(br#"{"include_usage":true}"#.to_vec());
    }
    let mut opts: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(value).ok()?;
    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&opts).ok()
}

/// The byte span of the value of top-level `key` in a JSON object, if it is there. The
/// body was read whole before, so it is well formed; anything unexpected gives `None`.
fn top_level_value(body: &[u8], key: &str) -> Option<(usize, usize)> {
    let ws = |i: &mut usize| {
        while body.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    // The index just past the string that starts at `i` (a `"`).
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        loop {
            match *body.get(i)? {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
    };
    let mut i = 0;
    ws(&mut i);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        ws(&mut i);
        if body.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(i)?;
        let raw = &body[i..key_end];
        let matches = if raw.contains(&b'\\') {
            serde_json::from_slice::<String>(raw).ok().as_deref() == Some(key)
        } else {
            &raw[1..raw.len() - 1] == key.as_bytes()
        };
        i = key_end;
        ws(&mut i);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let start = i;
        let mut depth = 0usize;
        loop {
            match *body.get(i)? {
                b'"' => {
                    i = string_end(i)?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b'}' if depth == 0 => break,
                _ => {}
            }
            i += 1;
        }
        let mut end = i;
        while end > start && body[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
        if matches {
            return Some((start, end));
        }
        if body[i] == b'}' {
            return None;
        }
        i += 1;
    }
}

/// Why a body the relay reads is refused (400): a field it reads is there twice (its
/// parsers and the provider's could take different ones) or has the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem(pub String);

/// Reads the fields the relay needs. `Ok(None)`: not a JSON object (left to the JSON
/// gate). `null` is taken as absent, as providers do.
pub fn read(body: &[u8]) -> Result<Option<RequestInfo>, FieldProblem> {
    use serde::de::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = match de.deserialize_any(TopVisitor) {
        Ok(Some(f)) if de.end().is_ok() => f,
        Ok(_) => return Ok(None),
        // A JSON object (as the JSON gate and a lenient provider read it) whose fields the
        // relay could not read (a lone surrogate, a number out of range in a field it
        // reads): refused, rather than counted at a default the provider would not use.
        Err(_) if starts_object(body) && crate::gate::is_json(body) => {
            return Err(FieldProblem(
                "a field the relay reads (model, stream, max_tokens, stream_options, store) could not be read"
                    .into(),
            ))
        }
        Err(_) => return Ok(None),
    };
    fields.into_info()
}

/// The fields of a `multipart/form-data` upload (a transcription's `model` and
/// `stream`), `None` when the body is not one or names neither. A field there twice is
/// refused, as in JSON: the relay would price one model while the provider ran another.
fn read_form(body: &[u8]) -> Result<Option<RequestInfo>, FieldProblem> {
    let mut info = RequestInfo::default();
    let (mut model, mut stream) = (false, false);
    for (name, value) in form_fields(body) {
        let seen = match name {
            b"model" => {
                info.model = Some(String::from_utf8_lossy(value).into_owned());
                &mut model
            }
            b"stream" => {
                info.stream = value == b"true";
                &mut stream
            }
            _ => continue,
        };
        if std::mem::replace(seen, true) {
            let key = String::from_utf8_lossy(name);
            return Err(FieldProblem(format!(
                "the field `{key}` appears more than once"
            )));
        }
    }
    Ok((model || stream).then_some(info))
}

/// The text fields of a `multipart/form-data` body as (name, value), in order, file parts
/// skipped, up to the end of the bytes given (clients send their fields before the file,
/// so the start of a large upload has them); empty when the body is not a form.
pub fn form_fields(body: &[u8]) -> Vec<(&[u8], &[u8])> {
    use memchr::memmem::find;
    let mut fields = Vec::new();
    let Some(first) = find(body, b"\r\n") else {
        return fields;
    };
    if first < 3 || !body.starts_with(b"--") {
        return fields;
    }
    // Each part ends at CRLF and the delimiter line.
    let mut delimiter = b"\r\n".to_vec();
    delimiter.extend_from_slice(&body[..first]);
    let mut at = first + 2;
    while let Some(head_len) = find(&body[at..], b"\r\n\r\n") {
        let head = &body[at..at + head_len];
        let value_start = at + head_len + 4;
        let Some(len) = find(&body[value_start..], &delimiter) else {
            break;
        };
        // `name="..."`, not the `filename="..."` a file part also has.
        let name = memchr::memmem::find_iter(head, b"name=\"")
            .find(|&i| i == 0 || !head[i - 1].is_ascii_alphanumeric())
            .and_then(|i| {
                let rest = &head[i + 6..];
                memchr::memchr(b'"', rest).map(|end| &rest[..end])
            });
        match name {
            Some(name) if find(head, b"filename=").is_none() => {
                fields.push((name, &body[value_start..value_start + len]));
            }
            _ => {}
        }
        at = value_start + len + delimiter.len();
        // `--` after a delimiter ends the form; CRLF starts the next part.
        if body[at..].starts_with(b"--") {
            break;
        }
        at += 2;
    }
    fields
}

fn starts_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The fields read from one body; `Err` values are the first problem met.
#[derive(Default)]
struct Fields {
    seen: u16,
    problem: Option<String>,
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    stream_options_present: bool,
    include_usage: Option<bool>,
    store_present: bool,
    store: Option<bool>,
}

const FIELDS: [&str; 7] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream_options",
    "store",
];

impl Fields {
    fn into_info(self) -> Result<Option<RequestInfo>, FieldProblem> {
        if let Some(p) = self.problem {
            return Err(FieldProblem(p));
        }
        Ok(Some(RequestInfo {
            model: self.model,
            stream: self.stream.unwrap_or(false),
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .or(self.max_output_tokens),
            include_usage: self.include_usage.unwrap_or(false),
            stream_options_present: self.stream_options_present,
            store: self.store,
            store_present: self.store_present,
        }))
    }

    fn fail(&mut self, why: String) {
        self.problem.get_or_insert(why);
    }

    fn take(&mut self, key: &str, v: serde_json::Value) {
        use serde_json::Value;
        let Some(i) = FIELDS.iter().position(|f| *f == key) else {
            return;
        };
        if self.seen & (1 << i) != 0 {
            return self.fail(format!("the field `{key}` appears more than once"));
        }
        self.seen |= 1 << i;
        let wrong = |what: &str| format!("the field `{key}` must be {what}");
        match (key, v) {
            ("stream_options", Value::Object(o)) => {
                self.stream_options_present = true;
                match o.get("include_usage") {
                    None | Some(Value::Null) => {}
                    Some(Value::Bool(b)) => self.include_usage = Some(*b),
                    Some(_) => self
                        .fail("the field `stream_options.include_usage` must be a boolean".into()),
                }
            }
            ("stream_options", Value::Null) => self.stream_options_present = true,
            ("stream_options", _) => self.fail(wrong("an object")),
            ("store", v) => {
                self.store_present = true;
                match v {
                    Value::Null => {}
                    Value::Bool(b) => self.store = Some(b),
                    _ => self.fail(wrong("a boolean")),
                }
            }
            (_, Value::Null) => {}
            ("model", Value::String(m)) => self.model = Some(m),
            ("model", _) => self.fail(wrong("a string")),
            ("stream", Value::Bool(b)) => self.stream = Some(b),
            ("stream", _) => self.fail(wrong("a boolean")),
            (_, Value::Number(n)) if n.as_u64().is_some() => {
                let n = n.as_u64();
                match key {
                    "max_tokens" => self.max_tokens = n,
                    "max_completion_tokens" => self.max_completion_tokens = n,
                    _ => self.max_output_tokens = n,
                }
            }
            _ => self.fail(wrong("a non-negative integer")),
        }
    }
}

/// Visits the top level: an object gives its fields, anything else `None`.
struct TopVisitor;

impl<'de> serde::de::Visitor<'de> for TopVisitor {
    type Value = Option<Fields>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if FIELDS.contains(&key.as_ref()) {
                let v: serde_json::Value = map.next_value()?;
                fields.take(&key, v);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Some(fields))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// The fields of a body, or `None` when it is not a request object or is refused.
pub fn parse(body: &[u8]) -> Option<RequestInfo> {
    read(body).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: Rewrite = Rewrite {
        usage: true,
        store_off: false,
    };

    fn form(parts: &[(&str, &str)], file: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in parts {
            b.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        b.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n");
        b.resize(b.len() + file, 7);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    }

    #[test]
    fn an_upload_is_read_for_its_fields_however_large_its_file() {
        let small = form(&[("model", "gpt-4o-transcribe"), ("stream", "true")], 100);
        let big = form(&[("model", "whisper-1"), ("language", "en")], 3 * MAX_READ);
        assert_eq!(
            form_fields(&small),
            vec![
                (&b"model"[..], &b"gpt-4o-transcribe"[..]),
                (&b"stream"[..], &b"true"[..])
            ]
        );
        for (body, model, stream) in [
            (&small, "gpt-4o-transcribe", true),
            (&big, "whisper-1", false),
        ] {
            let mut c = BodyCollector::default();
            let mut last = None;
            let chunks: Vec<&[u8]> = body.chunks(64 * 1024).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let (step, end) = c.step(chunk, i + 1 == chunks.len());
                assert_eq!(step, BodyStep::Pass);
                last = end;
            }
            let end = last.unwrap();
            let info = end.info.unwrap();
            assert_eq!(info.model.as_deref(), Some(model));
            assert_eq!(info.stream, stream);
            assert!(!end.invalid_json);
        }
        assert!(form_fields(b"{\"model\":\"m\"}").is_empty());
        // A field after the file is read too, when the body is held whole.
        let mut late = form(&[], 100);
        late.truncate(late.len() - b"--XyZ--\r\n".len());
        late.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XyZ--\r\n");
        assert_eq!(
            read_form(&late).unwrap().unwrap().model.as_deref(),
            Some("gpt-4o-transcribe")
        );
        // Two models: the relay cannot know which one the provider runs, so it refuses.
        let twice = form(
            &[("model", "whisper-1"), ("model", "gpt-4o-transcribe")],
            10,
        );
        let mut c = BodyCollector::default();
        let (_, end) = c.step(&twice, true);
        assert!(end
            .unwrap()
            .problem
            .unwrap()
            .0
            .contains("`model` appears more than once"));
        assert!(form_fields(b"--\r\n").is_empty());
    }

    #[test]
    fn duplicate_or_mistyped_fields_are_refused_and_null_is_absent() {
        for (body, field) in [
            (&br#"{"max_tokens":10,"max_tokens":9999}"#[..], "max_tokens"),
            (br#"{"model":"a","stream":true,"model":"b"}"#, "model"),
            (
                br#"{"stream_options":null,"stream_options":{}}"#,
                "stream_options",
            ),
            (br#"{"max_tokens":"5000"}"#, "max_tokens"),
            (br#"{"max_tokens":1e9}"#, "max_tokens"),
            (br#"{"max_tokens":-1}"#, "max_tokens"),
            (br#"{"stream":"true"}"#, "stream"),
            (br#"{"stream_options":[]}"#, "stream_options"),
            (
                br#"{"stream_options":{"include_usage":1}}"#,
                "include_usage",
            ),
            (br#"{"store":"yes"}"#, "store"),
        ] {
            let p = read(body).unwrap_err();
            assert!(
                p.0.contains(field),
                "{}: {}",
                String::from_utf8_lossy(body),
                p.0
            );
        }
        // Fields the relay does not read may repeat: the provider's business.
        let info = read(
            br#"{"user":"a","user":"b","max_tokens":null,"stream":null,"stream_options":null}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (info.max_tokens, info.stream, info.include_usage),
            (None, false, false)
        );
        assert!(info.stream_options_present);
        assert_eq!(read(b"[1]").unwrap(), None);
        assert_eq!(read(b"{} {}").unwrap(), None);
        assert_eq!(read(b"nope").unwrap(), None);
    }

    #[test]
    fn usage_is_asked_for_when_stream_options_is_null() {
        let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let info = parse(body).unwrap();
        let out = rewrite(body, &info, USAGE).unwrap().unwrap();
        assert!(out.usage_added);
        let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn store_is_forced_off_when_asked_or_defaulted() {
        let off = Rewrite {
            usage: false,
            store_off: true,
        };
        for body in [
            &br#"{"model":"m","input":"x"}"#[..],
            br#"{"model":"m","store":true}"#,
            br#"{"model":"m","store":null}"#,
            br#"{}"#,
        ] {
            let info = parse(body).unwrap();
            let out = rewrite(body, &info, off).unwrap().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
            assert_eq!(v["store"], false, "{}", String::from_utf8_lossy(body));
        }
        let body = br#"{"model":"m","store":false}"#;
        assert_eq!(rewrite(body, &parse(body).unwrap(), off), Ok(None));
        // Both at once, inserted without touching the client's bytes.
        let body = br#"{"model":"m","stream":true}"#;
        let both = Rewrite {
            usage: true,
            store_off: true,
        };
        let out = rewrite(body, &parse(body).unwrap(), both).unwrap().unwrap();
        assert_eq!(
            out.body,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"store":false}"#
        );
    }

    #[test]
    fn a_rewrite_changes_only_the_value_it_must() {
        let off = Rewrite {
            usage: true,
            store_off: true,
        };
        // Key order, number spelling and escapes elsewhere stay as the client sent them.
        let body = br#"{ "store" : true , "z":1e2, "a":{"y":"\u00e9","b":[1,{"store":true}]}, "stream":true, "stream_options": null }"#;
        let out = rewrite(body, &parse(body).unwrap(), off).unwrap().unwrap();
        assert!(out.usage_added);
        assert_eq!(
            std::str::from_utf8(&out.body).unwrap(),
            r#"{ "store" : false , "z":1e2, "a":{"y":"\u00e9","b":[1,{"store":true}]}, "stream":true, "stream_options": {"include_usage":true} }"#
        );
        // An escaped key is the same key.
        let body = br#"{"st\u006fre":true,"model":"m"}"#;
        let out = rewrite(body, &parse(body).unwrap(), off).unwrap().unwrap();
        assert_eq!(&out.body[..], br#"{"st\u006fre":false,"model":"m"}"#);
    }

    #[test]
    fn bodies_the_relay_cannot_read_or_rewrite_fail_closed() {
        // A lone surrogate in a field the relay reads: the JSON gate takes it, the relay
        // cannot read it, so it is refused instead of counted at defaults.
        let body =
            br#"{"model":"m","max_tokens":10,"max_tokens":100000,"stream_options":{"x":"\udc00"}}"#;
        assert!(crate::gate::is_json(body));
        assert!(read(body).is_err());
        // Elsewhere it does not matter to the relay, and `store` is still turned off.
        let body = br#"{"model":"m","store":true,"input":"hi \ud83d","n":1e400}"#;
        let off = Rewrite {
            usage: false,
            store_off: true,
        };
        let out = rewrite(body, &parse(body).unwrap(), off).unwrap().unwrap();
        assert_eq!(
            &out.body[..],
            br#"{"model":"m","store":false,"input":"hi \ud83d","n":1e400}"#
        );
        // A held body that is JSON but no object cannot be sent with store: false.
        let mut c = BodyCollector::default();
        c.reset(off);
        let (step, end) = c.step(b"[1,2]", true);
        assert_eq!(step, BodyStep::Replace(bytes::Bytes::new()));
        assert!(end.unwrap().problem.is_some());
    }

    #[test]
    fn a_store_off_body_too_large_to_read_is_refused() {
        let mut c = BodyCollector::default();
        c.reset(Rewrite {
            usage: false,
            store_off: true,
        });
        let (step, end) = c.step(&vec![b' '; MAX_READ + 1], false);
        assert_eq!(step, BodyStep::Replace(bytes::Bytes::new()));
        assert!(end.unwrap().unreadable);
    }

    #[test]
    fn reads_fields_wherever_they_are() {
        let body = br#"{"messages":[{"role":"user","content":"x"}],"stream":true,"model":"gpt-4o","max_completion_tokens":50,"stream_options":{"include_usage":true}}"#;
        let mut c = BodyCollector::default();
        assert_eq!(c.step(&body[..10], false), (BodyStep::Pass, None));
        let (step, end) = c.step(&body[10..], true);
        assert_eq!(step, BodyStep::Pass);
        assert_eq!(
            end.unwrap().info,
            Some(RequestInfo {
                model: Some("gpt-4o".into()),
                stream: true,
                max_tokens: Some(50),
                include_usage: true,
                stream_options_present: true,
                ..Default::default()
            })
        );
        let anthropic = br#"{"model":"claude","max_tokens":1024,"messages":[]}"#;
        let info = parse(anthropic).unwrap();
        assert_eq!((info.stream, info.max_tokens), (false, Some(1024)));
    }

    #[test]
    fn large_or_broken_bodies_give_nothing() {
        let mut c = BodyCollector::default();
        c.step(&vec![b' '; MAX_READ], false);
        let (_, end) = c.step(b"{}", true);
        assert_eq!(end.unwrap().info, None);
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(b"[1,2]"), None);
    }

    #[test]
    fn held_streaming_body_gets_usage_requested() {
        let body = br#"{"model":"m","stream":true,"messages":[]}  "#;
        let mut c = BodyCollector::default();
        c.reset(USAGE);
        assert_eq!(
            c.step(&body[..7], false).0,
            BodyStep::Replace(bytes::Bytes::new())
        );
        let (step, end) = c.step(&body[7..], true);
        let want = br#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}  "#;
        assert_eq!(step, BodyStep::Replace(bytes::Bytes::from_static(want)));
        assert!(end.unwrap().usage_added);
        // Asked already, or not streaming: sent as it came.
        for body in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            b"not json",
        ] {
            c.reset(USAGE);
            let (step, end) = c.step(body, true);
            assert_eq!(step, BodyStep::Replace(bytes::Bytes::copy_from_slice(body)));
            assert!(!end.unwrap().usage_added);
        }
        // stream_options without include_usage.
        let info =
            parse(br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#).unwrap();
        let out = rewrite(
            br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#,
            &info,
            USAGE,
        )
        .unwrap()
        .unwrap()
        .body;
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
    }

    #[test]
    fn a_held_body_over_the_cap_is_released_unchanged() {
        let mut c = BodyCollector::default();
        c.reset(USAGE);
        let big = vec![b'x'; MAX_READ + 1];
        assert_eq!(
            c.step(&big[..10], false).0,
            BodyStep::Replace(bytes::Bytes::new())
        );
        match c.step(&big[10..], false).0 {
            BodyStep::Replace(b) => assert_eq!(b.len(), MAX_READ + 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.step(b"tail", false).0, BodyStep::Pass);
        assert_eq!(
            c.step(b"", true),
            (BodyStep::Pass, Some(BodyEnd::default()))
        );
    }
}
