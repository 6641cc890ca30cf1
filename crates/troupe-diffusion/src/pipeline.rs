//! The StoryMaker generation pipeline (storymaker.md §4): diffusers'
//! `StableDiffusionXLPipeline` plus the adapter. Everything the adapter does not touch —
//! prompt encoding (with `force_zeros_for_empty_prompt`), time ids `(h, w, 0, 0, h, w)`,
//! classifier-free guidance `u + g·(c − u)` with the unconditional branch first, the sampler
//! loop, VAE decoding and post-processing — behaves as that pipeline does; the adapter adds
//! the PPR tokens after the 77 text tokens (unconditional branch: the PPR on zero inputs) and
//! the `ip_scale` / `lora_scale` of its processors.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, Int};
use troupe_data::rng::{KeyedRng, Purpose};
use troupe_models::adapter::Adapter;
use troupe_models::adapter_file::AdapterFile;
use troupe_models::attention::{AdapterScales, AttnContext};
use troupe_models::unet::{UNet2DConditionModel, UNetInput};
use troupe_models::weights::Precision;

use crate::DiffusionError;
use crate::conditioning::{CharacterFeatures, Encoders, host, image_tokens};
use crate::control::{ControlBatch, ControlContext, PoseControl};
use crate::reference::{CropOps, Reference};
use crate::samplers::{self, SamplerKind};

/// Settings of one generation call (defaults: the reference's `infer.py`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` gives zero negative text embeddings when the base model's
    /// `force_zeros_for_empty_prompt` is set (SDXL's default), as diffusers does.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale (no guidance at ≤ 1, as diffusers).
    pub guidance: f64,
    /// Image-attention scale of the processors.
    pub ip_scale: f64,
    /// LoRA scale of the processors.
    pub lora_scale: f64,
    /// Image width in pixels (a multiple of the VAE factor).
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images per call (one latent each).
    pub num_images: usize,
    /// Seed of the initial latents and any sampler noise.
    pub seed: u64,
    /// Multiplies the ControlNet's residuals (`controlnet_conditioning_scale`; used only for
    /// requests with a pose).
    pub controlnet_scale: f64,
}

impl Settings {
    /// What requests of one UNet batch must share: steps, sampler, guidance, both scales and
    /// the size (prompts, negative prompts, references, seeds and counts may differ).
    pub fn batch_key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}x{}|{}",
            self.steps,
            self.sampler.name(),
            self.guidance,
            self.ip_scale,
            self.lora_scale,
            self.width,
            self.height,
            self.controlnet_scale
        )
    }

    /// The reference's settings for `prompt` at `width` × `height`: UniPC, 25 steps,
    /// guidance 7.5, both scales 0.8, one image, seed 0 (and diffusers' ControlNet scale 1).
    pub fn new(prompt: &str, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: None,
            steps: 25,
            sampler: SamplerKind::UniPc,
            guidance: 7.5,
            ip_scale: 0.8,
            lora_scale: 0.8,
            width,
            height,
            num_images: 1,
            seed: 0,
            controlnet_scale: 1.0,
        }
    }
}

/// Frozen SDXL components and an adapter, ready to generate.
pub struct Pipeline {
    /// Encoders, VAE and scheduler config.
    pub encoders: Encoders,
    /// The adapter on the base UNet.
    pub adapter: Adapter,
    /// Where everything lives.
    pub device: Device,
    /// Library arithmetic the reference crops reproduce.
    pub crop_ops: CropOps,
    /// Image side the base model was trained at (diffusers' default `height`/`width`): the
    /// UNet config's `sample_size` × the VAE factor.
    pub default_size: usize,
    /// A pose ControlNet, for requests with a pose.
    pub control: Option<PoseControl>,
}

