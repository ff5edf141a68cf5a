//! Unit tests of the configuration stage: a file in, a [`Config`] or an error naming the
//! key out.

use std::time::Duration;

use super::*;
use crate::secret::SecretState;

const HASH: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn load(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(yaml, Path::new("."), &|n| {
        (n == "SET").then(|| "sk-provider".to_string())
    })
}

fn minimal(route_extra: &str, tenant: &str) -> String {
    format!(
        "listen: {{ proxy: 127.0.0.1:8080 }}\nroutes:\n  - name: openai\n    prefix: /openai/v1\n    provider: openai\n    upstreams: [https://api.openai.com/v1]\n{route_extra}tenants:\n{tenant}"
    )
}

#[test]
fn per_address_cap_defaults_beyond_loopback_only_when_not_set() {
    assert_eq!(per_address_cap("127.0.0.1:8080", None), (0, false));
    assert_eq!(per_address_cap("127.0.0.2:8080", None), (0, false));
    assert_eq!(per_address_cap("[::1]:8080", None), (0, false));
    assert_eq!(per_address_cap("0.0.0.0:8080", None), (1000, true));
    assert_eq!(per_address_cap("[::]:8080", None), (1000, true));
    assert_eq!(per_address_cap("10.0.0.11:8080", None), (1000, true));
    // What is set stays, 0 (no cap) included, on any address.
    assert_eq!(per_address_cap("0.0.0.0:8080", Some(0)), (0, false));
    assert_eq!(per_address_cap("0.0.0.0:8080", Some(20)), (20, false));
    assert_eq!(per_address_cap("127.0.0.1:8080", Some(20)), (20, false));
    // Through the whole validation.
    let c = load(&minimal("", "  []\n").replace("127.0.0.1:8080", "0.0.0.0:8080")).unwrap();
    assert_eq!(
        (c.max_connections_per_address, c.per_address_defaulted),
        (1000, true)
    );
    let c = load(&minimal("", "  []\n")).unwrap();
    assert_eq!(
        (c.max_connections_per_address, c.per_address_defaulted),
        (0, false)
    );
    let c = load(&minimal("", "  []\n").replace(
        "proxy: 127.0.0.1:8080",
        "proxy: 0.0.0.0:8080, max_connections_per_address: 0",
    ))
    .unwrap();
    assert_eq!(
        (c.max_connections_per_address, c.per_address_defaulted),
        (0, false)
    );
}

#[test]
fn minimal_config_loads_with_defaults() {
    let c = load(&minimal(
        "    key: env:SET\n",
        &format!("  - id: a\n    key_sha256: [{HASH}]\n"),
    ))
    .unwrap();
    assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
    let r = &c.routes[0];
    assert_eq!(r.upstreams[0].base_path, "/v1");
    assert_eq!(r.upstreams[0].port, 443);
    assert_eq!(r.timeouts.connect, Duration::from_secs(5));
    match &r.key {
        KeyConfig::Injected {
            header,
            prefix,
            suffix,
            states,
        } => {
            let SecretState::Present(s) = &states[0] else {
                panic!("{states:?}")
            };
            assert_eq!(header, "authorization");
            assert_eq!((prefix.as_str(), suffix.as_str()), ("Bearer ", ""));
            assert_eq!(s.expose(), "sk-provider");
        }
        other => panic!("{other:?}"),
    }
    assert!(c.tenants[0].routes.is_none());
}

