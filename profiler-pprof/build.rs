// protox keeps the build free of a system `protoc` binary.
fn main() {
    println!("cargo:rerun-if-changed=proto/profile.proto");
    let fds = protox::compile(["profile.proto"], ["proto"]).expect("compile profile.proto");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("generate Rust code for profile.proto");
}
