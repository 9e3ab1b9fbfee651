//! The generated gRPC servers must route upstream's exact method paths (written literally here),
//! because that string is what an upstream ztunnel or istiod puts in `:path`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use mesh_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tonic::codegen::Service;
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Request, Response, Status, Streaming};

const ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const CA_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Records whether a handler ran.
#[derive(Default, Clone)]
struct Called(Arc<AtomicBool>);

impl Called {
    fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Called {
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        self.set();
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Called {
    async fn create_certificate(
        &self,
        _request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.set();
        Ok(Response::new(IstioCertificateResponse::default()))
    }
}

/// A gRPC request carrying one empty (zero-length) message: flag 0, length 0.
fn grpc_request(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("valid request")
}

/// The gRPC status in the response headers, if the server answered trailers-only.
fn header_status<B>(resp: &http::Response<B>) -> Option<String> {
    resp.headers()
        .get("grpc-status")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

#[tokio::test]
async fn ads_server_routes_upstream_delta_path() {
    let called = Called::default();
    let mut svc = AggregatedDiscoveryServiceServer::new(called.clone());
    let resp = svc.call(grpc_request(ADS_PATH)).await.expect("infallible");
    assert!(called.get(), "handler not reached via {ADS_PATH}");
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(header_status(&resp), None);
}

#[tokio::test]
async fn ads_server_rejects_other_paths_as_unimplemented() {
    // Guards the test above: a path that differs (here the SotW method) is not routed.
    let called = Called::default();
    let mut svc = AggregatedDiscoveryServiceServer::new(called.clone());
    let path = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    let resp = svc.call(grpc_request(path)).await.expect("infallible");
    assert!(!called.get());
    assert_eq!(header_status(&resp).as_deref(), Some("12")); // UNIMPLEMENTED
}

#[tokio::test]
async fn ca_server_routes_upstream_create_certificate_path() {
    let called = Called::default();
    let mut svc = IstioCertificateServiceServer::new(called.clone());
    let resp = svc.call(grpc_request(CA_PATH)).await.expect("infallible");
    assert!(called.get(), "handler not reached via {CA_PATH}");
    assert_eq!(resp.status(), http::StatusCode::OK);

    let wrong = "/istio.v1.auth.IstioCertificateService/CreateCertificates";
    let called = Called::default();
    let mut svc = IstioCertificateServiceServer::new(called.clone());
    let resp = svc.call(grpc_request(wrong)).await.expect("infallible");
    assert!(!called.get());
    assert_eq!(header_status(&resp).as_deref(), Some("12"));
}