impl Pipeline {
    /// Loads the base model (`base`: an SDXL diffusers folder), the CLIP image encoder and
    /// `adapter` (its architecture from the file), checking that the adapter fits the UNet.
    pub fn load(
        base: &Path,
        image_encoder: &Path,
        adapter: &AdapterFile,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let encoders = Encoders::load(base, image_encoder, Precision::F32, device)?;
        let unet_dir = base.join("unet");
        let (unet, _) = UNet2DConditionModel::from_dir(&unet_dir, device, Some(DType::F32))?;
        let spec = adapter.verify()?;
        let file = adapter.path.display().to_string();
        let clip_dim = encoders.image_encoder.hidden_size();
        if spec.ppr.clip_embeddings_dim != clip_dim {
            return Err(DiffusionError::input(
                &file,
                "clip_embeddings_dim",
                format!(
                    "is {}, the image encoder's hidden size is {clip_dim}",
                    spec.ppr.clip_embeddings_dim
                ),
            ));
        }
        let mut model = Adapter::attach(unet, spec, device)
            .map_err(|e| DiffusionError::input(&file, "", e.message))?;
        model.load_tensors(adapter.state_dict()?)?;
        Self::from_parts(base, encoders, model, device)
    }

    /// A pipeline over already loaded parts (training renders samples with the adapter it
    /// trains); `base` is the SDXL folder they came from.
    pub fn from_parts(
        base: &Path,
        encoders: Encoders,
        adapter: Adapter,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let config: serde_json::Value =
            troupe_models::error::read_json_config(&base.join("unet").join("config.json"))?;
        let sample_size = config["sample_size"].as_u64().unwrap_or(128) as usize;
        Ok(Self {
            default_size: sample_size * encoders.vae.downscale_factor(),
            crop_ops: CropOps::default(),
            encoders,
            adapter,
            device: device.clone(),
            control: None,
        })
    }

    /// Adds a pose ControlNet (a diffusers `controlnet/` folder), checked against the UNet.
    pub fn with_control(
        mut self,
        dir: &Path,
        context: ControlContext,
    ) -> Result<Self, DiffusionError> {
        let precision = Precision::F32;
        let control = PoseControl::load(dir, &self.adapter.unet, precision, context, &self.device)?;
        self.control = Some(control);
        Ok(self)
    }

