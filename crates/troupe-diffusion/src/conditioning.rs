//! Conditioning: the frozen SDXL encoders and the adapter's PPR turn prompts and character
//! crops into the UNet's inputs. Training (`troupe-train`'s objective) and generation
//! ([`crate::pipeline`]) both call this module; there is no second copy.
//!
//! * prompts → `[B, 77, D]` text states (penultimate layers of both text encoders) and the
//!   pooled `[B, P]` embedding (`StableDiffusionXLPipeline.encode_prompt`);
//! * crops → CLIP image features (`hidden_states[-2]`, `[N, 1 + patches, D_clip]`);
//! * (ID embedding, body features, face features) per character → PPR tokens
//!   `[bg | char 1 | …]`, appended after the 77 text tokens (padded, with an attention bias,
//!   when the images of a batch have different character counts);
//! * pixels ↔ scaled VAE latents.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType, Int};
use troupe_data::loader::Batch;
use troupe_models::clip::{ClipConfig, ClipTextModel, ClipVisionModel, encode_sdxl_prompt};
use troupe_models::ppr::FaceIdPlus;
use troupe_models::tokenizer::ClipTokenizer;
use troupe_models::vae::AutoencoderKL;
use troupe_models::weights::Precision;

use crate::DiffusionError;
use crate::schedule::{NoiseSchedule, SchedulerConfig};

/// Score bias that keeps padding tokens out of the image attention.
const PADDING_BIAS: f32 = -1e4;

/// The frozen SDXL components and the base model's noise schedule.
pub struct Encoders {
    /// `tokenizer/`.
    pub tokenizer: ClipTokenizer,
    /// `tokenizer_2/`.
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder/`.
    pub text_encoder: ClipTextModel,
    /// `text_encoder_2/`.
    pub text_encoder_2: ClipTextModel,
    /// CLIP image encoder (ViT-H/14 for StoryMaker).
    pub image_encoder: ClipVisionModel,
    /// Input side of the image encoder (224 for ViT-H/14).
    pub image_size: usize,
    /// VAE.
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: SchedulerConfig,
    /// ᾱ_t of that scheduler.
    pub schedule: NoiseSchedule,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (diffusers' default: true): with no
    /// negative prompt, the negative text embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
}

/// Everything the UNet takes besides the noisy sample and the timestep.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, 77 + N_ip, D]`: text states, then image tokens.
    pub context: Tensor<3>,
    /// Pooled text embedding `[B, P]`.
    pub pooled: Tensor<2>,
    /// SDXL micro-conditioning `[B, 6]`.
    pub time_ids: Tensor<2>,
    /// `[B, N_ip]` score bias for padded image tokens (`None` when nothing is padded).
    pub ip_bias: Option<Tensor<2>>,
}

/// One image's characters for the PPR: `n` characters' ID embeddings `[n, id]`, body-crop
/// and face-crop CLIP features `[n, S, D_clip]`, and the training-time token-group dropout.
#[derive(Debug, Clone)]
pub struct CharacterFeatures {
    /// ArcFace embeddings.
    pub id_embeds: Tensor<2>,
    /// CLIP features of the body crops.
    pub body: Tensor<3>,
    /// CLIP features of the aligned face crops.
    pub face: Tensor<3>,
    /// Zero the face tokens (training dropout).
    pub drop_face: bool,
    /// Zero the body tokens (training dropout).
    pub drop_body: bool,
}

impl CharacterFeatures {
    /// The reference's unconditional image branch: the PPR on all-zero inputs of the same
    /// shapes (not CLIP of a black image, storymaker.md §4.7).
    pub fn zeros_like(&self) -> Self {
        Self {
            id_embeds: self.id_embeds.zeros_like(),
            body: self.body.zeros_like(),
            face: self.face.zeros_like(),
            drop_face: false,
            drop_body: false,
        }
    }
}

/// A host buffer as a tensor on `device`.
pub fn host<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

