//! Generates the message types and service traits from the checked-in descriptor set, so that
//! building needs no `protoc`; `cargo xtask proto` regenerates the set after a `.proto` change.
fn main() {
    println!("cargo:rerun-if-changed=proto");
    let mut files: Vec<String> = std::fs::read_dir("proto")
        .expect("reading proto/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".proto"))
        .collect();
    files.sort();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    connectrpc_build::Config::new()
        .descriptor_set("proto/descriptor.bin")
        .files(&files)
        .include_file("_connectrpc.rs")
        .compile()
        .expect("generating code from proto/descriptor.bin");
}
