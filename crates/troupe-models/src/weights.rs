//! Loading PyTorch state dicts (safetensors) into the burn modules of this crate.
//!
//! Choice: an own loader over the `safetensors` crate rather than burn-store. It keeps the
//! dependency set to burn's `std` + `flex` features, gives exact error messages (missing /
//! unexpected key by name, shape mismatch with key, expected and found shapes) and makes the
//! PyTorch → burn layout differences explicit:
//! * torch `Linear.weight` is `(out, in)`, burn's is `(in, out)` → transposed on load;
//! * torch LayerNorm `weight`/`bias` → burn `gamma`/`beta`;
//! * `Sequential`/`ModuleList` indices → named fields (see [`crate::resampler`], [`crate::ppr`]).
//!
//! Tensors stored as F32, F16, BF16 or F64 are converted to f32.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use troupe_pt::{DType, Tensor as PtTensor};

use crate::ppr::FaceIdPlus;
use crate::resampler::{
    FacePerceiverResampler, FeedForward, PerceiverAttention, PerceiverBlock, Resampler,
};

/// Errors while loading a state dict.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("parsing safetensors: {0}")]
    Format(String),
    /// A tensor has a dtype this loader does not convert.
    #[error("tensor `{key}` has unsupported dtype {dtype}")]
    Dtype {
        /// State-dict key.
        key: String,
        /// The stored dtype.
        dtype: String,
    },
    /// A key the module needs is absent.
    #[error("missing key `{0}`")]
    MissingKey(String),
    /// Keys present in the file that the module does not use.
    #[error("unexpected keys: {}", .0.join(", "))]
    UnexpectedKeys(Vec<String>),
    /// A tensor has the wrong shape (PyTorch layout).
    #[error("shape mismatch for `{key}`: expected {expected:?}, found {found:?}")]
    Shape {
        /// State-dict key.
        key: String,
        /// Shape the module expects (PyTorch layout).
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
}

