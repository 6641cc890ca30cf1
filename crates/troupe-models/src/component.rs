//! One entry point per model component for tools: detect what a folder holds, inspect it
//! (config, parameter count, dtypes, missing/unexpected keys, without loading tensors), and run
//! one forward pass on named tensors (`troupe debug forward`), so anyone can compare their
//! weights with diffusers/transformers.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;

use crate::attention::{AdapterScales, AttnContext};
use crate::clip::{ClipConfig, ClipTextModel, ClipVisionModel};
use crate::controlnet::{ControlNetConfig, ControlNetInput, ControlNetModel};
use crate::error::{ConfigError, ModelError};
use crate::ppr::FaceIdPlusConfig;
use crate::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetInput};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::weights::{LoadReport, StateDict, StoredDType, WeightError, to_host};

/// The components `troupe debug forward` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `UNet2DConditionModel`.
    Unet,
    /// `ControlNetModel`.
    ControlNet,
    /// `CLIPTextModel` (SDXL `text_encoder/`).
    TextEncoder,
    /// `CLIPTextModelWithProjection` (SDXL `text_encoder_2/`).
    TextEncoder2,
    /// `CLIPVisionModelWithProjection`.
    ImageEncoder,
    /// `AutoencoderKL` encoder (latent mean).
    VaeEncoder,
    /// `AutoencoderKL` decoder.
    VaeDecoder,
    /// StoryMaker PPR (`image_proj_model`).
    Ppr,
}

