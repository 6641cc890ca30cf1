//! diffusers `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`) built from its
//! `vae/config.json`: the encoder (`DownEncoderBlock2D`s, `UNetMidBlock2D`) that maps images in
//! `[-1, 1]` to a diagonal Gaussian over latents, and the decoder (`UpDecoderBlock2D`s) that maps
//! latents back to images.
//!
//! Field and key names mirror diffusers, so `diffusion_pytorch_model.safetensors` maps one to
//! one: `encoder.conv_in`, `encoder.down_blocks.{i}.resnets.{j}`,
//! `encoder.down_blocks.{i}.downsamplers.0.conv`, `encoder.mid_block.resnets.{0,1}`,
//! `encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`,
//! `encoder.conv_norm_out`, `encoder.conv_out`, `quant_conv`, `post_quant_conv`, and the same
//! under `decoder.` with `up_blocks.{i}.upsamplers.0.conv`.
//!
//! Latents here are *unscaled* (what `vae.encode(x).latent_dist` and `vae.decode(z)` use); the
//! UNet sees `(z - shift_factor) * scaling_factor` ([`AutoencoderKL::scale_latents`]).
//! Tiling and slicing are not implemented: they only bound memory, diffusers' untiled result is
//! the reference.

use std::path::Path;

use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;

use crate::attention::{Attention, AttentionConfig, AttnContext};
use crate::error::{ConfigError, ModelError, read_json_config};
use crate::resnet::{
    Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D, conv2d, group_norm,
};
use crate::weights::{LoadReport, StateDict, join};

/// GroupNorm epsilon of every VAE norm: diffusers hard-codes `resnet_eps=1e-6` and
/// `GroupNorm(..., eps=1e-6)` in `Encoder`/`Decoder`, whatever the config says.
const EPS: f64 = 1e-6;

/// Bounds diffusers' `DiagonalGaussianDistribution` clamps the log-variance to.
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

/// The `vae/config.json` fields this implementation reads. Unknown fields (`sample_size`,
/// `force_upcast`, `_diffusers_version`, …) are ignored; values selecting architectures it does
/// not build are refused by name in [`Self::validate`].
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    /// diffusers class; when present it must be `AutoencoderKL` (`AutoencoderTiny`,
    /// `AsymmetricAutoencoderKL`, … have other layouts).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Latent channels (the encoder emits twice as many: mean and log-variance).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Channels per block (encoder order; the decoder runs them reversed).
    #[serde(default = "block_out_default")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// GroupNorm groups of every norm.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latent scale the UNet sees (SD 1.x 0.18215, SDXL 0.13025).
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// Latent shift subtracted before scaling (SD3/Flux); null for SD/SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (a pipeline-level normalisation; kept, not applied here).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (kept, not applied here).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Encoder blocks: all `DownEncoderBlock2D`.
    #[serde(default = "down_default")]
    pub down_block_types: Vec<String>,
    /// Decoder blocks: all `UpDecoderBlock2D`.
    #[serde(default = "up_default")]
    pub up_block_types: Vec<String>,
    /// Must be `silu`.
    #[serde(default = "silu_name")]
    pub act_fn: String,
    /// 1×1 conv on the encoder's moments.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// 1×1 conv on latents before the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Self-attention between the two mid-block resnets (encoder and decoder).
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn sd_scaling() -> f64 {
    0.18215
}
fn block_out_default() -> Vec<usize> {
    vec![64]
}
fn down_default() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_default() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn silu_name() -> String {
    "silu".into()
}

