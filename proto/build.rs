//! Compiles the `.proto` files with `protox` (a pure-Rust protobuf compiler), so building zmesh
//! needs no system `protoc`.

const PROTOS: &[&str] = &["proto/ca.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
