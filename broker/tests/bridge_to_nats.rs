//! Covet -> NATS routes of `covet bridge nats`, end to end: a real
//! `covet broker`, a real `nats-server` with JetStream, and the real
//! bridge process with a config file. Records go into Covet with the
//! client's producer; the tests read the JetStream stream (or a core NATS
//! subscription) with async-nats and count by the `covet-topic`,
//! `covet-partition` and `covet-offset` headers: every record arrives,
//! none twice, each key in order, through a bridge killed -9, a NATS
//! restart and a broker restart; a record NATS refuses is dead-lettered
//! and the route goes on.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use common::bridge::Bridge;
use common::nats::{NatsServer, Seen, StreamReader};
use common::{wait_until, Broker};
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};
use futures::StreamExt as _;

/// Writes a bridge config with `routes` (TOML `[[route]]` tables).
fn write_config(dir: &Path, nats: &str, broker: &str, routes: &str) -> PathBuf {
    let path = dir.join("bridge.toml");
    std::fs::write(
        &path,
        format!("[nats]\nurl = \"{nats}\"\n\n[covet]\nbrokers = \"{broker}\"\n\n{routes}"),
    )
    .expect("write config");
    path
}

/// A JetStream stream on `subjects`, file-backed, with a 2-minute
/// duplicate window.
async fn create_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) {
    js.create_stream(jetstream::stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Publishes `n` records into `topic` (every third one unkeyed, the rest
/// over 50 keys; value = the record's number), all acknowledged.
async fn produce(client: &Client, topic: &str, from: u64, n: u64) {
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(2),
        ..Default::default()
    });
    let mut deliveries = Vec::with_capacity(n as usize);
    for i in from..from + n {
        let key = (i % 3 != 0).then(|| Bytes::from(format!("k{}", i % 50)));
        let d = producer
            .send(
                topic,
                Record {
                    key,
                    value: Bytes::from(i.to_string()),
                    headers: vec![covet_client::Header {
                        key: "origin".into(),
                        value: Bytes::from_static(b"test"),
                    }],
                    timestamp_ms: 0,
                },
            )
            .await
            .expect("send");
        deliveries.push(d);
    }
    for d in deliveries {
        tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .expect("delivery within 30 s")
            .expect("delivered");
    }
}

/// Every key's records appear in offset order (per partition).
fn assert_key_order(seen: &[Seen]) {
    let mut last: HashMap<(u32, String), u64> = HashMap::new();
    let mut first_seen = HashSet::new();
    for s in seen {
        // A copy of one already seen says nothing new about order.
        if !first_seen.insert(s.id()) {
            continue;
        }
        if let Some(k) = &s.key {
            let prev = last.insert((s.partition, k.clone()), s.offset);
            if let Some(p) = prev {
                assert!(
                    p < s.offset,
                    "key {k} of partition {}: offset {} after {p}",
                    s.partition,
                    s.offset
                );
            }
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: Broker,
    nats: NatsServer,
    client: Client,
    js: jetstream::Context,
    nc: async_nats::Client,
    path: PathBuf,
}

async fn setup(nats_extra: &[&str], partitions: u32, topics: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("covet"), &[]);
    let nats = NatsServer::start(&dir.path().join("nats"), nats_extra);
    let client = Client::connect(&broker.addr).await.expect("connect covet");
    for t in topics {
        client
            .create_topic(TopicSpec::new(*t).partitions(partitions))
            .await
            .expect("create topic");
    }
    let nc = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .expect("connect nats");
    let js = jetstream::new(nc.clone());
    let path = dir.path().to_path_buf();
    Setup {
        _dir: dir,
        broker,
        nats,
        client,
        js,
        nc,
        path,
    }
}

const JS_ROUTE: &str = r#"
[[route]]
name = "out"
from_topic = "orders"
to_subject = "out.{topic}.{key}"
"#;

/// (a) 100,000 records, a third unkeyed: all in the stream, none twice,
/// each key in order; a clean stop exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_records_arrive_once_in_key_order() {
    let s = setup(&[], 4, &["orders"]).await;
    create_stream(&s.js, "OUT", &["out.>"]).await;
    let status_addr = format!("127.0.0.1:{}", common::nats::free_port());
    let routes = format!("[status]\nlisten = \"{status_addr}\"\n{JS_ROUTE}");
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, &routes);
    let mut bridge = Bridge::start(&config, Some(&status_addr));
    let started = Instant::now();
    produce(&s.client, "orders", 0, 100_000).await;
    let mut reader = StreamReader::new(&s.js, "OUT");
    assert!(
        reader.wait_unique(100_000, Duration::from_secs(75)).await,
        "{} of 100000 arrived",
        reader.unique()
    );
    eprintln!("100000 records bridged in {:?}", started.elapsed());
    // The route's status: everything delivered, nothing in flight, and
    // the group's lag (asked every second) down to 0.
    let settled = wait_until(Duration::from_secs(15), || async {
        match covet_bridge::status::fetch(&status_addr).await {
            Ok(r) => {
                r.len() == 1
                    && r[0].delivered == 100_000
                    && r[0].received >= 100_000
                    && r[0].in_flight == 0
                    && r[0].lag == 0
                    && r[0].dead_lettered == 0
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(
        settled,
        "status: {:?}",
        covet_bridge::status::fetch(&status_addr).await
    );
    bridge.stop();
    reader.poll().await;
    assert_eq!(reader.duplicates(), 0, "duplicates in the stream");
    assert_eq!(reader.seen.len(), 100_000);
    assert_key_order(&reader.seen);
    // Subjects, values and headers are the records'.
    for m in reader.seen.iter().take(1000) {
        assert_eq!(m.headers.get("origin").map(|v| v.as_str()), Some("test"));
        let want = format!(
            "out.orders.{}",
            m.key.clone().unwrap_or_else(|| "_".to_string())
        );
        assert_eq!(m.subject, want);
        let i: u64 = std::str::from_utf8(&m.value).unwrap().parse().unwrap();
        assert_eq!(i % 3 == 0, m.key.is_none());
    }
}

/// A fault test: a bridge with the JetStream route and 20,000 records on
/// their way; `fault` once a quarter have arrived; then every record
/// arrives exactly once, and in key order.
async fn survives<F>(fault: F)
where
    F: FnOnce(&mut Setup, &mut Bridge),
{
    let n = 20_000u64;
    let mut s = setup(&[], 4, &["orders"]).await;
    create_stream(&s.js, "OUT", &["out.>"]).await;
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, JS_ROUTE);
    let mut bridge = Bridge::start(&config, None);
    let client = s.client.clone();
    let producing = tokio::spawn(async move { produce(&client, "orders", 0, n).await });
    let mut reader = StreamReader::new(&s.js, "OUT");
    assert!(
        reader
            .wait_unique(n as usize / 4, Duration::from_secs(30))
            .await,
        "{} of {n} arrived before the fault",
        reader.unique()
    );
    // Mid-stream: records are still on their way.
    assert!(reader.unique() < n as usize, "all arrived before the fault");
    eprintln!("fault after {} of {n}", reader.unique());
    fault(&mut s, &mut bridge);
    // The test's own clients ride the fault out too.
    tokio::time::timeout(Duration::from_secs(45), producing)
        .await
        .expect("produced within 45 s")
        .expect("producer task");
    assert!(
        reader
            .wait_unique(n as usize, Duration::from_secs(60))
            .await,
        "{} of {n} arrived after the fault; bridge log:\n{}",
        reader.unique(),
        bridge.log_tail()
    );
    bridge.stop();
    reader.poll().await;
    assert_eq!(reader.duplicates(), 0, "duplicates in the stream");
    assert_key_order(&reader.seen);
}

/// (b) The bridge killed -9 mid-stream and started again: nothing lost;
/// what it had published and not yet acknowledged in Covet is published
/// again and JetStream drops the copies (Nats-Msg-Id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_killed_and_restarted_loses_and_duplicates_nothing() {
    survives(|_, bridge| bridge.restart()).await;
}

/// (c) nats-server killed and restarted (same port and store) mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_loses_and_duplicates_nothing() {
    survives(|s, _| s.nats.restart()).await;
}

/// (d) The Covet broker killed and restarted (same address) mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_and_duplicates_nothing() {
    survives(|s, _| s.broker.restart_same_address()).await;
}

