//! Safe reading and writing of PyTorch `torch.save` checkpoints (the zip
//! format used since torch 1.6) in pure Rust.
//!
//! A checkpoint is a zip archive of STORED entries under one top-level folder:
//! `data.pkl` (a pickle describing the object tree), `data/<key>` (raw
//! little-endian storage bytes), `version`, and in newer torch `byteorder`,
//! `.format_version`, `.storage_alignment` and `.data/serialization_id`.
//!
//! Reading never executes code. The pickle is interpreted by a small virtual
//! machine that only knows plain data (None, bool, int, float, str, bytes,
//! tuple, list, dict), `collections.OrderedDict`, torch's tensor/parameter
//! rebuild functions and storage types, and, data-only, numpy arrays and
//! scalars. Any other global (`os.system`, `builtins.eval`, ...) is refused
//! before anything is called, with an error naming the file and the global.
//!
//! Defensive limits (all give an [`Error`], never a panic): `data.pkl` at most
//! 1 GiB; containers nested at most 256 deep (this also rejects reference
//! cycles); a pickle may not expand, through shared references, to more than
//! 4 objects per pickled object plus one million; every tensor view must lie
//! inside its storage as declared, and each storage record must hold at least
//! the declared bytes, so no allocation exceeds what the file holds, except
//! that stride-0 (expanded) views and repeated references to one tensor may add
//! at most 1 GiB in total. Zip64 archives (> 4 GiB) are read and written.
//!
//! ```no_run
//! let ckpt = troupe_pt::read_file(std::path::Path::new("faceid/0.bin"))?;
//! let id = ckpt.get_tensor("id").expect("id").to_f32_vec()?;
//! # Ok::<(), troupe_pt::Error>(())
//! ```

mod materialize;
mod numpy;
pub mod parity;
mod pickle;
mod pickle_write;
mod tensor;
mod torch;
mod value;
mod zipfile;

use std::path::Path;

pub use tensor::{DType, Tensor, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use value::Value;

/// An error while reading or writing a checkpoint; displays as
/// `"<file>: <what was wrong>"`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct Error {
    /// The file (or the name given to [`read_bytes`]) the error is about.
    pub file: String,
    /// What was wrong.
    pub kind: ErrorKind,
}

impl Error {
    pub(crate) fn new(file: impl Into<String>, kind: ErrorKind) -> Error {
        Error {
            file: file.into(),
            kind,
        }
    }
}

/// What went wrong; see [`Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing the file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A pre-1.6 torch file (pickle stream, not a zip).
    #[error(
        "legacy (non-zip) torch.save format is not supported; re-save it with a current torch \
         (`torch.save(torch.load(path, weights_only=True), path)`) to get the zip format"
    )]
    LegacyFormat,
    /// The file is not a torch.save zip checkpoint.
    #[error("not a torch.save checkpoint: {0}")]
    NotCheckpoint(String),
    /// The zip container is corrupt, truncated or uses unsupported features.
    #[error("corrupt or unsupported zip container: {0}")]
    Zip(String),
    /// The pickle names a global that is not on the allow-list.
    #[error(
        "pickle references global `{0}`; only torch tensor rebuilding, OrderedDict and numpy \
         arrays are allowed — refusing to execute it"
    )]
    ForbiddenGlobal(String),
    /// The pickle uses an opcode the safe unpickler does not implement.
    #[error(
        "pickle opcode {name} (0x{opcode:02x}) at byte {offset} is not supported by the safe unpickler"
    )]
    UnsupportedOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Its name in Python's `pickletools`.
        name: &'static str,
        /// Byte offset in `data.pkl`.
        offset: usize,
    },
    /// The pickle is malformed or uses an allowed global in an unsupported way.
    #[error("bad pickle at byte {offset}: {msg}")]
    Pickle {
        /// Byte offset in `data.pkl` of the opcode being executed.
        offset: usize,
        /// What was wrong.
        msg: String,
    },
    /// A storage record is missing or inconsistent with the pickle.
    #[error("storage `{key}`: {msg}")]
    Storage {
        /// The storage key (`data/<key>` in the archive).
        key: String,
        /// What was wrong.
        msg: String,
    },
    /// A tensor's shape, strides or data are invalid.
    #[error("invalid tensor: {0}")]
    Tensor(String),
    /// A valid construct this crate does not support (dtype, object type...).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Reads a `torch.save` checkpoint from a file.
///
/// Storage bytes are read straight from the archive into the tensors' buffers
/// (one copy; views that do not cover their whole storage are copied out).
pub fn read_file(path: &Path) -> Result<Value, Error> {
    let name = path.display().to_string();
    zipfile::read_file(path).map_err(|k| Error::new(name, k))
}

/// Reads a `torch.save` checkpoint held in memory; `name_for_errors` is used
/// as the file name in errors.
pub fn read_bytes(bytes: &[u8], name_for_errors: &str) -> Result<Value, Error> {
    zipfile::read_bytes(bytes).map_err(|k| Error::new(name_for_errors, k))
}

/// Writes `value` as a `torch.save`-compatible checkpoint that
/// `torch.load(path, weights_only=True)` reads.
///
/// Every tensor gets its own storage record of its dtype (f16 as
/// `HalfStorage`, ...), entries are STORED and 64-byte aligned, zip64 is used
/// when an entry or offset needs it. The file is written to `<path>.partial`
/// and renamed into place, so a failed write never leaves a truncated
/// checkpoint under `path`.
pub fn write_file(path: &Path, value: &Value) -> Result<(), Error> {
    let name = path.display().to_string();
    zipfile::write_file(path, value, false).map_err(|k| Error::new(name, k))
}

/// Gives tensor `i`'s bytes (or why not) to [`write_file_streaming`].
pub type TensorBytes<'a> = dyn FnMut(usize, &Tensor) -> Result<Vec<u8>, String> + 'a;

/// Writes `value` like [`write_file`], but each tensor's bytes come from `data(i, tensor)`
/// (tensors numbered in the order they appear in `value`) when it is written: the tensors in
/// `value` give dtype and shape only (their `data` may be empty), and at most one tensor's
/// bytes are held at a time. The file equals [`write_file`] of the same tensors.
pub fn write_file_streaming(
    path: &Path,
    value: &Value,
    data: &mut TensorBytes<'_>,
) -> Result<(), Error> {
    let name = path.display().to_string();
    zipfile::write_file_with(path, value, false, zipfile::TensorData::Streamed(data))
        .map_err(|k| Error::new(name, k))
}

/// Serialises `value` like [`write_file`] into memory, with `stem` as the
/// archive's top-level folder name.
pub fn write_bytes(value: &Value, stem: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    zipfile::write_to(&mut out, stem, value, false)
        .map_err(|k| Error::new("<in-memory checkpoint>", k))?;
    Ok(out)
}

/// Test hook: like [`write_bytes`] but with zip64 records forced on every
/// entry, to exercise the >4 GiB code path on small data.
#[doc(hidden)]
pub fn write_bytes_zip64(value: &Value, stem: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    zipfile::write_to(&mut out, stem, value, true)
        .map_err(|k| Error::new("<in-memory checkpoint>", k))?;
    Ok(out)
}
