//! A client that floods large produce requests and never reads the answers
//! must stall only itself: another client's produce is still acknowledged.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{self, produce_bytes};
use common::Broker;
use covet_client::{Client, Record, TopicSpec};
use covet_protocol::api::ProduceResponse;
use covet_protocol::batch;
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// Streams the flooding client opens on its one connection.
const FLOOD_STREAMS: usize = 10;
/// Requests each flooding stream offers at most (1 MiB each): enough that
/// all of them together would fill the node's 256 MiB budget with room to
/// spare, after the answers each stream buffers (64 per stream) are taken.
const FLOOD_REQUESTS: usize = 150;

async fn good_produce(addr: &str, id: u64) -> ProduceResponse {
    let records = vec![Record {
        value: Bytes::from_static(b"well-behaved"),
        ..Default::default()
    }];
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let messages = vec![produce_bytes(id, "t", batch::encode(&records).unwrap())];
    let mut responses = raw::stream::<ProduceResponse, _>(
        channel,
        "/covet.v1.Covet/Produce",
        futures::stream::iter(messages),
    )
    .await
    .unwrap();
    responses.message().await.unwrap().expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_answers_does_not_stall_other_producers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();

    // The flooder: one connection whose receive window is tiny, so the
    // broker's answers pile up unread, and many streams of 1 MiB requests.
    // They name no topic, so nothing reaches the disk: what is held is the
    // produce budget alone.
    let flood_channel = Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .initial_stream_window_size(Some(1))
        .connect()
        .await
        .unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let junk = produce_bytes(0, "no-such-topic", Bytes::from(vec![7u8; 1 << 20]));
    let mut flood = Vec::new();
    for _ in 0..FLOOD_STREAMS {
        let (taken, junk) = (taken.clone(), junk.clone());
        let requests = futures::stream::iter(0..FLOOD_REQUESTS).map(move |_| {
            taken.fetch_add(1, Ordering::Relaxed);
            junk.clone()
        });
        // Held, never read.
        flood.push(
            raw::stream::<ProduceResponse, _>(
                flood_channel.clone(),
                "/covet.v1.Covet/Produce",
                requests,
            )
            .await
            .unwrap(),
        );
    }

    // Wait until the broker has stopped reading the flood (nothing taken
    // for a second): whatever the flood could pin, it pins now.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let now = taken.load(Ordering::Relaxed);
        if now > 0 && since.elapsed() > Duration::from_secs(1) {
            break;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "the flood neither filled nor stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    eprintln!("the flood offered {} MiB", taken.load(Ordering::Relaxed));
    // A well-behaved client on its own connection is served, promptly.
    for id in 1..=3 {
        let answer = tokio::time::timeout(Duration::from_secs(10), good_produce(&broker.addr, id))
            .await
            .expect("a well-behaved produce was not answered while another client flooded");
        assert_eq!((answer.request_id, answer.error), (id, None));
    }
    assert_eq!(
        client.describe_topic("t").await.unwrap().partitions[0].high_watermark,
        3
    );
    assert!(
        taken.load(Ordering::Relaxed) < FLOOD_STREAMS * FLOOD_REQUESTS,
        "the flooder was held back"
    );
    drop(flood);
}
