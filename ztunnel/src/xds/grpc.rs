//! The ADS stream's gRPC framing, over a tonic [`Channel`] (which keeps TLS, HTTP/2, keepalives).
//!
//! tonic's `Streaming` assembles every message in one buffer that grows to the largest message
//! received and keeps that size for the life of the stream; the first snapshot of a 10 000-workload
//! mesh is ≈ 2.4 MB, of 100 000 workloads tens of MB, held for hours only to receive small
//! deltas. Here a message is collected in a buffer of exactly its size, decoded, and the buffer is
//! dropped. Each request is likewise encoded into its own buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use futures::channel::mpsc;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE};
use http_body_util::BodyExt;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use prost::Message;
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

/// The method's path.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
// Compressed flag (1 byte) + message length (4 bytes, big endian).
const HEADER_LEN: usize = 5;

/// Opens the bidirectional stream: `requests` are sent as they arrive, with `metadata` (auth,
/// cluster id) as request headers. Fails with the server's status when it refuses the stream.
pub async fn open(
    channel: Channel,
    metadata: HeaderMap,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    max_message: usize,
) -> Result<Responses, Status> {
    let frames = requests.map(|r| encode(&r).map(http_body::Frame::data));
    let mut request = http::Request::post(DELTA_ADS_PATH)
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("cannot build the request: {e}")))?;
    let headers = request.headers_mut();
    headers.extend(metadata);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    let response = channel
        .oneshot(request)
        .await
        .map_err(|e| Status::unavailable(format!("transport error: {e}")))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(Status::new(
            http_status_code(head.status),
            format!("the server answered HTTP {}", head.status),
        ));
    }
    // A refusal comes as headers only ("trailers-only" response); so, rarely, does an OK end.
    let header_status = Status::from_header_map(&head.headers);
    if let Some(status) = header_status.clone()
        && status.code() != Code::Ok
    {
        return Err(status);
    }
    Ok(Responses {
        body,
        pending: BytesMut::new(),
        max_message,
        ended_ok: header_status.is_some(),
    })
}

/// The response half of the stream.
pub struct Responses {
    body: Body,
    // Received bytes not yet decoded: at most one message's worth plus what followed it.
    pending: BytesMut,
    max_message: usize,
    // The headers already carried `grpc-status: 0` (a trailers-only OK).
    ended_ok: bool,
}

impl Responses {
    /// The next response; `Ok(None)` when the server ended the stream with status OK.
    pub async fn message(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        loop {
            if let Some(message) = self.take_message()? {
                let response = DeltaDiscoveryResponse::decode(message).map_err(|e| {
                    Status::internal(format!("undecodable DeltaDiscoveryResponse: {e}"))
                })?;
                return Ok(Some(response));
            }
            match self.body.frame().await {
                None => {
                    if !self.pending.is_empty() {
                        return Err(Status::internal("the stream ended inside a message"));
                    }
                    if self.ended_ok {
                        return Ok(None);
                    }
                    return Err(Status::internal(
                        "the server ended the stream without a status",
                    ));
                }
                Some(Err(status)) => return Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending.put(data),
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(Status::from_header_map)
                            .unwrap_or_else(|| {
                                Status::internal("the server ended the stream without a status")
                            });
                        if status.code() == Code::Ok {
                            return Ok(None);
                        }
                        return Err(status);
                    }
                },
            }
        }
    }

    /// Splits off the next complete message, if one has arrived. The buffer of a large message
    /// is given exactly that message's size and freed with it.
    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.pending.len() < HEADER_LEN {
            return Ok(None);
        }
        let (compressed, len) = (self.pending[0], &self.pending[1..HEADER_LEN]);
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if compressed != 0 {
            // Nothing was offered (no grpc-accept-encoding): the server must not compress.
            return Err(Status::internal(
                "the server sent a compressed message without being offered compression",
            ));
        }
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "message of {len} bytes is over the {} byte limit",
                self.max_message
            )));
        }
        let have = self.pending.len() - HEADER_LEN;
        if have < len {
            // Room for the rest of this message only, so the buffer never outgrows it.
            self.pending.reserve(len - have);
            return Ok(None);
        }
        let mut message = self.pending.split_to(HEADER_LEN + len);
        message.advance(HEADER_LEN);
        // `split_to` left the remainder sharing the message's allocation: move it out so the
        // allocation goes when the message does.
        self.pending = BytesMut::from(&self.pending[..]);
        Ok(Some(message.freeze()))
    }
}

