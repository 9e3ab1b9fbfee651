use std::fs::File;
use std::os::fd::AsFd;

use mesh_proto::zds::{Version, ZdsHello};

use super::*;
use crate::zds::NetnsFd;

fn hello() -> ZdsHello {
    ZdsHello {
        version: Version::V1 as i32,
    }
}

#[tokio::test]
async fn message_round_trip_without_fd() {
    let (a, b) = ZdsSocket::pair().unwrap();
    a.send(&hello(), None).await.unwrap();
    let dg = b.recv_datagram().await.unwrap();
    assert!(dg.fds.is_empty());
    assert_eq!(dg.decode::<ZdsHello>("hello").unwrap(), hello());
}

#[tokio::test]
async fn netns_fd_travels_with_the_datagram() {
    let (a, b) = ZdsSocket::pair().unwrap();
    let ns = File::open("/proc/self/ns/net").unwrap();
    a.send(&hello(), Some(ns.as_fd())).await.unwrap();
    let mut dg = b.recv_datagram().await.unwrap();
    assert_eq!(dg.fds.len(), 1);
    let received = NetnsFd::new(dg.fds.pop().unwrap()).unwrap();
    assert_eq!(received.inode(), NetnsFd::new(ns).unwrap().inode());
}

#[tokio::test]
async fn oversize_datagram_is_an_error_and_the_socket_stays_usable() {
    let (a, b) = ZdsSocket::pair().unwrap();
    a.send_raw(&[0x55; 2000], &[]).await.unwrap();
    a.send(&hello(), None).await.unwrap();
    let err = b.recv_datagram().await.unwrap_err();
    assert!(
        matches!(err, TransportError::Truncated { len: 2000 }),
        "{err}"
    );
    assert!(err.to_string().contains("1024-byte limit"), "{err}");
    let dg = b.recv_datagram().await.unwrap();
    assert_eq!(dg.decode::<ZdsHello>("hello").unwrap(), hello());
}

#[tokio::test]
async fn exactly_max_size_datagram_is_accepted() {
    let (a, b) = ZdsSocket::pair().unwrap();
    a.send_datagram(&[7; MAX_DATAGRAM_SIZE], None)
        .await
        .unwrap();
    assert_eq!(
        b.recv_datagram().await.unwrap().bytes.len(),
        MAX_DATAGRAM_SIZE
    );
}

#[tokio::test]
async fn too_many_fds_is_reported_as_control_truncation() {
    let (a, b) = ZdsSocket::pair().unwrap();
    // Just over the limit (fits the aligned buffer) and far over it (kernel sets MSG_CTRUNC).
    for count in [MAX_RECEIVED_FDS + 1, MAX_RECEIVED_FDS * 4] {
        let files: Vec<File> = (0..count)
            .map(|_| File::open("/proc/self/ns/net").unwrap())
            .collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        a.send_raw(b"x", &fds).await.unwrap();
        let err = b.recv_datagram().await.unwrap_err();
        assert!(
            matches!(err, TransportError::ControlTruncated),
            "{count}: {err}"
        );
    }
    a.send(&hello(), None).await.unwrap();
    assert!(b.recv_datagram().await.unwrap().fds.is_empty());
}

#[tokio::test]
async fn sender_refuses_oversize_and_empty_messages() {
    let (a, _b) = ZdsSocket::pair().unwrap();
    let err = a
        .send_datagram(&[1; MAX_DATAGRAM_SIZE + 1], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::TooLarge { len: 1025 }),
        "{err}"
    );
    let err = a.send(&ZdsHello { version: 0 }, None).await.unwrap_err();
    assert!(matches!(err, TransportError::Empty), "{err}");
}

#[tokio::test]
async fn peer_close_is_reported_as_closed() {
    let (a, b) = ZdsSocket::pair().unwrap();
    drop(a);
    assert!(matches!(
        b.recv_datagram().await,
        Err(TransportError::Closed)
    ));
    let err = b.send(&hello(), None).await.unwrap_err();
    assert!(err.to_string().contains("sendmsg"), "{err}");
}

#[tokio::test]
async fn garbage_decodes_to_a_named_error() {
    let (a, b) = ZdsSocket::pair().unwrap();
    a.send_datagram(&[0xff, 0xff, 0xff], None).await.unwrap();
    let err = b
        .recv_datagram()
        .await
        .unwrap()
        .decode::<ZdsHello>("zds hello")
        .unwrap_err();
    assert!(err.to_string().starts_with("invalid zds hello"), "{err}");
}

#[tokio::test]
async fn listener_accepts_and_replaces_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/ztunnel.sock");
    let first = ZdsListener::bind(&path).unwrap();
    drop(first);
    // The socket file outlives the listener; binding again must clean it up.
    let listener = ZdsListener::bind(&path).unwrap();
    assert_eq!(listener.path(), path);
    let (client, server) = tokio::join!(ZdsSocket::connect(&path), listener.accept());
    let (client, server) = (client.unwrap(), server.unwrap());
    client.send(&hello(), None).await.unwrap();
    let dg = server.recv_datagram().await.unwrap();
    assert_eq!(dg.decode::<ZdsHello>("hello").unwrap(), hello());
}

#[tokio::test]
async fn listener_refuses_to_replace_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"keep me").unwrap();
    let err = ZdsListener::bind(&path).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[tokio::test]
async fn connect_to_missing_socket_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let err = ZdsSocket::connect(dir.path().join("absent.sock"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connect failed"), "{err}");
}

#[test]
fn sockets_need_a_runtime() {
    let err = ZdsSocket::pair().unwrap_err();
    assert!(matches!(err, TransportError::NoRuntime), "{err}");
}
