//! HBONE: TCP tunnelled through HTTP/2 `CONNECT` streams over mutual TLS, as Istio ambient does it.
//!
//! * [`server::HboneServer`] terminates HBONE on port 15008: mTLS with a certificate chosen by the
//!   accepted socket's local address, HTTP/2 with the reference settings, and for each `CONNECT`
//!   a [`server::ConnectHandler`] that authorizes it and opens the upstream. The server answers
//!   `200` only once the handler accepted, then copies bytes both ways.
//! * [`client::HbonePool`] originates HBONE: pooled HTTP/2 connections per
//!   [`client::PoolKey`] (source identity, acceptable destination identities, destination
//!   address, source IP), at most 100 streams each, one dial per key at a time, idle release.
//! * [`Tunnel`] is one established `CONNECT` stream: `AsyncRead + AsyncWrite`, and a zero-copy
//!   [`crate::copy::ChunkRead`]/[`crate::copy::ChunkWrite`] for [`crate::copy::copy_bidirectional`].
//!   TCP FIN maps to an empty DATA frame with END_STREAM; RST_STREAM NO_ERROR/CANCEL reads as EOF.

pub mod client;
mod error;
pub mod headers;
pub mod server;
mod target;
mod tunnel;

use std::time::Duration;

use h2::{Ping, PingPong};

pub use error::ErrorKind;
pub use target::{ConnectTarget, TargetError};
pub use tunnel::Tunnel;

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

const MIB: u32 = 1024 * 1024;
const KIB: u32 = 1024;
// RFC 9113 limits: windows up to 2^31-1, frames between 2^14 and 2^24-1 (h2 panics outside).
const MAX_WINDOW: u32 = (1 << 31) - 1;

fn clamp_frame_size(size: u32) -> u32 {
    size.clamp(1 << 14, (1 << 24) - 1)
}

/// HTTP/2 settings of one side of an HBONE connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Settings {
    /// SETTINGS_INITIAL_WINDOW_SIZE: per-stream receive window.
    pub stream_window: u32,
    /// Connection-level receive window.
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE we accept.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE we accept.
    pub max_header_list_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS the peer may open (server side only).
    pub max_concurrent_streams: Option<u32>,
    /// Per-stream send buffer h2 may hold before applying back-pressure.
    pub max_send_buffer: usize,
    /// Delay before the first PING and between PINGs.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
}

impl H2Settings {
    /// The reference client settings (ztunnel outbound).
    pub fn client() -> Self {
        Self {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_header_list_size: 16 * KIB,
            max_concurrent_streams: None,
            // As upstream: the send buffer equals the stream window.
            max_send_buffer: 4 * MIB as usize,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }

    /// The reference server settings (ztunnel inbound on 15008).
    pub fn server() -> Self {
        Self {
            max_header_list_size: 64 * KIB,
            max_concurrent_streams: Some(200),
            max_send_buffer: 400 * KIB as usize,
            ..Self::client()
        }
    }
}

/// Sends a PING every `interval` and returns once one goes unanswered for `timeout` (or the
/// connection can no longer send PINGs). The caller then drops the connection.
async fn keepalive(ping_pong: Option<PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
            Err(_) => return format!("keepalive ping unanswered for {timeout:?}"),
        }
    }
}

#[cfg(test)]
mod testutil;
