//! `troupe debug bench-train`: one adapter training step — PPR on random CLIP features and
//! identity embeddings, the UNet forward with the adapter (attention maps recorded for the
//! loss), the region-weighted noise loss + attention loss, backward, AdamW — on random weights
//! of any UNet config, so the real SDXL step can be timed anywhere without downloads.
//!
//! Step FLOPs are 2 × the forward pass's ([`UNet2DConditionConfig::forward_flops`], checked
//! against PyTorch's counter): the backward through the frozen UNet computes input gradients
//! only, about one forward's work; the small trainable weights' gradients are not counted.

use std::time::Instant;

use anyhow::Result;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use troupe_diffusion::conditioning::{CharacterFeatures, image_tokens};
use troupe_models::adapter::{Adapter, AdapterSpec, GROUP_PPR, GROUP_PROCESSORS};
use troupe_models::attention::{AdapterScales, AttentionKernel, AttnContext};
use troupe_models::flops::FlopShape;
use troupe_models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetInput};
use troupe_models::weights::{Precision, cast_floats};

use crate::objective::{LossTargets, ObjectiveConfig, losses, recorded_layers};
use crate::optim::{AdamW, AdamWConfig, LearningRates, ParamNames};

/// What one benchmark step holds.
#[derive(Debug, Clone)]
pub struct BenchTrainSettings {
    /// Samples per step.
    pub batch: usize,
    /// Latent height (128 for a 1024² image).
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Text tokens.
    pub text_tokens: usize,
    /// Characters per image.
    pub characters: usize,
    /// LoRA rank (the reference's 128).
    pub lora_rank: usize,
    /// PPR resampler head width (the reference's 64; at most the cross-attention width).
    pub ppr_dim_head: usize,
    /// Width of the CLIP image features (1280: ViT-H/14).
    pub clip_dim: usize,
    /// CLIP feature tokens per crop (257: ViT-H/14 at 224²).
    pub clip_tokens: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// The UNet's attention op (memory, not numbers: see [`AttentionKernel`]).
    pub attention: AttentionKernel,
    /// Precision of the frozen UNet (`model.dtype`); the adapter stays f32.
    pub dtype: Precision,
}

/// What the benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchTrainReport {
    /// Seconds of each timed step.
    pub step_s: Vec<f64>,
    /// Median step seconds.
    pub median_s: f64,
    /// Samples per second at the median.
    pub samples_per_s: f64,
    /// FLOPs of one step (2 × forward).
    pub step_flops: f64,
    /// Achieved TFLOP/s at the median.
    pub tflops: f64,
    /// Bytes the device allocator holds after the last step (its pools keep their peak);
    /// `None` on a backend that does not report it (the CPU: see the process's peak RSS).
    pub device_memory_reserved: Option<u64>,
    /// Each step's loss (finite, or the benchmark says so).
    pub losses: Vec<f64>,
    /// Image tokens per sample in the context.
    pub image_tokens: usize,
    /// Adapter parameter tensors trained.
    pub trainable_tensors: usize,
}