/// One length-prefixed, uncompressed gRPC message.
fn encode(request: &DeltaDiscoveryRequest) -> Result<Bytes, Status> {
    let len = request.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::out_of_range(format!("request of {len} bytes is over 4 GiB")))?;
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    request
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("cannot encode the request: {e}")))?;
    Ok(buf.freeze())
}

/// The gRPC code for an HTTP status (the gRPC HTTP/2 spec's mapping).
fn http_status_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use http_body::Frame;

    use super::*;

    fn response(nonce: &str, padding: usize) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            nonce: nonce.into(),
            system_version_info: "x".repeat(padding),
            ..Default::default()
        }
    }

    fn framed(r: &DeltaDiscoveryResponse) -> Vec<u8> {
        let body = r.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn trailers(code: Code) -> Frame<Bytes> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from(code as i32));
        t.insert(
            "grpc-message",
            HeaderValue::from_static("from%20the%20test"),
        );
        Frame::trailers(t)
    }

    /// Responses reading `chunks` as DATA frames, then `end` (trailers) if any.
    fn responses(chunks: Vec<Vec<u8>>, end: Option<Frame<Bytes>>) -> Responses {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .chain(end.map(Ok))
            .collect();
        Responses {
            body: Body::new(http_body_util::StreamBody::new(stream::iter(frames))),
            pending: BytesMut::new(),
            max_message: 4 * 1024 * 1024,
            ended_ok: false,
        }
    }

    #[tokio::test]
    async fn messages_split_and_packed_across_frames_and_a_clean_end() {
        let (a, b, c) = (response("a", 10), response("b", 100_000), response("c", 0));
        let mut bytes = framed(&a);
        bytes.extend(framed(&b));
        bytes.extend(framed(&c));
        // Awkward frame boundaries: inside headers, inside bodies, several messages per frame.
        let chunks = [3, 20, 40_000, 60_000, 7, usize::MAX]
            .iter()
            .scan(0usize, |at, len| {
                let start = *at;
                *at = start.saturating_add(*len).min(bytes.len());
                Some(bytes[start..*at].to_vec())
            })
            .collect();
        let mut r = responses(chunks, Some(trailers(Code::Ok)));
        assert_eq!(r.message().await.unwrap(), Some(a));
        assert_eq!(r.message().await.unwrap(), Some(b));
        // A large message's buffer went with it.
        assert!(r.pending.capacity() < 16 * 1024, "{}", r.pending.capacity());
        assert_eq!(r.message().await.unwrap(), Some(c));
        assert_eq!(r.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_trailers_only_ok_is_a_clean_end() {
        let mut r = responses(vec![], None);
        r.ended_ok = true;
        assert_eq!(r.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_error_status_in_the_trailers_ends_the_stream_with_it() {
        let mut r = responses(
            vec![framed(&response("a", 0))],
            Some(trailers(Code::Unavailable)),
        );
        assert!(r.message().await.unwrap().is_some());
        let status = r.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "from the test");
    }

    #[tokio::test]
    async fn malformed_streams_are_clear_errors() {
        let too_big = {
            let mut f = vec![0];
            f.extend_from_slice(&(5u32 * 1024 * 1024).to_be_bytes());
            f
        };
        let compressed = {
            let mut f = framed(&response("a", 0));
            f[0] = 1;
            f
        };
        let mut truncated = framed(&response("a", 50));
        truncated.truncate(30);
        let garbage = vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        for (chunks, end, want) in [
            (vec![too_big], None, "over the 4194304 byte limit"),
            (vec![compressed], None, "compressed message"),
            (vec![truncated], None, "ended inside a message"),
            (vec![], None, "without a status"),
            (vec![garbage], None, "undecodable DeltaDiscoveryResponse"),
        ] {
            let err = responses(chunks, end).message().await.unwrap_err();
            assert!(err.message().contains(want), "{err:?}\nwant: {want}");
        }
    }

    #[test]
    fn requests_are_length_prefixed_and_uncompressed() {
        let request = DeltaDiscoveryRequest {
            type_url: "t".into(),
            ..Default::default()
        };
        let framed = encode(&request).unwrap();
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize,
            framed.len() - 5
        );
        assert_eq!(
            DeltaDiscoveryRequest::decode(&framed[5..]).unwrap(),
            request
        );
    }
}
