//! Compiles `listenscope/v1/*.proto` in pure Rust (protox: no `protoc` on the build host)
//! and writes the descriptor set next to the generated code for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["listenscope/v1/inventory.proto"];
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("listenscope_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=listenscope");
    Ok(())
}
