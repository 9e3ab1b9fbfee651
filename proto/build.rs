//! Compiles the `.proto` files with `protox` (a pure-Rust protobuf compiler), so building zmesh
//! needs no system `protoc`. The `google/protobuf/*` imports come from protox's bundled copies and
//! map to `prost_types`.

const PROTOS: &[&str] = &[
    "proto/ca.proto",
    "proto/workload.proto",
    "proto/authorization.proto",
    "proto/discovery.proto",
    "proto/zds.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // BTreeMap instead of HashMap for every proto map: encoding is then deterministic, so the
        // control plane can derive resource versions from the encoded bytes and tests can compare
        // bytes exactly.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
