//! Adapter files: every format troupe writes and reads, in one place.
//!
//! * `safetensors`: keys `image_proj_model.<name>` and `ip_adapter.<i>.<name>` exactly as the
//!   reference state dict (storymaker.md §3.3–3.4), PyTorch layouts, with metadata (the
//!   [`AdapterSpec`], base model, step, …).
//! * `storymaker-bin`: a `torch.save` zip `{'image_proj_model': {...}, 'ip_adapter': {...},
//!   'troupe': {metadata}}` (§3.5) that `torch.load(path, weights_only=True)` reads and the
//!   reference pipeline's strict `load_state_dict` calls accept unchanged (they take the two
//!   groups by name and ignore the rest).
//!
//! Reading accepts both, plus the public IP-Adapter `.bin` layout (`image_proj` instead of
//! `image_proj_model`), through `troupe-pt`, which never executes pickle code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use troupe_pt::{DType, Tensor, Value};

use crate::adapter::{AdapterSpec, check_processor_layout};
use crate::weights::{StateDict, StoredDType, WeightError, to_host, write_safetensors};

/// Tensors in the export layout and the metadata strings of one file.
type Contents = (Vec<(String, Tensor)>, HashMap<String, String>);

/// Container of an adapter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// `.safetensors` with metadata.
    Safetensors,
    /// The reference `mask.bin` torch zip.
    StorymakerBin,
}

/// Precision of written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDType {
    /// float32.
    F32,
    /// float16 (round to nearest even).
    F16,
}

/// Top-level groups of an adapter state dict.
const GROUPS: [&str; 2] = ["image_proj_model", "ip_adapter"];
/// Top-level entry of a torch zip holding troupe's metadata strings.
const BIN_METADATA: &str = "troupe";

fn format_error(path: &Path, message: impl Into<String>) -> WeightError {
    WeightError::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes an adapter (`tensors` in the export layout, `metadata` from
/// [`crate::adapter::Adapter::metadata`]) as `format` in `dtype`, atomically.
pub fn write_adapter(
    path: &Path,
    tensors: &[(String, Tensor)],
    format: AdapterFormat,
    dtype: ExportDType,
    metadata: HashMap<String, String>,
) -> Result<(), WeightError> {
    let target = match dtype {
        ExportDType::F32 => DType::F32,
        ExportDType::F16 => DType::F16,
    };
    let tensors = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_float_dtype(target)?)))
        .collect::<Result<Vec<_>, troupe_pt::Error>>()
        .map_err(|e| format_error(path, e.to_string()))?;
    match format {
        AdapterFormat::Safetensors => write_safetensors(path, &tensors, Some(metadata)),
        AdapterFormat::StorymakerBin => write_bin(path, &tensors, metadata),
    }
}