/// Every record of `topic` (all partitions), from the start.
async fn read_topic(client: &Client, topic: &str) -> Vec<covet_client::ConsumedRecord> {
    let info = client.describe_topic(topic).await.expect("describe");
    let mut out = Vec::new();
    for p in 0..info.partitions.len() as u32 {
        out.extend(common::read_partition(client, topic, p, StartPosition::Earliest).await);
    }
    out
}

/// Every record of `topic` once it holds at least `n` (the bridge makes
/// dead-letter topics when it first needs them); fails after 30 s.
async fn records_of(client: &Client, topic: &str, n: usize) -> Vec<covet_client::ConsumedRecord> {
    common::wait_for(Duration::from_secs(30), || async {
        client.describe_topic(topic).await.ok()?;
        let records = read_topic(client, topic).await;
        (records.len() >= n).then_some(records)
    })
    .await
    .unwrap_or_else(|| panic!("{topic} did not get {n} record(s) within 30 s"))
}

fn header<'a>(r: &'a covet_client::ConsumedRecord, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// (e) Poison records: one over the server's max_payload, and a route
/// whose subject no stream takes. Each goes to its route's dead-letter
/// topic (created by the bridge) with the reason; the records after the
/// oversized one still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_route_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let s = setup(&["-c", conf.to_str().unwrap()], 1, &["orders", "lost"]).await;
    create_stream(&s.js, "OUT", &["out.>"]).await;
    let routes = format!(
        "{JS_ROUTE}\n[[route]]\nname = \"lost\"\nfrom_topic = \"lost\"\nto_subject = \"nowhere.{{offset}}\"\ndead_letter_topic = \"lost-dead\"\n"
    );
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, &routes);
    let mut bridge = Bridge::start(&config, None);
    let producer = s.client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..20u32 {
        let value = if i == 5 {
            Bytes::from(vec![b'x'; 8192])
        } else {
            Bytes::from(i.to_string())
        };
        let r = Record {
            key: Some(Bytes::from(format!("k{i}"))),
            value,
            headers: vec![],
            timestamp_ms: 0,
        };
        deliveries.push(producer.send("orders", r).await.unwrap());
    }
    let lost = Record {
        key: None,
        value: Bytes::from_static(b"no stream"),
        headers: vec![],
        timestamp_ms: 0,
    };
    deliveries.push(producer.send("lost", lost).await.unwrap());
    for d in deliveries {
        d.await.unwrap();
    }
    let mut reader = StreamReader::new(&s.js, "OUT");
    assert!(
        reader.wait_unique(19, Duration::from_secs(30)).await,
        "{} of 19 arrived",
        reader.unique()
    );
    let dead = records_of(&s.client, "orders.dlq", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value.len(), 8192);
    assert_eq!(dead[0].key.as_deref(), Some(&b"k5"[..]));
    let why = header(&dead[0], "covet-bridge-error").expect("reason header");
    assert!(why.contains("Payload size limit"), "{why}");
    assert_eq!(header(&dead[0], "covet-offset"), Some("5"));
    let lost = records_of(&s.client, "lost-dead", 1).await;
    let why = header(&lost[0], "covet-bridge-error").expect("reason header");
    assert!(why.contains("no JetStream stream"), "{why}");
    bridge.stop();
    reader.poll().await;
    assert_eq!(reader.duplicates(), 0);
    assert!(reader.seen.iter().all(|m| m.offset != 5));
}

