//! The monitoring port (istiod's 15014): `GET /metrics` in Prometheus text format, `GET /ready`.
//!
//! Every istiod-lite metric (CA issuance, xDS connections, pushes, push latency, NACKs, translation)
//! goes through the `metrics` facade; the binary installs a Prometheus recorder and serves its
//! handle here.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds the monitoring server; serve it with [`serve`].
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the monitoring address {addr}: {e}"))
}

/// Serves `/metrics` and `/ready` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = route(&metrics, &req);
                async move { Ok::<_, Infallible>(reply) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = conn.await {
                tracing::debug!(%error, "monitoring connection failed");
            }
        });
    }
}

fn route(metrics: &PrometheusHandle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        (&Method::GET, "/ready") => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no monitoring endpoint {path}; try /metrics or /ready\n"),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_prometheus_text_and_names_unknown_paths() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("pilot_xds_pushes", "type" => "wads").increment(3);
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, handle, stop.clone()));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("pilot_xds_pushes{type=\"wads\"} 3"),
            "{metrics}"
        );
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        let missing = get(addr, "/nope").await;
        assert!(
            missing.starts_with("HTTP/1.1 404") && missing.contains("/nope"),
            "{missing}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_clear_error() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err().to_string();
        assert!(
            err.contains("monitoring address") && err.contains(&addr.to_string()),
            "{err}"
        );
    }
}
