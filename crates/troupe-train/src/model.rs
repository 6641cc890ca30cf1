//! The models of a training run: the frozen SDXL parts (text encoders, tokenizers, image
//! encoder, VAE, noise schedule) and the trainable [`Adapter`] (PPR + StoryMaker processors
//! living in the frozen UNet's attentions), with the reference's per-step forward pass.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, Int};
use troupe_data::loader::Batch;
use troupe_models::attention::{AdapterScales, AttnContext};
use troupe_models::clip::{ClipConfig, ClipTextModel, ClipVisionModel, encode_sdxl_prompt};
use troupe_models::ppr::{FaceIdPlus, FaceIdPlusConfig};
use troupe_models::tokenizer::ClipTokenizer;
use troupe_models::unet::{UNet2DConditionModel, UNetInput};
use troupe_models::vae::{AutoencoderKL, LatentDist};
use troupe_models::weights::StateDict;

use crate::config::ModelConfig;
use crate::ddpm::{Ddpm, Prediction, SchedulerConfig};
use crate::objective::{ObjectiveConfig, attention_loss, character_region, noise_loss};
use crate::optim::ParamNames;

/// Learning-rate group of the PPR.
pub const GROUP_PPR: usize = 0;
/// Learning-rate group of the attention processors.
pub const GROUP_PROCESSORS: usize = 1;

/// Everything that trains: the PPR and the UNet whose attentions carry the processors (the
/// UNet's own weights are frozen: `require_grad = false`).
#[derive(Module, Debug)]
pub struct Adapter {
    /// `image_proj_model`.
    pub ppr: FaceIdPlus,
    /// Frozen UNet with trainable processors attached.
    pub unet: UNet2DConditionModel,
}

impl Adapter {
    /// Runs a state-dict pass (load, export, name) over every trainable sub-module under its
    /// export prefix.
    pub fn walk(&mut self, sd: &mut StateDict) {
        self.ppr.load(sd, "image_proj_model");
        for attn in self.unet.attentions_mut() {
            let i = attn.index;
            if let Some(a) = attn.adapter.as_mut() {
                a.load(sd, &format!("ip_adapter.{i}"));
            }
        }
    }

    /// The trainable parameters' export keys and learning-rate groups.
    pub fn names(&mut self) -> ParamNames {
        let mut names = ParamNames::default();
        let mut sd = StateDict::namer();
        self.ppr.load(&mut sd, "image_proj_model");
        names.add(sd.into_names(), GROUP_PPR);
        let mut sd = StateDict::namer();
        for attn in self.unet.attentions_mut() {
            let i = attn.index;
            if let Some(a) = attn.adapter.as_mut() {
                a.load(&mut sd, &format!("ip_adapter.{i}"));
            }
        }
        names.add(sd.into_names(), GROUP_PROCESSORS);
        names
    }

    /// The trainable weights in the export layout (`image_proj_model.*`, `ip_adapter.{i}.*`,
    /// PyTorch shapes, f32).
    pub fn tensors(&self) -> Vec<(String, troupe_pt::Tensor)> {
        let mut sd = StateDict::exporter();
        self.clone().walk(&mut sd);
        sd.into_exported()
    }

    /// Loads trainable weights saved by [`Self::tensors`]; every key must match.
    pub fn load_tensors(
        &mut self,
        mut sd: StateDict,
    ) -> Result<(), troupe_models::weights::WeightError> {
        self.walk(&mut sd);
        sd.finish("StoryMaker adapter").map(|_| ())
    }
}

