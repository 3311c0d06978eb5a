//! Generates the gRPC code for `proto/*.proto` with madsim-tonic-build: real
//! tonic in the normal build, madsim's simulated transport under
//! `--cfg madsim`. `protoc` comes from protoc-bin-vendored unless `PROTOC` is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_build::configure().compile_protos(&["proto/attache.proto", "proto/metadata.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
