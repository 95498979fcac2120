//! A gRPC client that sends raw bytes as request messages, for requests no
//! well-behaved client can build: undecodable messages, oversized ones.
//! Responses are decoded as protobuf messages of type `R`.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Encodes each request message as the given bytes, unchanged.
pub struct RawCodec<R>(PhantomData<R>);

impl<R> Default for RawCodec<R> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

pub struct RawEncoder;
pub struct ProstDecoder<R>(PhantomData<R>);

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl<R: prost::Message + Default> Decoder for ProstDecoder<R> {
    type Item = R;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        R::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl<R: prost::Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder(PhantomData)
    }
}

/// Opens a client stream on `method` (e.g. `/covet.v1.Covet/Produce`)
/// sending `messages` as they are.
pub async fn stream<R, S>(
    channel: Channel,
    method: &'static str,
    messages: S,
) -> Result<Streaming<R>, Status>
where
    R: prost::Message + Default + Send + 'static,
    S: futures::Stream<Item = Bytes> + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.streaming(
        tonic::Request::new(messages),
        PathAndQuery::from_static(method),
        RawCodec::<R>::default(),
    )
    .await
    .map(|r| r.into_inner())
}

/// An encoded `ProduceRequest` for partition 0, to send as it is.
pub fn produce_bytes(id: u64, topic: &str, batch: Bytes) -> Bytes {
    use prost::Message as _;
    covet_protocol::api::ProduceRequest {
        request_id: id,
        topic: topic.into(),
        partition: 0,
        batch,
    }
    .encode_to_vec()
    .into()
}

/// Bounds every network step of the tests that speak gRPC directly.
pub const STEP: std::time::Duration = std::time::Duration::from_secs(20);

/// A gRPC channel to the broker at `addr`, for tests that bypass the client.
pub async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
