//! `covet bridge nats` against a nats-server that demands credentials or
//! TLS: user and password, a token, an nkey, and mutual TLS each let the
//! bridge in (a record goes from Covet to a NATS subscriber through it),
//! and credentials or a certificate the server refuses stop the bridge at
//! once with the reason (it does not wait forever for a server that will
//! never let it in).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::bridge::Bridge;
use common::nats::NatsServer;
use common::Broker;
use covet_client::{Client, ProducerConfig, Record, TopicSpec};
use futures::StreamExt as _;

/// A broker, a nats-server started with `server_conf` (its config file),
/// and a bridge config with `nats_extra` in its `[nats]` table and a core
/// route from topic `t` to `auth.{offset}`. Then: `client` (the test's own
/// NATS connection) subscribes, a record goes into `t`, and the message
/// must arrive through the bridge.
async fn bridged(
    dir: &Path,
    server_conf: &str,
    url_scheme: &str,
    nats_extra: &str,
    client: async_nats::ConnectOptions,
) {
    let broker = Broker::start(&dir.join("covet"), &[]);
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, server_conf).unwrap();
    let nats = NatsServer::start(&dir.join("nats"), &["-c", conf.to_str().unwrap()]);
    let covet = Client::connect(&broker.addr).await.expect("connect covet");
    covet
        .create_topic(TopicSpec::new("t").partitions(1))
        .await
        .expect("create topic");
    let url = format!("{url_scheme}://127.0.0.1:{}", nats.port);
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{url}\"\n{nats_extra}\n[covet]\nbrokers = \"{}\"\n\
             [[route]]\nname = \"auth\"\nfrom_topic = \"t\"\nto_subject = \"auth.{{offset}}\"\njetstream = false\n",
            broker.addr
        ),
    )
    .unwrap();
    let nc = client.connect(&url).await.expect("the test connects");
    let mut sub = nc.subscribe("auth.>").await.unwrap();
    nc.flush().await.unwrap();
    let mut bridge = Bridge::start(&config, None);
    let producer = covet.producer(ProducerConfig::default());
    let record = Record {
        key: None,
        value: Bytes::from_static(b"through"),
        headers: vec![],
        timestamp_ms: 0,
    };
    producer
        .send("t", record)
        .await
        .unwrap()
        .await
        .expect("delivered to covet");
    let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .unwrap_or_else(|_| panic!("nothing came through in 30 s; log:\n{}", bridge.log_tail()))
        .expect("subscription open");
    assert_eq!(m.subject.as_str(), "auth.0");
    assert_eq!(m.payload.as_ref(), b"through");
    bridge.stop();
}

/// Runs the bridge on a config that NATS refuses and returns its log;
/// fails unless it exits non-zero within 30 s.
fn refused(dir: &Path, server_conf: &str, url_scheme: &str, nats_extra: &str) -> String {
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, server_conf).unwrap();
    let _nats = NatsServer::start(&dir.join("nats"), &["-c", conf.to_str().unwrap()]);
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{url_scheme}://127.0.0.1:{}\"\n{nats_extra}\n[covet]\nbrokers = \"127.0.0.1:1\"\n\
             [[route]]\nname = \"auth\"\nfrom_topic = \"t\"\nto_subject = \"auth.{{offset}}\"\n",
            _nats.port
        ),
    )
    .unwrap();
    let log = dir.join("refused.log");
    let mut child = Some(
        Command::new(common::covet_bin())
            .args(["bridge", "nats", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn bridge"),
    );
    let status = common::process::wait_exit(&mut child, Duration::from_secs(30));
    common::process::kill9(&mut child);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("the bridge kept trying what NATS refuses (30 s):\n{log}"));
    assert!(!status.success(), "{log}");
    log
}

const USERS: &str = "authorization {\n  users: [ { user: bridge, password: s3cret } ]\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let dir = tempfile::tempdir().unwrap();
    bridged(
        dir.path(),
        USERS,
        "nats",
        "user = \"bridge\"\npassword = \"s3cret\"",
        async_nats::ConnectOptions::with_user_and_password("bridge".into(), "s3cret".into()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token() {
    let dir = tempfile::tempdir().unwrap();
    bridged(
        dir.path(),
        "authorization {\n  token: \"t0ken-of-the-bridge\"\n}\n",
        "nats",
        "token = \"t0ken-of-the-bridge\"",
        async_nats::ConnectOptions::with_token("t0ken-of-the-bridge".into()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey() {
    let dir = tempfile::tempdir().unwrap();
    let bridge_key = nkeys::KeyPair::new_user();
    let test_key = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("bridge.nk");
    std::fs::write(&seed_file, bridge_key.seed().unwrap()).unwrap();
    bridged(
        dir.path(),
        &format!(
            "authorization {{\n  users: [ {{ nkey: {} }}, {{ nkey: {} }} ]\n}}\n",
            bridge_key.public_key(),
            test_key.public_key()
        ),
        "nats",
        &format!("nkey_seed_file = {:?}", seed_file.to_str().unwrap()),
        async_nats::ConnectOptions::with_nkey(test_key.seed().unwrap()),
    )
    .await;
}

#[test]
fn a_wrong_password_stops_the_bridge_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = refused(
        dir.path(),
        USERS,
        "nats",
        "user = \"bridge\"\npassword = \"wrong\"",
    );
    assert!(log.contains("refused the bridge"), "{log}");
    assert!(log.contains("authorization violation"), "{log}");
}

/// A CA, and a certificate signed by it for `names` with the given
/// extended key usage; each as (certificate PEM, key PEM) files in `dir`
/// named after `name`.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("covet test {name}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issuer.pem()).unwrap();
        Ca { issuer }
    }

    fn issue(&self, dir: &Path, name: &str, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// nats-server with TLS that verifies client certificates.
fn tls_server_conf(dir: &Path) -> String {
    format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
        dir.join("server.pem").to_str().unwrap(),
        dir.join("server-key.pem").to_str().unwrap(),
        dir.join("ca.pem").to_str().unwrap(),
    )
}

fn tls_certificates(dir: &Path) {
    let ca = Ca::new(dir, "ca");
    ca.issue(
        dir,
        "server",
        &["127.0.0.1", "localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    ca.issue(
        dir,
        "bridge",
        &["bridge"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    ca.issue(
        dir,
        "test",
        &["test"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tls_certificates(d);
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(d.join("ca.pem"))
        .add_client_certificate(d.join("test.pem"), d.join("test-key.pem"))
        .require_tls(true);
    bridged(
        d,
        &tls_server_conf(d),
        "tls",
        &format!(
            "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}",
            d.join("ca.pem").to_str().unwrap(),
            d.join("bridge.pem").to_str().unwrap(),
            d.join("bridge-key.pem").to_str().unwrap(),
        ),
        client,
    )
    .await;
}

#[test]
fn a_server_certificate_from_another_ca_stops_the_bridge_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tls_certificates(d);
    // The bridge trusts only a CA that did not sign the server.
    Ca::new(d, "other-ca");
    let log = refused(
        d,
        &tls_server_conf(d),
        "tls",
        &format!(
            "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}",
            d.join("other-ca.pem").to_str().unwrap(),
            d.join("bridge.pem").to_str().unwrap(),
            d.join("bridge-key.pem").to_str().unwrap(),
        ),
    );
    assert!(log.contains("refused the bridge"), "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}
