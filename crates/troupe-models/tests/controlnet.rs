//! Parity of the burn ControlNetModel (and the UNet's residual inputs) with diffusers on tiny
//! random-weight models. Fixtures: `scripts/make_controlnet_fixtures.py`.

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_models::attention::AttnContext;
use troupe_models::controlnet::{ControlNetInput, ControlNetModel};
use troupe_models::unet::{UNet2DConditionModel, UNetInput};
use troupe_models::weights::StateDict;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn optional<const D: usize>(io: &mut StateDict, key: &str, device: &Device) -> Option<Tensor<D>> {
    io.shape(key)
        .is_some()
        .then(|| io.take_any(key, device).unwrap())
}

/// Runs the ControlNet `model` on `io_{case}`; returns the worst residual error and the
/// residuals with the io left for the UNet check.
fn check(model: &str, case: &str) -> (f32, StateDict, troupe_models::unet::ControlResiduals) {
    let device = Device::flex();
    let dir = fixtures().join("controlnet").join(model);
    let (cn, _) = ControlNetModel::from_dir(&dir, &device, Some(DType::F32)).unwrap();
    let mut io = StateDict::from_file(dir.join(format!("io_{case}.safetensors"))).unwrap();
    let scale = io.take_any::<1>("conditioning_scale", &device).unwrap();
    let input = ControlNetInput {
        sample: io.take_any("sample", &device).unwrap(),
        timestep: io.take_any("timestep", &device).unwrap(),
        encoder_hidden_states: io.take_any("encoder_hidden_states", &device).unwrap(),
        text_embeds: optional(&mut io, "text_embeds", &device),
        time_ids: optional(&mut io, "time_ids", &device),
        controlnet_cond: io.take_any("controlnet_cond", &device).unwrap(),
        conditioning_scale: scale.into_data().try_to_vec::<f32>().unwrap()[0] as f64,
    };
    let out = cn.forward(input.clone(), None);
    assert_eq!(out.down.len(), cn.controlnet_down_blocks.len());
    let mut worst = 0f32;
    for (i, d) in out.down.iter().enumerate() {
        let want = io
            .take_any::<4>(&format!("down_block_res_samples.{i}"), &device)
            .unwrap();
        worst = worst.max(max_abs_diff(d.clone(), want));
    }
    let want = io.take_any::<4>("mid_block_res_sample", &device).unwrap();
    worst = worst.max(max_abs_diff(out.mid.clone(), want));
    // Put the inputs back for the UNet.
    let mut rest = StateDict::from_file(dir.join(format!("io_{case}.safetensors"))).unwrap();
    rest.take_any::<1>("conditioning_scale", &device).unwrap();
    (worst, rest, out)
}

#[test]
fn sdxl_controlnet_matches_diffusers() {
    for case in ["even", "odd"] {
        let (e, _, _) = check("sdxl_tiny", case);
        assert!(e <= 1e-4, "{case}: max abs error {e}");
    }
}

#[test]
fn bgr_controlnet_with_conv_projections_matches_diffusers() {
    let (e, _, _) = check("sd15_bgr", "even");
    assert!(e <= 1e-4, "max abs error {e}");
}

#[test]
fn unet_adds_controlnet_residuals_as_diffusers() {
    let device = Device::flex();
    let unet_dir = fixtures().join("unet/sdxl_tiny");
    let (unet, _) = UNet2DConditionModel::from_dir(&unet_dir, &device, Some(DType::F32)).unwrap();
    for case in ["even", "odd"] {
        let (_, mut io, residuals) = check("sdxl_tiny", case);
        let input = UNetInput {
            sample: io.take_any("sample", &device).unwrap(),
            timestep: io.take_any("timestep", &device).unwrap(),
            encoder_hidden_states: io.take_any("encoder_hidden_states", &device).unwrap(),
            text_embeds: optional(&mut io, "text_embeds", &device),
            time_ids: optional(&mut io, "time_ids", &device),
            control: Some(residuals),
        };
        let out = unet.forward(input, &AttnContext::default());
        let e = max_abs_diff(out.sample, io.take_any::<4>("unet_out", &device).unwrap());
        assert!(e <= 1e-4, "{case}: max abs error {e}");
    }
}

#[test]
fn a_controlnet_of_another_layout_does_not_fit_the_unet() {
    let device = Device::flex();
    let (unet, _) = UNet2DConditionModel::from_dir(
        &fixtures().join("unet/sdxl_tiny"),
        &device,
        Some(DType::F32),
    )
    .unwrap();
    let dir = fixtures().join("controlnet");
    let (fits, _) = ControlNetModel::from_dir(&dir.join("sdxl_tiny"), &device, None).unwrap();
    fits.check_fits(&unet, "sdxl_tiny").unwrap();
    let (other, _) = ControlNetModel::from_dir(&dir.join("sd15_bgr"), &device, None).unwrap();
    let err = other.check_fits(&unet, "sd15_bgr").unwrap_err().to_string();
    assert!(
        err.contains("sd15_bgr") && err.contains("residual channels"),
        "{err}"
    );
}
