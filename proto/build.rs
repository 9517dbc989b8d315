//! Generates the Istio CA API from `istio/ca.proto`. The proto is compiled in pure Rust with
//! `protox`, so no `protoc` is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=istio/ca.proto");
    let fds = protox::compile(["istio/ca.proto"], ["istio"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
