//! The training objective of one micro-batch: conditioning (shared with generation,
//! `troupe_diffusion::conditioning`) → VAE latents → DDPM noising → the UNet with the adapter
//! → the StoryMaker losses ([`crate::losses`]). Randomness comes in from the caller
//! ([`StepNoise`]), so a step is a pure function of (weights, batch, noise).

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use troupe_data::loader::Batch;
use troupe_data::rng::KeyedRng;
use troupe_diffusion::conditioning::{Encoders, host};
use troupe_diffusion::control::{ControlBatch, PoseControl};
use troupe_diffusion::schedule::Prediction;
use troupe_models::adapter::Adapter;
use troupe_models::attention::{AdapterScales, AttentionKernel, AttnContext};
use troupe_models::unet::{UNetInput, UNetOutput};

use crate::losses::{attention_loss, character_region, noise_loss};

/// Loss weights and dropout rates; defaults are the reference recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// Offset noise scale (0.05): `noise = randn + s·randn(B, C, 1, 1)`.
    #[serde(default = "noise_offset")]
    pub noise_offset: f64,
    /// `w` in `e + w·e·M` (`--mask_loss_weight` 5).
    #[serde(default = "mask_loss_weight")]
    pub mask_loss_weight: f64,
    /// λ of the attention loss (`--ip_loss` 0.1); 0 disables it.
    #[serde(default = "attn_loss_weight")]
    pub attn_loss_weight: f64,
    /// Latent down-scale of the cross-attention layers used by the attention loss (4 = the
    /// SDXL 1/32-resolution layers: down_blocks.2, mid, up_blocks.0).
    #[serde(default = "attn_latent_downscale")]
    pub attn_latent_downscale: usize,
    /// min-SNR-γ weighting; `None` (reference) disables it.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// Probability of dropping only the image conditioning (0.05): zero crops and ID vectors.
    #[serde(default = "drop_image")]
    pub drop_image: f64,
    /// Probability of dropping only the caption (0.20).
    #[serde(default = "drop_text")]
    pub drop_text: f64,
    /// Probability of dropping both (0.05).
    #[serde(default = "drop_image")]
    pub drop_both: f64,
    /// PPR face-token group dropout (0.1).
    #[serde(default = "token_drop")]
    pub drop_face_tokens: f64,
    /// PPR body-token group dropout (0.1).
    #[serde(default = "token_drop")]
    pub drop_body_tokens: f64,
    /// The UNet's attention op in the training forward pass: `efficient` (backward recomputes
    /// the attention probabilities instead of keeping them; far less memory) or `plain`
    /// (burn's op-by-op attention). Same losses and gradients to f32 rounding.
    #[serde(default)]
    pub attention: AttentionKernel,
}

fn noise_offset() -> f64 {
    0.05
}
fn mask_loss_weight() -> f64 {
    5.0
}
fn attn_loss_weight() -> f64 {
    0.1
}
fn attn_latent_downscale() -> usize {
    4
}
fn drop_image() -> f64 {
    0.05
}
fn drop_text() -> f64 {
    0.20
}
fn token_drop() -> f64 {
    0.1
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            noise_offset: noise_offset(),
            mask_loss_weight: mask_loss_weight(),
            attn_loss_weight: attn_loss_weight(),
            attn_latent_downscale: attn_latent_downscale(),
            snr_gamma: None,
            drop_image: drop_image(),
            drop_text: drop_text(),
            drop_both: drop_image(),
            drop_face_tokens: token_drop(),
            drop_body_tokens: token_drop(),
            attention: AttentionKernel::default(),
        }
    }
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

impl StepNoise {
    /// Draws a micro-step's randomness for `b` samples of latent shape `[c, h, w]` from `rng`
    /// (timesteps uniform over the `steps` training timesteps).
    pub fn draw(
        rng: &mut KeyedRng,
        config: &ObjectiveConfig,
        steps: usize,
        b: usize,
        latent: [usize; 3],
    ) -> Self {
        let timesteps = (0..b).map(|_| rng.below(steps as u64) as usize).collect();
        Self::at_timesteps(rng, config, timesteps, latent, true)
    }

