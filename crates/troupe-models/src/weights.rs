//! Loading PyTorch state dicts (safetensors, diffusers/transformers folders) into burn modules.
//!
//! Choice: an own loader over the `safetensors` crate + `memmap2` rather than burn-store. It
//! keeps burn's feature set small, reports *every* missing / unexpected / mis-shaped key by name
//! in one error (what a user fixing a checkpoint needs), and makes the PyTorch → burn layout
//! differences explicit in one place:
//! * torch `Linear.weight` is `(out, in)`, burn's is `(in, out)` → transposed on load;
//! * torch LayerNorm/GroupNorm `weight`/`bias` → burn `gamma`/`beta`;
//! * `Sequential`/`ModuleList` indices → named fields (each module documents its mapping).
//!
//! Memory: headers are memory-mapped; each tensor is read (positioned read) once, straight into
//! the parameter it replaces. Modules are created with burn's lazy parameters, so the random initialisation
//! of a model that is then loaded never runs: loading an SDXL UNet holds one copy of the
//! weights, plus one tensor in flight. With [`StateDict::with_dtype`]`(None)` half-precision
//! weights stay half precision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, GroupNorm, LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// A tensor whose shape differs from what the module expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// State-dict key.
    pub key: String,
    /// Shape the module expects (PyTorch layout).
    pub expected: Vec<usize>,
    /// Shape in the file.
    pub found: Vec<usize>,
}

/// Errors while loading a state dict.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The file could not be read.
    #[error("reading {path}: {cause}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error (in the message, so not also a `source`).
        cause: std::io::Error,
    },
    /// The file could not be written.
    #[error("writing {path}: {cause}")]
    Write {
        /// File path.
        path: String,
        /// Underlying error (in the message, so not also a `source`).
        cause: std::io::Error,
    },
    /// The file is not valid safetensors (or a broken shard index).
    #[error("{path}: {message}")]
    Format {
        /// File path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor has a dtype this loader does not convert.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    Dtype {
        /// File path.
        path: String,
        /// State-dict key.
        key: String,
        /// The stored dtype.
        dtype: String,
    },
    /// A single key the caller asked for is absent.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// File path.
        path: String,
        /// State-dict key.
        key: String,
    },
    /// A single tensor the caller asked for has the wrong shape.
    #[error("{path}: `{}` has shape {:?}, expected {:?}", .mismatch.key, .mismatch.found, .mismatch.expected)]
    Shape {
        /// File path.
        path: String,
        /// The mismatch.
        mismatch: ShapeMismatch,
    },
    /// The file does not match the module: every problem is listed.
    #[error("{path} does not match the {module}:{}", keys_report(.missing, .unexpected, .shapes))]
    Keys {
        /// File path.
        path: String,
        /// What was being loaded (e.g. "UNet2DConditionModel").
        module: String,
        /// Keys the module needs that the file lacks.
        missing: Vec<String>,
        /// Keys in the file the module does not use.
        unexpected: Vec<String>,
        /// Keys whose shapes differ.
        shapes: Vec<ShapeMismatch>,
    },
}

fn keys_report(missing: &[String], unexpected: &[String], shapes: &[ShapeMismatch]) -> String {
    const SHOWN: usize = 20;
    let mut s = String::new();
    let mut list = |title: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        let _ = write!(s, "\n  {title} ({}):", items.len());
        for item in items.iter().take(SHOWN) {
            let _ = write!(s, "\n    {item}");
        }
        if items.len() > SHOWN {
            let _ = write!(s, "\n    … and {} more", items.len() - SHOWN);
        }
    };
    list("missing keys", missing.to_vec());
    list("unexpected keys", unexpected.to_vec());
    list(
        "shape mismatches",
        shapes
            .iter()
            .map(|m| format!("{}: file {:?}, model {:?}", m.key, m.found, m.expected))
            .collect(),
    );
    s
}