    /// CLIP features of the references, in slot order.
    pub fn characters(&self, refs: &[Reference]) -> Result<CharacterFeatures, DiffusionError> {
        let max = self.adapter.spec.ppr.max_characters;
        if refs.is_empty() || refs.len() > max {
            return Err(DiffusionError::input(
                "--reference",
                "",
                format!(
                    "{} references given, the adapter takes 1 to {max}",
                    refs.len()
                ),
            ));
        }
        let s = self.encoders.image_size;
        let (mut body, mut face, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for r in refs {
            let crops = r.crops(s as u32, &self.crop_ops)?;
            body.extend(crops.body);
            face.extend(crops.face);
            ids.extend_from_slice(&r.embedding);
        }
        let n = refs.len();
        Ok(CharacterFeatures {
            id_embeds: host(ids, [n, crate::reference::EMBEDDING_DIM], &self.device),
            body: self.encoders.image_features(body, n, &self.device),
            face: self.encoders.image_features(face, n, &self.device),
            drop_face: false,
            drop_body: false,
        })
    }

    /// Checks `settings` before any work, naming the setting.
    pub fn check(&self, settings: &Settings) -> Result<(), DiffusionError> {
        let f = self.encoders.vae.downscale_factor();
        for (name, v) in [("width", settings.width), ("height", settings.height)] {
            if v == 0 || v % f != 0 {
                return Err(DiffusionError::input(
                    &format!("--{name}"),
                    "",
                    format!("{v} is not a positive multiple of {f} (the VAE's factor)"),
                ));
            }
        }
        if settings.steps == 0 || settings.num_images == 0 {
            return Err(DiffusionError::input(
                "--steps/--num-images",
                "",
                "must be > 0",
            ));
        }
        samplers::build(settings.sampler, &self.encoders.scheduler, settings.steps)?;
        if !settings.controlnet_scale.is_finite() {
            return Err(DiffusionError::input(
                "--controlnet-scale",
                "",
                "must be finite",
            ));
        }
        Ok(())
    }

    /// The seeded initial noise `[num_images, C, h, w]` (before `init_noise_sigma`).
    pub fn initial_noise(&self, settings: &Settings) -> Tensor<4> {
        let shape = self.latent_shape(settings);
        let mut rng = KeyedRng::new(settings.seed, Purpose::Generate, 0, 0);
        host(rng.normals(shape.iter().product()), shape, &self.device)
    }

    fn latent_shape(&self, settings: &Settings) -> [usize; 4] {
        let f = self.encoders.vae.downscale_factor();
        let c = self.encoders.vae.latent_channels();
        [
            settings.num_images,
            c,
            settings.height / f,
            settings.width / f,
        ]
    }

    /// Generates `settings.num_images` images for `characters`, from `latents` (diffusers'
    /// `latents=`; the seeded noise when `None`). `on_step(i, latents)` sees the latents after
    /// each sampler step. Returns images `[N, 3, H, W]` in [0, 1].
    pub fn generate(
        &self,
        settings: &Settings,
        characters: &CharacterFeatures,
        latents: Option<Tensor<4>>,
        on_step: &mut dyn FnMut(usize, &Tensor<4>),
    ) -> Result<Tensor<4>, DiffusionError> {
        let request = Request {
            settings,
            characters,
            latents,
            pose: None,
        };
        let mut images = self.generate_batch(vec![request], on_step)?;
        Ok(images.remove(0))
    }

    /// Generates several requests in one UNet batch. They must share everything but the
    /// prompt, negative prompt, references, seed and image count ([`Settings::batch_key`]);
    /// each request's noise comes from its own seed. Returns each request's images.
    pub fn generate_batch(
        &self,
        requests: Vec<Request<'_>>,
        on_step: &mut dyn FnMut(usize, &Tensor<4>),
    ) -> Result<Vec<Tensor<4>>, DiffusionError> {
        let first = requests
            .first()
            .ok_or_else(|| DiffusionError::input("generate", "", "no request"))?
            .settings
            .clone();
        for r in &requests {
            self.check(r.settings)?;
            if r.settings.batch_key() != first.batch_key() {
                return Err(DiffusionError::input(
                    "generate",
                    "",
                    "requests of one batch must share steps, sampler, guidance, scales and size",
                ));
            }
        }
        let counts: Vec<usize> = requests.iter().map(|r| r.settings.num_images).collect();
        let mut x = Vec::new();
        for r in &requests {
            let want = self.latent_shape(r.settings);
            x.push(match &r.latents {
                Some(l) if l.dims() != want => {
                    return Err(DiffusionError::input(
                        "--latents",
                        "latents",
                        format!("has shape {:?}, expected {want:?}", l.dims()),
                    ));
                }
                Some(l) => l.clone(),
                None => self.initial_noise(r.settings),
            });
        }
        let Conditioned {
            context,
            pooled,
            time_ids,
            ip_bias,
            text_tokens,
            rows,
        } = self.conditioning(&first, &requests)?;
        let poses = self.poses(&first, &requests, &rows)?;
        let cfg = first.guidance > 1.0;
        let mut sampler = samplers::build(first.sampler, &self.encoders.scheduler, first.steps)?;
        let mut x = Tensor::cat(x, 0).mul_scalar(sampler.init_noise_sigma());
        let mut rngs: Vec<KeyedRng> = requests
            .iter()
            .map(|r| KeyedRng::new(r.settings.seed, Purpose::Generate, 1, 0))
            .collect();
        let ctx = AttnContext {
            scales: AdapterScales {
                lora: first.lora_scale,
                ip: first.ip_scale,
                ..AdapterScales::default()
            },
            ip_bias,
            ..AttnContext::default()
        };
        let n: usize = counts.iter().sum();
        let timesteps = sampler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(vec![x.clone(), x.clone()], 0)
            } else {
                x.clone()
            };
            let input = sampler.scale_model_input(input, i);
            let b = input.dims()[0];
            let timestep = host(vec![t; b], [b], &self.device);
            // Both guidance branches get the residuals, as in diffusers' ControlNet pipelines.
            let control = match (&self.control, &poses) {
                (Some(c), Some((pose, has_pose))) => Some(c.residuals(ControlBatch {
                    sample: input.clone(),
                    timestep: timestep.clone(),
                    context: &context,
                    text_tokens,
                    ip_bias: ctx.ip_bias.as_ref(),
                    pooled: pooled.clone(),
                    time_ids: time_ids.clone(),
                    pose: pose.clone(),
                    has_pose: has_pose.clone(),
                    scale: first.controlnet_scale,
                })),
                _ => None,
            };
            let out = self.adapter.unet.forward(
                UNetInput {
                    control,
                    sample: input,
                    timestep,
                    encoder_hidden_states: context.clone(),
                    text_embeds: Some(pooled.clone()),
                    time_ids: Some(time_ids.clone()),
                },
                &ctx,
            );
            let pred = if cfg {
                let u = out.sample.clone().narrow(0, 0, n);
                let c = out.sample.narrow(0, n, n);
                u.clone() + (c - u).mul_scalar(first.guidance)
            } else {
                out.sample
            };
            let [_, lc, lh, lw] = x.dims();
            let device = self.device.clone();
            let mut noise = || {
                let parts = rngs
                    .iter_mut()
                    .zip(&counts)
                    .map(|(rng, &k)| host(rng.normals(k * lc * lh * lw), [k, lc, lh, lw], &device))
                    .collect();
                Tensor::cat(parts, 0)
            };
            // Detached: on an autodiff device (training-time samples) no graph outlives a step.
            x = sampler.step(pred.detach(), i, x, &mut noise).detach();
            on_step(i, &x);
        }
        let images = self.encoders.decode_latents(x);
        let images = images.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for k in counts {
            out.push(images.clone().narrow(0, at, k));
            at += k;
        }
        Ok(out)
    }

    /// The UNet batch's conditioning. Rows: with guidance every request's unconditional
    /// branch, then every conditional one (diffusers' order for one request), each repeated for
    /// the request's images; without guidance only the latter.
    fn conditioning(
        &self,
        first: &Settings,
        requests: &[Request<'_>],
    ) -> Result<Conditioned, DiffusionError> {
        let d = &self.device;
        let prompts: Vec<String> = requests.iter().map(|r| r.settings.prompt.clone()).collect();
        let (text, pooled) = self.encoders.encode_prompts(&prompts, d)?;
        let cfg = first.guidance > 1.0;
        let (mut texts, mut pooleds, mut features) = (vec![], vec![], vec![]);
        if cfg {
            for (i, r) in requests.iter().enumerate() {
                let (neg, neg_pooled) = match &r.settings.negative_prompt {
                    None if self.encoders.force_zeros_for_empty_prompt => (
                        text.clone().narrow(0, i, 1).zeros_like(),
                        pooled.clone().narrow(0, i, 1).zeros_like(),
                    ),
                    other => {
                        let p = other.clone().unwrap_or_default();
                        self.encoders.encode_prompts(&[p], d)?
                    }
                };
                texts.push(neg);
                pooleds.push(neg_pooled);
                features.push(r.characters.zeros_like());
            }
        }
        texts.push(text);
        pooleds.push(pooled);
        features.extend(requests.iter().map(|r| r.characters.clone()));
        let (tokens, bias) = image_tokens(&self.adapter.ppr, features, d);
        let text_tokens = texts[0].dims()[1];
        let context = Tensor::cat(vec![Tensor::cat(texts, 0), tokens], 1); // [branches·k, M, D]
        let pooled = Tensor::cat(pooleds, 0);
        // Row r of the per-request tensors, repeated for each of its request's images.
        let branches = if cfg { 2 } else { 1 };
        let rows: Vec<i64> = (0..branches)
            .flat_map(|b| {
                requests.iter().enumerate().flat_map(move |(i, r)| {
                    std::iter::repeat_n((b * requests.len() + i) as i64, r.settings.num_images)
                })
            })
            .collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(rows.clone(), [rows.len()]), d);
        let (h, w) = (first.height as f32, first.width as f32);
        let ids: Vec<f32> = rows.iter().flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
        Ok(Conditioned {
            context: context.select(0, index.clone()),
            pooled: pooled.select(0, index.clone()),
            time_ids: host(ids, [rows.len(), 6], d),
            ip_bias: bias.map(|b| b.select(0, index)),
            text_tokens,
            rows: rows.iter().map(|&r| r as usize % requests.len()).collect(),
        })
    }

    /// The poses of the UNet batch's rows `[rows, 3, H, W]` and which rows have one (`None`
    /// when no request has a pose). A pose without a ControlNet is refused.
    #[allow(clippy::type_complexity)]
    fn poses(
        &self,
        first: &Settings,
        requests: &[Request<'_>],
        rows: &[usize],
    ) -> Result<Option<(Tensor<4>, Option<Vec<f32>>)>, DiffusionError> {
        if requests.iter().all(|r| r.pose.is_none()) {
            return Ok(None);
        }
        if self.control.is_none() {
            return Err(DiffusionError::input(
                "--pose",
                "",
                "a pose needs a ControlNet (--controlnet)",
            ));
        }
        let (h, w) = (first.height, first.width);
        let size = 3 * h * w;
        let mut pixels = vec![0f32; rows.len() * size];
        let mut has = Vec::with_capacity(rows.len());
        for (k, &r) in rows.iter().enumerate() {
            match requests[r].pose {
                Some(p) if p.len() == size => {
                    pixels[k * size..(k + 1) * size].copy_from_slice(p);
                    has.push(1.0);
                }
                Some(p) => {
                    return Err(DiffusionError::input(
                        "--pose",
                        "",
                        format!("has {} values, expected 3 × {h} × {w}", p.len()),
                    ));
                }
                None => has.push(0.0),
            }
        }
        let all = has.iter().all(|&x| x == 1.0);
        let pose = host(pixels, [rows.len(), 3, h, w], &self.device);
        Ok(Some((pose, (!all).then_some(has))))
    }
}

