//! The cost of one limit decision: the local limiter, and the Redis limiter against a
//! `redis-server` this bench starts on a free loopback port (skipped, with a message,
//! where none is installed). Each iteration admits and settles one request.

use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stream_relay::config::{Limits, RedisConfig};
use stream_relay::limits::local::LocalLimiter;
use stream_relay::limits::redis::RedisLimiter;
use stream_relay::limits::Limiter;
use stream_relay::metrics::Metrics;
use stream_relay::secret::Secret;

fn limits() -> Limits {
    Limits {
        requests_per_second: Some(1_000_000_000),
        requests_per_minute: Some(1_000_000_000),
        tokens_per_minute: Some(1_000_000_000_000),
        concurrent_requests: Some(1_000_000),
    }
}

fn bench(c: &mut Criterion) {
    let local = LocalLimiter::default();
    let l = limits();
    let tenants: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("limit decision/local (admit + settle)", |b| {
        b.iter(|| {
            i = (i + 1) % tenants.len();
            let a = local
                .admit_now(black_box(&tenants[i]), &l, 500)
                .ok()
                .unwrap();
            local.settle_now(&tenants[i], &l, &a, Some(120));
        })
    });

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("stream-relay-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Ok(mut server) = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not installed: skipping the Redis decision bench");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = RedisConfig {
        url: stream_relay::config::RedisUrl::Single(Secret::new(format!(
            "redis://127.0.0.1:{port}/"
        ))),
        timeout: Duration::from_millis(200),
        refuse_when_down: true,
        key_prefix: "bench".into(),
        slot_ttl: Duration::from_secs(60),
    };
    let redis = RedisLimiter::new(&config, Arc::new(Metrics::new(false))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = 0u64;
    c.bench_function(
        "limit decision/redis (admit + settle, one round trip each)",
        |b| {
            b.iter(|| {
                rt.block_on(async {
                    n += 1;
                    let t = &tenants[(n as usize) % tenants.len()];
                    let id = n.to_string();
                    let Ok(a) = redis.admit(t, &id, &l, 500).await else {
                        panic!("redis refused or did not answer");
                    };
                    redis.settle(t, &l, a, Some(120)).await;
                })
            })
        },
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
