//! diffusers `ControlNetModel` (`models/controlnets/controlnet.py`) built from its
//! `controlnet/config.json`: the UNet's input conv, time embeddings, down blocks and mid block
//! (built by the UNet's own code), the conditioning-image embedding, and the zero 1×1
//! convolutions that turn every skip and the mid output into residuals for the UNet.
//!
//! Field and key names mirror diffusers (`controlnet_cond_embedding.*`,
//! `controlnet_down_blocks.{i}`, `controlnet_mid_block`), so `diffusion_pytorch_model.safetensors`
//! maps one to one. The ControlNet's attentions never carry an adapter: StoryMaker trains the
//! UNet's processors only, and the frozen ControlNet attends with its own weights.

use std::path::Path;

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;

use crate::attention::AttnContext;
use crate::error::{ConfigError, ModelError, read_json_config};
use crate::resnet::conv2d;
use crate::unet::{
    Builder, ControlResiduals, DownBlock, MidBlock, Sinusoid, TimestepEmbedding,
    UNet2DConditionConfig, UNet2DConditionModel, embed_time, load_down_path,
};
use crate::weights::{LoadReport, StateDict, join};

/// `controlnet/config.json`: the UNet fields it shares, plus the conditioning embedding's.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    /// Everything a UNet config holds (a ControlNet's has no up blocks).
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
    /// Channels of the conditioning image.
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    /// Channels of the conditioning embedding's conv stages.
    #[serde(default = "embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `rgb`, or `bgr` (the image's channels are flipped first).
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Must be false.
    #[serde(default)]
    pub global_pool_conditions: bool,
}

fn three() -> usize {
    3
}
fn embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn rgb() -> String {
    "rgb".into()
}

impl ControlNetConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_json_config(path)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Refuses values this implementation does not build, naming the field.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        self.unet.validate_down_path(path)?;
        let err = |field: &str, msg: &str| Err(ConfigError::new(path, field, msg.to_string()));
        if self.unet.mid_block_type.is_none() {
            return err("mid_block_type", "must be UNetMidBlock2DCrossAttn");
        }
        if !matches!(
            self.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return err(
                "controlnet_conditioning_channel_order",
                "must be \"rgb\" or \"bgr\"",
            );
        }
        if self.global_pool_conditions {
            return err("global_pool_conditions", "must be false");
        }
        let stages = &self.conditioning_embedding_out_channels;
        if stages.is_empty() || stages.contains(&0) || self.conditioning_channels == 0 {
            return err(
                "conditioning_embedding_out_channels",
                "must list at least one non-zero width (and conditioning_channels be ≥ 1)",
            );
        }
        Ok(())
    }
}

