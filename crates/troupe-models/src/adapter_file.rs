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
//! Reading accepts both, plus the public IP-Adapter layouts (`image_proj` instead of
//! `image_proj_model`: a dictionary in `.bin`, a key prefix in `.safetensors`), through
//! `troupe-pt`, which never executes pickle code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use troupe_pt::{DType, Tensor, Value};

use crate::adapter::{AdapterSpec, check_processor_layout};
use crate::weights::{
    StateDict, StoredDType, TensorSpec, WeightError, to_host, write_safetensors_streaming,
};

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
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_streamed(path, &shapes, format, dtype, metadata, &mut |key| {
        Ok(by_name[key].clone())
    })
}

/// [`write_adapter`] for tensors copied to the host one at a time as they are written (see
/// [`crate::weights::StateDict::into_exported_lazy`]): a module streams to its file holding
/// one tensor beside itself.
pub fn write_adapter_lazy(
    path: &Path,
    tensors: Vec<crate::weights::Exported>,
    format: AdapterFormat,
    dtype: ExportDType,
    metadata: HashMap<String, String>,
) -> Result<(), WeightError> {
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    let mut copies: HashMap<String, _> = tensors.into_iter().map(|(k, _, c)| (k, c)).collect();
    write_streamed(path, &shapes, format, dtype, metadata, &mut |key| {
        let copy = copies
            .remove(key)
            .ok_or_else(|| format_error(path, format!("`{key}` asked for twice")))?;
        Ok(copy())
    })
}

/// Writes the tensors `shapes` names (export layout, in that order) as `format` in `dtype`,
/// asking `tensor(key)` for each one only when it is written: at most one tensor (and its
/// converted copy) is held at a time. Atomic; nothing is left behind on failure.
fn write_streamed(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    format: AdapterFormat,
    dtype: ExportDType,
    metadata: HashMap<String, String>,
    tensor: &mut dyn FnMut(&str) -> Result<Tensor, WeightError>,
) -> Result<(), WeightError> {
    let target = match dtype {
        ExportDType::F32 => DType::F32,
        ExportDType::F16 => DType::F16,
    };
    let mut converted = |key: &str| -> Result<Vec<u8>, WeightError> {
        let t = tensor(key)?;
        Ok(t.to_float_dtype(target)
            .map_err(|e| format_error(path, format!("`{key}`: {e}")))?
            .data)
    };
    match format {
        AdapterFormat::Safetensors => {
            let specs: Vec<TensorSpec> = shapes
                .iter()
                .map(|(k, s)| (k.clone(), target, s.clone()))
                .collect();
            write_safetensors_streaming(path, &specs, Some(metadata), converted)
        }
        AdapterFormat::StorymakerBin => write_bin(path, shapes, target, metadata, &mut converted),
    }
}

/// The reference `mask.bin` layout: `{'image_proj_model': {...}, 'ip_adapter': {...},
/// 'troupe': {metadata}}`, tensors streamed in group order.
fn write_bin(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    target: DType,
    metadata: HashMap<String, String>,
    converted: &mut dyn FnMut(&str) -> Result<Vec<u8>, WeightError>,
) -> Result<(), WeightError> {
    let mut top: Vec<(Value, Value)> = Vec::new();
    // Storage `i` is the i-th tensor in this order (the order the pickle names them).
    let mut order: Vec<&str> = Vec::new();
    for g in GROUPS {
        let prefix = format!("{g}.");
        let mut entries = Vec::new();
        for (k, shape) in shapes {
            if let Some(name) = k.strip_prefix(&prefix) {
                // Dtype and shape only: the bytes are streamed in when the entry is written.
                let placeholder = Tensor {
                    dtype: target,
                    shape: shape.clone(),
                    data: Vec::new(),
                };
                entries.push((Value::Str(name.to_string()), Value::Tensor(placeholder)));
                order.push(k);
            }
        }
        top.push((Value::Str(g.to_string()), Value::OrderedDict(entries)));
    }
    let mut meta: Vec<(String, String)> = metadata.into_iter().collect();
    meta.sort();
    let meta = meta
        .into_iter()
        .map(|(k, v)| (Value::Str(k), Value::Str(v)))
        .collect();
    top.push((Value::Str(BIN_METADATA.into()), Value::Dict(meta)));
    // The first error of a tensor is kept: troupe-pt only carries its text.
    let mut failure = None;
    let written = troupe_pt::write_file_streaming(path, &Value::Dict(top), &mut |i, _| {
        converted(order[i]).map_err(|e| {
            let text = e.to_string();
            failure = Some(e);
            text
        })
    });
    match (written, failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(format_error(path, e.to_string())),
    }
}

/// Exports the adapter file `source` to `out` as `format` in `dtype`, streaming: tensors are
/// read, checked finite, converted and written one at a time, so memory stays about one
/// tensor whatever the adapter's size (a `.safetensors` source is read with positioned reads;
/// a torch zip source is read whole). The file is verified against its architecture first
/// ([`AdapterFile::verify`]'s checks); `metadata` is added to the source's. Returns the
/// architecture and the number of tensors written.
pub fn export_adapter(
    source: &Path,
    out: &Path,
    format: AdapterFormat,
    dtype: ExportDType,
    metadata: HashMap<String, String>,
) -> Result<(AdapterSpec, usize), WeightError> {
    if !is_safetensors(source) {
        let file = AdapterFile::read(source)?;
        let spec = file.verify()?;
        let all = with_spec(file.metadata.clone(), metadata, &spec);
        write_adapter(out, &file.tensors, format, dtype, all)?;
        return Ok((spec, file.tensors.len()));
    }
    let (sd, shapes, spec) = open_checked(source)?;
    let all = with_spec(sd.metadata().clone().into_iter().collect(), metadata, &spec);
    write_streamed(out, &shapes, format, dtype, all, &mut |key| {
        let t = sd.read_host(key)?;
        check_finite(source, key, &t)?;
        Ok(t)
    })?;
    Ok((spec, shapes.len()))
}

