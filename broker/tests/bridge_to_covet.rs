//! NATS -> Covet routes of `covet bridge nats`, end to end: a real
//! nats-server with JetStream, a real `covet broker`, and the real bridge
//! process started with a config file. Messages are published to
//! JetStream with async-nats and read back from Covet; every message must
//! arrive once (by its `nats-stream-sequence` header), also across a
//! bridge kill -9, a nats-server restart and a broker restart.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::bridge::Bridge;
use common::nats::{free_port, NatsServer};
use common::process::tail;
use common::{read_partition, wait_until, Broker};
use covet_bridge::{ERROR_HEADER, ROUTE_HEADER, SEQUENCE_HEADER, SUBJECT_HEADER};
use covet_client::{Client, StartPosition, TopicSpec};

/// One test's world: a broker, a nats-server, and a JetStream stream.
struct World {
    dir: tempfile::TempDir,
    broker: Broker,
    nats: NatsServer,
    client: Client,
    js: async_nats::jetstream::Context,
}

const STREAM: &str = "ORDERS";

async fn world(partitions: u32, max_batch_bytes: Option<u32>) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("broker")).unwrap();
    std::fs::create_dir_all(dir.path().join("nats")).unwrap();
    let broker = Broker::start(&dir.path().join("broker"), &[]);
    let nats = NatsServer::start(&dir.path().join("nats"), &[]);
    let client = Client::connect(&broker.addr).await.expect("connect covet");
    let mut spec = TopicSpec::new("orders").partitions(partitions);
    spec.max_batch_bytes = max_batch_bytes;
    client.create_topic(spec).await.expect("create orders");
    let nc = async_nats::connect(nats.url()).await.expect("connect nats");
    let js = async_nats::jetstream::new(nc);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    World {
        dir,
        broker,
        nats,
        client,
        js,
    }
}

impl World {
    /// Writes the config and starts the bridge (route "in").
    fn bridge(&self, route_extra: &str) -> Bridge {
        let status = format!("127.0.0.1:{}", free_port());
        let config = self.dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "[nats]\nurl = \"{}\"\n[covet]\nbrokers = \"{}\"\n[status]\nlisten = \"{status}\"\n\
                 [[route]]\nname = \"in\"\nfrom_subject = \"orders.>\"\nto_topic = \"orders\"\n{route_extra}\n",
                self.nats.url(),
                self.broker.addr
            ),
        )
        .unwrap();
        Bridge::start(&config, Some(&status))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }

    /// Publishes messages `from..to` (payload = the number) to JetStream,
    /// waiting for every publish ack; subjects `orders.k<i % 16>.e`.
    async fn publish(&self, from: u64, to: u64) {
        let mut acks = Vec::with_capacity(1000);
        for i in from..to {
            let subject = format!("orders.k{}.e", i % 16);
            acks.push(
                self.js
                    .publish(subject, i.to_string().into())
                    .await
                    .expect("publish"),
            );
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await.expect("publish ack");
                }
            }
        }
        for a in acks {
            a.await.expect("publish ack");
        }
    }

    /// Whether the route's consumer has nothing left to deliver or ack.
    async fn drained(&self) -> bool {
        let Ok(stream) = self.js.get_stream(STREAM).await else {
            return false;
        };
        let Ok(consumer) = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("covet-bridge-in")
            .await
        else {
            return false;
        };
        match consumer.get_info().await {
            Ok(i) => i.num_pending == 0 && i.num_ack_pending == 0,
            Err(_) => false,
        }
    }

    /// Records in `orders` (sum of the high watermarks).
    async fn written(&self) -> u64 {
        match self.client.describe_topic("orders").await {
            Ok(info) => info.partitions.iter().map(|p| p.high_watermark).sum(),
            Err(_) => 0,
        }
    }

    /// Waits until `n` records are in Covet and the consumer is drained,
    /// then reads everything back and checks each stream sequence 1..=n is
    /// there exactly once (and, with `order`, per-key order).
    async fn expect_exactly(&self, n: u64, order: bool, timeout: Duration) {
        let done = wait_until(timeout, || async {
            self.written().await >= n && self.drained().await
        })
        .await;
        let info = self
            .client
            .describe_topic("orders")
            .await
            .expect("describe");
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
        for p in &info.partitions {
            for r in
                read_partition(&self.client, "orders", p.partition, StartPosition::Earliest).await
            {
                let h = |k: &str| {
                    r.headers
                        .iter()
                        .find(|h| h.key == k)
                        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                };
                assert_eq!(h(ROUTE_HEADER).as_deref(), Some("in"));
                let seq: u64 = h(SEQUENCE_HEADER)
                    .expect("sequence header")
                    .parse()
                    .unwrap();
                // Published on a fresh stream: payload i has sequence i + 1.
                assert_eq!(String::from_utf8_lossy(&r.value), (seq - 1).to_string());
                let subject = h(SUBJECT_HEADER).expect("subject header");
                assert_eq!(subject, format!("orders.k{}.e", (seq - 1) % 16));
                assert_eq!(
                    r.key.as_deref(),
                    Some(format!("k{}", (seq - 1) % 16).as_bytes())
                );
                *seen.entry(seq).or_default() += 1;
                if order {
                    let k = r.key.clone().unwrap_or_default().to_vec();
                    if let Some(prev) = last.insert(k, seq) {
                        assert!(prev < seq, "per-key order broken: {seq} after {prev}");
                    }
                }
            }
        }
        let missing: Vec<u64> = (1..=n).filter(|s| !seen.contains_key(s)).take(10).collect();
        let dups: Vec<(u64, u32)> = seen
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(s, c)| (*s, *c))
            .take(10)
            .collect();
        assert!(
            missing.is_empty() && dups.is_empty() && seen.len() as u64 == n,
            "drained: {done}; {} distinct of {n}; missing (first 10) {missing:?}; duplicated (first 10) {dups:?}; bridge log tail:\n{}",
            seen.len(),
            tail(&self.log(), 30)
        );
        assert!(done, "not drained in time although every record is there");
    }
}