/// `ControlNetConditioningEmbedding`: conv_in, pairs of (3×3, 3×3 stride 2) convs, conv_out,
/// SiLU after every conv but the last: the conditioning image at pixel resolution → the
/// latent grid's `block_out_channels[0]` features.
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding {
    /// 3×3 conv from the image channels.
    pub conv_in: Conv2d,
    /// The stages' convs, stride 1 and 2 alternating.
    pub blocks: Vec<Conv2d>,
    /// 3×3 (zero-initialised) conv to `block_out_channels[0]`.
    pub conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    fn new(c_in: usize, stages: &[usize], c_out: usize, device: &Device) -> Self {
        let mut blocks = Vec::new();
        for pair in stages.windows(2) {
            blocks.push(conv2d(pair[0], pair[0], 3, 1, 1, device));
            blocks.push(conv2d(pair[0], pair[1], 3, 2, 1, device));
        }
        Self {
            conv_in: conv2d(c_in, stages[0], 3, 1, 1, device),
            blocks,
            conv_out: conv2d(*stages.last().expect("validated"), c_out, 3, 1, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = silu(self.conv_in.forward(x));
        for conv in &self.blocks {
            x = silu(conv.forward(x));
        }
        self.conv_out.forward(x)
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.conv2d(&mut self.conv_in, &join(prefix, "conv_in"));
        for (i, conv) in self.blocks.iter_mut().enumerate() {
            sd.conv2d(conv, &join(prefix, &format!("blocks.{i}")));
        }
        sd.conv2d(&mut self.conv_out, &join(prefix, "conv_out"));
    }
}

/// Inputs of one ControlNet pass.
#[derive(Debug, Clone)]
pub struct ControlNetInput {
    /// Noisy latents `[B, C, H, W]` (the UNet's `sample`).
    pub sample: Tensor<4>,
    /// One timestep per batch item `[B]`.
    pub timestep: Tensor<1>,
    /// What the ControlNet's cross-attentions attend to `[B, M, cross_dim]`.
    pub encoder_hidden_states: Tensor<3>,
    /// SDXL pooled text embedding `[B, P]`.
    pub text_embeds: Option<Tensor<2>>,
    /// SDXL micro-conditioning `[B, 6]`.
    pub time_ids: Option<Tensor<2>>,
    /// The conditioning image (a pose) in [0, 1], `[B, 3, 8H, 8W]`.
    pub controlnet_cond: Tensor<4>,
    /// Multiplies every residual (`controlnet_conditioning_scale`).
    pub conditioning_scale: f64,
}

/// The SD/SDXL ControlNet.
#[derive(Module, Debug)]
pub struct ControlNetModel {
    /// 3×3 conv from latent channels.
    pub conv_in: Conv2d,
    /// Timestep MLP.
    pub time_embedding: TimestepEmbedding,
    /// SDXL `add_embedding`.
    pub add_embedding: Option<TimestepEmbedding>,
    /// The conditioning image's encoder.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding,
    /// Down blocks (the UNet's layout).
    pub down_blocks: Vec<DownBlock>,
    /// One zero 1×1 conv per skip.
    pub controlnet_down_blocks: Vec<Conv2d>,
    /// Mid block.
    pub mid_block: MidBlock,
    /// Zero 1×1 conv on the mid block's output.
    pub controlnet_mid_block: Conv2d,
    /// The embeddings' sinusoid settings.
    #[module(skip)]
    pub sinusoid: Sinusoid,
    /// The conditioning image arrives as BGR and is flipped to RGB.
    pub bgr: bool,
}

impl ControlNetModel {
    /// Builds the ControlNet for `config` (lazy parameters: call [`Self::load`] or
    /// [`Self::from_dir`]).
    pub fn new(config: &ControlNetConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate("config")?;
        let unet = &config.unet;
        let specs = unet.down_blocks("config")?;
        let mut b = Builder::new(unet, device);
        let down_blocks = b.down_blocks(unet, &specs);
        let mid_block = b.mid_block(unet, &specs).expect("validated");
        let ch = &unet.block_out_channels;
        let temb = unet.time_embed_dim();
        let add_embedding = unet.add_embedding(device);
        let mut model = Self {
            conv_in: conv2d(unet.in_channels, ch[0], 3, 1, 1, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            add_embedding,
            controlnet_cond_embedding: ControlNetConditioningEmbedding::new(
                config.conditioning_channels,
                &config.conditioning_embedding_out_channels,
                ch[0],
                device,
            ),
            down_blocks,
            controlnet_down_blocks: Vec::new(),
            mid_block,
            controlnet_mid_block: conv2d(ch[ch.len() - 1], ch[ch.len() - 1], 1, 1, 0, device),
            sinusoid: unet.sinusoid(),
            bgr: config.controlnet_conditioning_channel_order == "bgr",
        };
        model.controlnet_down_blocks = model
            .skip_channels()
            .into_iter()
            .map(|c| conv2d(c, c, 1, 1, 0, device))
            .collect();
        Ok(model)
    }

    /// Loads a diffusers `controlnet/` folder (`config.json` and
    /// `diffusion_pytorch_model.safetensors`). `dtype`: `Some(F32)` converts, `None` keeps the
    /// stored precision.
    pub fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<burn::tensor::DType>,
    ) -> Result<(Self, LoadReport), ModelError> {
        let config = ControlNetConfig::from_file(&dir.join("config.json"))?;
        let mut model = Self::new(&config, device)?;
        let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.with_dtype(dtype);
        model.load(&mut sd, "");
        let report = sd.finish("ControlNetModel")?;
        Ok((model, report))
    }

    /// Loads every ControlNet key under `prefix`, recording problems in `sd`.
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
        self.controlnet_cond_embedding
            .load(sd, &p("controlnet_cond_embedding"));
        for (i, conv) in self.controlnet_down_blocks.iter_mut().enumerate() {
            sd.conv2d(conv, &p(&format!("controlnet_down_blocks.{i}")));
        }
        self.mid_block.load(sd, &p("mid_block"));
        sd.conv2d(&mut self.controlnet_mid_block, &p("controlnet_mid_block"));
    }

    /// Channels of the residuals, in order (one per UNet skip).
    pub fn skip_channels(&self) -> Vec<usize> {
        crate::unet::skip_channels(&self.conv_in, &self.down_blocks)
    }

    /// Channels of the conditioning image.
    pub fn conditioning_channels(&self) -> usize {
        let conv = &self.controlnet_cond_embedding.conv_in;
        conv.weight.lazy_shape().dims::<4>()[1]
    }

    /// How many pixels of the conditioning image make one latent pixel (8 for SDXL's).
    pub fn conditioning_downscale(&self) -> usize {
        1 << (self.controlnet_cond_embedding.blocks.len() / 2)
    }

    /// Width of the cross-attentions' keys (what `encoder_hidden_states` must have).
    pub fn cross_attention_dim(&self) -> Option<usize> {
        self.down_blocks
            .iter()
            .flat_map(|b| &b.attentions)
            .chain(&self.mid_block.attentions)
            .flat_map(|t| t.attentions())
            .find(|a| a.index % 2 == 1)
            .map(|a| a.kv_dim())
    }

    /// Checks that this ControlNet's residuals fit `unet` (same skips, same embeddings), so a
    /// mismatched pair fails when loaded rather than mid-step. `path` names the ControlNet.
    pub fn check_fits(&self, unet: &UNet2DConditionModel, path: &str) -> Result<(), ConfigError> {
        let (ours, theirs) = (self.skip_channels(), unet.skip_channels());
        if ours != theirs {
            return Err(ConfigError::new(
                path,
                "block_out_channels/layers_per_block",
                format!(
                    "the ControlNet's residual channels {ours:?} do not match the UNet's skips {theirs:?}"
                ),
            ));
        }
        let width = |e: Option<&TimestepEmbedding>| e.map(|e| e.input_width());
        if width(self.add_embedding.as_ref()) != width(unet.add_embedding.as_ref())
            || self.sinusoid.add_time_dim != unet.sinusoid.add_time_dim
        {
            return Err(ConfigError::new(
                path,
                "addition_embed_type",
                "the ControlNet's SDXL time embedding differs from the UNet's".to_string(),
            ));
        }
        Ok(())
    }

    /// One pass: the scaled residuals for the UNet. Attentions run plain (no adapter);
    /// `key_bias` masks padded context tokens `[B, M]` (0 for real ones).
    pub fn forward(&self, input: ControlNetInput, key_bias: Option<Tensor<2>>) -> ControlResiduals {
        let ControlNetInput {
            sample,
            timestep,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            controlnet_cond,
            conditioning_scale,
        } = input;
        let dtype = self.conv_in.weight.val().dtype();
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
        let cond = controlnet_cond.cast(dtype);
        let cond = if self.bgr { cond.flip([1]) } else { cond };
        let x = self.conv_in.forward(sample.cast(dtype));
        let mut x = x + self.controlnet_cond_embedding.forward(cond);
        let ctx = AttnContext {
            key_bias,
            ..AttnContext::default()
        };
        let mut probs = Vec::new();
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, &ctx, &mut probs, &mut skips);
        }
        let x = self.mid_block.forward(x, &emb, &context, &ctx, &mut probs);
        let down = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| conv.forward(s).mul_scalar(conditioning_scale))
            .collect();
        ControlResiduals {
            down,
            mid: self
                .controlnet_mid_block
                .forward(x)
                .mul_scalar(conditioning_scale),
        }
    }
}