/// A parameter an exporter collected: key, PyTorch shape, and its host copy on demand (f32,
/// PyTorch layout).
pub type Exported = (
    String,
    Vec<usize>,
    Box<dyn FnOnce() -> troupe_pt::Tensor + Send>,
);

/// Stored element type of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoredDType {
    /// float32
    F32,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// float64 (converted on load)
    F64,
    /// int64 (inputs such as token ids; never a parameter)
    I64,
    /// int32 (inputs; never a parameter)
    I32,
}

impl StoredDType {
    fn from_safetensors(d: Dtype) -> Option<Self> {
        Some(match d {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            Dtype::F64 => Self::F64,
            Dtype::I64 => Self::I64,
            Dtype::I32 => Self::I32,
            _ => return None,
        })
    }

    /// The burn dtype a tensor keeps when loaded with `with_dtype(None)`.
    pub fn burn(self) -> DType {
        match self {
            Self::F32 | Self::F64 | Self::I64 | Self::I32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// Lower-case name as in PyTorch (`float16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
        }
    }
}

enum Backing {
    /// The map serves the header; tensor bytes are read with positioned reads, so they land
    /// only in the tensor being built (bytes read through a map would stay resident as page
    /// cache mapped into this process, doubling its peak RSS).
    Mapped(Mmap, std::fs::File),
    Owned(Vec<u8>),
}

impl Backing {
    fn header_bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, _) => m,
            Backing::Owned(v) => v,
        }
    }

    fn read(&self, range: Range<usize>) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Backing::Mapped(_, file) => {
                let mut buf = vec![0u8; range.len()];
                read_exact_at(file, &mut buf, range.start as u64)?;
                Ok(std::borrow::Cow::Owned(buf))
            }
            Backing::Owned(v) => Ok(std::borrow::Cow::Borrowed(&v[range])),
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

struct Entry {
    dtype: StoredDType,
    shape: Vec<usize>,
    backing: usize,
    range: Range<usize>,
}

/// What [`StateDict::finish`] reports about a complete, matching load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Tensors consumed.
    pub tensors: usize,
    /// Elements in those tensors.
    pub parameters: u64,
    /// Tensors per stored dtype.
    pub dtypes: BTreeMap<StoredDType, usize>,
}

/// A PyTorch state dict (one safetensors file or a sharded set), consumed key by key.
///
/// Module loaders (`linear`, `conv2d`, …) *record* problems and go on, so one load reports every
/// missing, unexpected and mis-shaped key at [`StateDict::finish`]. In check-only mode
/// ([`StateDict::check_only`]) nothing is read or allocated: only names and shapes are compared.
pub struct StateDict {
    path: String,
    backings: Vec<Backing>,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
    dtype: Option<DType>,
    check_only: bool,
    /// The first read error met by a module loader (reported by `finish`).
    failure: Option<WeightError>,
    /// Export mode: module "loaders" copy parameters out instead of in.
    export: Option<Vec<Exported>>,
    /// Naming mode: module "loaders" record each parameter's key and id.
    names: Option<Vec<(String, burn::module::ParamId)>>,
    missing: Vec<String>,
    shapes: Vec<ShapeMismatch>,
    report: LoadReport,
}