impl AutoencoderKLConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let config: Self = read_json_config(path)?;
        config.validate(&shown)?;
        Ok(config)
    }

    /// Refuses values this implementation does not build, naming the field; `path` is the
    /// config file the error reports.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| Err(ConfigError::new(path, field, msg));
        if let Some(c) = &self.class_name
            && c != "AutoencoderKL"
        {
            return err(
                "_class_name",
                format!("`{c}` is not supported (only AutoencoderKL)"),
            );
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return err("block_out_channels", "is empty".into());
        }
        for (field, kinds, allowed) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if kinds.len() != n {
                return err(
                    field,
                    format!("has {} entries for {n} block_out_channels", kinds.len()),
                );
            }
            if let Some(k) = kinds.iter().find(|k| k.as_str() != allowed) {
                return err(
                    field,
                    format!("`{k}` is not supported (supported: {allowed})"),
                );
            }
        }
        if self.act_fn != "silu" {
            return err(
                "act_fn",
                format!("`{}` is not supported (must be \"silu\")", self.act_fn),
            );
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return err(field, "must be at least 1".into());
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % self.norm_num_groups != 0 {
                return err(
                    "norm_num_groups",
                    format!(
                        "{} does not divide block {i}'s {c} channels",
                        self.norm_num_groups
                    ),
                );
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return err(
                "scaling_factor",
                format!("{} is not a usable scale", self.scaling_factor),
            );
        }
        if let Some(s) = self.shift_factor
            && !s.is_finite()
        {
            return err("shift_factor", format!("{s} is not finite"));
        }
        Ok(())
    }

    /// Spatial ratio image / latent: `2^(blocks − 1)` (8 for SD/SDXL).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// The mid-block self-attention (diffusers `Attention(..., residual_connection=True, bias=True,
/// _from_deprecated_attn_block=True)` with `norm_num_groups` set): GroupNorm, single-head
/// attention over the `H·W` pixels, residual. `upcast_softmax` has no effect here: diffusers'
/// default `AttnProcessor2_0` calls SDPA, which ignores it.
#[derive(Module, Debug)]
pub struct VaeAttention {
    /// Norm before q/k/v (`{prefix}.group_norm`).
    pub group_norm: GroupNorm,
    /// q/k/v/out projections, one head as wide as the channels.
    pub attn: Attention,
}

impl VaeAttention {
    /// Creates the block for `channels` (lazy parameters).
    pub fn new(channels: usize, groups: usize, device: &Device) -> Self {
        // diffusers: heads = channels / attention_head_dim with attention_head_dim = channels.
        Self {
            group_norm: group_norm(groups, channels, EPS, device),
            attn: AttentionConfig::new(channels, None, 1, channels)
                .with_bias(true)
                .init(0, device),
        }
    }

    /// `[B, C, H, W] → [B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // GroupNorm over [B, C, H·W] (diffusers) equals GroupNorm over [B, C, H, W].
        let hidden = self.group_norm.forward(x.clone()); // [B, C, H, W]
        let hidden = hidden.reshape([b, c, h * w]).swap_dims(1, 2); // [B, HW, C]
        let (out, _) = self.attn.forward(hidden, None, &AttnContext::default()); // [B, HW, C]
        let out = out.swap_dims(1, 2).reshape([b, c, h, w]); // [B, C, H, W]
        out + x
    }

    /// Loads `{prefix}.group_norm` and `{prefix}.{to_q,to_k,to_v,to_out.0}`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.group_norm(&mut self.group_norm, &join(prefix, "group_norm"));
        self.attn.load(sd, prefix);
    }
}

/// diffusers `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    /// `resnets.0` and `resnets.1`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `attentions.0`; absent with `mid_block_add_attention = false`.
    pub attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn new(channels: usize, groups: usize, add_attention: bool, device: &Device) -> Self {
        let resnet = || {
            ResnetBlock2DConfig::new(channels, channels, None)
                .with_groups(groups)
                .with_eps(EPS)
                .init(device)
        };
        Self {
            resnets: vec![resnet(), resnet()],
            attention: add_attention.then(|| VaeAttention::new(channels, groups, device)),
        }
    }

    /// `[B, C, H, W] → [B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(a) = &self.attention {
            x = a.forward(x);
        }
        self.resnets[1].forward(x, None)
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.load(sd, &join(prefix, &format!("resnets.{j}")));
        }
        if let Some(a) = self.attention.as_mut() {
            a.load(sd, &join(prefix, "attentions.0"));
        }
    }
}

/// diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional
/// stride-2 conv (encoder) or nearest ×2 + conv (decoder).
#[derive(Module, Debug)]
pub struct VaeBlock {
    /// `resnets.{j}`.
    pub resnets: Vec<ResnetBlock2D>,
    /// `downsamplers.0` (encoder blocks but the last).
    pub downsampler: Option<Downsample2D>,
    /// `upsamplers.0` (decoder blocks but the last).
    pub upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn resnets(
        c_in: usize,
        c_out: usize,
        n: usize,
        groups: usize,
        device: &Device,
    ) -> Vec<ResnetBlock2D> {
        (0..n)
            .map(|j| {
                ResnetBlock2DConfig::new(if j == 0 { c_in } else { c_out }, c_out, None)
                    .with_groups(groups)
                    .with_eps(EPS)
                    .init(device)
            })
            .collect()
    }

    /// `[B, C_in, H, W] → [B, C_out, H', W']`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = x;
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(x);
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(x, None);
        }
        x
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.load(sd, &join(prefix, &format!("resnets.{j}")));
        }
        if let Some(d) = self.downsampler.as_mut() {
            d.load(sd, &join(prefix, "downsamplers.0"));
        }
        if let Some(u) = self.upsampler.as_mut() {
            u.load(sd, &join(prefix, "upsamplers.0"));
        }
    }
}

/// diffusers `vae.Encoder` (`double_z=True`): image → moments `[B, 2·latent, h, w]`.
#[derive(Module, Debug)]
pub struct VaeEncoder {
    /// 3×3 conv, image → `block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// `down_blocks.{i}`.
    pub down_blocks: Vec<VaeBlock>,
    /// `mid_block`.
    pub mid_block: VaeMidBlock,
    /// Output GroupNorm.
    pub conv_norm_out: GroupNorm,
    /// 3×3 conv to `2·latent_channels` (mean and log-variance).
    pub conv_out: Conv2d,
}

impl VaeEncoder {
    fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let ch = &config.block_out_channels;
        let (n, g) = (ch.len(), config.norm_num_groups);
        let down_blocks = (0..n)
            .map(|i| VaeBlock {
                // Block i maps ch[i-1] → ch[i] (block 0 keeps ch[0], conv_in's width).
                resnets: VaeBlock::resnets(
                    ch[i.saturating_sub(1)],
                    ch[i],
                    config.layers_per_block,
                    g,
                    device,
                ),
                // diffusers `downsample_padding=0`: pad right/bottom by one, not symmetric.
                downsampler: (i + 1 < n).then(|| Downsample2D::new(ch[i], false, device)),
                upsampler: None,
            })
            .collect();
        let last = ch[n - 1];
        Self {
            conv_in: conv2d(config.in_channels, ch[0], 3, 1, 1, device),
            down_blocks,
            mid_block: VaeMidBlock::new(last, g, config.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, last, EPS, device),
            conv_out: conv2d(last, 2 * config.latent_channels, 3, 1, 1, device),
        }
    }

    /// `[B, C_img, H, W]` (in the weights' dtype) → moments `[B, 2·latent, H/f, W/f]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x); // [B, ch0, H, W]
        for block in &self.down_blocks {
            x = block.forward(x);
        }
        let x = self.mid_block.forward(x); // [B, ch_last, h, w]
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }

    /// Loads every encoder key under `prefix` (`encoder`).
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        let p = |name: &str| join(prefix, name);
        sd.conv2d(&mut self.conv_in, &p("conv_in"));
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            b.load(sd, &p(&format!("down_blocks.{i}")));
        }
        self.mid_block.load(sd, &p("mid_block"));
        sd.group_norm(&mut self.conv_norm_out, &p("conv_norm_out"));
        sd.conv2d(&mut self.conv_out, &p("conv_out"));
    }
}

/// diffusers `vae.Decoder` (`norm_type="group"`): latents → image.
#[derive(Module, Debug)]
pub struct VaeDecoder {
    /// 3×3 conv, latent → `block_out_channels[-1]`.
    pub conv_in: Conv2d,
    /// `mid_block` (runs before the up blocks).
    pub mid_block: VaeMidBlock,
    /// `up_blocks.{i}`, channels `block_out_channels` reversed, `layers_per_block + 1` resnets.
    pub up_blocks: Vec<VaeBlock>,
    /// Output GroupNorm over `block_out_channels[0]`.
    pub conv_norm_out: GroupNorm,
    /// 3×3 conv to image channels.
    pub conv_out: Conv2d,
}

