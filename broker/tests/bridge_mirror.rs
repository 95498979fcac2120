//! The worked example of `docs/nats-bridge.md`, as a new user runs it: the
//! config file is taken from the docs as it stands there, the topic is
//! made with `covet topic create`, the bridge runs with `--config` (the
//! addresses of this test's servers given as the flags the docs name), and
//! `covet bridge status` is asked. A JetStream stream is mirrored into a
//! Covet topic and back out into JetStream: every message arrives once
//! each way, across a kill -9 of the bridge.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use common::bridge::Bridge;
use common::nats::{free_port, NatsServer, StreamReader};
use common::{read_partition, wait_until, Broker};
use covet_bridge::status::RouteReport;
use covet_bridge::{ROUTE_HEADER, SEQUENCE_HEADER, SUBJECT_HEADER};
use covet_client::{Client, StartPosition};

/// The TOML block the docs introduce as "One config file".
fn docs_config() -> String {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/nats-bridge.md"
    ))
    .expect("read docs/nats-bridge.md");
    let from = docs
        .find("One config file")
        .expect("the docs' worked example has its config file");
    let block = &docs[from..];
    let start = block.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = block[start..].find("```").expect("the block ends") + start;
    block[start..end].to_string()
}

/// Runs `covet ARGS` against `broker`; its stdout, or the test fails with
/// its stderr.
fn covet(broker: &str, args: &[&str]) -> String {
    let out = Command::new(common::covet_bin())
        .args(args)
        .env("COVET_BROKER", broker)
        .output()
        .expect("run covet");
    assert!(
        out.status.success(),
        "covet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Publishes `orders.c<i % 7>.created` with payload `{"id": i}` for each
/// `i` in `from..to`, waiting for every ack.
async fn publish(js: &jetstream::Context, from: u64, to: u64) {
    let mut acks = Vec::new();
    for i in from..to {
        let subject = format!("orders.c{}.created", i % 7);
        let ack = js
            .publish(subject, format!("{{\"id\": {i}}}").into())
            .await
            .expect("publish");
        acks.push(ack);
    }
    for a in acks {
        a.await.expect("publish ack");
    }
}

/// Every record of `orders`, keyed by its `nats-stream-sequence`; fails
/// on a record written twice.
async fn topic_records(client: &Client) -> HashMap<u64, (String, String, String)> {
    let mut by_seq = HashMap::new();
    for p in 0..3 {
        for r in read_partition(client, "orders", p, StartPosition::Earliest).await {
            let h = |k: &str| {
                r.headers
                    .iter()
                    .find(|h| h.key == k)
                    .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                    .unwrap_or_else(|| panic!("no {k} header"))
            };
            assert_eq!(h(ROUTE_HEADER), "orders-in");
            let seq: u64 = h(SEQUENCE_HEADER).parse().expect("sequence");
            let key = String::from_utf8_lossy(r.key.as_deref().expect("a key")).into_owned();
            let value = String::from_utf8_lossy(&r.value).into_owned();
            let dup = by_seq.insert(seq, (h(SUBJECT_HEADER), key, value));
            assert!(dup.is_none(), "stream sequence {seq} written twice");
        }
    }
    by_seq
}

/// `covet bridge status --format json`.
fn status(broker: &str, addr: &str) -> Vec<RouteReport> {
    let out = covet(
        broker,
        &["bridge", "status", "--bridge", addr, "--format", "json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_example_mirrors_a_stream_into_covet_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("covet"), &[]);
    let nats = NatsServer::start(&dir.path().join("nats"), &[]);
    let nc = async_nats::connect(nats.url()).await.expect("connect nats");
    let js = jetstream::new(nc);
    // `nats stream add ORDERS --subjects 'orders.>' --storage file`, and
    // COVET_ORDERS on covet.orders.> for the way back.
    for (name, subject) in [("ORDERS", "orders.>"), ("COVET_ORDERS", "covet.orders.>")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    covet(
        &broker.addr,
        &["topic", "create", "orders", "--partitions", "3"],
    );

    // The docs' config file as it stands; this test's addresses come as
    // the flags that override the file's.
    let config = dir.path().join("bridge.toml");
    std::fs::write(&config, docs_config()).unwrap();
    let status_addr = format!("127.0.0.1:{}", free_port());
    let nats_url = nats.url();
    let mut bridge = Bridge::start_with_args(
        &config,
        Some(&status_addr),
        &[
            "--nats",
            &nats_url,
            "--broker",
            &broker.addr,
            "--status-listen",
            &status_addr,
        ],
    );
    let routes = status(&broker.addr, &status_addr);
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["orders-in", "orders-out"]);

    let client = Client::connect(&broker.addr).await.expect("connect covet");
    let mut back = StreamReader::new(&js, "COVET_ORDERS");
    let n = 2_000u64;
    publish(&js, 0, n / 2).await;
    assert!(
        back.wait_unique(n as usize / 4, Duration::from_secs(30))
            .await,
        "{} came back; log:\n{}",
        back.unique(),
        bridge.log_tail()
    );
    // Kill -9 mid-way, more messages while it is down, and start it again.
    bridge.kill9();
    publish(&js, n / 2, n).await;
    bridge.spawn();
    assert!(
        back.wait_unique(n as usize, Duration::from_secs(60)).await,
        "{} of {n} came back; log:\n{}",
        back.unique(),
        bridge.log_tail()
    );

    // Into Covet: each message once, keyed by the customer token.
    let written = topic_records(&client).await;
    assert_eq!(written.len() as u64, n, "records in orders");
    for (seq, (subject, key, value)) in &written {
        let i = seq - 1;
        assert_eq!(subject, &format!("orders.c{}.created", i % 7));
        assert_eq!(key, &format!("c{}", i % 7));
        assert_eq!(value, &format!("{{\"id\": {i}}}"));
    }
    // And back out: each record once (JetStream dropped the copies the
    // killed bridge published again), on covet.orders.<key>.
    back.poll().await;
    assert_eq!(back.duplicates(), 0, "duplicates in COVET_ORDERS");
    for m in &back.seen {
        let key = m.key.as_deref().expect("covet-key header");
        assert_eq!(m.subject, format!("covet.orders.{key}"));
        assert_eq!(
            m.headers
                .get("nats-subject")
                .map(|v| v.as_str().to_string()),
            Some(format!("orders.{key}.created"))
        );
    }

    // `covet bridge status`: both routes settled, nothing refused.
    let settled = wait_until(Duration::from_secs(15), || async {
        let r = status(&broker.addr, &status_addr);
        r.iter()
            .all(|r| r.lag == 0 && r.in_flight == 0 && r.errors == 0 && r.dead_lettered == 0)
    })
    .await;
    assert!(settled, "{:#?}", status(&broker.addr, &status_addr));
    let table = covet(
        &broker.addr,
        &[
            "bridge",
            "status",
            "--bridge",
            &status_addr,
            "--format",
            "table",
        ],
    );
    assert!(
        table.contains("orders-in") && table.contains("orders-out") && table.contains("LAG"),
        "{table}"
    );
    bridge.stop();
}
