//! Compiles `proto/*.proto` without a system `protoc`.
//!
//! `protox` parses the schema into a `FileDescriptorSet`; `tonic-prost-build`
//! generates the prost messages and the tonic client/server from it; the
//! generated services use the crate's own codec (`codec::SluiceCodec`). The
//! encoded set is also written to `$OUT_DIR/sluice_descriptor.bin` so the
//! crate can export it (gRPC reflection, text-format parsing of
//! `config.pbtxt`).

use std::{env, fs, path::PathBuf};

const PROTO_DIR: &str = "proto";
const PROTOS: &[&str] = &["proto/model_config.proto", "proto/grpc_service.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let mut compiler = protox::Compiler::new([PROTO_DIR])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    fs::write(
        out_dir.join("sluice_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads as `Bytes`: decoded without a copy, sliced without a copy.
        .bytes(".inference")
        // prost's codec, but a ModelInferRequest is checked against the caps of
        // `limits` before it is decoded (see src/codec.rs).
        .codec_path("crate::codec::SluiceCodec")
        .compile_fds(compiler.file_descriptor_set())?;

    Ok(())
}
