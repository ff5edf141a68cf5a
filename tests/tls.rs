//! HTTPS upstreams: the relay verifies the upstream's certificate chain and name against
//! a test CA made here, and refuses an upstream it cannot verify.

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// Writes ca.pem, and leaf.pem + leaf.key for `localhost` signed by that CA.
fn make_pki(dir: &std::path::Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stream-relay test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
}

#[test]
fn https_upstream_is_verified_against_the_route_ca() {
    let pki = temp_dir("pki");
    make_pki(&pki);
    let mock = MockProc::start_with(
        Some(PROVIDER_KEY),
        Some((&pki.join("leaf.pem"), &pki.join("leaf.key"))),
    );
    let port = mock.addr.port();
    let ca = pki.join("ca.pem");
    let config = format!(
        r#"routes:
  - {{ name: tls, prefix: /tls, provider: openai, upstreams: ["https://localhost:{port}"], key: "env:TEST_PROVIDER_KEY", ca_file: "{ca}", endpoints: ["POST chat/completions", "GET /mock/stats"] }}
  - {{ name: untrusted, prefix: /untrusted/v1, provider: openai, upstreams: ["https://localhost:{port}/v1"], key: "env:TEST_PROVIDER_KEY" }}
  - {{ name: wrongname, prefix: /wrongname/v1, provider: openai, upstreams: ["https://127.0.0.1:{port}/v1"], key: "env:TEST_PROVIDER_KEY", ca_file: "{ca}" }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
        ca = ca.display(),
        h = hash(TENANT_KEY)
    );
    let relay = RelayProc::start(&config, &[("TEST_PROVIDER_KEY", PROVIDER_KEY)]);
    let auth = format!("Bearer {TENANT_KEY}");

    let ok = request(
        relay.addr,
        "POST",
        "/tls/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(true, true),
    );
    assert_eq!(ok.status, 200, "{}", relay.stderr());
    assert!(ok.complete);
    assert!(String::from_utf8_lossy(&ok.body).ends_with("data: [DONE]\n\n"));
    let stats = || {
        let r = request(
            relay.addr,
            "GET",
            // The operator listed the mock's stats among the route's endpoints.
            "/tls/mock/stats",
            &[("authorization", &auth)],
            b"",
        );
        assert_eq!(r.status, 200);
        r.json()
    };
    let seen = stats();
    assert_eq!(seen["auth_failures"], 0);
    assert_eq!(seen["requests"], 1);

    // The test CA is not among the system roots: the relay must refuse the upstream.
    let r = request(
        relay.addr,
        "POST",
        "/untrusted/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(true, true),
    );
    assert_eq!(r.status, 502);
    // The certificate names localhost, not 127.0.0.1: refused as well.
    let r = request(
        relay.addr,
        "POST",
        "/wrongname/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(true, true),
    );
    assert_eq!(r.status, 502);
    assert_eq!(stats()["requests"], 1);
}
