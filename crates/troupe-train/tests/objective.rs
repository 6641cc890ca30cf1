//! StoryMaker losses against a per-image PyTorch reference
//! (fixture: `scripts/make_objective_fixtures.py`).

use burn::prelude::*;
use troupe_models::weights::StateDict;
use troupe_train::losses::{attention_loss, character_region, noise_loss};

#[test]
fn losses_match_the_reference() {
    let device = Device::flex();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/objective.safetensors"
    );
    let mut f = StateDict::from_file(path).unwrap();
    let pred: Tensor<4> = f.take_any("pred", &device).unwrap();
    let target: Tensor<4> = f.take_any("target", &device).unwrap();
    let masks: Tensor<4> = f.take_any("masks", &device).unwrap();
    let keep: Tensor<1> = f.take_any("keep", &device).unwrap();
    let layers: Vec<Tensor<3>> = vec![
        f.take_any("layer0", &device).unwrap(),
        f.take_any("layer1", &device).unwrap(),
    ];
    let want_noise: f32 = f
        .take_any::<1>("noise_loss", &device)
        .unwrap()
        .into_scalar();
    let want_attn: f32 = f.take_any::<1>("attn_loss", &device).unwrap().into_scalar();

    let ones = Tensor::ones([2], &device);
    let noise: f32 = noise_loss(
        pred,
        target,
        character_region(masks.clone()),
        keep,
        ones,
        5.0,
    )
    .into_scalar();
    assert!(
        (noise - want_noise).abs() <= 1e-5 * want_noise.abs(),
        "{noise} vs {want_noise}"
    );

    let attn: f32 = attention_loss(&layers, [4, 4], masks, &[2, 1], 3).into_scalar();
    assert!(
        (attn - want_attn).abs() <= 1e-5 * want_attn.abs().max(1e-3),
        "{attn} vs {want_attn}"
    );
}
