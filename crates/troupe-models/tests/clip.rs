//! Parity of the burn CLIP encoders with transformers on tiny random-weight models.
//! Fixtures: `scripts/make_clip_fixtures.py`.

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_models::clip::{ClipTextModel, ClipVisionModel, encode_sdxl_prompt};
use troupe_models::error::ModelError;
use troupe_models::weights::StateDict;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(name)
}

fn check_text(name: &str) {
    let device = Device::flex();
    let (model, _) = ClipTextModel::from_dir(&fixture(name), &device, Some(DType::F32)).unwrap();
    let mut io = StateDict::from_file(fixture(name).join("io.safetensors")).unwrap();
    let out = model.forward(io.take_int("input_ids", &device).unwrap());
    for (key, got) in [
        ("last_hidden_state", out.last_hidden_state),
        ("penultimate_hidden_state", out.penultimate_hidden_state),
    ] {
        let e = max_abs_diff(got, io.take_any::<3>(key, &device).unwrap());
        assert!(e <= 1e-4, "{name} {key}: max abs error {e}");
    }
    let e = max_abs_diff(out.pooled, io.take_any::<2>("pooled", &device).unwrap());
    assert!(e <= 1e-4, "{name} pooled: max abs error {e}");
    if io.shape("text_embeds").is_some() {
        let want = io.take_any::<2>("text_embeds", &device).unwrap();
        let e = max_abs_diff(out.text_embeds.expect("projection model"), want);
        assert!(e <= 1e-4, "{name} text_embeds: max abs error {e}");
    } else {
        assert!(out.text_embeds.is_none());
    }
}

#[test]
fn text_model_quick_gelu_legacy_pooling_matches() {
    check_text("text_quick");
}

#[test]
fn text_model_with_projection_matches() {
    check_text("text_proj");
}

#[test]
fn f16_text_weights_upcast_match() {
    check_text("text_proj_f16");
}

#[test]
fn vision_model_matches() {
    let device = Device::flex();
    let (model, _) =
        ClipVisionModel::from_dir(&fixture("vision"), &device, Some(DType::F32)).unwrap();
    let mut io = StateDict::from_file(fixture("vision/io.safetensors")).unwrap();
    let out = model.forward(io.take_any("pixel_values", &device).unwrap());
    let e = max_abs_diff(
        out.penultimate_hidden_state,
        io.take_any::<3>("penultimate_hidden_state", &device)
            .unwrap(),
    );
    assert!(e <= 1e-4, "penultimate: max abs error {e}");
    let e = max_abs_diff(
        out.image_embeds,
        io.take_any::<2>("image_embeds", &device).unwrap(),
    );
    assert!(e <= 1e-4, "image_embeds: max abs error {e}");
}

#[test]
fn sdxl_prompt_encoding_concatenates_penultimate_states() {
    let device = Device::flex();
    let (te1, _) =
        ClipTextModel::from_dir(&fixture("text_quick"), &device, Some(DType::F32)).unwrap();
    let (te2, _) =
        ClipTextModel::from_dir(&fixture("text_proj"), &device, Some(DType::F32)).unwrap();
    let mut io1 = StateDict::from_file(fixture("text_quick/io.safetensors")).unwrap();
    let mut io2 = StateDict::from_file(fixture("text_proj/io.safetensors")).unwrap();
    let (embeds, pooled) = encode_sdxl_prompt(
        &te1,
        &te2,
        io1.take_int("input_ids", &device).unwrap(),
        io2.take_int("input_ids", &device).unwrap(),
    );
    assert_eq!(embeds.dims(), [3, 77, 64]);
    let first = embeds.clone().narrow(2, 0, 32);
    let second = embeds.narrow(2, 32, 32);
    assert!(
        max_abs_diff(
            first,
            io1.take_any::<3>("penultimate_hidden_state", &device)
                .unwrap()
        ) <= 1e-4
    );
    assert!(
        max_abs_diff(
            second,
            io2.take_any::<3>("penultimate_hidden_state", &device)
                .unwrap()
        ) <= 1e-4
    );
    assert!(max_abs_diff(pooled, io2.take_any::<2>("text_embeds", &device).unwrap()) <= 1e-4);
}

#[test]
fn missing_key_and_bad_config_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("vision");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"patch_size\": 8", "\"patch_size\": 7"),
    )
    .unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = ClipVisionModel::from_dir(tmp.path(), &Device::flex(), None).unwrap_err();
    assert!(
        matches!(err, ModelError::Config(_)) && err.to_string().contains("patch_size"),
        "{err}"
    );

    // A text folder with a config claiming one more layer: that layer's keys are missing.
    let src = fixture("text_quick");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
    )
    .unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = ClipTextModel::from_dir(tmp.path(), &Device::flex(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.layers.3.self_attn.q_proj.weight") && err.contains("missing keys"),
        "{err}"
    );
}
