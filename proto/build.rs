//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no `protoc` binary
//! has to be installed, then generates prost messages and tonic clients/servers from the
//! resulting descriptor set.
//!
//! A second compile covers `proto/etcd/*.proto`, a wire-compatible subset of etcd's v3 gRPC API
//! used by the discovery client (`gochat_infra::discovery`): client code only, since gochat
//! never serves the etcd API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/im_repo.proto", "proto/im_logic.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let etcd_files = ["proto/etcd/kv.proto", "proto/etcd/rpc.proto"];
    for file in etcd_files {
        println!("cargo:rerun-if-changed={file}");
    }
    let etcd_fds = protox::compile(etcd_files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd_fds)?;
    Ok(())
}