impl Component {
    /// Every component with its command-line name.
    pub const ALL: [(&'static str, Component); 8] = [
        ("unet", Component::Unet),
        ("controlnet", Component::ControlNet),
        ("text-encoder", Component::TextEncoder),
        ("text-encoder-2", Component::TextEncoder2),
        ("image-encoder", Component::ImageEncoder),
        ("vae-encoder", Component::VaeEncoder),
        ("vae-decoder", Component::VaeDecoder),
        ("ppr", Component::Ppr),
    ];

    /// Parses a command-line name (`unet`, `text-encoder`, …).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }
}

/// Named tensors on the host, in a stable order.
pub type NamedTensors = Vec<(String, troupe_pt::Tensor)>;

/// Reads `config.json` of a model folder as JSON.
pub fn read_config(dir: &Path) -> Result<serde_json::Value, ModelError> {
    crate::error::read_json_config(&dir.join("config.json"))
}

/// Runs `component` once. `model` is the component folder (the adapter file for `ppr`),
/// `adapter` an optional StoryMaker adapter for the UNet, run with `scales`; `inputs` holds
/// the named inputs.
pub fn forward(
    component: Component,
    model: &Path,
    adapter: Option<&Path>,
    scales: AdapterScales,
    inputs: &mut StateDict,
    device: &Device,
) -> Result<NamedTensors, ModelError> {
    let f32 = Some(DType::F32);
    let out = match component {
        Component::Unet => {
            let (mut unet, _) = UNet2DConditionModel::from_dir(model, device, f32)?;
            if let Some(path) = adapter {
                let mut sd = StateDict::from_file(path)?;
                let prefix = if sd.shape("ip_adapter.0.to_q_lora.down.weight").is_some() {
                    "ip_adapter"
                } else {
                    ""
                };
                unet.load_adapter(&mut sd, prefix, device)?;
            }
            let channels = unet.conv_in.weight.lazy_shape().dims::<4>()[1];
            let cross = unet.processors().iter().find_map(|p| p.cross_attention_dim);
            let sample = input(inputs, "sample", [None, Some(channels), None, None], device)?;
            let b = Some(sample.dims()[0]);
            let input = UNetInput {
                control: None,
                timestep: input(inputs, "timestep", [b], device)?,
                encoder_hidden_states: input(
                    inputs,
                    "encoder_hidden_states",
                    [b, None, cross],
                    device,
                )?,
                text_embeds: optional(inputs, "text_embeds", [b, None], device)?,
                time_ids: optional(inputs, "time_ids", [b, None], device)?,
                sample,
            };
            if unet.add_embedding.is_some()
                && (input.text_embeds.is_none() || input.time_ids.is_none())
            {
                return Err(text_time_inputs(model));
            }
            let ctx = AttnContext {
                scales,
                ..AttnContext::default()
            };
            let out = unet.forward(input, &ctx);
            vec![("out".to_string(), to_host(out.sample))]
        }
        Component::ControlNet => {
            let (cn, _) = ControlNetModel::from_dir(model, device, f32)?;
            let channels = cn.conv_in.weight.lazy_shape().dims::<4>()[1];
            let sample = input(inputs, "sample", [None, Some(channels), None, None], device)?;
            let [b, _, h, w] = sample.dims();
            let f = cn.conditioning_downscale();
            let cond = [
                Some(b),
                Some(cn.conditioning_channels()),
                Some(h * f),
                Some(w * f),
            ];
            let scale = match optional::<1>(inputs, "conditioning_scale", [Some(1)], device)? {
                Some(t) => t
                    .into_data()
                    .convert::<f64>()
                    .as_slice::<f64>()
                    .expect("f64")[0],
                None => 1.0,
            };
            let cross = cn.cross_attention_dim();
            let input = ControlNetInput {
                timestep: input(inputs, "timestep", [Some(b)], device)?,
                encoder_hidden_states: input(
                    inputs,
                    "encoder_hidden_states",
                    [Some(b), None, cross],
                    device,
                )?,
                text_embeds: optional(inputs, "text_embeds", [Some(b), None], device)?,
                time_ids: optional(inputs, "time_ids", [Some(b), None], device)?,
                controlnet_cond: input(inputs, "controlnet_cond", cond, device)?,
                conditioning_scale: scale,
                sample,
            };
            if cn.add_embedding.is_some()
                && (input.text_embeds.is_none() || input.time_ids.is_none())
            {
                return Err(text_time_inputs(model));
            }
            let out = cn.forward(input, None);
            let mut v: NamedTensors = out
                .down
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("down_block_res_samples.{i}"), to_host(t)))
                .collect();
            v.push(("mid_block_res_sample".to_string(), to_host(out.mid)));
            v
        }
        Component::TextEncoder | Component::TextEncoder2 => {
            let (te, _) = ClipTextModel::from_dir(model, device, f32)?;
            let positions = te.position_embedding.weight.lazy_shape().dims::<2>()[0];
            let ids = match inputs.shape("input_ids") {
                Some([_, n]) if *n <= positions => inputs.take_int("input_ids", device)?,
                other => {
                    return Err(bad_input(
                        inputs,
                        "input_ids",
                        other,
                        &format!("[batch, ≤ {positions}]"),
                    ));
                }
            };
            let out = te.forward(ids);
            let mut v = vec![
                (
                    "last_hidden_state".to_string(),
                    to_host(out.last_hidden_state),
                ),
                (
                    "penultimate_hidden_state".to_string(),
                    to_host(out.penultimate_hidden_state),
                ),
                ("pooled".to_string(), to_host(out.pooled)),
            ];
            if let Some(t) = out.text_embeds {
                v.push(("text_embeds".to_string(), to_host(t)));
            }
            v
        }
        Component::ImageEncoder => {
            let (enc, _) = ClipVisionModel::from_dir(model, device, f32)?;
            let side = enc.image_size();
            let pixels = input(
                inputs,
                "pixel_values",
                [None, Some(3), Some(side), Some(side)],
                device,
            )?;
            let out = enc.forward(pixels);
            vec![
                (
                    "penultimate_hidden_state".to_string(),
                    to_host(out.penultimate_hidden_state),
                ),
                ("image_embeds".to_string(), to_host(out.image_embeds)),
            ]
        }
        Component::VaeEncoder => {
            let (vae, _) = AutoencoderKL::from_dir(model, device, f32)?;
            let channels = vae.encoder.conv_in.weight.lazy_shape().dims::<4>()[1];
            let pixels = input(
                inputs,
                "pixel_values",
                [None, Some(channels), None, None],
                device,
            )?;
            let mean = vae.encode_mean(pixels);
            vec![("latent_mean".to_string(), to_host(mean))]
        }
        Component::VaeDecoder => {
            let (vae, _) = AutoencoderKL::from_dir(model, device, f32)?;
            let channels = vae.latent_channels();
            let latents = input(
                inputs,
                "latents",
                [None, Some(channels), None, None],
                device,
            )?;
            let sample = vae.decode(latents);
            vec![("sample".to_string(), to_host(sample))]
        }
        Component::Ppr => {
            let mut sd = StateDict::from_file(model)?;
            let prefix = ppr_prefix(&sd);
            let config = FaceIdPlusConfig::from_state_dict(&sd, prefix)?;
            let mut ppr = config.init(device);
            ppr.load(&mut sd, prefix);
            sd.finish_part("PPR (faceid_plus)")?;
            let id = input(
                inputs,
                "id_embeds",
                [None, Some(config.id_embeddings_dim)],
                device,
            )?;
            let clip = Some(config.clip_embeddings_dim);
            let tokens = ppr.forward(
                id,
                input(inputs, "clip_char", [None, None, clip], device)?,
                input(inputs, "clip_face", [None, None, clip], device)?,
            );
            vec![("tokens".to_string(), to_host(tokens))]
        }
    };
    Ok(out)
}

