// protox keeps the build free of a system `protoc` binary.
const PROTOS: [&str; 4] = [
    "profile.proto",
    "types/v1/types.proto",
    "push/v1/push.proto",
    "querier/v1/querier.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"]).expect("compile the .proto files");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("generate Rust code for the .proto files");
}
