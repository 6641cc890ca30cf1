//! transformers' CLIP encoders (`models/clip/modeling_clip.py`): [`ClipTextModel`]
//! (`CLIPTextModel` and, with its projection, `CLIPTextModelWithProjection`) and
//! [`ClipVisionModel`] (`CLIPVisionModelWithProjection`), built from `config.json` and loaded
//! from `model.safetensors`; plus SDXL's two-encoder prompt encoding.
//!
//! Keys mirror transformers: `text_model.embeddings.{token,position}_embedding`,
//! `text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
//! layer_norm2}`, `text_model.final_layer_norm`, `text_projection`; `vision_model.embeddings.
//! {class_embedding, patch_embedding, position_embedding}`, `vision_model.pre_layrnorm` (sic),
//! `vision_model.encoder.layers.*`, `vision_model.post_layernorm`, `visual_projection`.

use std::path::Path;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Int};
use serde::Deserialize;

use crate::error::{ConfigError, ModelError, read_json_config};
use crate::weights::{LoadReport, StateDict, join};

/// Feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, SDXL's `text_encoder`).
    QuickGelu,
    /// Exact erf GELU (OpenCLIP bigG, ViT-H).
    Gelu,
}

/// Transformer sizes shared by the text and vision towers (transformers `CLIPTextConfig` /
/// `CLIPVisionConfig` fields; unknown fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Width of `text_projection` / `visual_projection` outputs.
    #[serde(default = "projection_dim")]
    pub projection_dim: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP activation.
    #[serde(default = "quick_gelu")]
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon.
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    /// Text: vocabulary size.
    #[serde(default)]
    pub vocab_size: usize,
    /// Text: positions (77).
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    /// Text: end-of-text id; 2 selects transformers' legacy argmax pooling.
    #[serde(default = "eos")]
    pub eos_token_id: i64,
    /// Vision: input side in pixels.
    #[serde(default)]
    pub image_size: usize,
    /// Vision: patch side.
    #[serde(default)]
    pub patch_size: usize,
    /// Vision: input channels.
    #[serde(default = "three")]
    pub num_channels: usize,
}

fn projection_dim() -> usize {
    512
}
fn quick_gelu() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn ln_eps() -> f64 {
    1e-5
}
fn seventy_seven() -> usize {
    77
}
fn eos() -> i64 {
    2
}
fn three() -> usize {
    3
}

impl ClipConfig {
    /// Reads a transformers `config.json` (a full `CLIPConfig` is refused: pass the tower's
    /// folder).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let config: Self = read_json_config(path)?;
        let err = |field: &str, msg: &str| Err(ConfigError::new(&shown, field, msg).into());
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return err("num_attention_heads", "must divide hidden_size");
        }
        Ok(config)
    }
}

/// `CLIPAttention`: q/k/v/out projections with bias, scale `head_dim^-0.5`.
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query.
    pub q_proj: Linear,
    /// Key.
    pub k_proj: Linear,
    /// Value.
    pub v_proj: Linear,
    /// Output.
    pub out_proj: Linear,
    /// Heads.
    pub heads: usize,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let h = self.heads;
        let split = |t: Tensor<3>| t.reshape([b, n, h, d / h]).swap_dims(1, 2); // [B, H, N, dh]
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let opts = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let a = attention(q, k, v, None, None, opts); // [B, H, N, dh]
        self.out_proj.forward(a.swap_dims(1, 2).reshape([b, n, d]))
    }
}

/// One pre-norm encoder layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// Self-attention.
    pub self_attn: ClipAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// MLP up.
    pub fc1: Linear,
    /// MLP down.
    pub fc2: Linear,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// Exact GELU (true) or quick GELU.
    pub exact_gelu: bool,
}