fn write_bin(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<(), WeightError> {
    let mut top: Vec<(Value, Value)> = Vec::new();
    for g in GROUPS {
        let prefix = format!("{g}.");
        let entries: Vec<(Value, Value)> = tensors
            .iter()
            .filter_map(|(k, t)| {
                let name = k.strip_prefix(&prefix)?;
                Some((Value::Str(name.to_string()), Value::Tensor(t.clone())))
            })
            .collect();
        top.push((Value::Str(g.to_string()), Value::OrderedDict(entries)));
    }
    let mut meta: Vec<(String, String)> = metadata.into_iter().collect();
    meta.sort();
    let meta = meta
        .into_iter()
        .map(|(k, v)| (Value::Str(k), Value::Str(v)))
        .collect();
    top.push((Value::Str(BIN_METADATA.into()), Value::Dict(meta)));
    // Same atomic pattern as safetensors: temporary file, then rename.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    troupe_pt::write_file(&tmp, &Value::Dict(top))
        .map_err(|e| format_error(path, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|source| WeightError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// An adapter file read into memory.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Tensors in the export layout (`image_proj_model.*`, `ip_adapter.*`), f32.
    pub tensors: Vec<(String, Tensor)>,
    /// Metadata strings (empty for files troupe did not write).
    pub metadata: HashMap<String, String>,
}

impl AdapterFile {
    /// Reads `.safetensors` (taken as they are) or a torch zip (`image_proj_model` or
    /// IP-Adapter's `image_proj`, and `ip_adapter`).
    pub fn read(path: &Path) -> Result<Self, WeightError> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let (tensors, metadata) = if is_safetensors {
            read_safetensors(path)?
        } else {
            read_bin(path)?
        };
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// The tensors as a state dict that carries the file's path and metadata.
    pub fn state_dict(&self) -> Result<StateDict, WeightError> {
        let mut sd = StateDict::from_tensors(&self.tensors)?;
        sd.set_origin(
            &self.path.display().to_string(),
            self.metadata.clone().into_iter().collect(),
        );
        Ok(sd)
    }

    /// The adapter's architecture (metadata, else inferred from shapes).
    pub fn spec(&self) -> Result<AdapterSpec, WeightError> {
        AdapterSpec::from_state_dict(&self.state_dict()?)
    }

    /// The architecture, after checking the file against it: every size valid, the PPR and
    /// each processor with exactly the tensors and shapes the architecture needs, every value
    /// finite. Every problem is listed, naming its key.
    pub fn verify(&self) -> Result<AdapterSpec, WeightError> {
        let spec = self.spec()?;
        spec.validate()
            .map_err(|m| format_error(&self.path, format!("architecture: {m}")))?;
        let shapes: BTreeMap<String, Vec<usize>> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        let (mut missing, mut unexpected, mut wrong) = check_processor_layout(&spec, &shapes);
        // The PPR: load its tensors into a lazy module, checking names and shapes only.
        let ppr: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("image_proj_model."))
            .cloned()
            .collect();
        let mut sd = StateDict::from_tensors(&ppr)?.check_only();
        spec.ppr
            .init(&burn::prelude::Device::flex())
            .load(&mut sd, "image_proj_model");
        if let Err(WeightError::Keys {
            missing: m,
            shapes: w,
            ..
        }) = sd.finish_part("PPR (faceid_plus)")
        {
            missing.extend(m);
            wrong.extend(w);
        }
        unexpected.extend(sd.keys());
        unexpected.extend(
            shapes
                .keys()
                .filter(|k| !k.starts_with("image_proj_model.") && !k.starts_with("ip_adapter."))
                .cloned(),
        );
        if !(missing.is_empty() && unexpected.is_empty() && wrong.is_empty()) {
            return Err(WeightError::Keys {
                path: self.path.display().to_string(),
                module: format!(
                    "adapter it declares ({} processors, rank {})",
                    spec.processors, spec.lora_rank
                ),
                missing,
                unexpected,
                shapes: wrong,
            });
        }
        for (key, t) in &self.tensors {
            let values = t
                .to_f32_vec()
                .map_err(|e| format_error(&self.path, format!("`{key}`: {e}")))?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(format_error(
                    &self.path,
                    format!(
                        "`{key}` holds a non-finite value ({}) at element {i}",
                        values[i]
                    ),
                ));
            }
        }
        Ok(spec)
    }
}

fn read_safetensors(path: &Path) -> Result<Contents, WeightError> {
    let mut sd = StateDict::from_file(path)?;
    let metadata = sd.metadata().clone().into_iter().collect();
    let device = burn::prelude::Device::flex();
    let mut out = Vec::new();
    for key in sd.keys() {
        if let Some(d @ (StoredDType::I32 | StoredDType::I64)) = sd.stored_dtype(&key) {
            return Err(format_error(
                path,
                format!(
                    "`{key}` is an integer tensor ({}); adapter weights are floats",
                    d.name()
                ),
            ));
        }
        let rank = sd.shape(&key).map_or(0, <[usize]>::len);
        let t = match rank {
            1 => to_host(sd.take_any::<1>(&key, &device)?),
            2 => to_host(sd.take_any::<2>(&key, &device)?),
            3 => to_host(sd.take_any::<3>(&key, &device)?),
            4 => to_host(sd.take_any::<4>(&key, &device)?),
            n => return Err(format_error(path, format!("`{key}` has rank {n}"))),
        };
        out.push((key, t));
    }
    Ok((out, metadata))
}

fn read_bin(path: &Path) -> Result<Contents, WeightError> {
    let value = troupe_pt::read_file(path).map_err(|e| format_error(path, e.to_string()))?;
    let mut out = Vec::new();
    for (group, names) in [
        ("image_proj_model", &["image_proj_model", "image_proj"][..]),
        ("ip_adapter", &["ip_adapter"][..]),
    ] {
        let Some(entries) = names
            .iter()
            .find_map(|n| value.get(n))
            .and_then(Value::entries)
        else {
            continue;
        };
        for (k, v) in entries {
            let (Value::Str(k), Some(t)) = (k, v.as_tensor()) else {
                return Err(format_error(
                    path,
                    format!("`{group}` holds a non-tensor entry"),
                ));
            };
            if !matches!(t.dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16) {
                return Err(format_error(
                    path,
                    format!(
                        "`{group}.{k}` is a {:?} tensor; adapter weights are floats",
                        t.dtype
                    ),
                ));
            }
            let t = t
                .to_float_dtype(DType::F32)
                .map_err(|e| format_error(path, format!("`{group}.{k}`: {e}")))?;
            out.push((format!("{group}.{k}"), t));
        }
    }
    if out.is_empty() {
        return Err(format_error(
            path,
            "no `image_proj_model`/`image_proj` or `ip_adapter` dictionary (is it an adapter checkpoint?)",
        ));
    }
    let mut metadata = HashMap::new();
    if let Some(entries) = value.get(BIN_METADATA).and_then(Value::entries) {
        for (k, v) in entries {
            if let (Value::Str(k), Value::Str(v)) = (k, v) {
                metadata.insert(k.clone(), v.clone());
            }
        }
    }
    Ok((out, metadata))
}
