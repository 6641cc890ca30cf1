//! diffusers `UNet2DConditionModel` (`models/unets/unet_2d_condition.py`) built from its
//! `unet/config.json`, with any block layout SD 1.x/2.x/SDXL use: `DownBlock2D`,
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`;
//! per-block `layers_per_block`, `transformer_layers_per_block`, heads, cross-attention width;
//! `use_linear_projection`; `addition_embed_type = "text_time"` (SDXL micro-conditioning).
//!
//! Field and key names mirror diffusers, so `diffusion_pytorch_model.safetensors` maps one to
//! one. Attention processors are numbered in diffusers' `attn_processors` order (down blocks,
//! then up blocks, then the mid block; attn1 before attn2), which is the numbering of the
//! StoryMaker / IP-Adapter `ip_adapter.{i}` keys (storymaker.md §3.4).

use std::path::Path;

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;

use crate::attention::{Attention, AttnAdapter, AttnContext, AttnProbs};
use crate::error::{ConfigError, ModelError, read_json_config};
use crate::resnet::{
    Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D, conv2d, group_norm,
};
use crate::transformer::{Transformer2DConfig, Transformer2DModel};
use crate::weights::{LoadReport, StateDict, WeightError, join};

/// A config value diffusers accepts as one number or one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize, field: &str, path: &str) -> Result<Vec<T>, ConfigError> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(ConfigError::new(
                path,
                field,
                format!("has {} entries but there are {n} down blocks", v.len()),
            )),
        }
    }
}

/// The `unet/config.json` fields this implementation reads. Fields that select architectures it
/// does not implement are read too, so a config using them is refused by name instead of being
/// silently mis-built.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Whether sinusoidal embeddings are `[cos, sin]`.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embeddings.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block types.
    pub down_block_types: Vec<String>,
    /// Mid block type (`UNetMidBlock2DCrossAttn` or none).
    #[serde(default = "mid_default")]
    pub mid_block_type: Option<String>,
    /// Up block types (absent in a ControlNet's config).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the down-sampling convs (1 = symmetric; 0 = right/bottom only).
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Mid-block resnet output divisor.
    #[serde(default = "onef")]
    pub mid_block_scale_factor: f64,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of resnets and the output norm.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Width of `encoder_hidden_states`.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention.
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Heads per block under diffusers' historical name (see `num_attention_heads`).
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock<usize>,
    /// Heads per block; when null diffusers uses `attention_head_dim` as the head *count*.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear (SDXL) or 1×1 conv transformer projections.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `"text_time"` (SDXL) or null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time-id embedding (SDXL 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (SDXL 2816 = 1280 + 6·256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be `silu`.
    #[serde(default = "silu_name")]
    pub act_fn: String,
    /// Must be false.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Unsupported when true.
    #[serde(default)]
    pub only_cross_attention: PerBlockBool,
    /// Unsupported when true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Unsupported when true (upcasting changes only f16 numerics of the attention scores).
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    /// Must be null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Must be `default`.
    #[serde(default = "default_name")]
    pub resnet_time_scale_shift: String,
    /// Must be `positional`.
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Must be null.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Must be null.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Must be null.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Must be 3.
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Must be 3.
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Must be null.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Must be `default`.
    #[serde(default = "default_name")]
    pub attention_type: String,
    /// Must be false.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Must be 1.
    #[serde(default = "onef")]
    pub resnet_out_scale_factor: f64,
}

/// `only_cross_attention`: a bool or one per block.
pub type PerBlockBool = PerBlock<bool>;

impl Default for PerBlock<bool> {
    fn default() -> Self {
        Self::One(false)
    }
}

fn four() -> usize {
    4
}
fn two() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn onef() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn eight_per_block() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn silu_name() -> String {
    "silu".into()
}
fn default_name() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid_default() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// Down block types this implementation builds.
const DOWN_BLOCKS: [&str; 2] = ["DownBlock2D", "CrossAttnDownBlock2D"];
/// Up block types this implementation builds.
const UP_BLOCKS: [&str; 2] = ["UpBlock2D", "CrossAttnUpBlock2D"];

fn check_block_types(
    path: &str,
    field: &str,
    kinds: &[String],
    allowed: [&str; 2],
) -> Result<(), ConfigError> {
    match kinds.iter().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ConfigError::new(
            path,
            field,
            format!("`{k}` is not supported (supported: {allowed:?})"),
        )),
        None => Ok(()),
    }
}

/// Everything the builder needs per down block, after diffusers' defaulting rules.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    /// Block type name.
    pub kind: String,
    /// Resnets (down) or resnets − 1 (up).
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks per attention.
    pub transformer_layers: usize,
    /// Cross-attention width.
    pub cross_attention_dim: usize,
}

impl UNet2DConditionConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let config: Self = read_json_config(path)?;
        config.validate(&shown)?;
        Ok(config)
    }

    /// Refuses values this implementation does not build, naming the field.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let n = self.down_block_types.len();
        if self.up_block_types.len() != n {
            return Err(ConfigError::new(
                path,
                "up_block_types",
                format!("has {} entries, expected {n}", self.up_block_types.len()),
            ));
        }
        check_block_types(path, "up_block_types", &self.up_block_types, UP_BLOCKS)?;
        self.validate_down_path(path)
    }

    /// Validates everything but the up blocks: the part a ControlNet shares with the UNet.
    pub fn validate_down_path(&self, path: &str) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| Err(ConfigError::new(path, field, msg));
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n {
            return err(
                "block_out_channels",
                format!(
                    "has {} entries for {n} down blocks",
                    self.block_out_channels.len()
                ),
            );
        }
        check_block_types(
            path,
            "down_block_types",
            &self.down_block_types,
            DOWN_BLOCKS,
        )?;
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return err("mid_block_type", format!("`{m}` is not supported"));
        }
        let must = |ok: bool, field: &str, what: &str| {
            if ok {
                Ok(())
            } else {
                err(field, format!("must be {what}"))
            }
        };
        must(self.act_fn == "silu", "act_fn", "\"silu\"")?;
        must(!self.center_input_sample, "center_input_sample", "false")?;
        must(
            self.only_cross_attention
                .expand(n, "only_cross_attention", path)?
                .iter()
                .all(|b| !b),
            "only_cross_attention",
            "false",
        )?;
        must(!self.dual_cross_attention, "dual_cross_attention", "false")?;
        must(
            self.upcast_attention != Some(true),
            "upcast_attention",
            "false",
        )?;
        must(self.class_embed_type.is_none(), "class_embed_type", "null")?;
        must(self.num_class_embeds.is_none(), "num_class_embeds", "null")?;
        must(self.encoder_hid_dim.is_none(), "encoder_hid_dim", "null")?;
        must(
            self.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            "\"default\"",
        )?;
        must(
            self.time_embedding_type == "positional",
            "time_embedding_type",
            "\"positional\"",
        )?;
        must(
            self.time_embedding_dim.is_none(),
            "time_embedding_dim",
            "null",
        )?;
        must(
            self.time_embedding_act_fn.is_none(),
            "time_embedding_act_fn",
            "null",
        )?;
        must(
            self.timestep_post_act.is_none(),
            "timestep_post_act",
            "null",
        )?;
        must(
            self.time_cond_proj_dim.is_none(),
            "time_cond_proj_dim",
            "null",
        )?;
        must(self.conv_in_kernel == 3, "conv_in_kernel", "3")?;
        must(self.conv_out_kernel == 3, "conv_out_kernel", "3")?;
        must(
            self.reverse_transformer_layers_per_block
                .as_ref()
                .is_none_or(|v| v.is_null()),
            "reverse_transformer_layers_per_block",
            "null",
        )?;
        must(
            self.attention_type == "default",
            "attention_type",
            "\"default\"",
        )?;
        must(!self.resnet_skip_time_act, "resnet_skip_time_act", "false")?;
        must(
            self.resnet_out_scale_factor == 1.0,
            "resnet_out_scale_factor",
            "1.0",
        )?;
        must(self.downsample_padding <= 1, "downsample_padding", "0 or 1")?;
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                must(
                    self.addition_time_embed_dim.is_some(),
                    "addition_time_embed_dim",
                    "set for text_time",
                )?;
                must(
                    self.projection_class_embeddings_input_dim.is_some(),
                    "projection_class_embeddings_input_dim",
                    "set for text_time",
                )?;
            }
            Some(other) => {
                return err("addition_embed_type", format!("`{other}` is not supported"));
            }
        }
        let blocks = self.down_blocks(path)?;
        for (i, (b, &c)) in blocks.iter().zip(&self.block_out_channels).enumerate() {
            if c % self.norm_num_groups != 0 {
                return err(
                    "norm_num_groups",
                    format!(
                        "{} does not divide block {i}'s {c} channels",
                        self.norm_num_groups
                    ),
                );
            }
            if b.heads == 0 || c % b.heads != 0 {
                return err(
                    "attention_head_dim",
                    format!("{} heads do not divide block {i}'s {c} channels", b.heads),
                );
            }
        }
        Ok(())
    }

    /// Per-down-block values, with diffusers' `num_attention_heads or attention_head_dim` quirk.
    pub fn down_blocks(&self, path: &str) -> Result<Vec<BlockSpec>, ConfigError> {
        let n = self.down_block_types.len();
        let layers = self.layers_per_block.expand(n, "layers_per_block", path)?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads", path)?,
            None => self
                .attention_head_dim
                .expand(n, "attention_head_dim", path)?,
        };
        let tl =
            self.transformer_layers_per_block
                .expand(n, "transformer_layers_per_block", path)?;
        let cross = self
            .cross_attention_dim
            .expand(n, "cross_attention_dim", path)?;
        Ok((0..n)
            .map(|i| BlockSpec {
                kind: self.down_block_types[i].clone(),
                layers: layers[i],
                heads: heads[i],
                transformer_layers: tl[i],
                cross_attention_dim: cross[i],
            })
            .collect())
    }

    /// Width of the time embedding (`4 × block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// The sinusoid settings of the timestep and time-id embeddings.
    pub fn sinusoid(&self) -> Sinusoid {
        Sinusoid {
            time_dim: self.block_out_channels[0],
            add_time_dim: self.addition_time_embed_dim.unwrap_or(0),
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        }
    }

    /// SDXL's `add_embedding` (for `addition_embed_type = "text_time"`; `None` otherwise).
    pub(crate) fn add_embedding(&self, device: &Device) -> Option<TimestepEmbedding> {
        (self.addition_embed_type.as_deref() == Some("text_time")).then(|| {
            TimestepEmbedding::new(
                self.projection_class_embeddings_input_dim.unwrap_or(0),
                self.time_embed_dim(),
                device,
            )
        })
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// First Linear.
    pub linear_1: Linear,
    /// Second Linear.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            linear_1: LinearConfig::new(d_in, d_out).init(device),
            linear_2: LinearConfig::new(d_out, d_out).init(device),
        }
    }

    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }

    /// Width of the input.
    pub fn input_width(&self) -> usize {
        self.linear_1.weight.lazy_shape().dims::<2>()[0]
    }

    pub(crate) fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.linear(&mut self.linear_1, &join(prefix, "linear_1"));
        sd.linear(&mut self.linear_2, &join(prefix, "linear_2"));
    }
}