/// Runs `s.warmup + s.steps` training steps of a fresh adapter on a random-weight UNet of
/// `config` on `device` and times the last `s.steps`.
pub fn bench_train(
    config: &UNet2DConditionConfig,
    s: &BenchTrainSettings,
    device: &Device,
) -> Result<BenchTrainReport> {
    let dev = device.clone().autodiff();
    dev.seed(0);
    let unet = cast_floats(UNet2DConditionModel::new(config, &dev)?, s.dtype.dtype()).no_grad();
    let mut spec = AdapterSpec {
        lora_rank: s.lora_rank,
        ..AdapterSpec::default()
    };
    spec.ppr.clip_embeddings_dim = s.clip_dim;
    spec.ppr.resampler_dim_head = s.ppr_dim_head;
    let spec = spec.for_unet(&unet)?;
    let mut adapter = Adapter::attach(unet, spec, &dev)?;
    let mut names = ParamNames::default();
    for (group, params) in adapter.param_groups() {
        names.add(params, group);
    }
    let mut opt = AdamW::new(AdamWConfig::default());
    let lrs: LearningRates = [
        (GROUP_PPR.to_string(), 1e-4),
        (GROUP_PROCESSORS.to_string(), 1e-4),
    ]
    .into();
    let obj = ObjectiveConfig {
        attention: s.attention,
        ..ObjectiveConfig::default()
    };
    let (mut times, mut step_losses, mut image_count) = (Vec::new(), Vec::new(), 0);
    for i in 0..s.warmup + s.steps {
        let started = Instant::now();
        let what = format!("a benchmark step (batch {})", s.batch);
        let (stepped, value, tokens) = crate::device::catch_out_of_memory(&what, || {
            let (loss, tokens) = step_loss(&adapter, config, s, &obj, &dev)?;
            let grads = loss.clone().backward();
            let mut grads = GradientsParams::from_grads(grads, &adapter);
            let stepped = opt.step(adapter.clone(), &names, &mut grads, &lrs);
            let value: f32 = loss.into_scalar(); // waits for the step
            anyhow::Ok((stepped, value, tokens))
        })
        .map_err(anyhow::Error::msg)??;
        (adapter, image_count) = (stepped, tokens);
        if i >= s.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
        step_losses.push(value as f64);
    }
    if let Some(l) = step_losses.iter().find(|l| !l.is_finite()) {
        anyhow::bail!("a benchmark step's loss is {l}: the step is broken on this device");
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let forward = config.forward_flops(FlopShape {
        batch: s.batch,
        height: s.height,
        width: s.width,
        text_tokens: s.text_tokens,
        image_tokens: image_count,
        lora_rank: s.lora_rank,
    })?;
    Ok(BenchTrainReport {
        median_s: median,
        samples_per_s: s.batch as f64 / median,
        step_flops: 2.0 * forward,
        tflops: 2.0 * forward / median / 1e12,
        device_memory_reserved: device.memory_pool_usage().map(|u| u.bytes_reserved),
        step_s: times,
        losses: step_losses,
        image_tokens: image_count,
        trainable_tensors: names.len(),
    })
}

/// One step's loss on fresh random inputs; also the image tokens per sample.
fn step_loss(
    adapter: &Adapter,
    config: &UNet2DConditionConfig,
    s: &BenchTrainSettings,
    obj: &ObjectiveConfig,
    dev: &Device,
) -> Result<(Tensor<1>, usize)> {
    let (b, n) = (s.batch, s.characters);
    let normal = Distribution::Normal(0.0, 1.0);
    let chars = (0..b)
        .map(|_| CharacterFeatures {
            id_embeds: Tensor::random([n, 512], normal, dev),
            body: Tensor::random([n, s.clip_tokens, s.clip_dim], normal, dev),
            face: Tensor::random([n, s.clip_tokens, s.clip_dim], normal, dev),
            drop_face: false,
            drop_body: false,
        })
        .collect();
    let (tokens, ip_bias) = image_tokens(&adapter.ppr, chars, dev);
    let [_, image, cross] = tokens.dims();
    let text = Tensor::random([b, s.text_tokens, cross], normal, dev);
    let ctx = AttnContext {
        scales: AdapterScales::default(),
        record: recorded_layers(adapter, obj),
        ip_bias,
        kernel: obj.attention,
        key_bias: None,
    };
    let (h, w) = (s.height, s.width);
    let out = adapter.unet.forward(
        UNetInput {
            control: None,
            sample: Tensor::random([b, config.in_channels, h, w], normal, dev),
            timestep: Tensor::from_data(TensorData::new(vec![500.0f32; b], [b]), dev),
            encoder_hidden_states: Tensor::cat(vec![text, tokens], 1),
            text_embeds: config.projection_class_embeddings_input_dim.map(|p| {
                let text = p - 6 * config.addition_time_embed_dim.unwrap_or(0);
                Tensor::random([b, text], normal, dev)
            }),
            time_ids: config.addition_embed_type.as_ref().map(|_| {
                let ids = [1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(b);
                Tensor::from_data(TensorData::new(ids, [b, 6]), dev)
            }),
        },
        &ctx,
    );
    let max_chars = adapter.spec.ppr.max_characters;
    let masks = Tensor::<4>::random([b, max_chars, h, w], Distribution::Uniform(0.0, 1.0), dev)
        .greater_elem(0.5)
        .float();
    let characters = vec![n; b];
    let targets = LossTargets {
        target: Tensor::random([b, config.out_channels, h, w], normal, dev),
        masks,
        keep: Tensor::ones([b], dev),
        sample_weights: Tensor::ones([b], dev),
        characters: &characters,
        tokens_per_slot: adapter.spec.ppr.tokens_per_slot(),
    };
    Ok((losses(out, targets, obj).total, image))
}