const JS_ROUTE: &str = "stream = \"ORDERS\"\nkey_token = 2\n";

/// 100,000 messages over 16 keys: all arrive once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_messages_arrive_once_in_key_order() {
    let w = world(4, None).await;
    let n = 100_000;
    let started = Instant::now();
    w.publish(0, n).await;
    let published = started.elapsed();
    let bridge = w.bridge(JS_ROUTE);
    w.expect_exactly(n, true, Duration::from_secs(90)).await;
    eprintln!(
        "published {n} in {published:?}, bridged in {:?}",
        started.elapsed() - published
    );
    let report = bridge.report().await;
    assert_eq!(report.delivered, n);
    assert_eq!(report.in_flight, 0);
    assert_eq!(report.dead_lettered, 0);
}

/// 20,000 messages in the stream, then a bridge, and `fault` once a third
/// of them are in Covet: afterwards every message is in Covet exactly
/// once. Gives back the world and the bridge for further checks.
async fn survives(fault: impl AsyncFnOnce(&mut World, &mut Bridge)) -> (World, Bridge) {
    let mut w = world(4, None).await;
    let n = 20_000;
    w.publish(0, n).await;
    let mut bridge = w.bridge(JS_ROUTE);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            w.written().await >= n / 3
        })
        .await,
        "a third not written in 60 s"
    );
    assert!(w.written().await < n, "all written before the fault");
    fault(&mut w, &mut bridge).await;
    w.expect_exactly(n, false, Duration::from_secs(75)).await;
    eprintln!("after the fault: {:?}", bridge.report().await);
    (w, bridge)
}

/// Kill -9 the bridge mid-stream and start it again: nothing lost, nothing
/// written twice (the redelivered messages are found by the scan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_kill9_mid_stream_loses_and_duplicates_nothing() {
    survives(async |_, bridge| bridge.restart()).await;
}

