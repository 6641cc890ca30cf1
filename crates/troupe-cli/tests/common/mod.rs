//! Helpers shared by the command-line tests: the repository root and running `troupe` in it.

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