impl VaeDecoder {
    fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let rev: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let (n, g) = (rev.len(), config.norm_num_groups);
        let up_blocks = (0..n)
            .map(|i| VaeBlock {
                // Up block i maps rev[i-1] → rev[i] (block 0 keeps the mid block's width).
                resnets: VaeBlock::resnets(
                    rev[i.saturating_sub(1)],
                    rev[i],
                    config.layers_per_block + 1,
                    g,
                    device,
                ),
                downsampler: None,
                upsampler: (i + 1 < n).then(|| Upsample2D::new(rev[i], device)),
            })
            .collect();
        Self {
            conv_in: conv2d(config.latent_channels, rev[0], 3, 1, 1, device),
            mid_block: VaeMidBlock::new(rev[0], g, config.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: group_norm(g, rev[n - 1], EPS, device),
            conv_out: conv2d(rev[n - 1], config.out_channels, 3, 1, 1, device),
        }
    }

    /// `[B, latent, h, w]` (in the weights' dtype, after `post_quant_conv`) →
    /// `[B, C_img, h·f, w·f]`.
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.forward(z); // [B, ch_last, h, w]
        let mut x = self.mid_block.forward(x);
        for block in &self.up_blocks {
            x = block.forward(x);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }

    /// Loads every decoder key under `prefix` (`decoder`).
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        let p = |name: &str| join(prefix, name);
        sd.conv2d(&mut self.conv_in, &p("conv_in"));
        self.mid_block.load(sd, &p("mid_block"));
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            b.load(sd, &p(&format!("up_blocks.{i}")));
        }
        sd.group_norm(&mut self.conv_norm_out, &p("conv_norm_out"));
        sd.conv2d(&mut self.conv_out, &p("conv_out"));
    }
}

/// diffusers `DiagonalGaussianDistribution` over unscaled latents: `mean` and `logvar`
/// (clamped to `[-30, 20]`), both `[B, latent, h, w]`.
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// `latent_dist.mean`.
    pub mean: Tensor<4>,
    /// `latent_dist.logvar`, clamped.
    pub logvar: Tensor<4>,
}

impl LatentDist {
    /// Splits encoder moments `[B, 2·latent, h, w]` into mean (first half of the channels) and
    /// clamped log-variance, as `torch.chunk(moments, 2, dim=1)`.
    pub fn from_moments(moments: Tensor<4>) -> Self {
        let c = moments.dims()[1] / 2;
        Self {
            mean: moments.clone().narrow(1, 0, c),
            logvar: moments.narrow(1, c, c).clamp(LOGVAR_MIN, LOGVAR_MAX),
        }
    }

    /// `exp(0.5 · logvar)`.
    pub fn std(&self) -> Tensor<4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std · noise` (diffusers `latent_dist.sample()`), `noise` standard normal of the
    /// mean's shape, drawn by the caller so it controls the RNG. Computed in the mean's dtype.
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        let noise = noise.cast(self.mean.dtype());
        self.mean.clone() + self.std() * noise
    }
}

/// diffusers `AutoencoderKL`: encoder, `quant_conv`, `post_quant_conv`, decoder.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// `encoder`.
    pub encoder: VaeEncoder,
    /// `decoder`.
    pub decoder: VaeDecoder,
    /// 1×1 conv on the moments (`use_quant_conv`).
    pub quant_conv: Option<Conv2d>,
    /// 1×1 conv on latents before decoding (`use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d>,
    /// `config.scaling_factor`.
    pub scaling_factor: f64,
    /// `config.shift_factor` (0 when null).
    pub shift_factor: f64,
    /// Image / latent spatial ratio.
    pub downscale_factor: usize,
}

