//! The peer port and membership changes against hostile or careless
//! input: real brokers, a raw client of the `RaftTransport` service.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, wait_until, Broker};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{ChangeMembershipRequest, ClusterStatusRequest};
use covet_protocol::internal::raft_transport_client::RaftTransportClient;
use covet_protocol::internal::{GroupMessage, RaftBatch};
use covet_protocol::reason::{reason_of, Reason};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

const CALL_TIMEOUT: Duration = Duration::from_secs(20);

async fn client(addr: &str) -> CovetClient<tonic::transport::Channel> {
    CovetClient::connect(format!("http://{addr}"))
        .await
        .expect("connect client")
}

/// A free loopback port (bound, then released for the broker to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A cluster of `n` nodes on loopback, all started together (each is
/// ready only once a majority is up). Returns the brokers and their peer
/// ports.
fn cluster(dir: &std::path::Path, n: u64) -> (Vec<Broker>, Vec<u16>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let peers = peers.join(",");
    let starts: Vec<_> = (1..=n)
        .map(|id| {
            let dir = dir.join(format!("n{id}"));
            let peers = peers.clone();
            let listen = format!("127.0.0.1:{}", ports[id as usize - 1]);
            std::thread::spawn(move || {
                Broker::start(
                    &dir,
                    &[
                        "--node-id",
                        &id.to_string(),
                        "--peer-listen",
                        &listen,
                        "--peers",
                        &peers,
                    ],
                )
            })
        })
        .collect();
    let brokers = starts
        .into_iter()
        .map(|s| s.join().expect("node started"))
        .collect();
    (brokers, ports)
}

/// Sends `batches` on one `RaftTransport.Send` stream; the call's outcome.
async fn send_batches(peer_port: u16, batches: Vec<RaftBatch>) -> Result<(), tonic::Status> {
    let mut c = RaftTransportClient::connect(format!("http://127.0.0.1:{peer_port}"))
        .await
        .expect("connect peer port")
        .max_encoding_message_size(usize::MAX);
    let call = c.send(tokio_stream::iter(batches));
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => panic!("peer call did not end in time"),
    }
}

fn batch(from: u64, address: &str, messages: Vec<GroupMessage>) -> RaftBatch {
    RaftBatch {
        from,
        client_address: address.to_string(),
        messages,
    }
}

fn whole(group: u64, message: Bytes) -> GroupMessage {
    GroupMessage {
        group,
        message,
        chunk: 0,
        chunks: 0,
    }
}

fn encoded(m: &Message) -> Bytes {
    Bytes::from(m.write_to_bytes().expect("encode"))
}

