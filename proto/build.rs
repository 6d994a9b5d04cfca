//! Compiles the .proto files with protox (pure Rust, no protoc) and generates
//! tonic clients and servers, plus a file descriptor set for server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/flotilla/v1/flotilla.proto",
        "proto/flotilla/raft/v1/raft.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("flotilla_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Every service decodes with our codec: undecodable requests are INVALID_ARGUMENT.
    tonic_prost_build::configure()
        .codec_path("crate::codec::FlotillaCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