#[test]
fn unset_key_is_not_fatal() {
    let c = load(&minimal("    key: env:UNSET\n", "  []\n")).unwrap();
    match &c.routes[0].key {
        KeyConfig::Injected { states, .. } => {
            assert!(matches!(states[..], [SecretState::Missing { .. }]))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_name_the_key() {
    let cases = [
        (minimal("    key: sk-inline\n", "  []\n"), "routes[0].key:"),
        (
            minimal("    timeouts: { idle: 5 }\n", "  []\n"),
            "routes[0].timeouts.idle:",
        ),
        (
            minimal("", "  - id: a\n    key_sha256: [abc]\n"),
            "tenants[0].key_sha256[0]:",
        ),
        (
            minimal(
                "",
                &format!("  - id: a\n    key_sha256: [{HASH}]\n    routes: [nope]\n"),
            ),
            "tenants[0].routes[0]:",
        ),
        (
            minimal("    key_format: Bearer\n    key: env:SET\n", "  []\n"),
            "routes[0].key_format:",
        ),
        (
            minimal("", "  []\n").replace("https://api.openai.com/v1", "ftp://x"),
            "routes[0].upstreams[0]:",
        ),
        (
            minimal("", "  []\n").replace("127.0.0.1:8080", "localhost"),
            "listen.proxy:",
        ),
        (
            minimal("", "  []\n")
                + "telemetry:\n  otlp: { endpoint: http://127.0.0.1:4318, client_sampling: never }\n",
            "telemetry.otlp.client_sampling:",
        ),
        (
            minimal("", "  []\n")
                + "telemetry:\n  otlp: { endpoint: grpc://collector:4317, protocol: grpc }\n",
            "telemetry.otlp.endpoint:",
        ),
        (
            minimal("", "  []\n")
                + "telemetry:\n  otlp: { endpoint: https://collector, ca_file: /nonexistent/ca.pem }\n",
            "telemetry.otlp.ca_file:",
        ),
    ];
    for (yaml, want) in cases {
        let e = load(&yaml).unwrap_err().to_string();
        assert!(e.starts_with(want), "wanted `{want}`, got `{e}`");
    }
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let e = load(&minimal("    prefx: /x\n", "  []\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("routes[0]") && e.contains("prefx"), "{e}");
}

#[test]
fn duplicate_names_prefixes_and_keys_are_refused() {
    let two = "listen: { proxy: 127.0.0.1:1 }\nroutes:\n  - { name: a, prefix: /x, provider: openai, upstreams: [http://h] }\n  - { name: a, prefix: /y, provider: openai, upstreams: [http://h] }\n";
    assert!(load(two)
        .unwrap_err()
        .to_string()
        .starts_with("routes[1].name"));
    let same = two.replace("name: a, prefix: /y", "name: b, prefix: /x/");
    assert!(load(&same)
        .unwrap_err()
        .to_string()
        .starts_with("routes[1].prefix"));
    let keys = minimal(
        "",
        &format!("  - {{ id: a, key_sha256: [{HASH}] }}\n  - {{ id: b, key_sha256: [{HASH}] }}\n"),
    );
    assert!(load(&keys)
        .unwrap_err()
        .to_string()
        .starts_with("tenants[1].key_sha256[0]"));
}

#[test]
fn upstream_urls_parse() {
    let u = parse_upstream_url("http://127.0.0.1:9000").unwrap();
    assert_eq!((u.tls, u.port, u.base_path.as_str()), (false, 9000, ""));
    assert_eq!(u.host_header(), "127.0.0.1:9000");
    let u = parse_upstream_url("https://[::1]:8443/v1/").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
    assert_eq!(u.base_path, "/v1");
    assert_eq!(u.authority(), "[::1]:8443");
    let u = parse_upstream_url("https://api.anthropic.com").unwrap();
    assert_eq!(u.host_header(), "api.anthropic.com");
    assert!(parse_upstream_url("https://").is_err());
    assert!(parse_upstream_url("https://h:0").is_err());
    assert!(parse_upstream_url("https://u@h").is_err());
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("1d").is_err());
    assert!(parse_duration("ms").is_err());
}

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/relay.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = Config::from_yaml(&text, path.parent().unwrap(), &|_| None).unwrap();
    assert!(
        c.mock_listen.is_some(),
        "the first run needs the built-in mock"
    );
}

#[test]
fn redis_is_one_url_a_cluster_list_or_a_sentinel_service() {
    let with = |redis: &str| load(&format!("{}redis:\n{redis}", minimal("", "  []\n")));
    let one = with("  url: redis://127.0.0.1:6379\n").unwrap();
    assert!(matches!(one.redis.unwrap().url, RedisUrl::Single(_)));
    let cluster = with("  url: [redis://10.0.0.1:6379, redis://10.0.0.2:6379]\n").unwrap();
    assert!(matches!(cluster.redis.unwrap().url, RedisUrl::Cluster(n) if n.len() == 2));
    let sentinel =
        with("  sentinel: { nodes: [redis://10.0.0.1:26379], service: mymaster }\n").unwrap();
    match sentinel.redis.unwrap().url {
        RedisUrl::Sentinel { nodes, service } => {
            assert_eq!((nodes.len(), service.as_str()), (1, "mymaster"));
        }
        other => panic!("{other:?}"),
    }
    let err = |redis: &str| with(redis).unwrap_err().to_string();
    assert!(err("  url: []\n").contains("redis.url"));
    assert!(err("  url: [redis://a:1, http://b:2]\n").contains("redis.url[1]"));
    assert!(err("  timeout: 50ms\n").contains("redis.url"));
    let both = "  url: redis://a:1\n  sentinel: { nodes: [redis://b:2], service: m }\n";
    assert!(err(both).contains("not both"));
    assert!(err("  sentinel: { nodes: [], service: m }\n").contains("redis.sentinel.nodes"));
    assert!(err("  sentinel: { nodes: [redis://b:2], service: \"\" }\n")
        .contains("redis.sentinel.service"));
}

#[test]
fn clickhouse_is_one_url_or_a_clusters_nodes_with_a_layout() {
    let with = |ch: &str| {
        load(&format!(
            "{}rows:\n  clickhouse:\n{ch}",
            minimal("", "  []\n")
        ))
    };
    let one = with("    url: http://127.0.0.1:8123\n").unwrap();
    let one = one.rows_clickhouse.unwrap();
    assert_eq!(one.urls, ["http://127.0.0.1:8123"]);
    assert!(one.cluster.is_none() && one.layout.is_none() && one.ttl_days.is_none());
    let nodes = with(
        "    url: [http://10.0.0.1:8123, http://10.0.0.2:8123]\n    cluster: { name: logs }\n    layout: current\n    ttl_days: 90\n",
    )
    .unwrap()
    .rows_clickhouse
    .unwrap();
    assert_eq!(nodes.urls.len(), 2);
    let cluster = nodes.cluster.unwrap();
    assert_eq!(
        (
            cluster.name.as_str(),
            cluster.engine.as_str(),
            cluster.sharding_key.as_str()
        ),
        ("logs", "MergeTree", "rand()")
    );
    assert_eq!(
        (nodes.layout, nodes.ttl_days),
        (Some(crate::rows::schema::Layout::Current), Some(90))
    );
    let err = |ch: &str| with(ch).unwrap_err().to_string();
    assert!(err("    url: []\n").starts_with("rows.clickhouse.url:"));
    assert!(err("    url: [http://a:1, redis://b:2]\n").starts_with("rows.clickhouse.url[1]:"));
    assert!(err("    url: http://a:1\n    layout: newest\n").starts_with("rows.clickhouse.layout:"));
    assert!(err("    url: http://a:1\n    ttl_days: 0\n").starts_with("rows.clickhouse.ttl_days:"));
    assert!(err("    url: http://a:1\n    cluster: { name: \"a'b\" }\n")
        .starts_with("rows.clickhouse.cluster.name:"));
    assert!(
        err("    url: http://a:1\n    cluster: { name: c, sharding_key: \"rand(); DROP\" }\n")
            .starts_with("rows.clickhouse.cluster.sharding_key:")
    );
}