impl std::fmt::Debug for StateDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDict")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl StateDict {
    fn empty(path: String) -> Self {
        Self {
            path,
            backings: Vec::new(),
            entries: BTreeMap::new(),
            metadata: BTreeMap::new(),
            dtype: Some(DType::F32),
            check_only: false,
            export: None,
            names: None,
            failure: None,
            missing: Vec::new(),
            shapes: Vec::new(),
            report: LoadReport::default(),
        }
    }

    /// An exporter: running a module's `load(sd, prefix)` on it *collects* the module's
    /// parameters under their PyTorch keys and layouts instead of loading them, so saving uses
    /// exactly the key mapping loading uses. Take the result with [`Self::into_exported`].
    pub fn exporter() -> Self {
        let mut sd = Self::empty("<export>".into());
        sd.export = Some(Vec::new());
        sd
    }

    /// A namer: running a module's `load(sd, prefix)` on it records each parameter's PyTorch
    /// key and burn [`ParamId`](burn::module::ParamId) (to name optimizer state and gradients).
    pub fn namer() -> Self {
        let mut sd = Self::empty("<names>".into());
        sd.names = Some(Vec::new());
        sd
    }

    /// The (key, id) pairs a namer collected, in visiting order.
    pub fn into_names(self) -> Vec<(String, burn::module::ParamId)> {
        self.names.unwrap_or_default()
    }

    /// The tensors an exporter collected (f32, PyTorch layout), in visiting order.
    pub fn into_exported(self) -> Vec<(String, troupe_pt::Tensor)> {
        self.into_exported_lazy()
            .into_iter()
            .map(|(key, _, host)| (key, host()))
            .collect()
    }

    /// What an exporter collected, each tensor copied to the host only when asked for: key,
    /// PyTorch shape, and the copy. Streaming a module to a file holds one tensor at a time.
    pub fn into_exported_lazy(self) -> Vec<Exported> {
        self.export.unwrap_or_default()
    }

    /// Memory-maps one `.safetensors` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let path = path.as_ref();
        let mut sd = Self::empty(path.display().to_string());
        sd.add_file(path)?;
        Ok(sd)
    }

    /// Opens the weights `{stem}.safetensors` in `dir`, or the shards listed by
    /// `{stem}.safetensors.index.json` (diffusers/transformers sharding). Falls back to the
    /// `{stem}.fp16.safetensors` variant when only that exists.
    pub fn from_dir(dir: impl AsRef<Path>, stem: &str) -> Result<Self, WeightError> {
        let dir = dir.as_ref();
        for name in [
            format!("{stem}.safetensors"),
            format!("{stem}.fp16.safetensors"),
        ] {
            let file = dir.join(&name);
            if file.is_file() {
                return Self::from_file(file);
            }
        }
        for name in [
            format!("{stem}.safetensors.index.json"),
            format!("{stem}.safetensors.index.fp16.json"),
        ] {
            let index = dir.join(&name);
            if index.is_file() {
                return Self::from_index(&index);
            }
        }
        Err(WeightError::Io {
            path: dir
                .join(format!("{stem}.safetensors"))
                .display()
                .to_string(),
            cause: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {stem}.safetensors (or sharded index) in this folder"),
            ),
        })
    }

    /// Opens every shard named in a `*.safetensors.index.json` (`weight_map` key → file).
    pub fn from_index(index: &Path) -> Result<Self, WeightError> {
        let path = index.display().to_string();
        let text = std::fs::read_to_string(index).map_err(|source| WeightError::Io {
            path: path.clone(),
            cause: source,
        })?;
        let format = |message: String| WeightError::Format {
            path: path.clone(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format("no `weight_map` object".into()))?;
        let mut shards = BTreeSet::new();
        for (key, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format(format!("weight_map[{key}] is not a file name")))?;
            shards.insert(file.to_string());
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut sd = Self::empty(path.clone());
        for shard in &shards {
            sd.add_file(&dir.join(shard))?;
        }
        for key in map.keys() {
            if !sd.entries.contains_key(key) {
                return Err(format(format!("`{key}` is listed but in no shard")));
            }
        }
        Ok(sd)
    }

    /// A state dict over host tensors (e.g. read from a PyTorch `.bin` by `troupe-pt`).
    pub fn from_tensors(tensors: &[(String, troupe_pt::Tensor)]) -> Result<Self, WeightError> {
        let views = tensors.iter().map(|(k, t)| (k.as_str(), HostView(t)));
        let bytes = safetensors::serialize(views, None).map_err(|e| WeightError::Format {
            path: "<memory>".into(),
            message: e.to_string(),
        })?;
        Self::from_bytes(bytes)
    }

    /// A check-only state dict of names and shapes, no data (see [`Self::check_only`]): for
    /// comparing a file's layout with a module without reading the file's tensors.
    pub fn from_shapes(shapes: &[(String, Vec<usize>)]) -> Self {
        let mut sd = Self::empty("<shapes>".into());
        sd.backings.push(Backing::Owned(Vec::new()));
        for (key, shape) in shapes {
            sd.entries.insert(
                key.clone(),
                Entry {
                    dtype: StoredDType::F32,
                    shape: shape.clone(),
                    backing: 0,
                    range: 0..0,
                },
            );
        }
        sd.check_only()
    }

    /// Parses an in-memory safetensors buffer.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, WeightError> {
        let mut sd = Self::empty("<memory>".into());
        sd.add_backing(Backing::Owned(bytes), "<memory>")?;
        Ok(sd)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), WeightError> {
        let io = |source| WeightError::Io {
            path: path.display().to_string(),
            cause: source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // would fault, the usual caveat of every mmap-based weight loader (safetensors, candle).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        self.add_backing(Backing::Mapped(map, file), &path.display().to_string())
    }

    fn add_backing(&mut self, backing: Backing, path: &str) -> Result<(), WeightError> {
        let bytes = backing.header_bytes();
        let format = |message: String| WeightError::Format {
            path: path.to_string(),
            message,
        };
        let (header_len, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
        let data_start = 8 + header_len;
        if let Some(m) = meta.metadata() {
            self.metadata
                .extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let index = self.backings.len();
        for (key, info) in meta.tensors() {
            let dtype =
                StoredDType::from_safetensors(info.dtype).ok_or_else(|| WeightError::Dtype {
                    path: path.to_string(),
                    key: key.clone(),
                    dtype: format!("{:?}", info.dtype),
                })?;
            if self.entries.contains_key(&key) {
                return Err(format(format!("`{key}` appears in more than one shard")));
            }
            let (a, b) = info.data_offsets;
            self.entries.insert(
                key,
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    backing: index,
                    range: data_start + a..data_start + b,
                },
            );
        }
        self.backings.push(backing);
        Ok(())
    }

    /// Sets the dtype tensors are created with: `Some(F32)` (default) converts everything to
    /// f32; `None` keeps each tensor's stored float type (f16 stays f16).
    pub fn with_dtype(mut self, dtype: Option<DType>) -> Self {
        self.dtype = dtype;
        self
    }

    /// Compares names and shapes only: module loaders read and allocate nothing.
    pub fn check_only(mut self) -> Self {
        self.check_only = true;
        self
    }

    /// The file (or index) this state dict was read from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The `__metadata__` strings of the file(s).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Names the file an in-memory state dict came from and gives it that file's metadata
    /// (errors then name the file).
    pub fn set_origin(&mut self, path: &str, metadata: BTreeMap<String, String>) {
        self.path = path.to_string();
        self.metadata = metadata;
    }

    /// What has been loaded (or, in check-only mode, matched) so far.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Keys not consumed yet, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Shape of an unconsumed key.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// Stored dtype of an unconsumed key.
    pub fn stored_dtype(&self, key: &str) -> Option<StoredDType> {
        self.entries.get(key).map(|e| e.dtype)
    }

    /// Count of each stored dtype among unconsumed keys.
    pub fn dtype_counts(&self) -> BTreeMap<StoredDType, usize> {
        let mut counts = BTreeMap::new();
        for e in self.entries.values() {
            *counts.entry(e.dtype).or_default() += 1;
        }
        counts
    }

    /// Removes a key (a buffer that is not a parameter, or to test error reporting).
    pub fn remove(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Takes `key` as a tensor on `device`, requiring exactly the PyTorch-layout `expected`
    /// shape. For inputs and single tensors; module loaders use the recording methods.
    pub fn take<const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, WeightError> {
        let found = self.shape(key).map(<[usize]>::to_vec);
        match found {
            None => Err(WeightError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
            }),
            Some(found) if found != expected => Err(WeightError::Shape {
                path: self.path.clone(),
                mismatch: ShapeMismatch {
                    key: key.into(),
                    expected: expected.to_vec(),
                    found,
                },
            }),
            Some(_) => self.take_any(key, device),
        }
    }

    /// Takes `key` with whatever shape it has (its rank must be `D`).
    pub fn take_any<const D: usize>(
        &mut self,
        key: &str,
        device: &Device,
    ) -> Result<Tensor<D>, WeightError> {
        let entry = self
            .entries
            .remove(key)
            .ok_or_else(|| WeightError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
            })?;
        if entry.shape.len() != D {
            return Err(WeightError::Format {
                path: self.path.clone(),
                message: format!("`{key}` has rank {}, expected {D}", entry.shape.len()),
            });
        }
        self.materialise(&entry, device)
    }

    /// Takes an integer tensor (int64 or int32, e.g. `input_ids`) with whatever shape it has.
    pub fn take_int<const D: usize>(
        &mut self,
        key: &str,
        device: &Device,
    ) -> Result<Tensor<D, Int>, WeightError> {
        let path = self.path.clone();
        let entry = self
            .entries
            .remove(key)
            .ok_or_else(|| WeightError::MissingKey {
                path: path.clone(),
                key: key.into(),
            })?;
        if entry.shape.len() != D || !matches!(entry.dtype, StoredDType::I64 | StoredDType::I32) {
            return Err(WeightError::Format {
                path,
                message: format!(
                    "`{key}` is {} with rank {}, expected an integer tensor of rank {D}",
                    entry.dtype.name(),
                    entry.shape.len()
                ),
            });
        }
        let bytes = self.read(&entry)?;
        let values = int_values(&bytes, entry.dtype);
        Ok(Tensor::from_data(
            TensorData::new(values, entry.shape),
            device,
        ))
    }

    fn read(&self, e: &Entry) -> Result<std::borrow::Cow<'_, [u8]>, WeightError> {
        self.backings[e.backing]
            .read(e.range.clone())
            .map_err(|source| WeightError::Io {
                path: self.path.clone(),
                cause: source,
            })
    }

    /// Reads `key` as a host tensor in its stored dtype (no device, no conversion), leaving
    /// the key in place: for streaming a file through without holding all of it.
    pub fn read_host(&self, key: &str) -> Result<troupe_pt::Tensor, WeightError> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| WeightError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
            })?;
        use troupe_pt::DType as P;
        let dtype = match e.dtype {
            StoredDType::F32 => P::F32,
            StoredDType::F16 => P::F16,
            StoredDType::BF16 => P::BF16,
            StoredDType::F64 => P::F64,
            StoredDType::I64 => P::I64,
            StoredDType::I32 => P::I32,
        };
        let bytes = self.read(e)?.into_owned();
        troupe_pt::Tensor::new(dtype, e.shape.clone(), bytes).map_err(|err| WeightError::Format {
            path: self.path.clone(),
            message: format!("`{key}`: {err}"),
        })
    }

    fn materialise<const D: usize>(
        &mut self,
        e: &Entry,
        device: &Device,
    ) -> Result<Tensor<D>, WeightError> {
        let bytes = self.read(e)?.into_owned();
        let data = match e.dtype {
            StoredDType::F32 => TensorData::from_bytes_vec(bytes, e.shape.clone(), DType::F32),
            StoredDType::F16 => TensorData::from_bytes_vec(bytes, e.shape.clone(), DType::F16),
            StoredDType::BF16 => TensorData::from_bytes_vec(bytes, e.shape.clone(), DType::BF16),
            StoredDType::F64 => {
                let v: Vec<f32> = bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect();
                TensorData::new(v, e.shape.clone())
            }
            // Integer tensors only reach here as inputs read with `take_any`: as floats.
            StoredDType::I64 | StoredDType::I32 => TensorData::new(
                int_values(&bytes, e.dtype)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect(),
                e.shape.clone(),
            ),
        };
        let dtype = self.dtype.unwrap_or(e.dtype.burn());
        self.report.tensors += 1;
        self.report.parameters += e.shape.iter().product::<usize>() as u64;
        *self.report.dtypes.entry(e.dtype).or_default() += 1;
        Ok(Tensor::from_data(
            data,
            TensorCreationOptions::new(device.clone()).with_dtype(dtype),
        ))
    }

    /// Replaces `p` by `key`, which must have the PyTorch shape `torch_shape`; `to_burn` maps the
    /// loaded tensor to the parameter's layout. Problems are recorded, not returned.
    fn load_with<const D: usize>(
        &mut self,
        p: &mut Param<Tensor<D>>,
        key: &str,
        torch_shape: [usize; D],
        to_burn: impl FnOnce(Tensor<D>) -> Tensor<D> + Send + 'static,
    ) {
        if let Some(names) = self.names.as_mut() {
            names.push((key.to_string(), p.id));
            return;
        }
        if let Some(out) = self.export.as_mut() {
            // The layout maps are involutions (identity or a 2-D transpose), so the same
            // closure turns burn's layout back into PyTorch's. It runs when the copy is taken:
            // a transpose may materialise, and doing them all up front would double the
            // module's memory.
            let t = p.val();
            out.push((
                key.to_string(),
                torch_shape.to_vec(),
                Box::new(move || to_host(to_burn(t))),
            ));
            return;
        }
        let Some(entry) = self.entries.remove(key) else {
            self.missing.push(key.to_string());
            return;
        };
        if entry.shape != torch_shape {
            self.shapes.push(ShapeMismatch {
                key: key.to_string(),
                expected: torch_shape.to_vec(),
                found: entry.shape,
            });
            return;
        }
        if self.check_only {
            self.report.tensors += 1;
            self.report.parameters += entry.shape.iter().product::<usize>() as u64;
            *self.report.dtypes.entry(entry.dtype).or_default() += 1;
            return;
        }
        let t = match self.materialise(&entry, &p.lazy_device()) {
            Ok(t) => to_burn(t),
            Err(e) => {
                self.failure.get_or_insert(e);
                return;
            }
        };
        *p = p.clone().transform_for_load(t, p.id);
    }

    /// Loads a parameter stored in the same layout as burn's.
    pub fn param<const D: usize>(&mut self, p: &mut Param<Tensor<D>>, key: &str) {
        let shape: [usize; D] = p.lazy_shape().dims();
        self.load_with(p, key, shape, |t| t);
    }

    /// torch `Linear` at `prefix`: `weight (out, in)` transposed to burn's `(in, out)`, `bias`.
    pub fn linear(&mut self, l: &mut Linear, prefix: &str) {
        let [d_in, d_out] = l.weight.lazy_shape().dims();
        // Stored contiguous in burn's layout (not as a transposed view): kernels then see the
        // same memory layout whether a weight was loaded or trained, so a resumed run computes
        // bit for bit what an uninterrupted one does.
        self.load_with(&mut l.weight, &join(prefix, "weight"), [d_out, d_in], |t| {
            let device = t.device();
            let dtype = t.dtype();
            let data = t.transpose().into_data();
            Tensor::from_data(data, TensorCreationOptions::new(device).with_dtype(dtype))
        });
        if let Some(b) = l.bias.as_mut() {
            self.param(b, &join(prefix, "bias"));
        }
    }

    /// torch `LayerNorm` at `prefix`: `weight` → gamma, `bias` → beta.
    pub fn layer_norm(&mut self, n: &mut LayerNorm, prefix: &str) {
        self.param(&mut n.gamma, &join(prefix, "weight"));
        if let Some(b) = n.beta.as_mut() {
            self.param(b, &join(prefix, "bias"));
        }
    }

    /// torch `GroupNorm` at `prefix`: `weight` → gamma, `bias` → beta.
    pub fn group_norm(&mut self, n: &mut GroupNorm, prefix: &str) {
        if let Some(g) = n.gamma.as_mut() {
            self.param(g, &join(prefix, "weight"));
        }
        if let Some(b) = n.beta.as_mut() {
            self.param(b, &join(prefix, "bias"));
        }
    }

    /// torch `Conv2d` at `prefix` (same `(out, in/groups, kh, kw)` layout as burn).
    pub fn conv2d(&mut self, c: &mut Conv2d, prefix: &str) {
        self.param(&mut c.weight, &join(prefix, "weight"));
        if let Some(b) = c.bias.as_mut() {
            self.param(b, &join(prefix, "bias"));
        }
    }

    /// torch `Embedding` at `prefix` (same `(n, d)` layout as burn).
    pub fn embedding(&mut self, e: &mut Embedding, prefix: &str) {
        self.param(&mut e.weight, &join(prefix, "weight"));
    }

    /// Ends a module load: `Ok` with what was loaded if every key matched and was used,
    /// otherwise one error listing all missing, unexpected and mis-shaped keys.
    pub fn finish(mut self, module: &str) -> Result<LoadReport, WeightError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.missing.is_empty() && self.shapes.is_empty() && self.entries.is_empty() {
            return Ok(self.report);
        }
        Err(WeightError::Keys {
            path: self.path.clone(),
            module: module.to_string(),
            missing: self.missing,
            unexpected: self.entries.into_keys().collect(),
            shapes: self.shapes,
        })
    }

    /// Like [`Self::finish`] but leaves unused keys in place (for files holding several
    /// modules, e.g. an adapter file with `image_proj_model.*` and `ip_adapter.*`). Missing or
    /// mis-shaped keys are still an error.
    pub fn finish_part(&mut self, module: &str) -> Result<(), WeightError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if self.missing.is_empty() && self.shapes.is_empty() {
            return Ok(());
        }
        Err(WeightError::Keys {
            path: self.path.clone(),
            module: module.to_string(),
            missing: std::mem::take(&mut self.missing),
            unexpected: Vec::new(),
            shapes: std::mem::take(&mut self.shapes),
        })
    }
}

