//! Cache stage: the plan and lookup at admission (`request_filter`), a hit answered as
//! the client first got it, what the client gets kept (`response_body_filter`), and a
//! complete answer stored at the end (`logging`). See [`crate::cache`].

use pingora_core::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::ctx::{Admitted, RequestCtx};
use super::RelayProxy;
use crate::cache::{self, Capture, Entry, Mode};
use crate::tap::TapKind;

impl RelayProxy {
    /// The request's cache plan, looked up: `None` when its route does not cache or its
    /// body was not read whole before forwarding.
    pub(super) async fn plan_cache(&self, a: &mut Admitted, req: &RequestHeader, body: &[u8]) {
        let Some(config) = &a.route.cache else {
            return;
        };
        if body.is_empty() {
            return;
        }
        let scope = match &config.shared_by {
            Some(group) if a.groups.iter().any(|g| g == group) => format!("group:{group}"),
            _ => format!("tenant:{}", a.tenant),
        };
        let header = |name: &str| req.headers.get(name).map(|v| v.as_bytes());
        let keyed = cache::key::KEYED_HEADERS;
        let format = match a.body.info.as_ref() {
            Some(i) if i.stream && i.include_usage => "sse+usage",
            Some(i) if i.stream => "sse",
            _ => "json",
        };
        let parts = cache::key::KeyParts {
            scope: &scope,
            route: &a.route.name,
            path_and_query: &a.route.provider_path_and_query(&req.uri),
            format,
            headers: [header(keyed[0]), header(keyed[1]), header(keyed[2])],
        };
        let mut plan = self
            .cache
            .plan(config, &parts, body, cache::asked(&req.headers));
        self.cache.lookup(&mut plan).await;
        a.cache = Some(Box::new(plan));
    }

    /// Answers the request from its cache entry: the head the relay gives every answer,
    /// then the body as the client first got it, a stream event by event.
    pub(super) async fn serve_hit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        entry: &Entry,
    ) -> Result<bool> {
        let mut head = ResponseHeader::build(200, Some(4))?;
        head.insert_header(http::header::CONTENT_TYPE, entry.content_type.as_str())?;
        if entry.stream {
            head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            head.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
        } else {
            head.insert_header(http::header::CONTENT_LENGTH, entry.size())?;
        }
        head.insert_header(cache::HEADER, "hit")?;
        let admission = ctx.admitted.as_ref().and_then(|a| a.admission.as_ref());
        super::response::client_head(&mut head, ctx.answer_id(), admission, None)?;
        ctx.client_status = Some(200);
        session.write_response_header(Box::new(head), false).await?;
        let last = entry.chunks.len().saturating_sub(1);
        for (i, chunk) in entry.chunks.iter().enumerate() {
            session
                .write_response_body(Some(chunk.clone()), i == last)
                .await?;
        }
        if entry.chunks.is_empty() {
            session.write_response_body(None, true).await?;
        }
        Ok(true)
    }

    /// At the end of a request on a caching route: its complete answer stored (never an
    /// error, a cut or stalled stream, one without usage or larger than the cap).
    pub(super) async fn store_answer(&self, ctx: &mut RequestCtx, outcome: &str) {
        let client_status = ctx.client_status;
        let Some(a) = ctx.admitted.as_mut() else {
            return;
        };
        let Some(plan) = a.cache.as_mut() else {
            return;
        };
        let capture = a.answer.cache_capture.take();
        let entry = (|| {
            let tap = a.answer.tap.as_ref()?;
            let m = &tap.measure;
            let complete = match tap.kind() {
                TapKind::OpenAiSse | TapKind::AnthropicSse => m.finished,
                TapKind::Json => true,
                _ => false,
            };
            let usage_known = m.usage.input.is_some() && m.usage.output.is_some();
            let ok = outcome == "ok"
                && client_status == Some(200)
                && a.answer.upstream_status == Some(200)
                && m.stream_error.is_none()
                && complete
                && usage_known;
            if !ok || plan.hit.is_some() || plan.mode == Mode::Bypass {
                return None;
            }
            let model = a
                .body
                .info
                .as_ref()
                .and_then(|i| i.model.clone())
                .or_else(|| m.model.clone());
            Some(Entry {
                content_type: a.answer.content_type.clone()?,
                stream: plan.stream,
                chunks: capture?.finish()?,
                usage: m.usage,
                cost: model
                    .as_deref()
                    .and_then(|md| self.pricing.cost(md, &m.usage)),
                model,
                finish_reason: m.finish_reason.clone(),
            })
        })();
        if let Some(entry) = entry {
            self.cache.store(plan, entry).await;
        }
        self.cache.count(plan);
    }
}

impl Admitted {
    /// Starts keeping what the client gets, for the cache: for a 200 on a request whose
    /// answer may be stored.
    pub fn capture_for_cache(&mut self) {
        let Some(plan) = &self.cache else {
            return;
        };
        if plan.mode != Mode::Bypass
            && plan.hit.is_none()
            && self.answer.upstream_status == Some(200)
            && self.answer.cache_capture.is_none()
        {
            let max = plan.config.max_entry_bytes;
            self.answer.cache_capture = Some(Capture::new(plan.stream, max));
        }
    }
}