impl Encoders {
    /// Loads the frozen components of the SDXL diffusers folder `base` and the CLIP image
    /// encoder folder `image_encoder`: the encoders in `precision`, the VAE always in f32 (the
    /// SDXL VAE overflows in f16, and it runs once per batch without a graph). Their outputs
    /// come back in f32 whatever the precision.
    pub fn load(
        base: &Path,
        image_encoder: &Path,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let dtype = Some(precision.dtype());
        let sub = |s: &str| base.join(s);
        let (te1, _) = ClipTextModel::from_dir(&sub("text_encoder"), device, dtype)?;
        let (te2, _) = ClipTextModel::from_dir(&sub("text_encoder_2"), device, dtype)?;
        let (vae, _) = AutoencoderKL::from_dir(&sub("vae"), device, Some(DType::F32))?;
        let (image, _) = ClipVisionModel::from_dir(image_encoder, device, dtype)?;
        let vision = ClipConfig::from_file(&image_encoder.join("config.json"))?;
        let scheduler_path = sub("scheduler").join("scheduler_config.json");
        let scheduler = SchedulerConfig::from_file(&scheduler_path)?;
        let schedule = NoiseSchedule::new(&scheduler).map_err(|message| {
            DiffusionError::input(&scheduler_path.display().to_string(), "", message)
        })?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&sub("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_dir(&sub("tokenizer_2"))?,
            text_encoder: te1.no_grad(),
            text_encoder_2: te2.no_grad(),
            image_encoder: image.no_grad(),
            image_size: vision.image_size,
            vae: vae.no_grad(),
            scheduler,
            schedule,
            force_zeros_for_empty_prompt: force_zeros(&base.join("model_index.json"))?,
        })
    }

    /// SDXL prompt encoding of `prompts`: `([B, 77, D], [B, P])`.
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        device: &Device,
    ) -> Result<(Tensor<3>, Tensor<2>), DiffusionError> {
        let ids1 = token_ids(&self.tokenizer, prompts, device)?;
        let ids2 = token_ids(&self.tokenizer_2, prompts, device)?;
        let (embeds, pooled) =
            encode_sdxl_prompt(&self.text_encoder, &self.text_encoder_2, ids1, ids2);
        Ok((embeds.cast(FloatDType::F32), pooled.cast(FloatDType::F32)))
    }

    /// CLIP features of `n` CLIP-normalised crops (`[n, 3, S, S]` flattened).
    pub fn image_features(&self, pixels: Vec<f32>, n: usize, device: &Device) -> Tensor<3> {
        let s = self.image_size;
        self.image_encoder
            .forward(host(pixels, [n, 3, s, s], device))
            .penultimate_hidden_state
            .cast(FloatDType::F32)
    }

    /// Pixels in [-1, 1] → VAE posterior sample (with the caller's `noise`) × scaling factor.
    pub fn encode_latents(&self, pixels: Tensor<4>, noise: Tensor<4>) -> Tensor<4> {
        let dist = self.vae.encode_dist(pixels);
        self.vae.scale_latents(dist.sample(noise))
    }

    /// Scaled latents → pixels in [-1, 1] (unclamped), as the pipeline decodes them.
    pub fn decode_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        self.vae.decode(self.vae.unscale_latents(latents))
    }

    /// The conditioning of a training batch: its (possibly dropped) captions, each image's
    /// characters through the PPR with `token_drop[i]` = (drop face, drop body), and the
    /// batch's time ids.
    pub fn condition_batch(
        &self,
        ppr: &FaceIdPlus,
        batch: &Batch,
        token_drop: &[(bool, bool)],
        device: &Device,
    ) -> Result<Conditioning, DiffusionError> {
        let b = batch.len();
        let c = batch.max_characters;
        let (text, pooled) = self.encode_prompts(&batch.captions, device)?;
        // Dropped images arrive as zero crops and zero embeddings (the reference's recipe).
        let body = self.image_features(batch.char_pixels.clone(), b * c, device);
        let face = self.image_features(batch.face_pixels.clone(), b * c, device);
        let [_, s, d] = body.dims();
        let ids = host(batch.id_embeds.clone(), [b * c, 512], device);
        let characters = (0..b)
            .map(|i| {
                let n = batch.num_characters[i].clamp(1, c);
                let (drop_face, drop_body) = token_drop[i];
                CharacterFeatures {
                    id_embeds: ids.clone().narrow(0, i * c, n),
                    body: body.clone().narrow(0, i * c, n).reshape([n, s, d]),
                    face: face.clone().narrow(0, i * c, n).reshape([n, s, d]),
                    drop_face,
                    drop_body,
                }
            })
            .collect();
        let (tokens, ip_bias) = image_tokens(ppr, characters, device);
        Ok(Conditioning {
            context: Tensor::cat(vec![text, tokens], 1),
            pooled,
            time_ids: host(batch.time_ids.clone(), [b, 6], device),
            ip_bias,
        })
    }
}

