//! Helpers shared by the command-line tests: the repository root, running `troupe` in it, and
//! fresh tiny adapters.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (relative paths in commands resolve against it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the `troupe` binary with `args` in the repository root.
pub fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run troupe")
}

/// Asserts that a command succeeded (its stderr on failure).
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that a command failed; its stderr.
pub fn stderr_of(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh adapter (tiny sizes) for the UNet config `unet`, written to `out`.
pub fn adapter_for(unet: &Path, out: &Path) -> PathBuf {
    adapter_seeded(unet, out, 0)
}

/// Like [`adapter_for`], initialised from `seed`.
pub fn adapter_seeded(unet: &Path, out: &Path, seed: u64) -> PathBuf {
    let seed = seed.to_string();
    let args = [
        "adapter",
        "init",
        "--unet-config",
        unet.to_str().unwrap(),
        "--rank",
        "4",
        "--clip-dim",
        "24",
        "--ppr-dim-head",
        "8",
        "--ppr-depth",
        "1",
        "--seed",
        &seed,
        "--out",
        out.to_str().unwrap(),
    ];
    let o = troupe(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.to_path_buf()
}

/// A fresh adapter for the tiny SDXL.
pub fn adapter(dir: &Path) -> PathBuf {
    let unet = root().join("configs/tiny-sdxl/unet/config.json");
    adapter_for(&unet, &dir.join("adapter.safetensors"))
}