/// A PyTorch state dict held in memory as f32 arrays, consumed key by key.
#[derive(Debug, Default)]
pub struct StateDict {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl StateDict {
    /// Reads every tensor of a `.safetensors` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| WeightError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parses a safetensors buffer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WeightError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightError::Format(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (key, view) in st.tensors() {
            // One conversion path for every weight file: troupe-pt's tensor (also used for .bin).
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F64 => DType::F64,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => return Err(WeightError::Dtype { key, dtype: format!("{other:?}") }),
            };
            let values = PtTensor::new(dtype, view.shape().to_vec(), view.data().to_vec())
                .and_then(|t| t.to_f32_vec())
                .map_err(|e| WeightError::Format(format!("{key}: {e}")))?;
            tensors.insert(key, (view.shape().to_vec(), values));
        }
        Ok(Self { tensors })
    }

    /// Keys still unconsumed, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Removes a key (e.g. to test error reporting).
    pub fn remove(&mut self, key: &str) -> bool {
        self.tensors.remove(key).is_some()
    }

    /// Takes `key`, checking its PyTorch-layout shape, as a tensor on `device`.
    pub fn take<const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, WeightError> {
        let (shape, values) = self
            .tensors
            .remove(key)
            .ok_or_else(|| WeightError::MissingKey(key.to_string()))?;
        if shape != expected {
            return Err(WeightError::Shape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(Tensor::from_data(TensorData::new(values, expected), device))
    }

    /// Errors with [`WeightError::UnexpectedKeys`] if any key was not consumed.
    pub fn finish(self) -> Result<(), WeightError> {
        if self.tensors.is_empty() {
            Ok(())
        } else {
            Err(WeightError::UnexpectedKeys(self.keys()))
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Replaces a parameter by `{key}` with the same shape.
fn load_param<const D: usize>(
    p: &mut Param<Tensor<D>>,
    sd: &mut StateDict,
    key: &str,
) -> Result<(), WeightError> {
    let cur = p.val();
    *p = Param::from_tensor(sd.take(key, cur.dims(), &cur.device())?);
    Ok(())
}

/// torch `Linear` at `prefix`: `weight (out, in)` transposed into burn's `(in, out)`, optional `bias`.
pub fn load_linear(l: &mut Linear, sd: &mut StateDict, prefix: &str) -> Result<(), WeightError> {
    let w = l.weight.val();
    let [d_in, d_out] = w.dims();
    let t: Tensor<2> = sd.take(&join(prefix, "weight"), [d_out, d_in], &w.device())?;
    l.weight = Param::from_tensor(t.transpose()); // [in, out]
    if let Some(b) = l.bias.as_mut() {
        load_param(b, sd, &join(prefix, "bias"))?;
    }
    Ok(())
}

/// torch `LayerNorm` at `prefix`: `weight` → gamma, `bias` → beta.
pub fn load_layer_norm(
    n: &mut LayerNorm,
    sd: &mut StateDict,
    prefix: &str,
) -> Result<(), WeightError> {
    load_param(&mut n.gamma, sd, &join(prefix, "weight"))?;
    if let Some(b) = n.beta.as_mut() {
        load_param(b, sd, &join(prefix, "bias"))?;
    }
    Ok(())
}

fn load_ff(ff: &mut FeedForward, sd: &mut StateDict, prefix: &str) -> Result<(), WeightError> {
    load_layer_norm(&mut ff.norm, sd, &join(prefix, "0"))?;
    load_linear(&mut ff.up, sd, &join(prefix, "1"))?;
    load_linear(&mut ff.down, sd, &join(prefix, "3"))
}

fn load_attn(
    a: &mut PerceiverAttention,
    sd: &mut StateDict,
    prefix: &str,
) -> Result<(), WeightError> {
    load_layer_norm(&mut a.norm1, sd, &join(prefix, "norm1"))?;
    load_layer_norm(&mut a.norm2, sd, &join(prefix, "norm2"))?;
    load_linear(&mut a.to_q, sd, &join(prefix, "to_q"))?;
    load_linear(&mut a.to_kv, sd, &join(prefix, "to_kv"))?;
    load_linear(&mut a.to_out, sd, &join(prefix, "to_out"))
}

fn load_blocks(
    layers: &mut [PerceiverBlock],
    sd: &mut StateDict,
    prefix: &str,
) -> Result<(), WeightError> {
    for (i, block) in layers.iter_mut().enumerate() {
        let p = join(prefix, &format!("layers.{i}"));
        load_attn(&mut block.attn, sd, &join(&p, "0"))?;
        load_ff(&mut block.ff, sd, &join(&p, "1"))?;
    }
    Ok(())
}

/// Loads an IP-Adapter-plus `Resampler` state dict under `prefix`.
pub fn load_resampler(
    r: &mut Resampler,
    sd: &mut StateDict,
    prefix: &str,
) -> Result<(), WeightError> {
    load_param(&mut r.latents, sd, &join(prefix, "latents"))?;
    load_linear(&mut r.proj_in, sd, &join(prefix, "proj_in"))?;
    load_linear(&mut r.proj_out, sd, &join(prefix, "proj_out"))?;
    load_layer_norm(&mut r.norm_out, sd, &join(prefix, "norm_out"))?;
    load_blocks(&mut r.layers, sd, prefix)
}

/// Loads a `FacePerceiverResampler` state dict under `prefix`.
pub fn load_face_resampler(
    r: &mut FacePerceiverResampler,
    sd: &mut StateDict,
    prefix: &str,
) -> Result<(), WeightError> {
    load_linear(&mut r.proj_in, sd, &join(prefix, "proj_in"))?;
    load_linear(&mut r.proj_out, sd, &join(prefix, "proj_out"))?;
    load_layer_norm(&mut r.norm_out, sd, &join(prefix, "norm_out"))?;
    load_blocks(&mut r.layers, sd, prefix)
}

impl FaceIdPlus {
    /// Loads the `image_proj_model` state dict (keys of storymaker.md §3.3, no prefix) from a
    /// `.safetensors` file into this module (shapes come from its config). Every key must be
    /// used exactly once.
    pub fn load_state_dict(self, path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let sd = StateDict::from_file(path)?;
        self.load_from(sd)
    }

    /// Like [`Self::load_state_dict`], from an in-memory [`StateDict`].
    pub fn load_from(mut self, mut sd: StateDict) -> Result<Self, WeightError> {
        load_param(&mut self.pos_embed, &mut sd, "pos_embed")?;
        load_param(&mut self.bg_embed, &mut sd, "bg_embed")?;
        load_linear(&mut self.proj.fc1, &mut sd, "proj.0")?;
        load_linear(&mut self.proj.fc2, &mut sd, "proj.2")?;
        load_layer_norm(&mut self.norm, &mut sd, "norm")?;
        load_linear(&mut self.proj_out, &mut sd, "proj_out")?;
        load_layer_norm(&mut self.norm_out, &mut sd, "norm_out")?;
        load_face_resampler(
            &mut self.perceiver_resampler,
            &mut sd,
            "perceiver_resampler",
        )?;
        load_resampler(&mut self.resample, &mut sd, "resample")?;
        sd.finish()?;
        Ok(self)
    }
}
