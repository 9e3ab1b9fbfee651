//! Shared by the xDS tests: resource builders and a scripted ADS server over TLS on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use mesh_proto::any::{self, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use mesh_proto::security::Authorization;
use mesh_proto::workload as pb;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// How long a test waits for the client.
pub const WAIT: Duration = Duration::from_secs(5);

/// A workload `Resource` named by its uid, with one IPv4 address.
pub fn workload(uid: &str, ip: [u8; 4], version: &str) -> Resource {
    let w = pb::Workload {
        uid: uid.into(),
        name: uid.replace('/', "-"),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    address(uid, pb::address::Type::Workload(w), version)
}

/// A workload `Resource` that fails validation (a 3-byte address).
pub fn bad_workload(uid: &str, version: &str) -> Resource {
    let mut r = workload(uid, [10, 0, 0, 99], version);
    let mut a: pb::Address = any::unpack(r.resource.as_ref().unwrap()).unwrap();
    if let Some(pb::address::Type::Workload(w)) = &mut a.r#type {
        w.addresses = vec![vec![1, 2, 3]];
    }
    r.resource = Some(any::pack(&a));
    r
}

/// A service `Resource` `default/<name>.default.svc.cluster.local` with one VIP.
pub fn service(name: &str, vip: [u8; 4], version: &str) -> Resource {
    let s = pb::Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let key = format!("default/{name}.default.svc.cluster.local");
    address(&key, pb::address::Type::Service(s), version)
}

/// An `Authorization` resource `<ns>/<name>`.
pub fn policy(ns: &str, name: &str, version: &str) -> Resource {
    let p = Authorization {
        name: name.into(),
        namespace: ns.into(),
        ..Default::default()
    };
    Resource {
        name: format!("{ns}/{name}"),
        version: version.into(),
        resource: Some(any::pack(&p)),
        ..Default::default()
    }
}

fn address(name: &str, t: pb::address::Type, version: &str) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(any::pack(&pb::Address { r#type: Some(t) })),
        ..Default::default()
    }
}

/// A root and a `localhost` serving certificate signed by it.
pub struct Pki {
    pub root_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Self {
            root_pem: root.pem(),
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// One stream as the server sees it.
pub struct Conn {
    pub metadata: MetadataMap,
    pub requests: Streaming<DeltaDiscoveryRequest>,
    pub responses: UnboundedSender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Conn {
    pub async fn recv(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("no request in time")
            .expect("stream error")
            .expect("stream ended")
    }

    pub fn send(&self, type_url: &str, nonce: &str, resources: Vec<Resource>, removed: &[&str]) {
        let r = DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            system_version_info: format!("sys-{nonce}"),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        };
        self.responses.unbounded_send(Ok(r)).unwrap();
    }

    /// Sends a response and returns the client's answer to it.
    pub async fn exchange(
        &mut self,
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryRequest {
        self.send(type_url, nonce, resources, removed);
        let reply = self.recv().await;
        assert_eq!(reply.type_url, type_url);
        assert_eq!(reply.response_nonce, nonce);
        assert!(
            reply.node.is_none(),
            "node is only sent on the first request"
        );
        reply
    }

    /// Reads the two initial requests: (address, authorization).
    pub async fn initial(&mut self) -> (DeltaDiscoveryRequest, DeltaDiscoveryRequest) {
        let a = self.recv().await;
        let b = self.recv().await;
        assert_eq!(a.type_url, ADDRESS_TYPE_URL);
        assert_eq!(b.type_url, AUTHORIZATION_TYPE_URL);
        (a, b)
    }
}

struct Ads(UnboundedSender<Conn>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = UnboundedReceiver<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        // A token the server refuses, answered with a status and no stream (trailers-only).
        if request
            .metadata()
            .get("authorization")
            .is_some_and(|v| v == "Bearer refused-token")
        {
            return Err(Status::unauthenticated("token refused by the test server"));
        }
        let (tx, rx) = unbounded();
        let metadata = request.metadata().clone();
        let conn = Conn {
            metadata,
            requests: request.into_inner(),
            responses: tx,
        };
        self.0
            .unbounded_send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(rx))
    }
}

/// A TLS ADS server on loopback; every accepted stream is handed to the test.
pub struct AdsServer {
    pub addr: SocketAddr,
    conns: UnboundedReceiver<Conn>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl AdsServer {
    pub async fn start(pki: &Pki, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = unbounded();
        let (stop, stopped) = oneshot::channel::<()>();
        let identity = tonic::transport::Identity::from_pem(&pki.cert_pem, &pki.key_pem);
        let server = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(Ads(tx)))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            });
        let task = tokio::spawn(async move { server.await.unwrap() });
        Self {
            addr,
            conns,
            stop: Some(stop),
            task,
        }
    }

    pub async fn conn(&mut self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.next())
            .await
            .expect("no connection in time")
            .expect("server gone")
    }

    /// Stops accepting and closes every connection.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Open streams would hold a graceful shutdown: end them from our side.
        drop(self.conns);
        self.task.abort();
        let _ = self.task.await;
    }
}