fn int_values(bytes: &[u8], dtype: StoredDType) -> Vec<i64> {
    match dtype {
        StoredDType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    }
}

/// Precision of frozen components (`model.dtype`): their weights are stored and computed in
/// it, while a trainable adapter stays in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half: 11 bits of mantissa, overflows above 65504.
    F16,
}

impl Precision {
    /// The tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(format!("`{s}`: expected \"f32\", \"bf16\" or \"f16\"")),
        }
    }
}

/// `module` with every float parameter cast to `dtype` (same parameter ids).
pub fn cast_floats<M: Module>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            p.map(|t| t.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Joins a key prefix and a name with a dot (an empty prefix adds nothing).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Path of a file inside a model folder, checked to exist.
pub fn model_file(dir: &Path, name: &str) -> Result<PathBuf, WeightError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(WeightError::Io {
            path: p.display().to_string(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        })
    }
}

/// Copies a tensor to the host as an f32 [`troupe_pt::Tensor`] (PyTorch layout as is).
pub fn to_host<const D: usize>(t: Tensor<D>) -> troupe_pt::Tensor {
    let shape = t.dims().to_vec();
    let values = t
        .cast(burn::tensor::FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    troupe_pt::Tensor::from_f32(shape, &values).expect("shape matches the values")
}

/// A host tensor as a `safetensors` view (for in-memory state dicts).
struct HostView<'a>(&'a troupe_pt::Tensor);

