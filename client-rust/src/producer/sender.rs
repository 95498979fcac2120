//! The producer's sender task: drains closed batches, in queue order, onto
//! one produce stream and resolves their acknowledgements.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use covet_protocol::api::{ProduceRequest, ProduceResponse};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use super::{BatchAck, ClosedBatch};
use crate::{Client, Error, Result};

/// What the queue carries.
pub(crate) enum Queued {
    Batch(ClosedBatch),
    /// Answered once every batch queued before it is answered.
    Barrier(oneshot::Sender<()>),
}

/// A batch sent and not yet answered. Dropping it gives its records'
/// bytes back to the producer's buffer, whatever the outcome.
struct InFlight {
    ack: Arc<BatchAck>,
    reserved: usize,
    buffer: Arc<Semaphore>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.buffer.add_permits(self.reserved);
    }
}

/// Batches awaiting an answer on one stream; `None` once the stream has
/// ended and its batches were failed, so nothing can be added that no one
/// would ever answer.
type InFlightMap = Arc<Mutex<Option<HashMap<u64, InFlight>>>>;

/// The produce stream currently open, and the batches awaiting an answer
/// on it.
struct Stream {
    tx: mpsc::Sender<ProduceRequest>,
    in_flight: InFlightMap,
}

pub(crate) struct Sender {
    client: Client,
    max_in_flight: u32,
    permits: Arc<Semaphore>,
    buffer: Arc<Semaphore>,
    stream: Option<Stream>,
    next_id: u64,
}

impl Sender {
    pub(crate) fn new(client: Client, max_in_flight: usize, buffer: Arc<Semaphore>) -> Sender {
        let max_in_flight = max_in_flight.clamp(1, 1 << 16) as u32;
        Sender {
            client,
            max_in_flight,
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            buffer,
            stream: None,
            next_id: 0,
        }
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        while let Some(item) = rx.recv().await {
            match item {
                Queued::Batch(b) => self.send(b).await,
                Queued::Barrier(done) => {
                    // Every batch holds a permit until it is answered:
                    // holding all of them means nothing is in flight.
                    drop(self.permits.acquire_many(self.max_in_flight).await);
                    let _ = done.send(());
                }
            }
        }
    }

    /// Sends one batch, waiting for an in-flight slot.
    async fn send(&mut self, b: ClosedBatch) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return b.ack.complete(Err(Error::Closed));
        };
        let mut flight = InFlight {
            ack: b.ack,
            reserved: b.reserved,
            buffer: self.buffer.clone(),
            _permit: permit,
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut req = ProduceRequest {
            request_id: id,
            topic: b.topic.to_string(),
            partition: b.partition,
            batch: b.batch,
        };
        // Two tries: the stream may have ended just before this batch, in
        // which case a fresh one is opened.
        for _ in 0..2 {
            let (tx, in_flight) = match self.stream().await {
                Ok(s) => s,
                Err(e) => return flight.ack.complete(Err(e)),
            };
            match in_flight.lock().expect("in-flight lock").as_mut() {
                Some(map) => map.insert(id, flight),
                None => {
                    self.stream = None;
                    continue;
                }
            };
            match tx.send(req).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(r)) => {
                    self.stream = None;
                    req = r;
                    let taken = in_flight
                        .lock()
                        .expect("in-flight lock")
                        .as_mut()
                        .and_then(|m| m.remove(&id));
                    match taken {
                        Some(f) => flight = f,
                        // The reader failed it already.
                        None => return,
                    }
                }
            }
        }
        flight
            .ack
            .complete(Err(Error::Transport("produce stream closed".into())));
    }

    /// The open produce stream, opening one if there is none or the last
    /// one broke.
    async fn stream(&mut self) -> Result<(mpsc::Sender<ProduceRequest>, InFlightMap)> {
        if let Some(s) = &self.stream {
            if !s.tx.is_closed() {
                return Ok((s.tx.clone(), s.in_flight.clone()));
            }
        }
        let (tx, rx) = mpsc::channel(self.max_in_flight as usize);
        let responses = self
            .client
            .rpc()
            .produce(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let in_flight: InFlightMap = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(read_responses(responses, in_flight.clone()));
        self.stream = Some(Stream {
            tx: tx.clone(),
            in_flight: in_flight.clone(),
        });
        Ok((tx, in_flight))
    }
}

/// Resolves batches as responses arrive; when the stream ends, fails
/// whatever is still in flight on it.
async fn read_responses(mut responses: tonic::Streaming<ProduceResponse>, in_flight: InFlightMap) {
    let end = loop {
        match responses.message().await {
            Ok(Some(resp)) => {
                let flight = in_flight
                    .lock()
                    .expect("in-flight lock")
                    .as_mut()
                    .and_then(|m| m.remove(&resp.request_id));
                if let Some(f) = flight {
                    let outcome = match &resp.error {
                        Some(e) => Err(Error::from_api(e)),
                        None => Ok(resp.base_offset),
                    };
                    f.ack.complete(outcome);
                }
            }
            Ok(None) => break Error::Transport("produce stream ended".into()),
            Err(status) => break Error::from(status),
        }
    };
    let rest = in_flight.lock().expect("in-flight lock").take();
    let rest = rest.into_iter().flat_map(|m| m.into_values());
    for f in rest {
        f.ack.complete(Err(end.clone()));
    }
}