/// PPR tokens of a batch of images, each `[bg | char 1 | … | char n]` flattened to
/// `(1 + n)·T` tokens, zero-padded to the batch's longest: `([B, N, D], padding bias)`.
/// Each image's characters share one PPR call, as in the reference (its batch of one image).
pub fn image_tokens(
    ppr: &FaceIdPlus,
    images: Vec<CharacterFeatures>,
    device: &Device,
) -> (Tensor<3>, Option<Tensor<2>>) {
    let [_, per_slot, d] = ppr.pos_embed.val().dims();
    let counts: Vec<usize> = images.iter().map(|f| f.id_embeds.dims()[0]).collect();
    let longest = counts.iter().copied().max().unwrap_or(0);
    let max_tokens = (1 + longest) * per_slot;
    let b = images.len();
    let mut bias = vec![0f32; b * max_tokens];
    let mut rows = Vec::with_capacity(b);
    for (i, f) in images.into_iter().enumerate() {
        let n = counts[i];
        let t = ppr.forward_with_drop(f.id_embeds, f.body, f.face, f.drop_face, f.drop_body);
        let t = t.reshape([1, (1 + n) * per_slot, d]); // [1, (1+n)·T, D]
        let pad = max_tokens - (1 + n) * per_slot;
        if pad > 0 {
            bias[i * max_tokens + (1 + n) * per_slot..(i + 1) * max_tokens].fill(PADDING_BIAS);
            rows.push(Tensor::cat(vec![t, Tensor::zeros([1, pad, d], device)], 1));
        } else {
            rows.push(t);
        }
    }
    let padded = bias.iter().any(|&x| x != 0.0);
    (
        Tensor::cat(rows, 0),
        padded.then(|| host(bias, [b, max_tokens], device)),
    )
}

fn token_ids(
    tok: &ClipTokenizer,
    prompts: &[String],
    device: &Device,
) -> Result<Tensor<2, Int>, DiffusionError> {
    let mut ids = Vec::new();
    for p in prompts {
        ids.extend(tok.encode(p)?.into_iter().map(|i| i as i64));
    }
    let n = tok.max_length();
    Ok(Tensor::from_data(
        TensorData::new(ids, [prompts.len(), n]),
        device,
    ))
}

/// `force_zeros_for_empty_prompt` of a pipeline's `model_index.json` (true when absent, as
/// `StableDiffusionXLPipeline` registers it).
fn force_zeros(path: &Path) -> Result<bool, DiffusionError> {
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(DiffusionError::input(&shown, "", e.to_string())),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DiffusionError::input(&shown, "", e.to_string()))?;
    match v.get("force_zeros_for_empty_prompt") {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(other) => Err(DiffusionError::input(
            &shown,
            "force_zeros_for_empty_prompt",
            format!("is {other}, expected true or false"),
        )),
    }
}
