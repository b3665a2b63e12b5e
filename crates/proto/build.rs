//! Generates the message types and service traits from the checked-in descriptor set, so that
//! building needs no `protoc`; `cargo xtask proto` regenerates the set after a `.proto` change.
fn main() {
    println!("cargo:rerun-if-changed=proto/descriptor.bin");
    connectrpc_build::Config::new()
        .descriptor_set("proto/descriptor.bin")
        .files(&["process.proto", "filesystem.proto"])
        .include_file("_connectrpc.rs")
        .compile()
        .expect("generating code from proto/descriptor.bin");
}