/// Every group's status on a node, once it answers.
async fn group_views(addr: &str) -> Option<Vec<covet_protocol::api::GroupStatus>> {
    let mut c = CovetClient::connect(format!("http://{addr}")).await.ok()?;
    let call = c.cluster_status(ClusterStatusRequest {});
    let status = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()?;
    Some(status.into_inner().groups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_last_voter_is_refused_and_the_node_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), &[]);
    let mut c = client(&b.addr).await;
    let err = c
        .change_membership(ChangeMembershipRequest {
            add_node: 0,
            remove_node: 1,
        })
        .await
        .expect_err("removing the only node must be refused");
    assert_eq!(reason_of(&err), Some(Reason::MembershipConflict), "{err:?}");
    // Nothing was proposed: the node restarts on its data.
    b.restart();
    let mut c = client(&b.addr).await;
    c.cluster_status(ClusterStatusRequest {})
        .await
        .expect("serves after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_strangers_and_forged_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, ports) = cluster(dir.path(), 2);
    let (n1, peer_port) = (&nodes[0], ports[0]);

    // A node id outside the configuration.
    let err = send_batches(peer_port, vec![batch(99, "127.0.0.1:1", vec![])])
        .await
        .expect_err("an unknown node must be refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // An address that is too long, or not HOST:PORT.
    let long = format!("127.0.0.1:{}", "9".repeat(1 << 20));
    for bad in [long.as_str(), "not an address"] {
        let err = send_batches(peer_port, vec![batch(2, bad, vec![])])
            .await
            .expect_err("a bad client address must be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }

    // Garbage bytes, and a heartbeat from a "leader" of a later term that
    // claims a commit index far past the log (raft-rs panics on it), then
    // an append whose entries do not follow its index.
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.from = 2;
    hb.to = 1;
    hb.term = 1_000;
    hb.commit = u64::MAX / 2;
    let mut app = Message::default();
    app.set_msg_type(MessageType::MsgAppend);
    app.from = 2;
    app.to = 1;
    app.term = 1_001;
    app.index = 1_000_000;
    app.log_term = 1_001;
    app.commit = u64::MAX / 2;
    let e = raft::prelude::Entry {
        index: 3,
        term: 1_001,
        ..Default::default()
    };
    app.set_entries(vec![e].into());
    // A snapshot for the metadata group (whose log is never compacted: no
    // leader sends one, and installing it fails).
    let mut snap = Message::default();
    snap.set_msg_type(MessageType::MsgSnapshot);
    snap.from = 2;
    snap.to = 1;
    snap.term = 1_002;
    let meta = snap.mut_snapshot().mut_metadata();
    meta.index = 1_000;
    meta.term = 1_002;
    meta.mut_conf_state().voters = vec![1, 2];
    // A proposal from a peer (only a node's own leader proposes; an empty
    // one panics raft-rs on the leader, node 1 as a rule).
    let mut propose = Message::default();
    propose.set_msg_type(MessageType::MsgPropose);
    propose.from = 2;
    propose.to = 1;
    // The snapshot goes first: the heartbeat's term showing up below proves
    // the snapshot was stepped (or dropped) before it.
    let messages = vec![
        whole(0, encoded(&snap)),
        whole(0, encoded(&propose)),
        whole(0, Bytes::from_static(b"\xff\xff\xff garbage")),
        whole(0, encoded(&hb)),
        whole(0, encoded(&app)),
    ];
    send_batches(peer_port, vec![batch(2, "", messages)])
        .await
        .expect("a stream of dropped messages still ends cleanly");

    // The heartbeat was stepped (its later term reached the metadata
    // group: it was not dropped unseen), and no group was taken out of
    // service for it.
    let addr = n1.addr.clone();
    let stepped = wait_until(Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            group_views(&addr).await.is_some_and(|groups| {
                groups
                    .iter()
                    .any(|g| g.role == "faulted" || (g.group == 0 && g.term >= 1_000))
            })
        }
    })
    .await;
    let seen = group_views(&n1.addr).await;
    assert!(
        stepped,
        "the forged heartbeat never reached the group: {seen:?}"
    );
    let faulted: Vec<_> = seen
        .iter()
        .flatten()
        .filter(|g| g.role == "faulted")
        .collect();
    assert!(faulted.is_empty(), "groups out of service: {faulted:?}");
    // And the metadata group has (or regains) a leader: the cluster works.
    let mut c = client(&n1.addr).await;
    let ok = wait_until(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            c.cluster_status(ClusterStatusRequest {})
                .await
                .is_ok_and(|s| {
                    s.into_inner()
                        .groups
                        .iter()
                        .any(|g| g.group == 0 && g.leader != 0)
                })
        }
    })
    .await;
    assert!(ok, "metadata group without a leader");
    c.cluster_status(ClusterStatusRequest {})
        .await
        .expect("serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_that_leaves_no_reachable_majority_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = cluster(dir.path(), 3);
    // The metadata leader, as node 1 sees it.
    let addr = nodes[0].addr.clone();
    let leader = wait_for(Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            let groups = group_views(&addr).await?;
            groups
                .iter()
                .find(|g| g.group == 0 && g.leader != 0)
                .map(|g| g.leader)
        }
    })
    .await
    .expect("no metadata leader");
    let others: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    let (down, live) = (others[0], others[1]);
    nodes[down as usize - 1].kill9();
    let leader_addr = nodes[leader as usize - 1].addr.clone();
    // Once the leader has not heard from the dead node for an election
    // timeout...
    let noticed = wait_until(Duration::from_secs(20), || {
        let addr = leader_addr.clone();
        async move {
            group_views(&addr).await.is_some_and(|groups| {
                groups
                    .iter()
                    .any(|g| g.group == 0 && g.replicas.iter().any(|r| r.node == down && !r.active))
            })
        }
    })
    .await;
    assert!(noticed, "the leader never saw node {down} go");
    // ...removing the live follower is refused: the dead node and the
    // leader would be the voters, and only one of them answers.
    let mut c = client(&leader_addr).await;
    let err = c
        .change_membership(ChangeMembershipRequest {
            add_node: 0,
            remove_node: live,
        })
        .await
        .expect_err("a removal leaving no reachable majority must be refused");
    assert_eq!(reason_of(&err), Some(Reason::MembershipConflict), "{err:?}");
    // Removing the dead node is fine: the two live nodes remain.
    let voters = c
        .change_membership(ChangeMembershipRequest {
            add_node: 0,
            remove_node: down,
        })
        .await
        .expect("removing the dead node")
        .into_inner()
        .voters;
    assert!(!voters.contains(&down), "{voters:?}");
}
