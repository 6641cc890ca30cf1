//! The StoryMaker adapter as one module: the PPR (`image_proj_model`) and the attention
//! processors (`ip_adapter.{i}`) attached to a frozen UNet, with its architecture
//! ([`AdapterSpec`]).
//!
//! The spec is what a file needs to be rebuilt: it travels in every adapter file troupe writes
//! (safetensors metadata, or a `troupe` entry in the torch zip that the reference loader
//! ignores) and every reader uses it. Files without it (the released `mask.bin`, other
//! tools' exports) have their spec inferred from tensor shapes, with StoryMaker's head width
//! 64, which shapes cannot show.

use burn::module::ParamId;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::ppr::{FaceIdPlus, FaceIdPlusConfig};
use crate::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use std::collections::BTreeMap;

use crate::weights::{ShapeMismatch, StateDict, WeightError};

/// Metadata key holding the [`AdapterSpec`] as JSON.
pub const SPEC_METADATA: &str = "troupe.adapter";

/// Parameter group of the PPR (`image_proj_model.*`).
pub const GROUP_PPR: &str = "ppr";
/// Parameter group of the attention processors (`ip_adapter.*`).
pub const GROUP_PROCESSORS: &str = "processors";

/// Everything that fixes an adapter's tensors: LoRA rank, PPR sizes and the base UNet's
/// processor count. Defaults are StoryMaker SDXL's (the released `mask.bin`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// LoRA rank of every processor (128).
    pub lora_rank: usize,
    /// Attention processors of the base UNet, `ip_adapter.0 … n−1` (140 for SDXL).
    pub processors: usize,
    /// PPR sizes; `cross_attention_dim` is the base UNet's.
    pub ppr: FaceIdPlusConfig,
}

impl Default for AdapterSpec {
    fn default() -> Self {
        Self {
            lora_rank: 128,
            processors: 140,
            ppr: FaceIdPlusConfig::new(),
        }
    }
}

impl PartialEq for AdapterSpec {
    fn eq(&self, other: &Self) -> bool {
        serde_json::to_value(self).ok() == serde_json::to_value(other).ok()
    }
}

impl AdapterSpec {
    /// The spec of an adapter for `unet` (processor count and cross-attention width taken from
    /// it; rank and PPR sizes from `self`).
    pub fn for_unet(mut self, unet: &UNet2DConditionModel) -> Result<Self, ConfigError> {
        let processors = unet.processors();
        let cross = processors
            .iter()
            .find_map(|p| p.cross_attention_dim)
            .ok_or_else(|| ConfigError::new("unet", "", "the UNet has no cross-attention"))?;
        self.processors = processors.len();
        self.ppr.cross_attention_dim = cross;
        Ok(self)
    }

    /// The metadata entry that carries this spec.
    pub fn metadata(&self) -> (String, String) {
        let json = serde_json::to_string(self).expect("the spec serialises");
        (SPEC_METADATA.to_string(), json)
    }

    /// The spec of the adapter in `sd` (keys `image_proj_model.*`, `ip_adapter.*`): from its
    /// metadata when present, else inferred from the tensor shapes.
    pub fn from_state_dict(sd: &StateDict) -> Result<Self, WeightError> {
        let bad = |message: String| WeightError::Format {
            path: sd.path().to_string(),
            message,
        };
        if let Some(json) = sd.metadata().get(SPEC_METADATA) {
            return serde_json::from_str(json)
                .map_err(|e| bad(format!("metadata `{SPEC_METADATA}`: {e}")));
        }
        let probe = "ip_adapter.0.to_q_lora.down.weight";
        let lora_rank = match sd.shape(probe) {
            Some([r, _]) => *r,
            _ => {
                return Err(WeightError::MissingKey {
                    path: sd.path().to_string(),
                    key: probe.into(),
                });
            }
        };
        let processors = processor_count(&sd.keys());
        let ppr = FaceIdPlusConfig::from_state_dict(sd, "image_proj_model")?;
        Ok(Self {
            lora_rank,
            processors,
            ppr,
        })
    }