    /// The randomness of a step at given `timesteps` (one per sample); token-group dropout
    /// coins are drawn only when `token_dropout` is set (validation has none).
    pub fn at_timesteps(
        rng: &mut KeyedRng,
        config: &ObjectiveConfig,
        timesteps: Vec<usize>,
        [c, h, w]: [usize; 3],
        token_dropout: bool,
    ) -> Self {
        let b = timesteps.len();
        let mut noise = rng.normals(b * c * h * w);
        let offset = rng.normals(b * c);
        for (i, n) in noise.iter_mut().enumerate() {
            *n += (config.noise_offset as f32) * offset[i / (h * w)];
        }
        let vae_noise = rng.normals(b * c * h * w);
        let token_drop = (0..b)
            .map(|_| {
                if !token_dropout {
                    return (false, false);
                }
                (
                    rng.uniform() < config.drop_face_tokens,
                    rng.uniform() < config.drop_body_tokens,
                )
            })
            .collect();
        Self {
            timesteps,
            noise,
            vae_noise,
            token_drop,
        }
    }
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

/// Processor indices whose image-attention maps the attention loss reads.
pub(crate) fn recorded_layers(adapter: &Adapter, obj: &ObjectiveConfig) -> Vec<usize> {
    if obj.attn_loss_weight <= 0.0 {
        return Vec::new();
    }
    adapter
        .unet
        .processors()
        .into_iter()
        .filter(|p| {
            p.cross_attention_dim.is_some() && p.latent_downscale == obj.attn_latent_downscale
        })
        .map(|p| p.index)
        .collect()
}

/// The reference training forward pass on one batch; returns the losses. `control`: a pose
/// ControlNet and its scale, fed the batch's poses (rows without one get no residuals).
pub fn forward(
    encoders: &Encoders,
    adapter: &Adapter,
    control: Option<(&PoseControl, f64)>,
    batch: &Batch,
    rnd: &StepNoise,
    obj: &ObjectiveConfig,
    device: &Device,
) -> Result<Losses, troupe_diffusion::DiffusionError> {
    let b = batch.len();
    let (h, w) = (batch.height as usize, batch.width as usize);
    let cond = encoders.condition_batch(&adapter.ppr, batch, &rnd.token_drop, device)?;

    // Latents: VAE posterior sample × scaling (frozen, no graph).
    let pixels = host(batch.pixels.clone(), [b, 3, h, w], device);
    let f = encoders.vae.downscale_factor();
    let [lc, lh, lw] = [encoders.vae.latent_channels(), h / f, w / f];
    let latents =
        encoders.encode_latents(pixels, host(rnd.vae_noise.clone(), [b, lc, lh, lw], device));

    // Forward diffusion.
    let schedule = &encoders.schedule;
    let coef: Vec<(f32, f32)> = rnd
        .timesteps
        .iter()
        .map(|&t| schedule.coefficients(t))
        .collect();
    let sa = host(coef.iter().map(|c| c.0).collect(), [b, 1, 1, 1], device);
    let sn = host(coef.iter().map(|c| c.1).collect(), [b, 1, 1, 1], device);
    let noise = host(rnd.noise.clone(), [b, lc, lh, lw], device);
    let noisy = latents.clone() * sa.clone() + noise.clone() * sn.clone();
    let target = match schedule.prediction {
        Prediction::Epsilon => noise,
        Prediction::VPrediction => noise * sa - latents * sn,
    };

    let ctx = AttnContext {
        scales: AdapterScales::default(),
        record: recorded_layers(adapter, obj),
        ip_bias: cond.ip_bias.clone(),
        kernel: obj.attention,
        key_bias: None,
    };
    let timesteps = host(
        rnd.timesteps.iter().map(|&t| t as f32).collect(),
        [b],
        device,
    );
    let residuals = match (control, &batch.pose) {
        (Some((control, scale)), Some(pose)) => {
            let all = batch.has_pose.iter().all(|&x| x == 1.0);
            Some(control.residuals(ControlBatch {
                sample: noisy.clone(),
                timestep: timesteps.clone(),
                context: &cond.context,
                text_tokens: encoders.tokenizer.max_length(),
                ip_bias: cond.ip_bias.as_ref(),
                pooled: cond.pooled.clone(),
                time_ids: cond.time_ids.clone(),
                pose: host(pose.clone(), [b, 3, h, w], device),
                has_pose: (!all).then(|| batch.has_pose.clone()),
                scale,
            }))
        }
        _ => None,
    };
    let out = adapter.unet.forward(
        UNetInput {
            control: residuals,
            sample: noisy,
            timestep: timesteps,
            encoder_hidden_states: cond.context,
            text_embeds: Some(cond.pooled),
            time_ids: Some(cond.time_ids),
        },
        &ctx,
    );

    let c = batch.max_characters;
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
            .map(|&t| schedule.min_snr_weight(t, g as f32))
            .collect(),
        None => vec![1.0; b],
    };
    let targets = LossTargets {
        target,
        masks,
        keep: host(keep, [b], device),
        sample_weights: host(weights, [b], device),
        characters: &batch.num_characters,
        tokens_per_slot: adapter.spec.ppr.tokens_per_slot(),
    };
    Ok(losses(out, targets, obj))
}

/// What the UNet's output is scored against.
pub(crate) struct LossTargets<'a> {
    /// Noise (or v) target `[B, C, h, w]`.
    pub target: Tensor<4>,
    /// Character masks at latent size `[B, max characters, h, w]`.
    pub masks: Tensor<4>,
    /// 1 where the image conditioning was kept, 0 where dropped `[B]`.
    pub keep: Tensor<1>,
    /// Min-SNR weights or ones `[B]`.
    pub sample_weights: Tensor<1>,
    /// Characters per image.
    pub characters: &'a [usize],
    /// PPR tokens per slot.
    pub tokens_per_slot: usize,
}

/// The region-weighted noise loss and the attention-map loss of one UNet output.
pub(crate) fn losses(out: UNetOutput, t: LossTargets, obj: &ObjectiveConfig) -> Losses {
    let [_, _, lh, lw] = t.target.dims();
    let noise_term = noise_loss(
        out.sample,
        t.target,
        character_region(t.masks.clone()),
        t.keep,
        t.sample_weights,
        obj.mask_loss_weight,
    );
    let attention = if out.attn_probs.is_empty() {
        Tensor::zeros([1], &t.masks.device())
    } else {
        let mut size = [lh, lw];
        for _ in 0..obj.attn_latent_downscale.trailing_zeros() {
            size = [size[0].div_ceil(2), size[1].div_ceil(2)];
        }
        let layers: Vec<Tensor<3>> = out.attn_probs.into_iter().map(|p| p.probs).collect();
        attention_loss(&layers, size, t.masks, t.characters, t.tokens_per_slot)
    };
    let total = noise_term.clone() + attention.clone().mul_scalar(obj.attn_loss_weight);
    Losses {
        total,
        noise: noise_term,
        attention,
    }
}