/// (f) A core NATS route delivers to a subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_nats_route_delivers_to_a_subscriber() {
    let s = setup(&[], 2, &["orders"]).await;
    let mut sub = s.nc.subscribe("core.>").await.unwrap();
    s.nc.flush().await.unwrap();
    let routes = "[[route]]\nname = \"core\"\nfrom_topic = \"orders\"\nto_subject = \"core.{partition}.{key}\"\njetstream = false\n";
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, routes);
    let mut bridge = Bridge::start(&config, None);
    produce(&s.client, "orders", 0, 5_000).await;
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 5_000 {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 5000 arrived", seen.len()))
            .expect("subscription open");
        let seen_m = Seen::of(m.subject.as_str(), m.headers.as_ref(), m.payload.clone());
        let want = format!(
            "core.{}.{}",
            seen_m.partition,
            seen_m.key.clone().unwrap_or_else(|| "_".into())
        );
        assert_eq!(seen_m.subject, want);
        seen.insert(seen_m.id());
    }
    bridge.stop();
    // Acknowledged in Covet: the group has nothing left.
    let lag_zero = wait_until(Duration::from_secs(15), || async {
        s.client
            .describe_group("covet-bridge-core")
            .await
            .map(|g| g.partitions.iter().all(|p| p.lag == 0))
            .unwrap_or(false)
    })
    .await;
    assert!(lag_zero, "the group still has lag after the bridge stopped");
}