    /// Checks that every size is usable before anything is allocated: all at least 1, the PPR
    /// head width dividing both resampler widths, sizes within bounds. The message names the
    /// field.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.ppr;
        for (field, v) in [
            ("lora_rank", self.lora_rank),
            ("ppr.cross_attention_dim", p.cross_attention_dim),
            ("ppr.id_embeddings_dim", p.id_embeddings_dim),
            ("ppr.clip_embeddings_dim", p.clip_embeddings_dim),
            ("ppr.num_tokens", p.num_tokens),
            ("ppr.resampler_depth", p.resampler_depth),
            ("ppr.resampler_dim_head", p.resampler_dim_head),
            ("ppr.resampler_num_queries", p.resampler_num_queries),
            ("ppr.resampler_ff_mult", p.resampler_ff_mult),
            ("ppr.max_characters", p.max_characters),
        ] {
            if v == 0 {
                return Err(format!("`{field}` must be at least 1"));
            }
            if v > MAX_SIZE {
                return Err(format!("`{field}` = {v} is over the limit of {MAX_SIZE}"));
            }
        }
        for (width, name) in [
            (
                p.cross_attention_dim,
                "the face resampler width (cross_attention_dim)",
            ),
            (
                p.clip_embeddings_dim,
                "the character resampler width (clip_embeddings_dim)",
            ),
        ] {
            if width % p.resampler_dim_head != 0 {
                return Err(format!(
                    "`ppr.resampler_dim_head` = {} does not divide {name} {width}",
                    p.resampler_dim_head
                ));
            }
        }
        Ok(())
    }

    /// Checks that an adapter of this spec fits `unet`; the message says what differs.
    pub fn check_unet(&self, unet: &UNet2DConditionModel) -> Result<(), String> {
        self.validate()?;
        let narrowest = unet
            .processors()
            .iter()
            .map(|p| {
                p.hidden_size
                    .min(p.cross_attention_dim.unwrap_or(p.hidden_size))
            })
            .min()
            .unwrap_or(0);
        if self.lora_rank > narrowest {
            return Err(format!(
                "`lora_rank` = {} exceeds the narrowest attention width of the UNet ({narrowest}): a LoRA cannot have a higher rank than its layer",
                self.lora_rank
            ));
        }
        let want = self.clone().for_unet(unet).map_err(|e| e.to_string())?;
        if want.processors != self.processors {
            return Err(format!(
                "the adapter has {} attention processors, the UNet has {}",
                self.processors, want.processors
            ));
        }
        if want.ppr.cross_attention_dim != self.ppr.cross_attention_dim {
            return Err(format!(
                "the adapter's cross-attention width is {}, the UNet's is {}",
                self.ppr.cross_attention_dim, want.ppr.cross_attention_dim
            ));
        }
        Ok(())
    }
}

/// Upper bound of any single adapter size (rank, width, depth, token count): far above every
/// real architecture, low enough that no product of a few of them overflows or exhausts memory
/// unnoticed.
pub const MAX_SIZE: usize = 1 << 16;

