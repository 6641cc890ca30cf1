//! One writer per run directory: `RUN_DIR/.lock`, held with an OS file lock for as long as the
//! run trains. The lock dies with its process (even on `kill -9`), so a crashed run never
//! leaves a stale lock; the file's text (pid and host) is only there to name the owner.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Holds the run directory's lock until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Locks `dir` (created if missing) or refuses, naming the process that holds it. Also
    /// checks that `dir` and its `checkpoints/` can be written, before any step is taken.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            let owner = if owner.is_empty() {
                "another process"
            } else {
                owner
            };
            bail!(
                "{} is in use by {owner} (lock {}: {e}); wait for it to finish or stop it first",
                dir.display(),
                path.display()
            );
        }
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".into());
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "troupe pid {} on {host}", std::process::id())
            .with_context(|| format!("writing {}", path.display()))?;
        check_writable(&dir.join("checkpoints"))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` if needed and writes and removes a probe file in it, so a read-only folder
/// is found before training rather than at the first checkpoint.
fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(".write-probe");
    File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("{} is not writable", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = RunLock::acquire(&run).unwrap();
        let e = RunLock::acquire(&run).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("in use"),
            "{e}"
        );
        drop(first);
        RunLock::acquire(&run).expect("free again once the holder is gone");
    }
}
