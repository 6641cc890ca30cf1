//! Errors that say where: every problem with user data names the file, the row and the field.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in the user's data a problem was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (shard, manifest, image, index, ...).
    pub file: PathBuf,
    /// Zero-based row in a shard, or line number (one-based) in a manifest; `None` for file-level problems.
    pub row: Option<u64>,
    /// Field path inside the row, e.g. `characters[1].embedding`.
    pub field: Option<String>,
    /// What `row` counts: "row" (shards, zero-based), "line" (JSONL, one-based), "entry".
    pub unit: &'static str,
}

impl Default for Location {
    fn default() -> Self {
        Self {
            file: PathBuf::new(),
            row: None,
            field: None,
            unit: "row",
        }
    }
}

impl Location {
    /// A file-level location.
    pub fn file(file: impl AsRef<Path>) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            ..Self::default()
        }
    }

    /// A row of a shard (zero-based).
    pub fn row(file: impl AsRef<Path>, row: u64) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            row: Some(row),
            ..Self::default()
        }
    }

    /// A line of a text file such as a JSONL manifest (one-based).
    pub fn line(file: impl AsRef<Path>, line: u64) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            row: Some(line),
            field: None,
            unit: "line",
        }
    }

    /// An entry of an index (e.g. `"2"[5]` of a StoryMaker JSON index, given as its position).
    pub fn entry(file: impl AsRef<Path>, entry: u64) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            row: Some(entry),
            field: None,
            unit: "entry",
        }
    }

    /// The same location narrowed to a field.
    pub fn field(&self, field: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(row) = self.row {
            write!(f, ": {} {row}", self.unit)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        Ok(())
    }
}

/// A problem with user data or with reading/writing it.
#[derive(Debug, Clone)]
pub struct DataError {
    /// Where it happened.
    pub at: Location,
    /// What is wrong, as one sentence for a person.
    pub message: String,
}

impl DataError {
    /// An error at `at`.
    pub fn new(at: Location, message: impl Into<String>) -> Self {
        Self {
            at,
            message: message.into(),
        }
    }

    /// An I/O error on a file.
    pub fn io(file: impl AsRef<Path>, err: &std::io::Error) -> Self {
        Self::new(Location::file(file), format!("{err}"))
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

impl std::error::Error for DataError {}

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

thread_local! {
    /// Set while this thread runs work under [`catch_quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work`, turning a panic into `Err(its message)` without printing it. For decoders that
/// panic on corrupt input (the `parquet` crate's asserts, libjpeg's fatal errors raised as
/// panics): the caller names the file.
pub(crate) fn catch_quietly<T>(work: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|d| d.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|d| d.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    QUIET.with(|d| d.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}