/// The error for an SDXL model run without its `text_time` inputs.
fn text_time_inputs(model: &Path) -> ModelError {
    ConfigError::new(
        &model.join("config.json").display().to_string(),
        "addition_embed_type",
        "is text_time: the inputs need `text_embeds` and `time_ids`",
    )
    .into()
}

/// Takes input `key` after checking its shape against `want` (`None`: any size).
fn input<const D: usize>(
    inputs: &mut StateDict,
    key: &str,
    want: [Option<usize>; D],
    device: &Device,
) -> Result<Tensor<D>, ModelError> {
    let shape = inputs.shape(key);
    let fits = shape.is_some_and(|s| {
        s.len() == D && s.iter().zip(&want).all(|(n, w)| w.is_none_or(|w| *n == w))
    });
    if !fits && shape.is_some() {
        let expected: Vec<String> = want
            .iter()
            .map(|w| w.map_or("any".into(), |w| w.to_string()))
            .collect();
        return Err(bad_input(
            inputs,
            key,
            shape,
            &format!("[{}]", expected.join(", ")),
        ));
    }
    Ok(inputs.take_any(key, device)?)
}

/// The error for input `key` of shape `got` (`None`: absent) where `expected` was wanted.
fn bad_input(inputs: &StateDict, key: &str, got: Option<&[usize]>, expected: &str) -> ModelError {
    let got = got.map_or("absent".to_string(), |s| format!("{s:?}"));
    ConfigError::new(
        inputs.path(),
        key,
        format!("has shape {got}, expected {expected}"),
    )
    .into()
}

/// Takes `key` (checked as [`input`]) if the inputs have it.
fn optional<const D: usize>(
    inputs: &mut StateDict,
    key: &str,
    want: [Option<usize>; D],
    device: &Device,
) -> Result<Option<Tensor<D>>, ModelError> {
    if inputs.shape(key).is_some() {
        input(inputs, key, want, device).map(Some)
    } else {
        Ok(None)
    }
}

/// `image_proj_model` when the file holds a full adapter, `""` for a bare PPR state dict.
fn ppr_prefix(sd: &StateDict) -> &'static str {
    if sd.shape("image_proj_model.pos_embed").is_some() {
        "image_proj_model"
    } else {
        ""
    }
}

/// What [`inspect`] found about one component.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Folder or file inspected.
    pub path: String,
    /// Class name (diffusers/transformers, or `StoryMaker adapter`).
    pub component: String,
    /// Selected config values, as text.
    pub config: Vec<(String, String)>,
    /// Tensors in the weight files and their elements, per stored dtype.
    pub dtypes: BTreeMap<StoredDType, usize>,
    /// Parameters (elements) the model uses.
    pub parameters: u64,
    /// Keys the model needs that are absent.
    pub missing: Vec<String>,
    /// Keys present that the model does not use.
    pub unexpected: Vec<String>,
    /// Shape mismatches, as text.
    pub mismatched: Vec<String>,
}