impl ClipEncoderLayer {
    fn new(c: &ClipConfig, device: &Device) -> Self {
        let d = c.hidden_size;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_eps)
                .init(device)
        };
        Self {
            self_attn: ClipAttention {
                q_proj: lin(d, d),
                k_proj: lin(d, d),
                v_proj: lin(d, d),
                out_proj: lin(d, d),
                heads: c.num_attention_heads,
            },
            layer_norm1: ln(),
            fc1: lin(d, c.intermediate_size),
            fc2: lin(c.intermediate_size, d),
            layer_norm2: ln(),
            exact_gelu: c.hidden_act == HiddenAct::Gelu,
        }
    }

    fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), causal);
        let h = self.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if self.exact_gelu {
            gelu(h)
        } else {
            h.clone() * sigmoid(h.mul_scalar(1.702))
        };
        x + self.fc2.forward(h)
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        for (l, name) in [
            (&mut self.self_attn.q_proj, "self_attn.q_proj"),
            (&mut self.self_attn.k_proj, "self_attn.k_proj"),
            (&mut self.self_attn.v_proj, "self_attn.v_proj"),
            (&mut self.self_attn.out_proj, "self_attn.out_proj"),
            (&mut self.fc1, "mlp.fc1"),
            (&mut self.fc2, "mlp.fc2"),
        ] {
            sd.linear(l, &join(prefix, name));
        }
        sd.layer_norm(&mut self.layer_norm1, &join(prefix, "layer_norm1"));
        sd.layer_norm(&mut self.layer_norm2, &join(prefix, "layer_norm2"));
    }
}

/// Runs the layers; returns (output of the last layer, input of the last layer = transformers'
/// `hidden_states[-2]`).
fn encode(layers: &[ClipEncoderLayer], x: Tensor<3>, causal: bool) -> (Tensor<3>, Tensor<3>) {
    let mut penultimate = x.clone();
    let mut x = x;
    for layer in layers {
        penultimate = x.clone();
        x = layer.forward(x, causal);
    }
    (x, penultimate)
}

fn load_layers(layers: &mut [ClipEncoderLayer], sd: &mut StateDict, prefix: &str) {
    for (i, l) in layers.iter_mut().enumerate() {
        l.load(sd, &join(prefix, &format!("encoder.layers.{i}")));
    }
}

/// Outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// Final-normed states `[B, 77, D]`.
    pub last_hidden_state: Tensor<3>,
    /// `hidden_states[-2]` (not normed) `[B, 77, D]`: what SDXL conditions on.
    pub penultimate_hidden_state: Tensor<3>,
    /// `last_hidden_state` at the end-of-text token `[B, D]`.
    pub pooled: Tensor<2>,
    /// `text_projection(pooled)` `[B, P]` (`CLIPTextModelWithProjection` only).
    pub text_embeds: Option<Tensor<2>>,
}

/// `CLIPTextModel`, or `CLIPTextModelWithProjection` when `text_projection` is present.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// Token embedding `[vocab, D]`.
    pub token_embedding: Embedding,
    /// Position embedding `[77, D]`.
    pub position_embedding: Embedding,
    /// Encoder layers.
    pub layers: Vec<ClipEncoderLayer>,
    /// Final LayerNorm.
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (no bias), for the projection model.
    pub text_projection: Option<Linear>,
    /// End-of-text id (2 = legacy argmax pooling).
    pub eos_token_id: i64,
}

impl ClipTextModel {
    /// Builds the model (lazy parameters); `projection` adds `text_projection`.
    pub fn new(c: &ClipConfig, projection: bool, device: &Device) -> Self {
        Self {
            token_embedding: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
            position_embedding: EmbeddingConfig::new(c.max_position_embeddings, c.hidden_size)
                .init(device),
            layers: (0..c.num_hidden_layers)
                .map(|_| ClipEncoderLayer::new(c, device))
                .collect(),
            final_layer_norm: LayerNormConfig::new(c.hidden_size)
                .with_epsilon(c.layer_norm_eps)
                .init(device),
            text_projection: projection.then(|| {
                LinearConfig::new(c.hidden_size, c.projection_dim)
                    .with_bias(false)
                    .init(device)
            }),
            eos_token_id: c.eos_token_id,
        }
    }