/// The frozen components and the noise schedule.
pub struct Frozen {
    /// `tokenizer/`.
    pub tokenizer: ClipTokenizer,
    /// `tokenizer_2/`.
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder/`.
    pub text_encoder: ClipTextModel,
    /// `text_encoder_2/`.
    pub text_encoder_2: ClipTextModel,
    /// CLIP image encoder.
    pub image_encoder: ClipVisionModel,
    /// Input side of the image encoder.
    pub image_size: usize,
    /// VAE.
    pub vae: AutoencoderKL,
    /// DDPM forward process.
    pub ddpm: Ddpm,
}

/// Loads the frozen parts and builds the adapter (fresh initialisation).
pub fn load_models(
    m: &ModelConfig,
    seed: u64,
    device: &Device,
) -> anyhow::Result<(Frozen, Adapter)> {
    use anyhow::Context;
    let f32 = Some(DType::F32);
    let base = &m.base;
    let sub = |s: &str| base.join(s);
    let (unet, _) = UNet2DConditionModel::from_dir(&sub("unet"), device, f32)
        .with_context(|| format!("loading the UNet from {}", sub("unet").display()))?;
    let (te1, _) = ClipTextModel::from_dir(&sub("text_encoder"), device, f32)?;
    let (te2, _) = ClipTextModel::from_dir(&sub("text_encoder_2"), device, f32)?;
    let (vae, _) = AutoencoderKL::from_dir(&sub("vae"), device, f32)?;
    let (image_encoder, _) = ClipVisionModel::from_dir(&m.image_encoder, device, f32)?;
    let vision = ClipConfig::from_file(&m.image_encoder.join("config.json"))?;
    let scheduler = SchedulerConfig::from_file(&sub("scheduler").join("scheduler_config.json"))?;
    let ddpm = Ddpm::new(&scheduler)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sub("scheduler").display()))?;
    let tokenizer = ClipTokenizer::from_dir(&sub("tokenizer"))?;
    let tokenizer_2 = ClipTokenizer::from_dir(&sub("tokenizer_2"))?;

    // Frozen: no gradients are ever computed for these weights.
    let frozen = Frozen {
        tokenizer,
        tokenizer_2,
        text_encoder: te1.no_grad(),
        text_encoder_2: te2.no_grad(),
        image_encoder: image_encoder.no_grad(),
        image_size: vision.image_size,
        vae: vae.no_grad(),
        ddpm,
    };

    device.seed(seed);
    let mut unet = unet.no_grad();
    unet.attach_adapter(m.lora_rank, device);
    let cross = unet
        .processors()
        .iter()
        .find_map(|p| p.cross_attention_dim)
        .context("the UNet has no cross-attention")?;
    let ppr = FaceIdPlusConfig::new()
        .with_cross_attention_dim(cross)
        .with_clip_embeddings_dim(vision.hidden_size)
        .with_num_tokens(m.ppr_num_tokens)
        .with_resampler_depth(m.ppr_depth)
        .with_resampler_dim_head(m.ppr_dim_head)
        .with_resampler_num_queries(m.ppr_num_queries)
        .with_max_characters(m.max_characters)
        .init(device);
    Ok((frozen, Adapter { ppr, unet }))
}

/// Host-side randomness of one micro-step (drawn from the run's keyed generator).
pub struct StepNoise {
    /// Timestep per sample.
    pub timesteps: Vec<usize>,
    /// Diffusion noise `[B, C, h, w]` (offset noise included).
    pub noise: Vec<f32>,
    /// VAE posterior sample noise `[B, C, h, w]`.
    pub vae_noise: Vec<f32>,
    /// PPR group dropout coins per sample: (drop face tokens, drop body tokens).
    pub token_drop: Vec<(bool, bool)>,
}

/// Loss terms of one micro-step.
#[derive(Debug, Clone)]
pub struct Losses {
    /// `noise + λ·attention` (the backpropagated scalar).
    pub total: Tensor<1>,
    /// Region-weighted noise MSE.
    pub noise: Tensor<1>,
    /// Attention-map loss (0 when disabled).
    pub attention: Tensor<1>,
}

fn host<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn token_ids(
    tok: &ClipTokenizer,
    captions: &[String],
    device: &Device,
) -> anyhow::Result<Tensor<2, Int>> {
    let mut ids = Vec::new();
    for c in captions {
        ids.extend(tok.encode(c)?.into_iter().map(|i| i as i64));
    }
    let n = tok.max_length();
    Ok(Tensor::from_data(
        TensorData::new(ids, [captions.len(), n]),
        device,
    ))
}

/// The reference training forward pass on one batch; returns the losses.
pub fn forward(
    frozen: &Frozen,
    adapter: &Adapter,
    batch: &Batch,
    rnd: &StepNoise,
    obj: &ObjectiveConfig,
    device: &Device,
) -> anyhow::Result<Losses> {
    let b = batch.len();
    let (h, w) = (batch.height as usize, batch.width as usize);
    let c = batch.max_characters;
    let s = frozen.image_size;

    // Latents: VAE posterior sample × scaling (frozen, no graph).
    let pixels = host(batch.pixels.clone(), [b, 3, h, w], device);
    let dist: LatentDist = frozen.vae.encode_dist(pixels);
    let [_, lc, lh, lw] = dist.mean.dims();
    let latents =
        frozen
            .vae
            .scale_latents(dist.sample(host(rnd.vae_noise.clone(), [b, lc, lh, lw], device)));

    // Text: SDXL's two encoders on the (possibly dropped) captions.
    let ids1 = token_ids(&frozen.tokenizer, &batch.captions, device)?;
    let ids2 = token_ids(&frozen.tokenizer_2, &batch.captions, device)?;
    let (text, pooled) =
        encode_sdxl_prompt(&frozen.text_encoder, &frozen.text_encoder_2, ids1, ids2);

    // Image features of every character slot (dropped images arrive as zero crops).
    let crops = |v: &Vec<f32>| {
        let out = frozen
            .image_encoder
            .forward(host(v.clone(), [b * c, 3, s, s], device));
        let [_, n, d] = out.penultimate_hidden_state.dims();
        (out.penultimate_hidden_state, n, d)
    };
    let (clip_char, n_clip, d_clip) = crops(&batch.char_pixels);
    let (clip_face, _, _) = crops(&batch.face_pixels);
    let ids = host(batch.id_embeds.clone(), [b, c, 512], device);

    // PPR per image (its characters share one call, as the reference's batch of 1).
    let per_slot = adapter.ppr.pos_embed.val().dims()[1];
    let d = adapter.ppr.pos_embed.val().dims()[2];
    let max_tokens = (1 + c) * per_slot;
    let mut tokens = Vec::with_capacity(b);
    let mut bias = vec![0f32; b * max_tokens];
    for i in 0..b {
        let n = batch.num_characters[i].max(1).min(c);
        let id = ids
            .clone()
            .narrow(0, i, 1)
            .reshape([c, 512])
            .narrow(0, 0, n);
        let ch = clip_char
            .clone()
            .narrow(0, i * c, n)
            .reshape([n, n_clip, d_clip]);
        let fc = clip_face
            .clone()
            .narrow(0, i * c, n)
            .reshape([n, n_clip, d_clip]);
        let (drop_face, drop_body) = rnd.token_drop[i];
        let t = adapter
            .ppr
            .forward_with_drop(id, ch, fc, drop_face, drop_body); // [1+n, T, D]
        let t = t.reshape([1, (1 + n) * per_slot, d]);
        let pad = max_tokens - (1 + n) * per_slot;
        tokens.push(if pad > 0 {
            for j in (1 + n) * per_slot..max_tokens {
                bias[i * max_tokens + j] = -1e4; // padding slots get no attention
            }
            Tensor::cat(vec![t, Tensor::zeros([1, pad, d], device)], 1)
        } else {
            t
        });
    }
    let ip_tokens = Tensor::cat(tokens, 0); // [B, (1+C)·T, D]
    let any_padding = bias.iter().any(|&x| x != 0.0);
    let context = Tensor::cat(vec![text, ip_tokens], 1); // [B, 77 + Ni, D]

    // Forward diffusion.
    let coef: Vec<(f32, f32)> = rnd
        .timesteps
        .iter()
        .map(|&t| frozen.ddpm.coefficients(t))
        .collect();
    let sa = host(coef.iter().map(|c| c.0).collect(), [b, 1, 1, 1], device);
    let sn = host(coef.iter().map(|c| c.1).collect(), [b, 1, 1, 1], device);
    let noise = host(rnd.noise.clone(), [b, lc, lh, lw], device);
    let noisy = latents.clone() * sa.clone() + noise.clone() * sn.clone();
    let target = match frozen.ddpm.prediction {
        Prediction::Epsilon => noise,
        Prediction::VPrediction => noise * sa - latents * sn,
    };

    let record: Vec<usize> = if obj.attn_loss_weight > 0.0 {
        adapter
            .unet
            .processors()
            .into_iter()
            .filter(|p| {
                p.cross_attention_dim.is_some() && p.latent_downscale == obj.attn_latent_downscale
            })
            .map(|p| p.index)
            .collect()
    } else {
        Vec::new()
    };
    let ctx = AttnContext {
        scales: AdapterScales::default(),
        record,
        ip_bias: any_padding.then(|| host(bias, [b, max_tokens], device)),
    };
    let timesteps = host(
        rnd.timesteps.iter().map(|&t| t as f32).collect(),
        [b],
        device,
    );
    let time_ids = host(batch.time_ids.clone(), [b, 6], device);
    let out = adapter.unet.forward(
        UNetInput {
            sample: noisy,
            timestep: timesteps,
            encoder_hidden_states: context,
            text_embeds: Some(pooled),
            time_ids: Some(time_ids),
        },
        &ctx,
    );

    let masks = host(batch.masks.clone(), [b, c, lh, lw], device);
    let keep: Vec<f32> = batch
        .drop_image
        .iter()
        .map(|&d| if d { 0.0 } else { 1.0 })
        .collect();
    let weights: Vec<f32> = match obj.snr_gamma {
        Some(g) => rnd
            .timesteps
            .iter()
            .map(|&t| frozen.ddpm.min_snr_weight(t, g as f32))
            .collect(),
        None => vec![1.0; b],
    };
    let noise_term = noise_loss(
        out.sample,
        target,
        character_region(masks.clone()),
        host(keep, [b], device),
        host(weights, [b], device),
        obj.mask_loss_weight,
    );
    let attention = if out.attn_probs.is_empty() {
        Tensor::zeros([1], device)
    } else {
        let mut size = [lh, lw];
        for _ in 0..obj.attn_latent_downscale.trailing_zeros() {
            size = [size[0].div_ceil(2), size[1].div_ceil(2)];
        }
        let layers: Vec<Tensor<3>> = out.attn_probs.into_iter().map(|p| p.probs).collect();
        attention_loss(&layers, size, masks, &batch.num_characters, per_slot)
    };
    let total = noise_term.clone() + attention.clone().mul_scalar(obj.attn_loss_weight);
    Ok(Losses {
        total,
        noise: noise_term,
        attention,
    })
}

/// Checks that a path exists, for clear errors before a long load.
pub fn require_dir(path: &Path, key: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        anyhow::bail!("`{key}` = {}: no such folder", path.display())
    }
}

/// Initialises the adapter from the public checkpoints as StoryMaker does (§5.1): from
/// IP-Adapter-FaceID-PlusV2-SDXL the PPR's `proj.*`, `norm.*`, `perceiver_resampler.*` and all
/// processors (`ip_adapter.*`); from IP-Adapter-Plus-SDXL-ViT-H the projection model as
/// `resample.*`. Every other weight keeps its fresh initialisation (`pos_embed`, `bg_embed`,
/// `proj_out` zero). A tensor whose shape differs is an error naming it. Returns a summary.
pub fn init_from_pretrained(
    adapter: &mut Adapter,
    faceid: Option<&Path>,
    ip_plus: Option<&Path>,
) -> anyhow::Result<String> {
    use std::collections::BTreeMap;
    let mut merged: BTreeMap<String, troupe_pt::Tensor> = adapter.tensors().into_iter().collect();
    // (target key, tensor, source file) of every pretrained tensor StoryMaker uses.
    let mut wanted = Vec::new();
    let mut ignored = 0usize;
    if let Some(path) = faceid {
        let ppr = [
            "image_proj_model.proj.",
            "image_proj_model.norm.",
            "image_proj_model.perceiver_resampler.",
        ];
        for (key, t) in crate::export::read_adapter(path)? {
            if key.starts_with("ip_adapter.") || ppr.iter().any(|p| key.starts_with(p)) {
                wanted.push((key, t, path));
            } else {
                ignored += 1;
            }
        }
    }
    if let Some(path) = ip_plus {
        for (key, t) in crate::export::read_adapter(path)? {
            match key.strip_prefix("image_proj_model.") {
                Some(name) => wanted.push((format!("image_proj_model.resample.{name}"), t, path)),
                None => ignored += 1,
            }
        }
    }
    let mut taken = 0usize;
    for (key, t, file) in wanted {
        match merged.get_mut(&key) {
            Some(slot) if slot.shape == t.shape => {
                *slot = t;
                taken += 1;
            }
            Some(slot) => anyhow::bail!(
                "{}: `{key}` has shape {:?}, the adapter needs {:?} (check model.lora_rank and the base model)",
                file.display(),
                t.shape,
                slot.shape
            ),
            None => ignored += 1,
        }
    }
    let tensors: Vec<(String, troupe_pt::Tensor)> = merged.into_iter().collect();
    adapter.load_tensors(StateDict::from_tensors(&tensors)?)?;
    Ok(format!(
        "initialised {taken} tensors from pretrained checkpoints ({ignored} not used)"
    ))
}

/// A freshly initialised adapter for any UNet config (no UNet weights are read or allocated:
/// only the processors and the PPR are materialised).
pub fn fresh_adapter(
    unet_config: &troupe_models::unet::UNet2DConditionConfig,
    rank: usize,
    ppr: &FaceIdPlusConfig,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Adapter> {
    device.seed(seed);
    let mut unet = UNet2DConditionModel::new(unet_config, device)?;
    unet.attach_adapter(rank, device);
    Ok(Adapter {
        ppr: ppr.init(device),
        unet,
    })
}

/// Metadata stored in exported adapters.
pub fn export_metadata(
    adapter: &Adapter,
    base: &str,
    step: u64,
    config_hash: &str,
    dim_head: usize,
) -> std::collections::HashMap<String, String> {
    let rank = adapter
        .unet
        .attentions()
        .first()
        .and_then(|a| a.adapter.as_ref())
        .map_or(0, |a| a.to_q_lora.down.weight.val().dims()[1]);
    let tokens = adapter.ppr.pos_embed.val().dims()[1];
    [
        ("format", "storymaker-adapter".to_string()),
        ("producer", format!("troupe {}", env!("CARGO_PKG_VERSION"))),
        ("base_model", base.to_string()),
        ("lora_rank", rank.to_string()),
        ("tokens_per_character", tokens.to_string()),
        ("step", step.to_string()),
        ("config_sha256", config_hash.to_string()),
        (troupe_models::ppr::DIM_HEAD_METADATA, dim_head.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