/// Inspects a component folder, an SDXL pipeline folder (`model_index.json`: every component
/// sub-folder), or an adapter file. Only headers are read, except that an adapter's tensors
/// are read one at a time to check they are finite.
pub fn inspect(path: &Path) -> Result<Vec<Inspection>, ModelError> {
    if path.is_file() {
        return Ok(vec![inspect_adapter(path)?]);
    }
    if path.join("model_index.json").is_file() {
        let mut out = Vec::new();
        for sub in [
            "unet",
            "controlnet",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "image_encoder",
        ] {
            let dir = path.join(sub);
            if dir.join("config.json").is_file() {
                out.push(inspect_dir(&dir)?);
            }
        }
        return Ok(out);
    }
    Ok(vec![inspect_dir(path)?])
}

fn class_name(config: &serde_json::Value) -> String {
    config
        .get("_class_name")
        .and_then(|v| v.as_str())
        .or_else(|| config.pointer("/architectures/0").and_then(|v| v.as_str()))
        .unwrap_or("unknown")
        .to_string()
}

fn summary(config: &serde_json::Value, fields: &[&str]) -> Vec<(String, String)> {
    fields
        .iter()
        .filter_map(|f| config.get(*f).map(|v| (f.to_string(), v.to_string())))
        .collect()
}

/// Turns a check-only load into an [`Inspection`], keys problems included.
fn finish(
    path: &Path,
    component: String,
    config: Vec<(String, String)>,
    dtypes: BTreeMap<StoredDType, usize>,
    result: Result<LoadReport, WeightError>,
) -> Result<Inspection, ModelError> {
    let mut out = Inspection {
        path: path.display().to_string(),
        component,
        config,
        dtypes,
        parameters: 0,
        missing: Vec::new(),
        unexpected: Vec::new(),
        mismatched: Vec::new(),
    };
    match result {
        Ok(report) => out.parameters = report.parameters,
        Err(WeightError::Keys {
            missing,
            unexpected,
            shapes,
            ..
        }) => {
            out.missing = missing;
            out.unexpected = unexpected;
            out.mismatched = shapes
                .into_iter()
                .map(|m| format!("{}: file {:?}, model {:?}", m.key, m.found, m.expected))
                .collect();
        }
        Err(e) => return Err(e.into()),
    }
    Ok(out)
}

fn inspect_dir(dir: &Path) -> Result<Inspection, ModelError> {
    let config = read_config(dir)?;
    let class = class_name(&config);
    match class.as_str() {
        "UNet2DConditionModel" => {
            let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json"))?;
            let device = Device::flex();
            let mut unet = UNet2DConditionModel::new(&cfg, &device)?;
            let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.check_only();
            let dtypes = sd.dtype_counts();
            unet.load(&mut sd, "");
            let fields = [
                "block_out_channels",
                "layers_per_block",
                "transformer_layers_per_block",
                "attention_head_dim",
                "num_attention_heads",
                "cross_attention_dim",
                "use_linear_projection",
                "addition_embed_type",
                "down_block_types",
                "up_block_types",
            ];
            let mut summary = summary(&config, &fields);
            summary.push((
                "attention processors".into(),
                unet.processors().len().to_string(),
            ));
            finish(
                dir,
                class,
                summary,
                dtypes,
                sd.finish("UNet2DConditionModel"),
            )
        }
        "ControlNetModel" => {
            let cfg = ControlNetConfig::from_file(&dir.join("config.json"))?;
            let mut cn = ControlNetModel::new(&cfg, &Device::flex())?;
            let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.check_only();
            let dtypes = sd.dtype_counts();
            cn.load(&mut sd, "");
            let fields = [
                "block_out_channels",
                "layers_per_block",
                "transformer_layers_per_block",
                "attention_head_dim",
                "num_attention_heads",
                "cross_attention_dim",
                "addition_embed_type",
                "down_block_types",
                "conditioning_embedding_out_channels",
                "controlnet_conditioning_channel_order",
            ];
            let mut summary = summary(&config, &fields);
            summary.push((
                "residuals".into(),
                cn.controlnet_down_blocks.len().to_string(),
            ));
            finish(dir, class, summary, dtypes, sd.finish("ControlNetModel"))
        }
        "CLIPTextModel" | "CLIPTextModelWithProjection" | "CLIPVisionModelWithProjection" => {
            let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
            let device = Device::flex();
            let mut sd = StateDict::from_dir(dir, "model")?.check_only();
            let dtypes = sd.dtype_counts();
            let fields = [
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "projection_dim",
                "hidden_act",
                "vocab_size",
                "image_size",
                "patch_size",
            ];
            let result = if class == "CLIPVisionModelWithProjection" {
                ClipVisionModel::new(&cfg, &device)?.load(&mut sd);
                sd.finish(&class)
            } else {
                let projection = class == "CLIPTextModelWithProjection";
                ClipTextModel::new(&cfg, projection, &device).load(&mut sd);
                sd.finish(&class)
            };
            finish(
                dir,
                class.clone(),
                summary(&config, &fields),
                dtypes,
                result,
            )
        }
        "AutoencoderKL" => {
            let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
            let mut vae = AutoencoderKL::new(&cfg, &Device::flex())?;
            let mut sd = StateDict::from_dir(dir, "diffusion_pytorch_model")?.check_only();
            let dtypes = sd.dtype_counts();
            vae.load(&mut sd, "");
            let fields = [
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "norm_num_groups",
                "scaling_factor",
                "shift_factor",
            ];
            finish(
                dir,
                class,
                summary(&config, &fields),
                dtypes,
                sd.finish("AutoencoderKL"),
            )
        }
        other => Err(ConfigError::new(
            &dir.join("config.json").display().to_string(),
            "_class_name",
            format!("`{other}` is not a component troupe knows"),
        )
        .into()),
    }
}