/// The adapter file at `path` verified as [`AdapterFile::verify`] does; a `.safetensors` file
/// is read one tensor at a time (positioned reads), so memory stays about one tensor.
pub fn verify_file(path: &Path) -> Result<AdapterSpec, WeightError> {
    if !is_safetensors(path) {
        return AdapterFile::read(path)?.verify();
    }
    let (sd, shapes, spec) = open_checked(path)?;
    for (key, _) in &shapes {
        check_finite(path, key, &sd.read_host(key)?)?;
    }
    Ok(spec)
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// Tensor keys and their shapes, in key order.
type Shapes = Vec<(String, Vec<usize>)>;

/// A `.safetensors` adapter opened by its header: the state dict (tensors unread), each
/// key's shape in key order, and the architecture, with the layout verified against it.
fn open_checked(path: &Path) -> Result<(StateDict, Shapes, AdapterSpec), WeightError> {
    let sd = StateDict::from_file(path)?;
    let keys = sd.keys();
    for key in &keys {
        refuse_integer(path, key, sd.stored_dtype(key))?;
    }
    let shapes: Vec<(String, Vec<usize>)> = keys
        .iter()
        .map(|k| (k.clone(), sd.shape(k).unwrap_or(&[]).to_vec()))
        .collect();
    let spec = AdapterSpec::from_state_dict(&sd)?;
    verify_layout(path, &spec, &shapes.iter().cloned().collect())?;
    Ok((sd, shapes, spec))
}

/// `source` metadata with `extra` added and the architecture stated.
fn with_spec(
    mut source: HashMap<String, String>,
    extra: HashMap<String, String>,
    spec: &AdapterSpec,
) -> HashMap<String, String> {
    source.extend(extra);
    let (k, v) = spec.metadata();
    source.insert(k, v);
    source
}

fn refuse_integer(path: &Path, key: &str, dtype: Option<StoredDType>) -> Result<(), WeightError> {
    match dtype {
        Some(d @ (StoredDType::I32 | StoredDType::I64)) => Err(format_error(
            path,
            format!(
                "`{key}` is an integer tensor ({}); adapter weights are floats",
                d.name()
            ),
        )),
        _ => Ok(()),
    }
}

fn check_finite(path: &Path, key: &str, t: &Tensor) -> Result<(), WeightError> {
    let values = t
        .to_f32_vec()
        .map_err(|e| format_error(path, format!("`{key}`: {e}")))?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format_error(
            path,
            format!(
                "`{key}` holds a non-finite value ({}) at element {i}",
                values[i]
            ),
        )),
        None => Ok(()),
    }
}

/// Checks a table of tensor shapes (key → shape, `image_proj_model.*` and `ip_adapter.*`)
/// against `spec`, as [`AdapterFile::verify`] checks a file's: exactly the tensors and shapes
/// the architecture has, none missing, none extra. `path` names the table in errors.
pub fn verify_shapes(
    path: &Path,
    spec: &AdapterSpec,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<(), WeightError> {
    verify_layout(path, spec, shapes)
}

/// Checks the tensors of an adapter file (`shapes`: key → shape) against `spec`: sizes valid,
/// the PPR and each processor with exactly the tensors and shapes the architecture needs.
fn verify_layout(
    path: &Path,
    spec: &AdapterSpec,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<(), WeightError> {
    spec.validate()
        .map_err(|m| format_error(path, format!("architecture: {m}")))?;
    let (mut missing, mut unexpected, mut wrong) = check_processor_layout(spec, shapes);
    // The PPR: a lazy module compared with the shapes only (check-only: nothing is read).
    let ppr: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .filter(|(k, _)| k.starts_with("image_proj_model."))
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    let mut sd = StateDict::from_shapes(&ppr);
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
    if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    Err(WeightError::Keys {
        path: path.display().to_string(),
        module: format!(
            "adapter it declares ({} processors, rank {})",
            spec.processors, spec.lora_rank
        ),
        missing,
        unexpected,
        shapes: wrong,
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
        let shapes: BTreeMap<String, Vec<usize>> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        verify_layout(&self.path, &spec, &shapes)?;
        for (key, t) in &self.tensors {
            check_finite(&self.path, key, t)?;
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
        refuse_integer(path, &key, sd.stored_dtype(&key))?;
        let rank = sd.shape(&key).map_or(0, <[usize]>::len);
        let t = match rank {
            1 => to_host(sd.take_any::<1>(&key, &device)?),
            2 => to_host(sd.take_any::<2>(&key, &device)?),
            3 => to_host(sd.take_any::<3>(&key, &device)?),
            4 => to_host(sd.take_any::<4>(&key, &device)?),
            n => return Err(format_error(path, format!("`{key}` has rank {n}"))),
        };
        // The public IP-Adapter safetensors name the projection model `image_proj.*` (their
        // `.bin` files an `image_proj` dictionary, read below); troupe's name is the
        // StoryMaker one.
        let key = match key.strip_prefix("image_proj.") {
            Some(name) => format!("image_proj_model.{name}"),
            None => key,
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