/// SIGTERM mid-stream: the bridge settles what it has in flight, writes
/// its checkpoint and exits 0; started again, it loses and duplicates
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_sigterm_mid_stream_exits_cleanly_and_resumes() {
    survives(async |w, bridge| {
        bridge.stop();
        let cp = read_partition(&w.client, "__covet_bridge.in", 0, StartPosition::Earliest).await;
        assert!(!cp.is_empty(), "no checkpoint written");
        bridge.spawn();
    })
    .await;
}

/// nats-server killed and restarted (same port and store) mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_loses_and_duplicates_nothing() {
    survives(async |w, _| w.nats.restart()).await;
}

/// The Covet broker killed and restarted (same address) mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_and_duplicates_nothing() {
    survives(async |w, _| w.broker.restart_same_address()).await;
}

/// The broker down for longer than the producer retries a write (30 s):
/// the route ends its session, scans again once Covet is back, and goes
/// on; nothing lost, nothing written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_broker_outage_rescans_and_goes_on() {
    let (_world, bridge) = survives(async |w, bridge| {
        w.broker.kill9();
        let gave_up = wait_until(Duration::from_secs(60), || async {
            bridge.log().contains("Covet failed a write")
        })
        .await;
        assert!(
            gave_up,
            "no write failed in 60 s; log:\n{}",
            bridge.log_tail()
        );
        w.broker.restart_same_address();
    })
    .await;
    assert!(
        bridge.log().matches("duplicate scan done").count() >= 2,
        "the route did not scan again; log:\n{}",
        bridge.log_tail()
    );
}

/// The stream deleted and made again while the bridge is down: the new
/// messages number from 1 again, and neither the old checkpoint nor the
/// old records may make the route take them for duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_is_not_taken_for_duplicates() {
    let w = world(2, None).await;
    w.publish(0, 200).await;
    let mut bridge = w.bridge(JS_ROUTE);
    w.expect_exactly(200, true, Duration::from_secs(30)).await;
    let status = bridge.terminate(Duration::from_secs(40));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    w.js.delete_stream(STREAM).await.expect("delete stream");
    w.js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream again");
    w.publish(0, 100).await;
    bridge.spawn();
    let ok = wait_until(Duration::from_secs(30), || async {
        w.written().await >= 300 && w.drained().await
    })
    .await;
    let mut count: HashMap<u64, u32> = HashMap::new();
    for p in 0..2 {
        for r in read_partition(&w.client, "orders", p, StartPosition::Earliest).await {
            let seq = r
                .headers
                .iter()
                .find(|h| h.key == SEQUENCE_HEADER)
                .map(|h| String::from_utf8_lossy(&h.value).parse::<u64>().unwrap())
                .expect("sequence");
            *count.entry(seq).or_default() += 1;
        }
    }
    let want: HashMap<u64, u32> = (1..=200)
        .map(|s| (s, if s <= 100 { 2 } else { 1 }))
        .collect();
    assert!(
        ok && count == want,
        "drained: {ok}; {} records; log:\n{}",
        count.values().sum::<u32>(),
        tail(&w.log(), 30)
    );
}

/// The stream deleted and made again under a running bridge: the route
/// finds its consumer gone, opens a new one and carries on with the new
/// messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_under_a_running_bridge_is_followed() {
    let w = world(2, None).await;
    w.publish(0, 200).await;
    let bridge = w.bridge(JS_ROUTE);
    w.expect_exactly(200, true, Duration::from_secs(30)).await;
    w.js.delete_stream(STREAM).await.expect("delete stream");
    w.js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream again");
    w.publish(0, 100).await;
    let ok = wait_until(Duration::from_secs(45), || async {
        w.written().await >= 300 && w.drained().await
    })
    .await;
    let written = w.written().await;
    assert!(
        ok && written == 300,
        "{written} records; log:\n{}",
        tail(&w.log(), 30)
    );
    drop(bridge);
}