fn inspect_adapter(path: &Path) -> Result<Inspection, ModelError> {
    // The file must match the architecture it declares; a torch zip (`mask.bin`) has no
    // safetensors header, so its tensors are read once and inspected from memory.
    let sd = if path.extension().is_some_and(|e| e == "safetensors") {
        crate::adapter_file::verify_file(path)?;
        StateDict::from_file(path)?
    } else {
        let file = crate::adapter_file::AdapterFile::read(path)?;
        file.verify()?;
        file.state_dict()?
    };
    let mut sd = sd.check_only();
    let dtypes = sd.dtype_counts();
    let keys = sd.keys();
    let mut config = Vec::new();
    let mut result = Ok(LoadReport::default());
    let has_ppr =
        sd.shape("pos_embed").is_some() || sd.shape("image_proj_model.pos_embed").is_some();
    if has_ppr {
        let prefix = ppr_prefix(&sd);
        let c = FaceIdPlusConfig::from_state_dict(&sd, prefix)?;
        config.extend([
            (
                "ppr cross_attention_dim".to_string(),
                c.cross_attention_dim.to_string(),
            ),
            (
                "ppr id_embeddings_dim".to_string(),
                c.id_embeddings_dim.to_string(),
            ),
            (
                "ppr clip_embeddings_dim".to_string(),
                c.clip_embeddings_dim.to_string(),
            ),
            (
                "ppr tokens per character".to_string(),
                c.tokens_per_slot().to_string(),
            ),
            (
                "ppr max characters".to_string(),
                c.max_characters.to_string(),
            ),
        ]);
        c.init(&Device::flex()).load(&mut sd, prefix);
        result = sd
            .finish_part("PPR (faceid_plus)")
            .map(|()| LoadReport::default());
    }
    let ppr_params = sd.report().parameters;
    // Processors: `ip_adapter.{i}.*`; report their count and LoRA rank.
    let processors = crate::adapter::processor_count(&keys);
    if let Some([r, _]) = sd.shape("ip_adapter.0.to_q_lora.down.weight") {
        config.push(("lora rank".into(), r.to_string()));
    }
    config.push(("attention processors".into(), processors.to_string()));
    let adapter_params: u64 = keys
        .iter()
        .filter(|k| k.starts_with("ip_adapter."))
        .filter_map(|k| sd.shape(k))
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    let mut out = finish(path, "StoryMaker adapter".into(), config, dtypes, result)?;
    out.parameters = ppr_params + adapter_params;
    // Left after the PPR: anything that is not a processor key is unexpected.
    out.unexpected = sd
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("ip_adapter."))
        .collect();
    Ok(out)
}