    /// Loads a transformers folder (`config.json` + `model.safetensors`). The projection model
    /// is chosen by the config's `architectures` (or the presence of `text_projection.weight`).
    pub fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<(Self, LoadReport), ModelError> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let mut sd = StateDict::from_dir(dir, "model")?.with_dtype(dtype);
        let projection = sd.shape("text_projection.weight").is_some();
        let mut model = Self::new(&config, projection, device);
        model.load(&mut sd);
        let name = if projection {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        };
        let report = sd.finish(name)?;
        Ok((model, report))
    }

    /// Loads every key (dropping the `position_ids` buffer older checkpoints carry). Keys are
    /// under `text_model.` (SDXL's files, `CLIPTextModelWithProjection`) or, as transformers 5
    /// saves a bare `CLIPTextModel`, at the top level.
    pub fn load(&mut self, sd: &mut StateDict) {
        let bare = sd.shape("final_layer_norm.weight").is_some()
            && sd.shape("text_model.final_layer_norm.weight").is_none();
        let p = if bare { "" } else { "text_model" };
        sd.remove(&join(p, "embeddings.position_ids"));
        sd.embedding(
            &mut self.token_embedding,
            &join(p, "embeddings.token_embedding"),
        );
        sd.embedding(
            &mut self.position_embedding,
            &join(p, "embeddings.position_embedding"),
        );
        load_layers(&mut self.layers, sd, p);
        sd.layer_norm(&mut self.final_layer_norm, &join(p, "final_layer_norm"));
        if let Some(p) = self.text_projection.as_mut() {
            sd.linear(p, "text_projection");
        }
    }

    /// `input_ids [B, N]` → states, pooled output and (projection model) `text_embeds`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> TextOutput {
        let [b, n] = input_ids.dims();
        let device = input_ids.device();
        let dtype = self.final_layer_norm.gamma.val().dtype();
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let x = self.token_embedding.forward(input_ids.clone())
            + self.position_embedding.forward(positions); // [B, N, D]
        let (x, penultimate) = encode(&self.layers, x.cast(dtype), true);
        let last = self.final_layer_norm.forward(x); // [B, N, D]
        // End-of-text position per row (transformers' two rules).
        let ids = input_ids
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .unwrap_or_default();
        let eos: Vec<i64> = ids
            .chunks(n)
            .map(|row| {
                let pos = if self.eos_token_id == 2 {
                    // argmax: the first maximum
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max)
                } else {
                    row.iter().position(|&t| t == self.eos_token_id)
                };
                pos.unwrap_or(0) as i64
            })
            .collect();
        let d = last.dims()[2];
        let index = Tensor::<1, Int>::from_data(TensorData::new(eos, [b]), &device)
            .reshape([b, 1, 1])
            .expand([b, 1, d]);
        let pooled = last.clone().gather(1, index).reshape([b, d]); // [B, D]
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(pooled.clone()));
        TextOutput {
            last_hidden_state: last,
            penultimate_hidden_state: penultimate,
            pooled,
            text_embeds,
        }
    }
}

/// SDXL prompt encoding (`StableDiffusionXLPipeline.encode_prompt`, no clip skip):
/// `prompt_embeds = cat(te1 penultimate, te2 penultimate)` on the last axis `[B, 77, D1+D2]`,
/// `pooled = te2 text_embeds` `[B, P]`.
pub fn encode_sdxl_prompt(
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    ids1: Tensor<2, Int>,
    ids2: Tensor<2, Int>,
) -> (Tensor<3>, Tensor<2>) {
    let o1 = te1.forward(ids1);
    let o2 = te2.forward(ids2);
    let dtype = o1.penultimate_hidden_state.dtype();
    let embeds = Tensor::cat(
        vec![
            o1.penultimate_hidden_state,
            o2.penultimate_hidden_state.cast(dtype),
        ],
        2,
    );
    let pooled = o2
        .text_embeds
        .expect("text_encoder_2 has a text_projection");
    (embeds, pooled)
}

/// Outputs of [`ClipVisionModel::forward`].
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `hidden_states[-2]` `[B, 1 + patches, D]` (what IP-Adapter-plus and the PPR consume).
    pub penultimate_hidden_state: Tensor<3>,
    /// Output of the last layer `[B, 1 + patches, D]`.
    pub last_hidden_state: Tensor<3>,
    /// `visual_projection(post_layernorm(last[:, 0]))` `[B, P]`.
    pub image_embeds: Tensor<2>,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Module, Debug)]
pub struct ClipVisionModel {
    /// `class_embedding` `[D]`.
    pub class_embedding: Param<Tensor<1>>,
    /// Patchify conv (stride = patch, no bias).
    pub patch_embedding: Conv2d,
    /// Position embedding `[1 + patches, D]`.
    pub position_embedding: Embedding,
    /// `pre_layrnorm`.
    pub pre_layrnorm: LayerNorm,
    /// Encoder layers.
    pub layers: Vec<ClipEncoderLayer>,
    /// `post_layernorm` (on the class token).
    pub post_layernorm: LayerNorm,
    /// `visual_projection` (no bias).
    pub visual_projection: Linear,
}