impl safetensors::View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        st_dtype(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// The header `safetensors::serialize` writes for `tensors` (in its data order), with
/// `__metadata__` added with its keys sorted: the `safetensors` crate writes a `HashMap` in
/// random order, and the same content must give the same bytes. Padded to 8 bytes.
fn header(
    tensors: &[(String, Dtype, Vec<usize>, usize)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, dtype, shape, len)| {
            let info = safetensors::tensor::TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            };
            offset += len;
            (name.clone(), info)
        })
        .collect();
    let meta = safetensors::tensor::Metadata::new(None, infos).map_err(|e| e.to_string())?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&serde_json::to_string(&meta).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if let Some(m) = metadata {
        let mut meta: Vec<(String, String)> = m.into_iter().collect();
        meta.sort();
        let meta = meta
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The data section starts 8-byte aligned, as the format requires.
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    Ok(h)
}

/// One tensor of a streamed safetensors file: name, dtype, shape.
pub type TensorSpec = (String, troupe_pt::DType, Vec<usize>);

/// Writes a `.safetensors` file tensor by tensor: `data(name)` is asked for each tensor's
/// bytes (in `specs`' dtype) only when it is written, so at most one tensor is held. The
/// bytes equal [`write_safetensors`] of the same tensors. Atomic: a temporary file in the same
/// folder, fsync, rename; removed on failure.
pub fn write_safetensors_streaming(
    path: &Path,
    specs: &[TensorSpec],
    metadata: Option<std::collections::HashMap<String, String>>,
    mut data: impl FnMut(&str) -> Result<Vec<u8>, WeightError>,
) -> Result<(), WeightError> {
    let shown = path.display().to_string();
    let format = |message: String| WeightError::Format {
        path: shown.clone(),
        message,
    };
    // The data order of `safetensors::serialize`: descending dtype alignment, then name.
    let mut order: Vec<(String, Dtype, Vec<usize>, usize)> = specs
        .iter()
        .map(|(name, dtype, shape)| {
            let numel = shape.iter().product::<usize>();
            (
                name.clone(),
                st_dtype(*dtype),
                shape.clone(),
                numel * dtype.itemsize(),
            )
        })
        .collect();
    order.sort_by(|(ln, ld, ..), (rn, rd, ..)| rd.cmp(ld).then(ln.cmp(rn)));
    let h = header(&order, metadata).map_err(format)?;
    let tmp = partial_path(path);
    let result = (|| -> Result<(), WeightError> {
        use std::io::Write;
        let io = |source| WeightError::Write {
            path: shown.clone(),
            cause: source,
        };
        let mut f =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        for (name, _, _, len) in &order {
            let bytes = data(name)?;
            if bytes.len() != *len {
                return Err(format(format!(
                    "`{name}`: {} bytes given for a tensor of {len}",
                    bytes.len()
                )));
            }
            f.write_all(&bytes).map_err(io)?;
        }
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `.NAME.partial` next to `path`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

fn st_dtype(d: troupe_pt::DType) -> Dtype {
    use troupe_pt::DType as P;
    match d {
        P::F64 => Dtype::F64,
        P::F32 => Dtype::F32,
        P::F16 => Dtype::F16,
        P::BF16 => Dtype::BF16,
        P::I64 => Dtype::I64,
        P::I32 => Dtype::I32,
        P::I16 => Dtype::I16,
        P::I8 => Dtype::I8,
        P::U8 => Dtype::U8,
        P::Bool => Dtype::BOOL,
    }
}

/// Writes named host tensors (any dtype) and string metadata as a `.safetensors` file,
/// atomically (see [`write_safetensors_streaming`]).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, troupe_pt::Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), WeightError> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dtype, t.shape.clone()))
        .collect();
    let by_name: std::collections::HashMap<&str, &troupe_pt::Tensor> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_safetensors_streaming(path, &specs, metadata, |name| {
        Ok(by_name[name].data.clone())
    })
}
