//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no `protoc` binary
//! has to be installed, then generates prost messages and tonic clients/servers from the
//! resulting descriptor set.

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
    Ok(())
}