/// diffusers `get_timestep_embedding` (max period 10000, scale 1): `t [N]` → `[N, dim]`.
/// Frequencies are computed on the host in f32 in PyTorch's order of operations
/// (`exp(−ln(10000) · i / (half − shift))`); the embedding is checked with the whole UNet
/// against diffusers (within 1e-4), not on its own.
pub fn timestep_embedding(
    t: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Tensor<2> {
    let half = dim / 2;
    let ln = -(10000f32.ln());
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln * i as f32 / (half as f32 - shift as f32)).exp())
        .collect();
    let device = t.device();
    let [n] = t.dims();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = t.cast(burn::tensor::FloatDType::F32).reshape([n, 1]) * freqs.reshape([1, half]); // [N, half]
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        Tensor::cat(vec![emb, Tensor::zeros([n, 1], &device)], 1)
    } else {
        emb
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock {
    /// Resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet (cross-attention blocks only).
    pub attentions: Vec<Transformer2DModel>,
    /// Stride-2 conv (all but the last block).
    pub downsampler: Option<Downsample2D>,
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    /// Resnets over `cat(hidden, skip)`.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet (cross-attention blocks only).
    pub attentions: Vec<Transformer2DModel>,
    /// Nearest ×2 + conv (all but the last block).
    pub upsampler: Option<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn` with one attention: resnet, transformer, resnet.
#[derive(Module, Debug)]
pub struct MidBlock {
    /// Two resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer.
    pub attentions: Vec<Transformer2DModel>,
}

impl DownBlock {
    /// Runs the block on `x`, pushing every resnet (+ transformer) output and the
    /// down-sampled result to `skips` (diffusers' `res_samples`).
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        emb: &Tensor<2>,
        context: &Tensor<3>,
        ctx: &AttnContext,
        probs: &mut Vec<AttnProbs>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (j, r) in self.resnets.iter().enumerate() {
            x = r.forward(x, Some(emb.clone()));
            if let Some(t) = self.attentions.get(j) {
                x = t.forward(x, context, ctx, probs);
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(x);
            skips.push(x.clone());
        }
        x
    }

    pub(crate) fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        load_resnets_attentions(&mut self.resnets, &mut self.attentions, sd, prefix);
        if let Some(d) = self.downsampler.as_mut() {
            d.load(sd, &join(prefix, "downsamplers.0"));
        }
    }

    /// Channels of each skip this block pushes, in order.
    pub(crate) fn skip_channels(&self) -> Vec<usize> {
        let out = |r: &ResnetBlock2D| r.conv2.weight.lazy_shape().dims::<4>()[0];
        let mut c: Vec<usize> = self.resnets.iter().map(out).collect();
        if self.downsampler.is_some() {
            c.push(*c.last().expect("a down block has resnets"));
        }
        c
    }
}

impl MidBlock {
    /// resnet → transformer → resnet.
    pub fn forward(
        &self,
        x: Tensor<4>,
        emb: &Tensor<2>,
        context: &Tensor<3>,
        ctx: &AttnContext,
        probs: &mut Vec<AttnProbs>,
    ) -> Tensor<4> {
        let x = self.resnets[0].forward(x, Some(emb.clone()));
        let x = self.attentions[0].forward(x, context, ctx, probs);
        self.resnets[1].forward(x, Some(emb.clone()))
    }

    pub(crate) fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        load_resnets_attentions(&mut self.resnets, &mut self.attentions, sd, prefix);
    }
}

/// The sinusoid settings of the timestep and SDXL time-id embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sinusoid {
    /// Width of the timestep sinusoid (`block_out_channels[0]`).
    pub time_dim: usize,
    /// Width of each time-id sinusoid (`addition_time_embed_dim`; 0 without `text_time`).
    pub add_time_dim: usize,
    /// Sinusoid order (`flip_sin_to_cos`).
    pub flip_sin_to_cos: bool,
    /// Frequency shift (`freq_shift`).
    pub freq_shift: f64,
}

/// The embedding every resnet receives: `time_embedding(sinusoid(t))`, plus for SDXL
/// (`text_time`) `add_embedding(cat(text_embeds, sinusoid(time_ids)))`. Shared by the UNet and
/// the ControlNet.
pub(crate) fn embed_time(
    time_embedding: &TimestepEmbedding,
    add_embedding: Option<&TimestepEmbedding>,
    sinusoid: Sinusoid,
    timestep: Tensor<1>,
    text_embeds: Option<Tensor<2>>,
    time_ids: Option<Tensor<2>>,
    dtype: burn::tensor::DType,
) -> Tensor<2> {
    let [b] = timestep.dims();
    let Sinusoid {
        time_dim,
        add_time_dim,
        flip_sin_to_cos,
        freq_shift,
    } = sinusoid;
    let t_emb = timestep_embedding(timestep, time_dim, flip_sin_to_cos, freq_shift);
    let emb = time_embedding.forward(t_emb.cast(dtype)); // [B, T]
    let Some(add) = add_embedding else {
        return emb;
    };
    let text = text_embeds.expect("SDXL UNet needs text_embeds");
    let ids = time_ids.expect("SDXL UNet needs time_ids");
    let k = ids.dims()[1];
    let t = timestep_embedding(
        ids.reshape([b * k]),
        add_time_dim,
        flip_sin_to_cos,
        freq_shift,
    )
    .reshape([b, k * add_time_dim]); // [B, 6·256]
    let add_in = Tensor::cat(vec![text.cast(dtype), t.cast(dtype)], 1);
    emb + add.forward(add_in)
}

/// A ControlNet's output, added to the UNet's skips and mid-block output (diffusers'
/// `down_block_additional_residuals`, `mid_block_additional_residual`).
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One per UNet skip, in order (`conv_in`, each down resnet, each down-sampler).
    pub down: Vec<Tensor<4>>,
    /// Added to the mid block's output.
    pub mid: Tensor<4>,
}

/// Where one attention processor sits (diffusers `attn_processors` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorInfo {
    /// Position in `attn_processors` (the `ip_adapter.{i}` index).
    pub index: usize,
    /// diffusers name, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor`.
    pub name: String,
    /// `heads × dim_head`.
    pub hidden_size: usize,
    /// Width of the key/value input for cross-attention, `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Spatial down-scaling of this layer relative to the latent (1, 2, 4, …).
    pub latent_downscale: usize,
}

/// Conditioning of one UNet forward pass.
#[derive(Debug, Clone)]
pub struct UNetInput {
    /// Noisy latents `[B, C, H, W]`.
    pub sample: Tensor<4>,
    /// One timestep per batch item `[B]` (float, may be fractional).
    pub timestep: Tensor<1>,
    /// `[B, M, cross_dim]`: 77 text tokens, then image tokens when an adapter is attached.
    pub encoder_hidden_states: Tensor<3>,
    /// SDXL pooled text embedding `[B, P]` (`addition_embed_type = "text_time"`).
    pub text_embeds: Option<Tensor<2>>,
    /// SDXL micro-conditioning `[B, 6]`.
    pub time_ids: Option<Tensor<2>>,
    /// A ControlNet's residuals (pose conditioning), if any.
    pub control: Option<ControlResiduals>,
}

/// Result of [`UNet2DConditionModel::forward`].
#[derive(Debug, Clone)]
pub struct UNetOutput {
    /// Predicted noise (or v) `[B, out_channels, H, W]`, in f32 whatever the weights' dtype
    /// (losses and samplers work in f32).
    pub sample: Tensor<4>,
    /// Image-attention maps of the processors named in the context's `record`, in forward order.
    pub attn_probs: Vec<AttnProbs>,
}

/// The SD/SDXL denoising UNet.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    /// 3×3 conv from latent channels.
    pub conv_in: Conv2d,
    /// Timestep MLP.
    pub time_embedding: TimestepEmbedding,
    /// SDXL `add_embedding` over `cat(text_embeds, sinusoid(time_ids))`.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Down blocks.
    pub down_blocks: Vec<DownBlock>,
    /// Up blocks.
    pub up_blocks: Vec<UpBlock>,
    /// Mid block.
    pub mid_block: Option<MidBlock>,
    /// Output GroupNorm.
    pub conv_norm_out: GroupNorm,
    /// 3×3 conv to output channels.
    pub conv_out: Conv2d,
    /// The embeddings' sinusoid settings.
    #[module(skip)]
    pub sinusoid: Sinusoid,
}