/// A message larger than the topic's max_batch_bytes goes to the
/// dead-letter topic with the reason; the ones after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_route_goes_on() {
    let w = world(1, Some(16 << 10)).await;
    w.publish(0, 5).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("trace", "t-1");
    w.js.publish_with_headers("orders.big.e", headers, vec![7u8; 64 << 10].into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    let bridge = w.bridge(JS_ROUTE);
    let dlq = wait_until(Duration::from_secs(30), || async {
        w.client
            .describe_topic("orders.dlq")
            .await
            .is_ok_and(|i| i.partitions.iter().map(|p| p.high_watermark).sum::<u64>() >= 1)
    })
    .await;
    assert!(
        dlq,
        "nothing dead-lettered in 30 s; log:\n{}",
        tail(&w.log(), 30)
    );
    let recs = read_partition(&w.client, "orders.dlq", 0, StartPosition::Earliest).await;
    assert_eq!(recs.len(), 1);
    let h = |k: &str| {
        recs[0]
            .headers
            .iter()
            .find(|h| h.key == k)
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
    };
    let reason = h(ERROR_HEADER).expect("error header");
    assert!(reason.contains("BATCH_TOO_LARGE"), "{reason}");
    assert_eq!(h(SUBJECT_HEADER).as_deref(), Some("orders.big.e"));
    assert_eq!(h("trace").as_deref(), Some("t-1"));
    assert_eq!(h(SEQUENCE_HEADER).as_deref(), Some("6"));
    assert!(recs[0].value.is_empty(), "the oversized value was kept");
    // Later messages still arrive (7..=10 after the poison at 6).
    w.publish(5, 9).await;
    let ok = wait_until(Duration::from_secs(30), || async {
        w.written().await >= 9 && w.drained().await
    })
    .await;
    assert!(
        ok,
        "later messages did not arrive; log:\n{}",
        tail(&w.log(), 30)
    );
    let recs = read_partition(&w.client, "orders", 0, StartPosition::Earliest).await;
    let seqs: Vec<String> = recs
        .iter()
        .filter_map(|r| r.headers.iter().find(|h| h.key == SEQUENCE_HEADER))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .collect();
    assert_eq!(seqs, ["1", "2", "3", "4", "5", "7", "8", "9", "10"]);
    let report = bridge.report().await;
    assert_eq!(report.dead_lettered, 1);
}

/// A core NATS route: messages published while it runs arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_nats_route_writes_what_is_published() {
    let w = world(2, None).await;
    let bridge = w.bridge("max_in_flight = 4096\n");
    let nc = async_nats::connect(w.nats.url()).await.expect("connect");
    // The subscription is made as the route starts: probe until one
    // message arrives (core NATS drops what nobody is subscribed to).
    let subscribed = wait_until(Duration::from_secs(30), || async {
        let _ = nc.publish("orders.probe.e", "probe".into()).await;
        let _ = nc.flush().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.written().await >= 1
    })
    .await;
    assert!(subscribed, "no probe arrived; log:\n{}", tail(&w.log(), 30));
    let before = w.written().await;
    let n = 1000u64;
    for i in 0..n {
        nc.publish(format!("orders.k{}.e", i % 4), i.to_string().into())
            .await
            .expect("publish");
    }
    nc.flush().await.expect("flush");
    let ok = wait_until(Duration::from_secs(30), || async {
        w.written().await >= before + n
    })
    .await;
    assert!(
        ok,
        "not all core messages arrived; log:\n{}",
        tail(&w.log(), 30)
    );
    let mut got = Vec::new();
    for p in 0..2 {
        for r in read_partition(&w.client, "orders", p, StartPosition::Earliest).await {
            if r.value.as_ref() != b"probe" {
                assert!(r.headers.iter().all(|h| h.key != SEQUENCE_HEADER));
                got.push(String::from_utf8_lossy(&r.value).parse::<u64>().unwrap());
            }
        }
    }
    got.sort_unstable();
    assert_eq!(got, (0..n).collect::<Vec<_>>());
    let report = bridge.report().await;
    assert_eq!(report.errors, 0, "{report:?}");
}