/// The conditioning of one UNet batch.
struct Conditioned {
    /// `[rows, text + N_ip, D]`.
    context: Tensor<3>,
    /// `[rows, P]`.
    pooled: Tensor<2>,
    /// `[rows, 6]`.
    time_ids: Tensor<2>,
    /// Padding bias of the image tokens.
    ip_bias: Option<Tensor<2>>,
    /// Text tokens at the start of `context`.
    text_tokens: usize,
    /// The request of each row.
    rows: Vec<usize>,
}

/// One request of a [`Pipeline::generate_batch`] call.
pub struct Request<'a> {
    /// Its settings.
    pub settings: &'a Settings,
    /// Its characters' features ([`Pipeline::characters`]).
    pub characters: &'a CharacterFeatures,
    /// Initial latents (seeded noise when `None`).
    pub latents: Option<Tensor<4>>,
    /// Its pose in [0, 1] `[3, H, W]` ([`crate::control::read_pose`]), for the ControlNet.
    pub pose: Option<&'a [f32]>,
}

/// `[N, 3, H, W]` in [0, 1] → 8-bit RGB images as diffusers' `numpy_to_pil` makes them:
/// `(x · 255).round()` (half to even) in float32.
pub fn to_rgb8(images: Tensor<4>) -> Vec<image::RgbImage> {
    let [n, _, h, w] = images.dims();
    let data: Vec<f32> = images
        .permute([0, 2, 3, 1])
        .cast(burn::tensor::FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    (0..n)
        .map(|i| {
            let px: Vec<u8> = data[i * h * w * 3..(i + 1) * h * w * 3]
                .iter()
                .map(|&x| (x * 255.0).round_ties_even() as u8)
                .collect();
            image::RgbImage::from_raw(w as u32, h as u32, px).expect("sized buffer")
        })
        .collect()
}