/// Builds resnets and transformers with one config's settings, numbering attention processors
/// in build order.
pub(crate) struct Builder<'a> {
    device: &'a Device,
    groups: usize,
    eps: f64,
    temb: usize,
    linear_projection: bool,
    next_index: usize,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(config: &UNet2DConditionConfig, device: &'a Device) -> Self {
        Self {
            device,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            temb: config.time_embed_dim(),
            linear_projection: config.use_linear_projection,
            next_index: 0,
        }
    }

    /// The down blocks of `config` (validated), as diffusers' `get_down_block` builds them.
    pub(crate) fn down_blocks(
        &mut self,
        config: &UNet2DConditionConfig,
        specs: &[BlockSpec],
    ) -> Vec<DownBlock> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, spec) in specs.iter().enumerate() {
            let in_c = out_c;
            out_c = ch[i];
            let cross = spec.kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..spec.layers {
                resnets.push(self.resnet(if j == 0 { in_c } else { out_c }, out_c, 1.0));
                if cross {
                    attentions.push(self.transformer(out_c, spec));
                }
            }
            let downsampler = (i + 1 < n)
                .then(|| Downsample2D::new(out_c, config.downsample_padding == 1, self.device));
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }
        down_blocks
    }

    /// The `UNetMidBlock2DCrossAttn` of `config`, if it has one.
    pub(crate) fn mid_block(
        &mut self,
        config: &UNet2DConditionConfig,
        specs: &[BlockSpec],
    ) -> Option<MidBlock> {
        config.mid_block_type.as_ref()?;
        let c = *config.block_out_channels.last().expect("validated");
        let scale = config.mid_block_scale_factor;
        let first = self.resnet(c, c, scale);
        let attn = self.transformer(c, specs.last().expect("validated"));
        Some(MidBlock {
            resnets: vec![first, self.resnet(c, c, scale)],
            attentions: vec![attn],
        })
    }

    fn resnet(&self, c_in: usize, c_out: usize, scale: f64) -> ResnetBlock2D {
        ResnetBlock2DConfig::new(c_in, c_out, Some(self.temb))
            .with_groups(self.groups)
            .with_eps(self.eps)
            .with_output_scale_factor(scale)
            .init(self.device)
    }

    fn transformer(&mut self, channels: usize, spec: &BlockSpec) -> Transformer2DModel {
        let t = Transformer2DConfig::new(
            channels,
            spec.heads,
            channels / spec.heads,
            spec.transformer_layers,
            spec.cross_attention_dim,
            self.groups,
            self.linear_projection,
        )
        .init(self.next_index, self.device);
        self.next_index += 2 * spec.transformer_layers;
        t
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet for `config` (lazy parameters: call [`Self::load`] or a `from_*` loader).
    pub fn new(config: &UNet2DConditionConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate("config")?;
        let specs = config.down_blocks("config")?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let mut b = Builder::new(config, device);
        // Registration order = processor order: down blocks, up blocks, mid block.
        let down_blocks = b.down_blocks(config, &specs);

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_specs: Vec<BlockSpec> = specs.iter().rev().cloned().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, (kind, spec)) in config.up_block_types.iter().zip(&rev_specs).enumerate() {
            let prev_c = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let cross = kind == "CrossAttnUpBlock2D";
            let layers = spec.layers + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_c } else { out_c };
                let r_in = if j == 0 { prev_c } else { out_c };
                resnets.push(b.resnet(r_in + skip, out_c, 1.0));
                if cross {
                    attentions.push(b.transformer(out_c, spec));
                }
            }
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(out_c, device));
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let mid_block = b.mid_block(config, &specs);

        let temb = config.time_embed_dim();
        let add_embedding = config.add_embedding(device);
        Ok(Self {
            conv_in: conv2d(config.in_channels, ch[0], 3, 1, 1, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            add_embedding,
            down_blocks,
            up_blocks,
            mid_block,
            conv_norm_out: group_norm(config.norm_num_groups, ch[0], config.norm_eps, device),
            conv_out: conv2d(ch[0], config.out_channels, 3, 1, 1, device),
            sinusoid: config.sinusoid(),
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its sharded index / fp16 variant). `dtype`: `Some(F32)` converts, `None` keeps the
    /// stored precision.
    pub fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<burn::tensor::DType>,
    ) -> Result<(Self, LoadReport), ModelError> {
        let config = UNet2DConditionConfig::from_file(&dir.join("config.json"))?;
        let mut unet = Self::new(&config, device)?;
        let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.with_dtype(dtype);
        unet.load(&mut sd, "");
        let report = sd.finish("UNet2DConditionModel")?;
        Ok((unet, report))
    }

    /// Loads every UNet key under `prefix`, recording problems in `sd`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        let p = |name: &str| join(prefix, name);
        let stem = (&mut self.conv_in, &mut self.time_embedding);
        load_down_path(
            sd,
            prefix,
            stem,
            &mut self.add_embedding,
            &mut self.down_blocks,
        );
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            let bp = p(&format!("up_blocks.{i}"));
            load_resnets_attentions(&mut block.resnets, &mut block.attentions, sd, &bp);
            if let Some(u) = block.upsampler.as_mut() {
                u.load(sd, &join(&bp, "upsamplers.0"));
            }
        }
        if let Some(m) = self.mid_block.as_mut() {
            m.load(sd, &p("mid_block"));
        }
        sd.group_norm(&mut self.conv_norm_out, &p("conv_norm_out"));
        sd.conv2d(&mut self.conv_out, &p("conv_out"));
    }

    /// Every attention, in processor order.
    pub fn attentions(&self) -> Vec<&Attention> {
        let down = self.down_blocks.iter().flat_map(|b| &b.attentions);
        let up = self.up_blocks.iter().flat_map(|b| &b.attentions);
        let mid = self.mid_block.iter().flat_map(|b| &b.attentions);
        down.chain(up)
            .chain(mid)
            .flat_map(|t| t.attentions())
            .collect()
    }

    /// Every attention, in processor order, mutably.
    pub fn attentions_mut(&mut self) -> Vec<&mut Attention> {
        let down = self.down_blocks.iter_mut().flat_map(|b| &mut b.attentions);
        let up = self.up_blocks.iter_mut().flat_map(|b| &mut b.attentions);
        let mid = self.mid_block.iter_mut().flat_map(|b| &mut b.attentions);
        down.chain(up)
            .chain(mid)
            .flat_map(|t| t.attentions_mut())
            .collect()
    }

    /// diffusers `attn_processors` names and sizes, in order.
    pub fn processors(&self) -> Vec<ProcessorInfo> {
        let n = self.down_blocks.len();
        let mut out = Vec::new();
        let mut push = |path: String, ts: &[Transformer2DModel], scale: usize| {
            for (j, t) in ts.iter().enumerate() {
                for (k, block) in t.transformer_blocks.iter().enumerate() {
                    for (a, attn) in [(1, &block.attn1), (2, &block.attn2)] {
                        out.push(ProcessorInfo {
                            index: attn.index,
                            name: format!(
                                "{path}.attentions.{j}.transformer_blocks.{k}.attn{a}.processor"
                            ),
                            hidden_size: attn.hidden_size(),
                            cross_attention_dim: (a == 2).then(|| attn.kv_dim()),
                            latent_downscale: scale,
                        });
                    }
                }
            }
        };
        for (i, b) in self.down_blocks.iter().enumerate() {
            push(format!("down_blocks.{i}"), &b.attentions, 1 << i);
        }
        for (i, b) in self.up_blocks.iter().enumerate() {
            push(format!("up_blocks.{i}"), &b.attentions, 1 << (n - 1 - i));
        }
        if let Some(m) = &self.mid_block {
            push("mid_block".into(), &m.attentions, 1 << (n - 1));
        }
        out
    }

    /// Attaches freshly initialised StoryMaker processors (rank-`rank` LoRA everywhere, image
    /// branch on every cross-attention), replacing any attached adapter.
    pub fn attach_adapter(&mut self, rank: usize, device: &Device) {
        for attn in self.attentions_mut() {
            let is_cross = attn.index % 2 == 1;
            let cross = is_cross.then(|| attn.kv_dim());
            attn.adapter = Some(AttnAdapter::new(attn.hidden_size(), cross, rank, device));
        }
    }

    /// Loads `{prefix}.{i}.*` adapter keys (prefix `ip_adapter`, or `""` for a bare processor
    /// state dict) into attached adapters; returns the LoRA rank found in the file.
    /// Other keys (e.g. `image_proj_model.*`) are left in `sd`.
    pub fn load_adapter(
        &mut self,
        sd: &mut StateDict,
        prefix: &str,
        device: &Device,
    ) -> Result<usize, WeightError> {
        let probe = join(prefix, "0.to_q_lora.down.weight");
        let rank = match sd.shape(&probe) {
            Some([r, _]) => *r,
            _ => {
                return Err(WeightError::MissingKey {
                    path: sd.path().to_string(),
                    key: probe,
                });
            }
        };
        self.attach_adapter(rank, device);
        for attn in self.attentions_mut() {
            let i = attn.index;
            if let Some(a) = attn.adapter.as_mut() {
                a.load(sd, &join(prefix, &i.to_string()));
            }
        }
        sd.finish_part("StoryMaker attention processors")?;
        Ok(rank)
    }

    /// Channels of the skips the down path pushes, in order: what a ControlNet's residuals must
    /// match one to one.
    pub fn skip_channels(&self) -> Vec<usize> {
        skip_channels(&self.conv_in, &self.down_blocks)
    }

    /// The forward pass. `ctx` sets adapter scales and which processors' image-attention maps
    /// are returned.
    pub fn forward(&self, input: UNetInput, ctx: &AttnContext) -> UNetOutput {
        let UNetInput {
            sample,
            timestep,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            control,
        } = input;
        let dtype = self.conv_in.weight.val().dtype();
        let [_, _, h, w] = sample.dims();
        let sample = sample.cast(dtype);
        let context = encoder_hidden_states.cast(dtype);
        let emb = embed_time(
            &self.time_embedding,
            self.add_embedding.as_ref(),
            self.sinusoid,
            timestep,
            text_embeds,
            time_ids,
            dtype,
        );

        // Skip sizes are forwarded to the upsamplers when the latent is not a multiple of 2^n.
        let factor = 1usize << (self.up_blocks.len().saturating_sub(1));
        let forward_size = h % factor != 0 || w % factor != 0;

        let mut probs = Vec::new();
        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, ctx, &mut probs, &mut skips);
        }
        let (down_residuals, mid_residual) = match control {
            Some(c) => (Some(c.down), Some(c.mid)),
            None => (None, None),
        };
        if let Some(residuals) = down_residuals {
            assert_eq!(
                residuals.len(),
                skips.len(),
                "one ControlNet residual per skip"
            );
            for (skip, r) in skips.iter_mut().zip(residuals) {
                *skip = skip.clone() + r.cast(dtype);
            }
        }
        if let Some(m) = &self.mid_block {
            x = m.forward(x, &emb, &context, ctx, &mut probs);
        }
        if let Some(r) = mid_residual {
            x = x + r.cast(dtype);
        }
        for block in &self.up_blocks {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = r.forward(Tensor::cat(vec![x, skip], 1), Some(emb.clone()));
                if let Some(t) = block.attentions.get(j) {
                    x = t.forward(x, &context, ctx, &mut probs);
                }
            }
            if let Some(u) = &block.upsampler {
                let size = skips.last().filter(|_| forward_size).map(|s| {
                    let [_, _, sh, sw] = s.dims();
                    [sh, sw]
                });
                x = u.forward(x, size);
            }
        }
        let x = silu(self.conv_norm_out.forward(x));
        UNetOutput {
            sample: self.conv_out.forward(x).cast(burn::tensor::FloatDType::F32),
            attn_probs: probs,
        }
    }
}

