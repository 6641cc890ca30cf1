//! Parity of the burn PPR (`faceid_plus`) with a PyTorch reference on tiny sizes.
//! Fixtures come from `scripts/make_ppr_fixtures.py` (the sizes below must match it).

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use burn::prelude::*;
use troupe_models::ppr::{FaceIdPlus, FaceIdPlusConfig};
use troupe_models::weights::{StateDict, WeightError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ppr")
        .join(name)
}

fn tiny_config() -> FaceIdPlusConfig {
    FaceIdPlusConfig::new()
        .with_cross_attention_dim(32)
        .with_id_embeddings_dim(16)
        .with_clip_embeddings_dim(24)
        .with_num_tokens(4)
        .with_resampler_depth(2)
        .with_resampler_dim_head(8)
        .with_resampler_num_queries(16)
        .with_resampler_ff_mult(2)
        .with_max_characters(3)
}

fn load_model(device: &Device) -> FaceIdPlus {
    tiny_config()
        .init(device)
        .load_state_dict(fixture("weights.safetensors"))
        .expect("load weights")
}

fn io_tensor<const D: usize>(
    io: &mut StateDict,
    key: &str,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    io.take(key, shape, device).expect(key)
}

fn check(tag: &str, b: usize, drop_face: bool, drop_clip: bool) {
    let device = Device::flex();
    let model = load_model(&device);
    let mut io = StateDict::from_file(fixture("io.safetensors")).unwrap();
    let id = io_tensor(&mut io, &format!("{tag}.id_embeds"), [b, 16], &device);
    let clip = io_tensor(&mut io, &format!("{tag}.clip_embeds"), [b, 9, 24], &device);
    let face = io_tensor(&mut io, &format!("{tag}.face_embeds"), [b, 9, 24], &device);
    let expected = io_tensor(&mut io, &format!("{tag}.output"), [1 + b, 20, 32], &device);
    let out = model.forward_with_drop(id, clip, face, drop_face, drop_clip);
    assert_eq!(out.dims(), [1 + b, 20, 32]);
    let err = max_abs_diff(out, expected);
    println!("{tag}: max abs err {err:e}");
    assert!(err <= 1e-4, "{tag}: max abs err {err}");
}

#[test]
fn parity_b1() {
    check("b1", 1, false, false);
}

#[test]
fn parity_b3() {
    check("b3", 3, false, false);
}

#[test]
fn parity_b2_drop_face() {
    check("b2_dropface", 2, true, false);
}

#[test]
fn forward_without_drop_matches_forward() {
    let device = Device::flex();
    let model = load_model(&device);
    let mut io = StateDict::from_file(fixture("io.safetensors")).unwrap();
    let id = io_tensor(&mut io, "b1.id_embeds", [1, 16], &device);
    let clip = io_tensor(&mut io, "b1.clip_embeds", [1, 9, 24], &device);
    let face = io_tensor(&mut io, "b1.face_embeds", [1, 9, 24], &device);
    let expected = io_tensor(&mut io, "b1.output", [2, 20, 32], &device);
    assert!(max_abs_diff(model.forward(id, clip, face), expected) <= 1e-4);
}

#[test]
fn missing_key_is_named() {
    let device = Device::flex();
    let mut sd = StateDict::from_file(fixture("weights.safetensors")).unwrap();
    let key = "perceiver_resampler.layers.1.0.to_kv.weight";
    assert!(sd.remove(key));
    let err = tiny_config().init(&device).load_from(sd).unwrap_err();
    assert!(
        matches!(&err, WeightError::Keys { missing, .. } if missing == &[key.to_string()]),
        "{err}"
    );
    assert!(err.to_string().contains(key));
}

#[test]
fn unexpected_key_and_shape_mismatch_are_reported() {
    let device = Device::flex();
    // Wrong config (depth 1): the second layer's keys are unexpected.
    let sd = StateDict::from_file(fixture("weights.safetensors")).unwrap();
    let err = tiny_config()
        .with_resampler_depth(1)
        .init(&device)
        .load_from(sd)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Keys { .. }), "{msg}");
    assert!(msg.contains("resample.layers.1.0.to_q.weight"), "{msg}");

    // Wrong width: shape mismatch names key, expected and found shapes.
    let sd = StateDict::from_file(fixture("weights.safetensors")).unwrap();
    let err = tiny_config()
        .with_max_characters(2)
        .init(&device)
        .load_from(sd)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pos_embed") && msg.contains("[2, 20, 32]") && msg.contains("[3, 20, 32]"),
        "{msg}"
    );
}

#[test]
fn default_config_shapes() {
    let c = FaceIdPlusConfig::new();
    assert_eq!(c.tokens_per_slot(), 20);
    assert_eq!(c.face_resampler().heads, 32);
    assert_eq!(c.char_resampler().heads, 20);
    assert_eq!(c.char_resampler().output_dim, 2048);
}
