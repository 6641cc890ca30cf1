//! Adapter files: the export formats and reading adapters back.
//!
//! * `safetensors`: keys `image_proj_model.<name>` and `ip_adapter.<i>.<name>` exactly as the
//!   reference state dict (storymaker.md §3.3–3.4), PyTorch layouts, with metadata (base model,
//!   rank, tokens, step, config hash, PPR head width).
//! * `storymaker-bin`: a `torch.save` zip `{'image_proj_model': {...}, 'ip_adapter': {...}}`
//!   (§3.5) that `torch.load(path, weights_only=True)` reads and the reference pipeline's strict
//!   `load_state_dict` accepts unchanged.
//!
//! Reading accepts both, plus the public IP-Adapter `.bin` layout (`image_proj` instead of
//! `image_proj_model`), through `troupe-pt`, which never executes pickle code.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use troupe_models::weights::{StateDict, write_safetensors};
use troupe_pt::{DType, Tensor, Value};

/// Export container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.safetensors` with metadata.
    Safetensors,
    /// The reference `mask.bin` torch zip.
    StorymakerBin,
}

/// Precision of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDType {
    /// float32.
    F32,
    /// float16 (round to nearest even).
    F16,
}

/// Top-level groups of an adapter state dict.
const GROUPS: [&str; 2] = ["image_proj_model", "ip_adapter"];

fn convert(tensors: &[(String, Tensor)], dtype: ExportDType) -> Result<Vec<(String, Tensor)>> {
    tensors
        .iter()
        .map(|(k, t)| {
            let t = match dtype {
                ExportDType::F32 => t.to_float_dtype(DType::F32)?,
                ExportDType::F16 => t.to_float_dtype(DType::F16)?,
            };
            Ok((k.clone(), t))
        })
        .collect()
}

/// Writes an adapter (`tensors` in the export layout) as `format`.
pub fn write_adapter(
    path: &Path,
    tensors: &[(String, Tensor)],
    format: Format,
    dtype: ExportDType,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let tensors = convert(tensors, dtype)?;
    match format {
        Format::Safetensors => write_safetensors(path, &tensors, Some(metadata))?,
        Format::StorymakerBin => {
            let mut groups: Vec<(Value, Value)> = Vec::new();
            for g in GROUPS {
                let prefix = format!("{g}.");
                let entries: Vec<(Value, Value)> = tensors
                    .iter()
                    .filter_map(|(k, t)| {
                        let name = k.strip_prefix(&prefix)?;
                        Some((Value::Str(name.to_string()), Value::Tensor(t.clone())))
                    })
                    .collect();
                groups.push((Value::Str(g.to_string()), Value::OrderedDict(entries)));
            }
            troupe_pt::write_file(path, &Value::Dict(groups))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads an adapter file into the export layout (`image_proj_model.*`, `ip_adapter.*`).
/// `.safetensors` files are taken as they are; torch zip files may use `image_proj_model` or
/// IP-Adapter's `image_proj` as the projection group.
pub fn read_adapter(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        let mut sd = StateDict::from_file(path)?;
        let device = burn::prelude::Device::flex();
        let mut out = Vec::new();
        for key in sd.keys() {
            let shape = sd.shape(&key).map(<[usize]>::to_vec).unwrap_or_default();
            let t = match shape.len() {
                1 => troupe_models::weights::to_host(sd.take_any::<1>(&key, &device)?),
                2 => troupe_models::weights::to_host(sd.take_any::<2>(&key, &device)?),
                3 => troupe_models::weights::to_host(sd.take_any::<3>(&key, &device)?),
                4 => troupe_models::weights::to_host(sd.take_any::<4>(&key, &device)?),
                n => bail!("{}: `{key}` has rank {n}", path.display()),
            };
            out.push((key, t));
        }
        return Ok(out);
    }
    let value =
        troupe_pt::read_file(path).with_context(|| format!("reading {}", path.display()))?;
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
                bail!("{}: `{group}` holds a non-tensor entry", path.display());
            };
            out.push((format!("{group}.{k}"), t.to_float_dtype(DType::F32)?));
        }
    }
    if out.is_empty() {
        bail!(
            "{}: no `image_proj_model`/`image_proj` or `ip_adapter` dictionary (is it an adapter checkpoint?)",
            path.display()
        );
    }
    Ok(out)
}