impl ClipVisionModel {
    /// Builds the model (lazy parameters).
    pub fn new(c: &ClipConfig, device: &Device) -> Result<Self, ConfigError> {
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(ConfigError::new(
                "config",
                "patch_size",
                "must divide image_size",
            ));
        }
        let d = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_eps)
                .init(device)
        };
        Ok(Self {
            class_embedding: Param::from_tensor(Tensor::zeros([d], device)),
            patch_embedding: Conv2dConfig::new([c.num_channels, d], [c.patch_size, c.patch_size])
                .with_stride([c.patch_size, c.patch_size])
                .with_bias(false)
                .init(device),
            position_embedding: EmbeddingConfig::new(patches + 1, d).init(device),
            pre_layrnorm: ln(),
            layers: (0..c.num_hidden_layers)
                .map(|_| ClipEncoderLayer::new(c, device))
                .collect(),
            post_layernorm: ln(),
            visual_projection: LinearConfig::new(d, c.projection_dim)
                .with_bias(false)
                .init(device),
        })
    }

    /// Loads a transformers folder (`config.json` + `model.safetensors`).
    pub fn from_dir(
        dir: &Path,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<(Self, LoadReport), ModelError> {
        let path = dir.join("config.json");
        let config = ClipConfig::from_file(&path)?;
        let mut model = Self::new(&config, device).map_err(|mut e| {
            e.path = path.display().to_string();
            e
        })?;
        let mut sd = StateDict::from_dir(dir, "model")?.with_dtype(dtype);
        model.load(&mut sd);
        let report = sd.finish("CLIPVisionModelWithProjection")?;
        Ok((model, report))
    }

    /// Loads every key.
    pub fn load(&mut self, sd: &mut StateDict) {
        sd.remove("vision_model.embeddings.position_ids");
        sd.param(
            &mut self.class_embedding,
            "vision_model.embeddings.class_embedding",
        );
        sd.conv2d(
            &mut self.patch_embedding,
            "vision_model.embeddings.patch_embedding",
        );
        sd.embedding(
            &mut self.position_embedding,
            "vision_model.embeddings.position_embedding",
        );
        sd.layer_norm(&mut self.pre_layrnorm, "vision_model.pre_layrnorm");
        load_layers(&mut self.layers, sd, "vision_model");
        sd.layer_norm(&mut self.post_layernorm, "vision_model.post_layernorm");
        sd.linear(&mut self.visual_projection, "visual_projection");
    }

    /// The input side in pixels: `patch × √(positions − 1)`.
    pub fn image_size(&self) -> usize {
        let positions = self.position_embedding.weight.lazy_shape().dims::<2>()[0];
        let patch = self.patch_embedding.weight.lazy_shape().dims::<4>()[2];
        patch * ((positions.saturating_sub(1)) as f64).sqrt().round() as usize
    }

    /// Width of the hidden states (`hidden_size`, 1280 for ViT-H/14).
    pub fn hidden_size(&self) -> usize {
        self.class_embedding.val().dims()[0]
    }

    /// `pixel_values [B, 3, S, S]` (CLIP-normalised) → hidden states and `image_embeds`.
    pub fn forward(&self, pixel_values: Tensor<4>) -> VisionOutput {
        let dtype = self.pre_layrnorm.gamma.val().dtype();
        let x = self.patch_embedding.forward(pixel_values.cast(dtype)); // [B, D, g, g]
        let [b, d, gh, gw] = x.dims();
        let patches = x.reshape([b, d, gh * gw]).swap_dims(1, 2); // [B, P, D]
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1); // [B, 1+P, D]
        let n = x.dims()[1];
        let device = x.device();
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let x = x + self.position_embedding.forward(positions).cast(dtype);
        let x = self.pre_layrnorm.forward(x);
        let (last, penultimate) = encode(&self.layers, x, false);
        let cls = last.clone().narrow(1, 0, 1).reshape([b, d]);
        let image_embeds = self
            .visual_projection
            .forward(self.post_layernorm.forward(cls));
        VisionOutput {
            penultimate_hidden_state: penultimate,
            last_hidden_state: last,
            image_embeds,
        }
    }
}