impl AutoencoderKL {
    /// Builds the VAE for `config` (lazy parameters: call [`Self::load`] or [`Self::from_dir`]).
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate("config")?;
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        Ok(Self {
            encoder: VaeEncoder::new(config, device),
            decoder: VaeDecoder::new(config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(l2, l2, 1, 1, 0, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(l, l, 1, 1, 0, device)),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
            downscale_factor: config.downscale_factor(),
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its fp16 variant / sharded index). `dtype`: `Some(F32)` converts, `None` keeps the
    /// stored precision. Every missing, unexpected or mis-shaped key is listed in one error.
    ///
    /// diffusers' `force_upcast` is not applied: the SDXL VAE overflows in f16, so load it with
    /// `Some(DType::F32)` (or a fixed fp16 VAE) when running in half precision.
    pub fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<burn::tensor::DType>,
    ) -> Result<(Self, LoadReport), ModelError> {
        let path = dir.join("config.json");
        let config = AutoencoderKLConfig::from_file(&path)?;
        let mut vae = Self::new(&config, device)?;
        let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.with_dtype(dtype);
        vae.load(&mut sd, "");
        let report = sd.finish("AutoencoderKL")?;
        Ok((vae, report))
    }

    /// Loads every VAE key under `prefix`, recording problems in `sd`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        self.encoder.load(sd, &join(prefix, "encoder"));
        self.decoder.load(sd, &join(prefix, "decoder"));
        if let Some(c) = self.quant_conv.as_mut() {
            sd.conv2d(c, &join(prefix, "quant_conv"));
        }
        if let Some(c) = self.post_quant_conv.as_mut() {
            sd.conv2d(c, &join(prefix, "post_quant_conv"));
        }
    }

    /// The dtype the weights are held in; inputs are cast to it and outputs come back in it.
    pub fn dtype(&self) -> burn::tensor::DType {
        self.encoder.conv_in.weight.val().dtype()
    }

    /// Encoder moments `[B, 2·latent, H/f, W/f]` (after `quant_conv`) of `pixels [B, C, H, W]`
    /// in `[-1, 1]`.
    pub fn encode_moments(&self, pixels: Tensor<4>) -> Tensor<4> {
        let moments = self.encoder.forward(pixels.cast(self.dtype()));
        match &self.quant_conv {
            Some(c) => c.forward(moments),
            None => moments,
        }
    }

    /// `vae.encode(pixels).latent_dist`: unscaled mean and clamped log-variance,
    /// `[B, latent, H/f, W/f]`, in the weights' dtype.
    pub fn encode_dist(&self, pixels: Tensor<4>) -> LatentDist {
        LatentDist::from_moments(self.encode_moments(pixels))
    }

    /// `vae.encode(pixels).latent_dist.mean` (unscaled), `[B, latent, H/f, W/f]`.
    pub fn encode_mean(&self, pixels: Tensor<4>) -> Tensor<4> {
        self.encode_dist(pixels).mean
    }

    /// `vae.decode(latents).sample`: unscaled `latents [B, latent, h, w]` →
    /// image `[B, C, h·f, w·f]` (roughly `[-1, 1]`), in the weights' dtype.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = latents.cast(self.dtype());
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// `config.scaling_factor`.
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// `config.shift_factor` (0 when null).
    pub fn shift_factor(&self) -> f64 {
        self.shift_factor
    }

    /// Image / latent spatial ratio `f` (8 for SD/SDXL).
    pub fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    /// Channels of the latent (`config.latent_channels`, 4 for SD/SDXL).
    pub fn latent_channels(&self) -> usize {
        self.decoder.conv_in.weight.val().dims()[1]
    }

    /// Unscaled VAE latents → the UNet's: `(z − shift_factor) · scaling_factor` (diffusers
    /// pipelines and training scripts).
    pub fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        z.sub_scalar(self.shift_factor)
            .mul_scalar(self.scaling_factor)
    }

    /// The UNet's latents → unscaled: `z / scaling_factor + shift_factor` (before [`Self::decode`]).
    pub fn unscale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        z.div_scalar(self.scaling_factor)
            .add_scalar(self.shift_factor)
    }
}
