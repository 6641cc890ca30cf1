//! Parity of the burn UNet2DConditionModel (and the StoryMaker processors) with diffusers on
//! tiny random-weight models. Fixtures: `scripts/make_unet_fixtures.py`.

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_models::attention::{AdapterScales, AttnContext};
use troupe_models::error::ModelError;
use troupe_models::unet::{UNet2DConditionModel, UNetInput};
use troupe_models::weights::{StateDict, StoredDType, WeightError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn inputs(io: &mut StateDict, device: &Device) -> UNetInput {
    UNetInput {
        control: None,
        sample: io.take_any("sample", device).unwrap(),
        timestep: io.take_any("timestep", device).unwrap(),
        encoder_hidden_states: io.take_any("encoder_hidden_states", device).unwrap(),
        text_embeds: io
            .shape("text_embeds")
            .is_some()
            .then(|| io.take_any("text_embeds", device).unwrap()),
        time_ids: io
            .shape("time_ids")
            .is_some()
            .then(|| io.take_any("time_ids", device).unwrap()),
    }
}

/// Loads `model`, runs `io_{case}` and returns the max abs error against diffusers.
fn error_of(model: &str, case: &str, dtype: Option<DType>) -> f32 {
    let device = Device::flex();
    let (unet, _) = UNet2DConditionModel::from_dir(&fixture(model), &device, dtype).unwrap();
    let mut io =
        StateDict::from_file(fixture(model).join(format!("io_{case}.safetensors"))).unwrap();
    let out = unet.forward(inputs(&mut io, &device), &AttnContext::default());
    max_abs_diff(out.sample, io.take_any::<4>("out", &device).unwrap())
}

#[test]
fn sdxl_layout_matches_diffusers() {
    let e = error_of("sdxl_tiny", "even", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn odd_latent_size_forwards_skip_sizes_to_upsamplers() {
    // 14×10 latent: 10 → 5 → 3 on the way down, so the up path must resize 3 → 5 → 10.
    let e = error_of("sdxl_tiny", "odd", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn sd15_layout_with_conv_projections_matches_diffusers() {
    let e = error_of("sd15_tiny", "even", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn f16_weights_upcast_to_f32_match() {
    // The f16 file's reference output was computed with the same f16-rounded weights in f32.
    let e = error_of("sd15_tiny_f16", "even", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn f16_weights_can_stay_half_precision() {
    let device = Device::flex();
    let dir = fixture("sd15_tiny_f16");
    let (unet, report) = UNet2DConditionModel::from_dir(&dir, &device, None).unwrap();
    assert_eq!(unet.conv_in.weight.val().dtype(), DType::F16);
    assert_eq!(report.dtypes.len(), 1, "{:?}", report.dtypes);
    let mut io = StateDict::from_file(dir.join("io_even.safetensors")).unwrap();
    let out = unet.forward(inputs(&mut io, &device), &AttnContext::default());
    // Computed in f16, handed back in f32 for losses and samplers.
    assert_eq!(out.sample.dtype(), DType::F32);
    // Half-precision arithmetic: a loose bound, still far below the output scale (~1).
    let e = max_abs_diff(out.sample, io.take_any::<4>("out", &device).unwrap());
    assert!(e <= 5e-2, "max abs error {e}");
}

#[test]
fn storymaker_processors_match_reference() {
    let device = Device::flex();
    let (mut unet, _) =
        UNet2DConditionModel::from_dir(&fixture("sdxl_tiny"), &device, Some(DType::F32)).unwrap();
    let mut sd = StateDict::from_file(fixture("sdxl_tiny_adapter.safetensors")).unwrap();
    let rank = unet.load_adapter(&mut sd, "ip_adapter", &device).unwrap();
    assert_eq!(rank, 4);
    sd.finish("adapter").unwrap();

    let processors = unet.processors();
    let cross: Vec<usize> = processors
        .iter()
        .filter(|p| p.cross_attention_dim.is_some())
        .map(|p| p.index)
        .collect();
    let ctx = AttnContext {
        scales: AdapterScales {
            lora: 0.8,
            ip: 0.7,
            text_tokens: 77,
        },
        record: cross.clone(),
        ..AttnContext::default()
    };
    let mut io = StateDict::from_file(fixture("sdxl_tiny/io_adapter.safetensors")).unwrap();
    let out = unet.forward(inputs(&mut io, &device), &ctx);
    let e = max_abs_diff(out.sample, io.take_any::<4>("out", &device).unwrap());
    assert!(e <= 1e-4, "output max abs error {e}");

    assert_eq!(out.attn_probs.len(), cross.len());
    for p in out.attn_probs {
        let expected = io
            .take_any::<3>(&format!("attn_probs.{}", p.index), &device)
            .unwrap();
        let e = max_abs_diff(p.probs, expected);
        assert!(e <= 1e-4, "attn_probs.{} max abs error {e}", p.index);
    }
}

#[test]
fn processor_names_follow_diffusers_order() {
    let device = Device::flex();
    let (unet, _) =
        UNet2DConditionModel::from_dir(&fixture("sdxl_tiny"), &device, Some(DType::F32)).unwrap();
    let names: Vec<String> = unet.processors().into_iter().map(|p| p.name).collect();
    // Down blocks, then up blocks, then the mid block (diffusers registration order).
    assert_eq!(
        names[0],
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    );
    assert_eq!(
        names[1],
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    );
    assert_eq!(
        names[4],
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    );
    assert_eq!(
        names[12],
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    );
    assert_eq!(
        names.last().unwrap(),
        "mid_block.attentions.0.transformer_blocks.1.attn2.processor"
    );
    // 2 down attentions × (1 + 2 blocks) + 3 up × (2 + 1) + mid 2 blocks = 17 blocks, 34 processors.
    assert_eq!(names.len(), 34);
}

#[test]
fn missing_and_unexpected_keys_are_all_named() {
    let device = Device::flex();
    let dir = fixture("sd15_tiny");
    let config =
        troupe_models::unet::UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let mut unet = UNet2DConditionModel::new(&config, &device).unwrap();
    let mut sd = StateDict::from_dir(&dir, "diffusion_pytorch_model")
        .unwrap()
        .check_only();
    sd.remove("mid_block.attentions.0.proj_in.weight");
    sd.remove("conv_out.bias");
    unet.load(&mut sd, "");
    let msg = sd.finish("UNet2DConditionModel").unwrap_err().to_string();
    assert!(
        msg.contains("mid_block.attentions.0.proj_in.weight"),
        "{msg}"
    );
    assert!(msg.contains("conv_out.bias"), "{msg}");

    // A config with one more layer per block: its extra keys are missing, listed by name.
    let mut config = config;
    config.layers_per_block = troupe_models::unet::PerBlock::One(2);
    let mut unet = UNet2DConditionModel::new(&config, &device).unwrap();
    let mut sd = StateDict::from_dir(&dir, "diffusion_pytorch_model")
        .unwrap()
        .check_only();
    unet.load(&mut sd, "");
    match sd.finish("UNet2DConditionModel").unwrap_err() {
        WeightError::Keys { missing, .. } => {
            assert!(
                missing.contains(&"down_blocks.0.resnets.1.conv1.weight".to_string()),
                "{missing:?}"
            )
        }
        other => panic!("{other}"),
    }
}

#[test]
fn unsupported_config_values_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("sd15_tiny/config.json")).unwrap();
    let bad = text.replace("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    std::fs::write(dir.path().join("config.json"), bad).unwrap();
    let err = UNet2DConditionModel::from_dir(dir.path(), &Device::flex(), None).unwrap_err();
    assert!(matches!(err, ModelError::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("down_block_types") && msg.contains("SimpleCrossAttnDownBlock2D"),
        "{msg}"
    );
}

#[test]
fn export_round_trips_the_adapter_keys_and_layouts() {
    let device = Device::flex();
    let (mut unet, _) =
        UNet2DConditionModel::from_dir(&fixture("sdxl_tiny"), &device, Some(DType::F32)).unwrap();
    let path = fixture("sdxl_tiny_adapter.safetensors");
    let mut sd = StateDict::from_file(&path).unwrap();
    unet.load_adapter(&mut sd, "ip_adapter", &device).unwrap();
    let mut exp = StateDict::exporter();
    for attn in unet.attentions_mut() {
        let i = attn.index;
        attn.adapter
            .as_mut()
            .unwrap()
            .load(&mut exp, &format!("ip_adapter.{i}"));
    }
    let exported = exp.into_exported();
    let mut original = StateDict::from_file(&path).unwrap();
    assert_eq!(exported.len(), original.keys().len());
    for (key, t) in exported {
        let want: Tensor<2> = original.take_any(&key, &device).unwrap();
        assert_eq!(want.dims().to_vec(), t.shape, "{key}");
        assert_eq!(
            want.into_data().try_to_vec::<f32>().unwrap(),
            t.to_f32_vec().unwrap(),
            "{key}"
        );
    }
}

#[test]
fn loading_never_runs_the_random_initialisation() {
    // Parameters stay lazy until loaded, so an SDXL-size load holds one copy of the weights.
    let device = Device::flex();
    let dir = fixture("sd15_tiny");
    let config =
        troupe_models::unet::UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let mut unet = UNet2DConditionModel::new(&config, &device).unwrap();
    assert!(!unet.conv_in.weight.is_initialized());
    assert!(
        !unet.up_blocks[1].attentions[0].transformer_blocks[0]
            .ff
            .proj
            .weight
            .is_initialized()
    );
    let mut sd = StateDict::from_dir(&dir, "diffusion_pytorch_model").unwrap();
    unet.load(&mut sd, "");
    sd.finish("UNet2DConditionModel").unwrap();
    assert!(unet.conv_in.weight.is_initialized());
}

#[test]
fn sharded_weights_load_through_their_index() {
    // diffusers' `save_pretrained(max_shard_size=…)`: six shards and the index JSON.
    let e = error_of("sd15_tiny_sharded", "even", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn bf16_weights_upcast_to_f32_match() {
    // The reference output was computed with the same bf16-rounded weights in f32.
    let device = Device::flex();
    let (_, report) =
        UNet2DConditionModel::from_dir(&fixture("sd15_tiny_bf16"), &device, Some(DType::F32))
            .unwrap();
    let stored: Vec<_> = report.dtypes.keys().copied().collect();
    assert_eq!(stored, [StoredDType::BF16], "{:?}", report.dtypes);
    let e = error_of("sd15_tiny_bf16", "even", Some(DType::F32));
    assert!(e <= 1e-4, "max abs error {e}");
}
