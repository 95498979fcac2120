//! Compiles the `.proto` files with protox (pure Rust), so building Covet
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/covet/v1/covet.proto",
        "proto/covet/v1/internal.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Payloads are `bytes::Bytes`: decoding slices the receive buffer
        // instead of copying into a `Vec`.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
