//! Per-request work the relay adds before a byte goes upstream: routing, tenant
//! authentication (SHA-256 and a constant-time compare) and the upstream request rewrite.
//! The end-to-end comparison with nginx is scripts/bench.sh.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora_http::RequestHeader;
use stream_relay::auth::{hash_key_hex, TenantTable};
use stream_relay::config::Config;
use stream_relay::proxy::{admit, prepare_upstream_request};
use stream_relay::route::RouteTable;

fn setup() -> (RouteTable, TenantTable) {
    let mut tenants = String::new();
    for i in 0..1000 {
        tenants.push_str(&format!(
            "  - {{ id: t{i}, key_sha256: [\"{}\"] }}\n",
            hash_key_hex(&format!("sk-tenant-{i}"))
        ));
    }
    let yaml = format!(
        "listen: {{ proxy: 127.0.0.1:1 }}\nroutes:\n  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: [\"http://127.0.0.1:9/v1\"], key: \"env:K\" }}\n  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: [\"http://127.0.0.1:9\"], key: \"env:K\" }}\ntenants:\n{tenants}"
    );
    let c = Config::from_yaml(&yaml, Path::new("."), &|_| Some("sk-provider".into())).unwrap();
    (
        RouteTable::new(&c.routes).unwrap(),
        TenantTable::new(&c.tenants),
    )
}

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("POST", b"/openai/v1/chat/completions", None).unwrap();
    for (k, v) in [
        ("host", "relay.internal:8080"),
        ("authorization", "Bearer sk-tenant-517"),
        ("content-type", "application/json"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("x-stainless-lang", "python"),
        ("content-length", "412"),
    ] {
        r.insert_header(k, v).unwrap();
    }
    r
}

fn bench(c: &mut Criterion) {
    let (routes, tenants) = setup();
    let req = request();
    c.bench_function("admit (route + auth, 1000 tenants)", |b| {
        b.iter(|| admit(black_box(&routes), black_box(&tenants), black_box(&req)).is_ok())
    });
    let route = routes.find("/openai/v1/chat/completions").unwrap().clone();
    c.bench_function("prepare_upstream_request", |b| {
        b.iter(|| {
            let mut r = req.clone();
            prepare_upstream_request(
                &mut r,
                &route,
                &route.upstreams[0].url,
                Some(0),
                "0123456789abcdef0123456789abcdef",
            )
            .unwrap();
            r
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