/// Compares the tensors of an adapter file (`shapes`: key → shape, export layout) with the
/// processors `spec` declares: for each `ip_adapter.{i}`, the four LoRA pairs at the spec's
/// rank with one hidden width, and the image projections (both or neither) from the spec's
/// cross-attention width. The PPR (`image_proj_model.*`) is not looked at here. Returns the
/// missing keys, the unexpected ones and the shape mismatches.
pub fn check_processor_layout(
    spec: &AdapterSpec,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> (Vec<String>, Vec<String>, Vec<ShapeMismatch>) {
    let (mut missing, mut unexpected, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    let r = spec.lora_rank;
    let mut expected = BTreeMap::new();
    for i in 0..spec.processors {
        let key = |name: &str| format!("ip_adapter.{i}.{name}");
        // The hidden width `h` and key/value input width come from the file's `to_q` and
        // `to_k` LoRA; everything else must agree with them and with the spec.
        let h = shapes
            .get(&key("to_q_lora.up.weight"))
            .and_then(|s| s.first().copied());
        let kv = shapes
            .get(&key("to_k_lora.down.weight"))
            .and_then(|s| s.get(1).copied());
        let (Some(h), Some(kv)) = (h, kv) else {
            missing.push(key(if h.is_none() {
                "to_q_lora.up.weight"
            } else {
                "to_k_lora.down.weight"
            }));
            continue;
        };
        for (name, in_dim) in [
            ("to_q_lora", h),
            ("to_k_lora", kv),
            ("to_v_lora", kv),
            ("to_out_lora", h),
        ] {
            expected.insert(key(&format!("{name}.down.weight")), vec![r, in_dim]);
            expected.insert(key(&format!("{name}.up.weight")), vec![h, r]);
        }
        if shapes.contains_key(&key("to_k_ip.weight"))
            || shapes.contains_key(&key("to_v_ip.weight"))
        {
            let cross = spec.ppr.cross_attention_dim;
            expected.insert(key("to_k_ip.weight"), vec![h, cross]);
            expected.insert(key("to_v_ip.weight"), vec![h, cross]);
        }
    }
    for (k, want) in &expected {
        match shapes.get(k) {
            None => missing.push(k.clone()),
            Some(found) if found != want => wrong.push(ShapeMismatch {
                key: k.clone(),
                expected: want.clone(),
                found: found.clone(),
            }),
            Some(_) => {}
        }
    }
    for k in shapes.keys() {
        if k.starts_with("ip_adapter.") && !expected.contains_key(k) && !missing.contains(k) {
            unexpected.push(k.clone());
        }
    }
    (missing, unexpected, wrong)
}

/// Number of processors named in `keys` (`ip_adapter.{i}.…`): the largest index + 1.
pub fn processor_count(keys: &[String]) -> usize {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix("ip_adapter.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// The adapter: the PPR and the UNet whose attentions carry the processors. Only the PPR and
/// the processors are trainable; the UNet's own weights are frozen (`no_grad`).
#[derive(Module, Debug)]
pub struct Adapter {
    /// `image_proj_model`.
    pub ppr: FaceIdPlus,
    /// Frozen UNet with the processors attached.
    pub unet: UNet2DConditionModel,
    /// The architecture (written into every file).
    #[module(skip)]
    pub spec: AdapterSpec,
}

impl Adapter {
    /// Attaches freshly initialised processors of `spec` to `unet` and builds a fresh PPR
    /// (reference zero-inits), after checking that `spec` fits the UNet. Freeze the UNet
    /// (`no_grad`) before, when it will be trained through.
    pub fn attach(
        mut unet: UNet2DConditionModel,
        spec: AdapterSpec,
        device: &Device,
    ) -> Result<Self, ConfigError> {
        spec.check_unet(&unet)
            .map_err(|m| ConfigError::new("adapter", "", m))?;
        unet.attach_adapter(spec.lora_rank, device);
        Ok(Self {
            ppr: spec.ppr.init(device),
            unet,
            spec,
        })
    }

    /// A freshly initialised adapter of `spec` for any UNet config, seeded: the UNet's own
    /// weights are never read or allocated (lazy parameters), only the processors and the PPR.
    pub fn fresh(
        unet_config: &UNet2DConditionConfig,
        spec: AdapterSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ConfigError> {
        let unet = UNet2DConditionModel::new(unet_config, device)?;
        let spec = spec.for_unet(&unet)?;
        device.seed(seed);
        Self::attach(unet, spec, device)
    }

    /// Runs a state-dict pass (load, export, name) over the trainable sub-modules under
    /// their export keys.
    pub fn walk(&mut self, sd: &mut StateDict) {
        self.walk_ppr(sd);
        self.walk_processors(sd);
    }

    fn walk_ppr(&mut self, sd: &mut StateDict) {
        self.ppr.load(sd, "image_proj_model");
    }

    fn walk_processors(&mut self, sd: &mut StateDict) {
        for attn in self.unet.attentions_mut() {
            let i = attn.index;
            if let Some(a) = attn.adapter.as_mut() {
                a.load(sd, &format!("ip_adapter.{i}"));
            }
        }
    }

    /// The trainable parameters by group ([`GROUP_PPR`], [`GROUP_PROCESSORS`]): export key and
    /// id of each.
    pub fn param_groups(&mut self) -> Vec<(&'static str, Vec<(String, ParamId)>)> {
        let mut ppr = StateDict::namer();
        self.walk_ppr(&mut ppr);
        let mut processors = StateDict::namer();
        self.walk_processors(&mut processors);
        vec![
            (GROUP_PPR, ppr.into_names()),
            (GROUP_PROCESSORS, processors.into_names()),
        ]
    }

    /// The trainable weights in the export layout (`image_proj_model.*`, `ip_adapter.{i}.*`,
    /// PyTorch shapes, f32).
    pub fn tensors(&self) -> Vec<(String, troupe_pt::Tensor)> {
        let mut sd = StateDict::exporter();
        self.clone().walk(&mut sd);
        sd.into_exported()
    }

    /// Writes the trainable weights (export layout) to `path` as `format` in `dtype`,
    /// streaming: each tensor is copied to the host only as it is written.
    pub fn write(
        &self,
        path: &std::path::Path,
        format: crate::adapter_file::AdapterFormat,
        dtype: crate::adapter_file::ExportDType,
        metadata: std::collections::HashMap<String, String>,
    ) -> Result<(), WeightError> {
        let mut sd = StateDict::exporter();
        self.clone().walk(&mut sd);
        crate::adapter_file::write_adapter_lazy(
            path,
            sd.into_exported_lazy(),
            format,
            dtype,
            metadata,
        )
    }

    /// Loads trainable weights in the export layout; every key must match.
    pub fn load_tensors(&mut self, mut sd: StateDict) -> Result<(), WeightError> {
        self.walk(&mut sd);
        sd.finish("StoryMaker adapter").map(|_| ())
    }

    /// Metadata of a file holding this adapter: the spec, the producer, and `extra`.
    pub fn metadata(
        &self,
        extra: impl IntoIterator<Item = (String, String)>,
    ) -> std::collections::HashMap<String, String> {
        let mut m: std::collections::HashMap<String, String> = extra.into_iter().collect();
        m.insert("format".into(), "storymaker-adapter".into());
        m.insert(
            "producer".into(),
            format!("troupe {}", env!("CARGO_PKG_VERSION")),
        );
        let (k, v) = self.spec.metadata();
        m.insert(k, v);
        m
    }
}
