//! Atomic checkpoints with exact resume.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
//! * `adapter.safetensors`: the trainable weights in the export layout, with the adapter's
//!   architecture in the metadata (an export like any other),
//! * `optimizer.safetensors`: the optimizer's own state (it saves and restores itself),
//! * `state.json`: step, loader position, failure counters, seed,
//! * `COMPLETE`: SHA-256 of each file above, written last.
//!
//! It is written into a temporary folder, every file fsynced, then renamed into place, so a
//! checkpoint folder either is complete or does not exist; a checkpoint whose `COMPLETE` is
//! missing or whose checksums differ is never loaded. Randomness is keyed by (seed, step), so
//! the step is the whole RNG state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use troupe_data::loader::LoaderState;
use troupe_models::adapter::Adapter;
use troupe_models::adapter_file::{AdapterFile, AdapterFormat, ExportDType};

use crate::optim::{AdamW, AdamWConfig};

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Training steps completed (optimizer updates plus skipped non-finite steps).
    pub step: u64,
    /// Loader position after the last consumed batch.
    pub loader: LoaderState,
    /// Non-finite steps skipped so far.
    pub skipped_nonfinite: u64,
    /// Consecutive non-finite steps at save time.
    pub consecutive_nonfinite: u64,
    /// Run seed.
    pub seed: u64,
}

const FILES: [&str; 3] = ["adapter.safetensors", "optimizer.safetensors", "state.json"];

fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn fsync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not supported everywhere, so best effort.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Folder of step `step` under `run_dir`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Writes a checkpoint atomically, then deletes all but the newest `keep_last` complete ones.
/// `metadata` goes into the adapter file (see [`Adapter::metadata`]).
pub fn save(
    run_dir: &Path,
    adapter: &Adapter,
    metadata: std::collections::HashMap<String, String>,
    optimizer: &AdamW,
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = checkpoint_dir(run_dir, state.step);
    let tmp = root.join(format!(".tmp-step-{:08}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    adapter.write(
        &tmp.join("adapter.safetensors"),
        AdapterFormat::Safetensors,
        ExportDType::F32,
        metadata,
    )?;
    crate::faults::write_point();
    optimizer.save(&tmp.join("optimizer.safetensors"))?;
    crate::faults::write_point();
    let json = serde_json::to_vec_pretty(state)?;
    write_synced(&tmp.join("state.json"), &json)?;
    let mut complete = String::new();
    for f in FILES {
        complete.push_str(&format!("{}  {f}\n", sha256(&tmp.join(f))?));
    }
    write_synced(&tmp.join("COMPLETE"), complete.as_bytes())?;
    fsync_dir(&tmp);
    crate::faults::write_point();
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
        crate::faults::write_point();
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    fsync_dir(&root);
    crate::faults::write_point();
    let complete = list(run_dir)?;
    for old in complete.iter().rev().skip(keep_last) {
        std::fs::remove_dir_all(&old.1)?;
        crate::faults::write_point();
    }
    Ok(final_dir)
}

/// Replaces `path` with `bytes` atomically: written to `path.partial`, fsynced, renamed over
/// `path`. A kill leaves either the old file or the new one (and perhaps a `.partial`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir);
    }
    crate::faults::write_point();
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    crate::faults::write_point();
    Ok(())
}

/// Checkpoint folders by step, oldest first (complete or not).
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join("checkpoints");
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(&root)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Checks `COMPLETE` and every checksum.
pub fn verify(dir: &Path) -> Result<()> {
    let complete = dir.join("COMPLETE");
    let text = std::fs::read_to_string(&complete)
        .with_context(|| format!("{}: no COMPLETE marker (half-written)", dir.display()))?;
    let mut listed = BTreeMap::new();
    for line in text.lines() {
        if let Some((sum, file)) = line.split_once("  ") {
            listed.insert(file.to_string(), sum.to_string());
        }
    }
    for f in FILES {
        let want = listed
            .get(f)
            .with_context(|| format!("{}: COMPLETE lists no checksum for {f}", dir.display()))?;
        let got = sha256(&dir.join(f))?;
        if &got != want {
            bail!("{}: checksum mismatch for {f} (corrupted)", dir.display());
        }
    }
    Ok(())
}

/// A verified checkpoint, read back.
pub struct Loaded {
    /// Its folder.
    pub dir: PathBuf,
    /// `state.json`.
    pub state: TrainState,
    /// The adapter file.
    pub adapter: AdapterFile,
    /// The optimizer as saved.
    pub optimizer: AdamW,
}

/// Loads the newest checkpoint that verifies; the newer ones that do not are reported in
/// `rejected` (folder and reason), never loaded.
pub fn load_latest(
    run_dir: &Path,
    adamw: AdamWConfig,
    device: &Device,
) -> Result<(Option<Loaded>, Vec<String>)> {
    let mut rejected = Vec::new();
    for (_, dir) in list(run_dir)?.into_iter().rev() {
        match verify(&dir).and_then(|()| read(&dir, adamw, device)) {
            Ok(l) => return Ok((Some(l), rejected)),
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    Ok((None, rejected))
}

fn read(dir: &Path, adamw: AdamWConfig, device: &Device) -> Result<Loaded> {
    let state: TrainState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
        .with_context(|| format!("{}: state.json", dir.display()))?;
    let adapter = AdapterFile::read(&dir.join("adapter.safetensors"))?;
    let optimizer = AdamW::load(adamw, &dir.join("optimizer.safetensors"), device)?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        adapter,
        optimizer,
    })
}

/// The adapter file a run or checkpoint folder stands for: a file as it is, a checkpoint
/// folder once verified, a run folder's newest complete checkpoint (newer incomplete ones are
/// reported in `skipped`).
pub fn adapter_file(source: &Path, skipped: &mut Vec<String>) -> Result<PathBuf> {
    if source.is_file() {
        return Ok(source.to_path_buf());
    }
    if source.join("adapter.safetensors").is_file() && source.join("COMPLETE").is_file() {
        verify(source)?;
        return Ok(source.join("adapter.safetensors"));
    }
    if source.is_dir() {
        for (_, dir) in list(source)?.into_iter().rev() {
            match verify(&dir) {
                Ok(()) => return Ok(dir.join("adapter.safetensors")),
                Err(e) => skipped.push(format!("{e:#}")),
            }
        }
        bail!("{}: no complete checkpoint", source.display());
    }
    bail!("{}: no such file or directory", source.display())
}
