//! Benchmark support for zmesh: a tiny application protocol spoken over every transport under test,
//! and the measuring helpers (percentiles, RSS) the benchmark binaries share.
//!
//! Every scenario runs the same client and server logic over each transport, so the only thing that
//! differs between rows is the transport itself (plain TCP, TLS 1.3, HBONE).

pub mod app;
pub mod stats;
pub mod transport;

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed stream.
pub type BoxStream = Pin<Box<dyn Stream>>;
