//! `troupe debug …` subcommands: look inside model components.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use troupe_models::tokenizer::ClipTokenizer;

#[derive(Subcommand)]
pub enum DebugCommand {
    /// Tokenise prompts as SDXL's CLIP tokenizer does; prints each prompt's ids on one line.
    Tokenize {
        /// Tokenizer folder (e.g. SDXL's `tokenizer/` or `tokenizer_2/`): `tokenizer.json`, or
        /// `vocab.json` + `merges.txt`, with `tokenizer_config.json` / `special_tokens_map.json`.
        #[arg(long)]
        model: PathBuf,
        /// Prompts to tokenise.
        #[arg(required = true)]
        prompts: Vec<String>,
    },
    /// Decode an image as the data loader does (JPEG through libjpeg-turbo's decoder, as
    /// Pillow) and write its 8-bit RGB pixels as PNG, to compare with
    /// `Image.open(IMAGE).convert("RGB")`. With `--repeat N`, also print the decode throughput.
    Decode {
        /// The image file.
        image: PathBuf,
        /// Where to write the RGB pixels (PNG).
        #[arg(long)]
        out: PathBuf,
        /// Decode this many times and print megapixels per second (one core).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Time UNet forward passes of a config with random weights (no weight files needed);
    /// `scripts/bench_unet.py` runs diffusers on the same config and prints the ratio.
    BenchUnet(BenchUnetArgs),
    /// Time one adapter training step (PPR, UNet forward with the adapter and attention maps,
    /// both losses, backward, AdamW) on random weights of any UNet config: ms/step, samples/s,
    /// device memory, TFLOP/s and MFU. `scripts/bench_train_gpu.py` times the same step in
    /// PyTorch.
    BenchTrain(BenchTrainArgs),
    /// Run one forward pass of a component on named tensors and write the named outputs, to
    /// compare weights with diffusers/transformers. Tensor names per component: see
    /// `crates/troupe-models/src/component.rs` (e.g. `unet`: sample, timestep,
    /// encoder_hidden_states[, text_embeds, time_ids] → out; `controlnet`: the same plus
    /// controlnet_cond[, conditioning_scale] → down_block_res_samples.{i},
    /// mid_block_res_sample).
    Forward {
        /// unet, controlnet, text-encoder, text-encoder-2, image-encoder, vae-encoder,
        /// vae-decoder or ppr.
        #[arg(long)]
        component: String,
        /// Component folder (diffusers/transformers layout); for `ppr`, the adapter file.
        #[arg(long)]
        model: PathBuf,
        /// StoryMaker adapter `.safetensors` whose processors are attached to the UNet.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Scale of the adapter's LoRA deltas (training 1.0; StoryMaker inference 0.8).
        #[arg(long, default_value_t = 1.0)]
        lora_scale: f64,
        /// Scale of the image-attention branch (training 1.0; StoryMaker inference 0.8).
        #[arg(long, default_value_t = 1.0)]
        ip_scale: f64,
        /// Input tensors (`.safetensors`).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (`.safetensors`, f32).
        #[arg(long)]
        output: PathBuf,
    },
}

/// The batch and latent size of a benchmark.
#[derive(clap::Args)]
pub struct LatentBatch {
    /// Samples per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Latent height (128 for 1024² images).
    #[arg(long, default_value_t = 32)]
    height: usize,
    /// Latent width.
    #[arg(long, default_value_t = 32)]
    width: usize,
}

#[derive(clap::Args)]
pub struct BenchUnetArgs {
    /// A diffusers `unet/config.json` (random weights).
    #[arg(long, required_unless_present = "model")]
    config: Option<PathBuf>,
    /// A diffusers `unet/` folder: load its weights (reports load time and peak memory).
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// With `--model`: keep the stored precision (f16 stays f16) instead of converting to f32.
    #[arg(long)]
    keep_dtype: bool,
    #[command(flatten)]
    shape: LatentBatch,
    /// Text tokens in `encoder_hidden_states`.
    #[arg(long, default_value_t = 77)]
    seq: usize,
    /// Timed forward passes (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up passes.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    /// A diffusers `unet/config.json` (random weights; the real SDXL config times the real step).
    #[arg(long)]
    unet_config: PathBuf,
    /// `cpu`, `cuda[:N]` or `vulkan[:N]`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    shape: LatentBatch,
    /// Characters per image.
    #[arg(long, default_value_t = 1)]
    characters: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 128)]
    lora_rank: usize,
    /// Width of the CLIP image features (1280: ViT-H/14).
    #[arg(long, default_value_t = 1280)]
    clip_dim: usize,
    /// PPR resampler head width (64; at most the UNet's cross-attention width).
    #[arg(long, default_value_t = 64)]
    ppr_dim_head: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The device's peak TFLOP/s at the computed precision, for MFU (e.g. 989 for an H100/H200
    /// in dense bf16, 67 in f32).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// The attention op: `efficient` (backward recomputes the probabilities) or `plain`
    /// (burn's attention, which keeps them): same numbers, different memory.
    #[arg(long, default_value = "efficient")]
    attention: troupe_models::attention::AttentionKernel,
    /// Precision of the frozen UNet: `f32`, `bf16` or `f16` (the adapter stays f32).
    #[arg(long, default_value = "f32")]
    dtype: troupe_models::weights::Precision,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: DebugCommand) -> Result<ExitCode> {
    match cmd {
        DebugCommand::Tokenize { model, prompts } => {
            let tok = ClipTokenizer::from_dir(&model)
                .with_context(|| format!("loading the tokenizer in {}", model.display()))?;
            let mut out = std::io::stdout().lock();
            for prompt in &prompts {
                let ids = tok.encode(prompt)?;
                let line: Vec<String> = ids.iter().map(u32::to_string).collect();
                writeln!(out, "{}", line.join(" "))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::Decode { image, out, repeat } => {
            use troupe_data::image_io::{DecodeLimits, decode_rgb};
            let bytes =
                std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let at = troupe_data::Location::file(&image);
            let started = std::time::Instant::now();
            let mut rgb = decode_rgb(&bytes, &at, DecodeLimits::default())?;
            for _ in 1..repeat {
                rgb = decode_rgb(&bytes, &at, DecodeLimits::default())?;
            }
            let secs = started.elapsed().as_secs_f64();
            if repeat > 1 {
                let mp = (rgb.width() * rgb.height()) as f64 / 1e6 * repeat as f64;
                println!("{:.1} MP/s", mp / secs);
            }
            let png = troupe_data::image_io::encode_png_rgb(&rgb);
            troupe_diffusion::gallery::write_atomic(&out, &png)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::BenchUnet(args) => bench_unet(args),
        DebugCommand::BenchTrain(args) => bench_train(args),
        DebugCommand::Forward {
            component,
            model,
            adapter,
            lora_scale,
            ip_scale,
            inputs,
            output,
        } => {
            use troupe_models::component::{Component, forward};
            use troupe_models::weights::{StateDict, write_safetensors};
            let Some(c) = Component::from_name(&component) else {
                let names: Vec<&str> = Component::ALL.iter().map(|(n, _)| *n).collect();
                anyhow::bail!(
                    "unknown component `{component}` (one of: {})",
                    names.join(", ")
                );
            };
            let mut ins = StateDict::from_file(&inputs)?;
            let device = burn::prelude::Device::flex();
            let scales = troupe_models::attention::AdapterScales {
                lora: lora_scale,
                ip: ip_scale,
                text_tokens: 77,
            };
            let outs = forward(c, &model, adapter.as_deref(), scales, &mut ins, &device)?;
            let unused = ins.keys();
            if !unused.is_empty() {
                eprintln!(
                    "note: inputs not used by {component}: {}",
                    unused.join(", ")
                );
            }
            write_safetensors(&output, &outs, None)?;
            for (name, t) in &outs {
                println!("{name}: {:?}", t.shape);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn bench_unet(args: BenchUnetArgs) -> Result<ExitCode> {
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use troupe_models::attention::AttnContext;
    use troupe_models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetInput};

    let device = Device::flex();
    let config_path = match (&args.config, &args.model) {
        (Some(c), _) => c.clone(),
        (None, Some(m)) => m.join("config.json"),
        (None, None) => unreachable!("clap requires one"),
    };
    let config = UNet2DConditionConfig::from_file(&config_path)?;
    let rss_before = peak_rss_mb();
    let mut load = None;
    let unet = match &args.model {
        Some(dir) => {
            let t = std::time::Instant::now();
            let dtype = (!args.keep_dtype).then_some(burn::tensor::DType::F32);
            let (unet, report) = UNet2DConditionModel::from_dir(dir, &device, dtype)?;
            load = Some((t.elapsed().as_secs_f64(), report.parameters, peak_rss_mb()));
            unet
        }
        None => UNet2DConditionModel::new(&config, &device)?,
    };
    let b = args.shape.batch;
    let cross = config.down_blocks(&config_path.display().to_string())?[0].cross_attention_dim;
    let normal = Distribution::Normal(0.0, 1.0);
    let input = || UNetInput {
        control: None,
        sample: Tensor::random(
            [b, config.in_channels, args.shape.height, args.shape.width],
            normal,
            &device,
        ),
        timestep: Tensor::from_data(TensorData::new(vec![500.0f32; b], [b]), &device),
        encoder_hidden_states: Tensor::random([b, args.seq, cross], normal, &device),
        text_embeds: config.projection_class_embeddings_input_dim.map(|p| {
            let text = p - 6 * config.addition_time_embed_dim.unwrap_or(0);
            Tensor::random([b, text], normal, &device)
        }),
        time_ids: config.addition_embed_type.as_ref().map(|_| {
            let ids = [1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(b);
            Tensor::from_data(TensorData::new(ids, [b, 6]), &device)
        }),
    };
    let ctx = AttnContext::default();
    let run = || {
        let out = unet.forward(input(), &ctx).sample;
        out.into_data(); // waits for the result
    };
    for _ in 0..args.warmup {
        run();
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters.max(1) {
        let t = std::time::Instant::now();
        run();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    if let Some((secs, params, peak)) = load {
        eprintln!(
            "loaded {params} parameters in {secs:.2} s; peak RSS {peak:.1} MB after loading (before: {rss_before:.1} MB)"
        );
    }
    if args.json {
        let load = load.map(|(s, p, peak)| {
            serde_json::json!({"load_s": s, "parameters": p, "peak_rss_mb": peak, "rss_before_mb": rss_before})
        });
        println!(
            "{}",
            serde_json::json!({"median_s": median, "times_s": times, "threads": threads, "load": load})
        );
    } else {
        println!(
            "UNet forward, batch {b}, latent {}x{}: median {median:.4} s over {} runs ({threads} threads)",
            args.shape.height,
            args.shape.width,
            times.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_train(args: BenchTrainArgs) -> Result<ExitCode> {
    use troupe_models::unet::UNet2DConditionConfig;
    use troupe_train::bench::{BenchTrainSettings, bench_train};

    let device = troupe_train::device::parse_device_for(&args.device, "--device")
        .map_err(anyhow::Error::msg)?;
    let config = UNet2DConditionConfig::from_file(&args.unet_config)?;
    let settings = BenchTrainSettings {
        batch: args.shape.batch,
        height: args.shape.height,
        width: args.shape.width,
        text_tokens: 77,
        characters: args.characters,
        lora_rank: args.lora_rank,
        ppr_dim_head: args.ppr_dim_head,
        clip_dim: args.clip_dim,
        clip_tokens: 257,
        steps: args.steps.max(1),
        warmup: args.warmup,
        attention: args.attention,
        dtype: args.dtype,
    };
    let r = bench_train(&config, &settings, &device)?;
    let mfu = args.peak_tflops.map(|p| r.tflops / p);
    let rss = peak_rss_mb();
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["mfu"] = mfu.into();
        v["peak_rss_mb"] = rss.into();
        v["device"] = args.device.clone().into();
        v["batch"] = args.shape.batch.into();
        v["latent"] = serde_json::json!([args.shape.height, args.shape.width]);
        v["attention"] = serde_json::to_value(args.attention)?;
        v["dtype"] = serde_json::to_value(args.dtype)?;
        println!("{v}");
    } else {
        let memory = r
            .device_memory_reserved
            .map_or(format!("peak RSS {rss:.0} MB"), |b| {
                format!(
                    "device memory reserved {:.2} GiB",
                    b as f64 / (1u64 << 30) as f64
                )
            });
        let mfu = mfu.map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m));
        println!(
            "train step, batch {}, latent {}x{} ({} image tokens): {:.1} ms/step, {:.3} samples/s, {:.2} TFLOP/s{mfu}; {memory}",
            args.shape.batch,
            args.shape.height,
            args.shape.width,
            r.image_tokens,
            1000.0 * r.median_s,
            r.samples_per_s,
            r.tflops
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Peak resident memory of this process in MB (`VmHWM`; 0 where /proc is unavailable).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