/// Loads what the UNet and the ControlNet share: `conv_in`, the time embeddings and the down
/// blocks under `prefix`.
pub(crate) fn load_down_path(
    sd: &mut StateDict,
    prefix: &str,
    (conv_in, time_embedding): (&mut Conv2d, &mut TimestepEmbedding),
    add_embedding: &mut Option<TimestepEmbedding>,
    down_blocks: &mut [DownBlock],
) {
    let p = |name: &str| join(prefix, name);
    sd.conv2d(conv_in, &p("conv_in"));
    time_embedding.load(sd, &p("time_embedding"));
    if let Some(a) = add_embedding.as_mut() {
        a.load(sd, &p("add_embedding"));
    }
    for (i, block) in down_blocks.iter_mut().enumerate() {
        block.load(sd, &p(&format!("down_blocks.{i}")));
    }
}

/// Channels of the skips of a down path: `conv_in`'s output, then each block's.
pub(crate) fn skip_channels(conv_in: &Conv2d, down_blocks: &[DownBlock]) -> Vec<usize> {
    let c0 = conv_in.weight.lazy_shape().dims::<4>()[0];
    std::iter::once(c0)
        .chain(down_blocks.iter().flat_map(|b| b.skip_channels()))
        .collect()
}

fn load_resnets_attentions(
    resnets: &mut [ResnetBlock2D],
    attentions: &mut [Transformer2DModel],
    sd: &mut StateDict,
    prefix: &str,
) {
    for (j, r) in resnets.iter_mut().enumerate() {
        r.load(sd, &join(prefix, &format!("resnets.{j}")));
    }
    for (j, t) in attentions.iter_mut().enumerate() {
        t.load(sd, &join(prefix, &format!("attentions.{j}")));
    }
}