/// (g) Keys a subject cannot hold are escaped, end to end, and the
/// original key travels in a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_escaped_into_one_subject_token() {
    let s = setup(&[], 1, &["orders"]).await;
    create_stream(&s.js, "OUT", &["out.>"]).await;
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, JS_ROUTE);
    let mut bridge = Bridge::start(&config, None);
    let cases: [(Option<&[u8]>, &str); 8] = [
        (Some(b"a.b"), "out.orders.a%2Eb"),
        (Some(b"x*y"), "out.orders.x%2Ay"),
        (Some(b"sp ace"), "out.orders.sp%20ace"),
        (Some(b">"), "out.orders.%3E"),
        (Some(b"plain"), "out.orders.plain"),
        (Some(b"_"), "out.orders.%5F"),
        (None, "out.orders._"),
        (Some(b"\xff."), "out.orders.%FF%2E"),
    ];
    let producer = s.client.producer(ProducerConfig::default());
    let header = |k: &str, v: &[u8]| covet_client::Header {
        key: k.into(),
        value: Bytes::copy_from_slice(v),
    };
    for (key, _) in &cases {
        let r = Record {
            key: key.map(Bytes::copy_from_slice),
            value: Bytes::from_static(b"v"),
            // NATS control headers are not passed through: this one would
            // make JetStream refuse the message.
            headers: vec![
                header("app", b"one"),
                header("Nats-Expected-Last-Sequence", b"999"),
            ],
            timestamp_ms: 0,
        };
        producer.send("orders", r).await.unwrap().await.unwrap();
    }
    let mut reader = StreamReader::new(&s.js, "OUT");
    assert!(
        reader
            .wait_unique(cases.len(), Duration::from_secs(30))
            .await
    );
    bridge.stop();
    assert_eq!(reader.seen.len(), cases.len());
    let by_offset: HashMap<u64, &Seen> = reader.seen.iter().map(|m| (m.offset, m)).collect();
    for (i, (key, subject)) in cases.iter().enumerate() {
        let m = by_offset[&(i as u64)];
        assert_eq!(&m.subject, subject);
        assert_eq!(m.headers.get("app").map(|v| v.as_str()), Some("one"));
        assert!(m.headers.get("Nats-Expected-Last-Sequence").is_none());
        let b64 = m.headers.get("covet-key-base64").map(|v| v.as_str());
        if key == &Some(&b"\xff."[..]) {
            // Not UTF-8: base64, never a mangled covet-key.
            assert_eq!(b64, Some("/y4="));
            assert_eq!(m.key, None);
        } else {
            assert_eq!(b64, None);
            assert_eq!(
                m.key.as_deref().map(str::as_bytes),
                *key,
                "the covet-key header carries the key as it was"
            );
        }
    }
}

/// A bridge stopped while NATS is down exits cleanly within its settle
/// grace: records it could not publish stay unacknowledged in Covet, and
/// a bridge started later (NATS back) delivers every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_nats_is_down_leaves_records_to_the_next_bridge() {
    let mut s = setup(&[], 2, &["orders"]).await;
    create_stream(&s.js, "OUT", &["out.>"]).await;
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, JS_ROUTE);
    let mut bridge = Bridge::start(&config, None);
    produce(&s.client, "orders", 0, 1_000).await;
    let mut reader = StreamReader::new(&s.js, "OUT");
    assert!(reader.wait_unique(1_000, Duration::from_secs(30)).await);
    s.nats.kill9();
    produce(&s.client, "orders", 1_000, 1_000).await;
    let stopping = Instant::now();
    bridge.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(25),
        "stopping took {:?}",
        stopping.elapsed()
    );
    s.nats.restart();
    let mut bridge = Bridge::start(&config, None);
    assert!(
        reader.wait_unique(2_000, Duration::from_secs(60)).await,
        "{} of 2000 arrived",
        reader.unique()
    );
    bridge.stop();
    reader.poll().await;
    assert_eq!(reader.duplicates(), 0);
}

/// A core NATS route dead-letters what NATS cannot take (a record over
/// max_payload, a header value that is not UTF-8) and publishes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_route_dead_letters_what_nats_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let s = setup(&["-c", conf.to_str().unwrap()], 1, &["corein"]).await;
    let mut sub = s.nc.subscribe("core.>").await.unwrap();
    s.nc.flush().await.unwrap();
    let routes = "[[route]]\nname = \"core\"\nfrom_topic = \"corein\"\nto_subject = \"core.{offset}\"\njetstream = false\n";
    let config = write_config(&s.path, &s.nats.url(), &s.broker.addr, routes);
    let mut bridge = Bridge::start(&config, None);
    let producer = s.client.producer(ProducerConfig::default());
    let records = [
        (Bytes::from_static(b"fine"), vec![]),
        (Bytes::from(vec![b'x'; 8192]), vec![]),
        (
            Bytes::from_static(b"bad header"),
            vec![covet_client::Header {
                key: "h".into(),
                value: Bytes::from_static(b"\xff"),
            }],
        ),
        (Bytes::from_static(b"fine too"), vec![]),
    ];
    for (value, headers) in records {
        let r = Record {
            key: None,
            value,
            headers,
            timestamp_ms: 0,
        };
        producer.send("corein", r).await.unwrap().await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{got:?} arrived"))
            .expect("subscription open");
        got.push(m.subject.to_string());
    }
    got.sort();
    assert_eq!(got, ["core.0", "core.3"]);
    let dead = records_of(&s.client, "corein.dlq", 2).await;
    bridge.stop();
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .map(|r| {
            (
                header(r, "covet-offset").unwrap_or_default().to_string(),
                header(r, "covet-bridge-error")
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "1");
    assert!(reasons[0].1.contains("Payload size limit"), "{reasons:?}");
    assert_eq!(reasons[1].0, "2");
    assert!(reasons[1].1.contains("header \"h\""), "{reasons:?}");
    // Nothing else was published.
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(extra.is_err(), "unexpected message: {extra:?}");
}
