use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The BPF target needs `-Z build-std=core`; RUSTC_BOOTSTRAP unlocks it on the stable
    // toolchain for this child build only, not for the rest of the workspace.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let metadata = cargo_metadata_root()?;
    let ebpf = Package {
        name: "profiler-ebpf",
        root_dir: &metadata,
        ..Default::default()
    };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
        .context("building the BPF programs (run `cargo xtask setup` for rust-src and bpf-linker)")
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("profiler-ebpf");
    Ok(root.to_string_lossy().into_owned())
}
