//! Parity of the burn AutoencoderKL with diffusers on tiny random-weight models.
//! Fixtures: `scripts/make_vae_fixtures.py`.

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_models::error::ModelError;
use troupe_models::vae::{AutoencoderKL, AutoencoderKLConfig, LatentDist};
use troupe_models::weights::{StateDict, WeightError};

/// f32 parity bound (every fixture output is O(1)).
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

/// Max abs errors of one fixture: (latent mean, logvar, latent sample, decoded sample).
fn errors_of(model: &str, dtype: Option<DType>) -> [f32; 4] {
    let device = Device::flex();
    let dir = fixture(model);
    let (vae, _) = AutoencoderKL::from_dir(&dir, &device, dtype).unwrap();
    let mut io = StateDict::from_file(dir.join("io.safetensors")).unwrap();
    let pixels: Tensor<4> = io.take_any("pixel_values", &device).unwrap();
    let dist = vae.encode_dist(pixels);
    let noise: Tensor<4> = io.take_any("noise", &device).unwrap();
    let sample = dist.sample(noise);
    let decoded = vae.decode(io.take_any("latents", &device).unwrap());
    let mut take = |k: &str| io.take_any::<4>(k, &device).unwrap();
    let e = [
        max_abs_diff(dist.mean, take("latent_mean")),
        max_abs_diff(dist.logvar, take("logvar")),
        max_abs_diff(sample, take("latent_sample")),
        max_abs_diff(decoded, take("sample")),
    ];
    eprintln!(
        "{model}: mean {:.2e}, logvar {:.2e}, sample {:.2e}, decode {:.2e}",
        e[0], e[1], e[2], e[3]
    );
    e
}

fn assert_parity(model: &str, dtype: Option<DType>, tol: f32) {
    let names = ["latent_mean", "logvar", "latent_sample", "sample"];
    for (name, e) in names.iter().zip(errors_of(model, dtype)) {
        assert!(e <= tol, "{model} {name}: max abs error {e}");
    }
}

#[test]
fn two_blocks_match_diffusers() {
    assert_parity("kl_2block", Some(DType::F32), TOL);
}

#[test]
fn three_blocks_two_layers_match_diffusers() {
    assert_parity("kl_3block", Some(DType::F32), TOL);
}

#[test]
fn four_blocks_without_attention_or_quant_convs_match_diffusers() {
    assert_parity("kl_4block_bare", Some(DType::F32), TOL);

    // Non-square input: 24×40 → 3×5 latents through three asymmetric-padding downsamplers.
    let device = Device::flex();
    let dir = fixture("kl_4block_bare");
    let (vae, _) = AutoencoderKL::from_dir(&dir, &device, None).unwrap();
    assert!(vae.quant_conv.is_none() && vae.post_quant_conv.is_none());
    assert!(vae.encoder.mid_block.attention.is_none());
    assert_eq!(vae.downscale_factor(), 8);
    let mut io = StateDict::from_file(dir.join("io.safetensors")).unwrap();
    let mean = vae.encode_mean(io.take_any("pixel_values_rect", &device).unwrap());
    assert_eq!(mean.dims(), [1, 4, 3, 5]);
    let e = max_abs_diff(mean, io.take_any::<4>("latent_mean_rect", &device).unwrap());
    assert!(e <= TOL, "rect latent_mean: max abs error {e}");
}

#[test]
fn f16_weights_upcast_to_f32_match() {
    // The f16 file's reference outputs were computed with the same f16-rounded weights in f32.
    assert_parity("kl_2block_f16", Some(DType::F32), TOL);
}

#[test]
fn f16_weights_can_stay_half_precision() {
    let device = Device::flex();
    let dir = fixture("kl_2block_f16");
    let (vae, report) = AutoencoderKL::from_dir(&dir, &device, None).unwrap();
    assert_eq!(vae.dtype(), DType::F16);
    assert_eq!(report.dtypes.len(), 1, "{:?}", report.dtypes);
    let mut io = StateDict::from_file(dir.join("io.safetensors")).unwrap();
    let mean = vae.encode_mean(io.take_any("pixel_values", &device).unwrap());
    assert_eq!(mean.dtype(), DType::F16);
    // Half-precision arithmetic: a loose bound, still far below the output scale (~1).
    let e = max_abs_diff(mean, io.take_any::<4>("latent_mean", &device).unwrap());
    eprintln!("f16 arithmetic: latent_mean {e:.2e}");
    assert!(e <= 5e-2, "f16 latent_mean: max abs error {e}");
    let decoded = vae.decode(io.take_any("latents", &device).unwrap());
    assert_eq!(decoded.dtype(), DType::F16);
    let e = max_abs_diff(decoded, io.take_any::<4>("sample", &device).unwrap());
    eprintln!("f16 arithmetic: sample {e:.2e}");
    assert!(e <= 5e-2, "f16 sample: max abs error {e}");
}

#[test]
fn config_fields_are_read() {
    let device = Device::flex();
    let (vae, report) = AutoencoderKL::from_dir(&fixture("kl_3block"), &device, None).unwrap();
    assert_eq!(vae.scaling_factor(), 0.13025);
    assert_eq!(vae.shift_factor(), 0.0);
    assert_eq!(vae.downscale_factor(), 4);
    // Encoder 2 resnets per block, decoder layers_per_block + 1 = 3.
    assert!(vae.encoder.down_blocks.iter().all(|b| b.resnets.len() == 2));
    assert!(vae.decoder.up_blocks.iter().all(|b| b.resnets.len() == 3));
    assert_eq!(report.dtypes.len(), 1);

    let (bare, _) = AutoencoderKL::from_dir(&fixture("kl_4block_bare"), &device, None).unwrap();
    assert_eq!(bare.shift_factor(), 0.1159);
    assert_eq!(bare.scaling_factor(), 0.3611);
    // (z − shift) · scale and back.
    let z = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2, 1, 1]), &device);
    let s = bare.scale_latents(z.clone());
    let expected = [(1.0 - 0.1159) * 0.3611, (-2.0 - 0.1159) * 0.3611];
    let got = s.clone().into_data().try_to_vec::<f32>().unwrap();
    assert!(
        (got[0] - expected[0] as f32).abs() < 1e-6 && (got[1] - expected[1] as f32).abs() < 1e-6,
        "{got:?}"
    );
    assert!(max_abs_diff(bare.unscale_latents(s), z) < 1e-6);
}

#[test]
fn sampling_is_mean_plus_std_times_noise_and_logvar_is_clamped() {
    let device = Device::flex();
    // Moments [1, 2, 1, 3]: mean channel then logvar channel, with logvars beyond both clamps.
    let moments = Tensor::<4>::from_data(
        TensorData::new(
            vec![0.5f32, -1.0, 2.0, 2.0f32.ln(), -100.0, 100.0],
            [1, 2, 1, 3],
        ),
        &device,
    );
    let dist = LatentDist::from_moments(moments);
    let logvar = dist.logvar.clone().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(logvar[1..], [-30.0, 20.0]);
    let noise = Tensor::<4>::from_data(
        TensorData::new(vec![1.5f32, 2.0, -1.0], [1, 1, 1, 3]),
        &device,
    );
    let got = dist.sample(noise).into_data().try_to_vec::<f32>().unwrap();
    let expected = [
        0.5 + 2f32.sqrt() * 1.5,
        -1.0 + (-15f32).exp() * 2.0,
        2.0 - 10f32.exp(),
    ];
    for (g, e) in got.iter().zip(expected) {
        assert!(
            (g - e).abs() <= 1e-5 * e.abs().max(1.0),
            "{got:?} vs {expected:?}"
        );
    }
}

#[test]
fn missing_and_unexpected_keys_are_named() {
    let device = Device::flex();
    let dir = fixture("kl_2block");
    let config = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let mut vae = AutoencoderKL::new(&config, &device).unwrap();
    let mut sd = StateDict::from_dir(&dir, "diffusion_pytorch_model")
        .unwrap()
        .check_only();
    sd.remove("encoder.mid_block.attentions.0.group_norm.weight");
    sd.remove("decoder.up_blocks.0.upsamplers.0.conv.bias");
    vae.load(&mut sd, "");
    let msg = sd.finish("AutoencoderKL").unwrap_err().to_string();
    assert!(
        msg.contains("encoder.mid_block.attentions.0.group_norm.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("decoder.up_blocks.0.upsamplers.0.conv.bias"),
        "{msg}"
    );

    // Without mid-block attention the file's attention keys are unexpected, listed by name.
    let mut config = config;
    config.mid_block_add_attention = false;
    let mut vae = AutoencoderKL::new(&config, &device).unwrap();
    let mut sd = StateDict::from_dir(&dir, "diffusion_pytorch_model")
        .unwrap()
        .check_only();
    vae.load(&mut sd, "");
    match sd.finish("AutoencoderKL").unwrap_err() {
        WeightError::Keys {
            missing,
            unexpected,
            ..
        } => {
            assert!(missing.is_empty(), "{missing:?}");
            assert!(
                unexpected.contains(&"decoder.mid_block.attentions.0.to_q.weight".to_string()),
                "{unexpected:?}"
            );
        }
        other => panic!("{other}"),
    }
}

/// Writes `kl_2block`'s config with `from` replaced by `to` into a temp folder and loads it.
fn load_edited_config(from: &str, to: &str) -> ModelError {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("kl_2block/config.json")).unwrap();
    assert!(text.contains(from), "fixture config lacks {from}");
    std::fs::write(dir.path().join("config.json"), text.replacen(from, to, 1)).unwrap();
    AutoencoderKL::from_dir(dir.path(), &Device::flex(), None).unwrap_err()
}

#[test]
fn unsupported_config_values_name_the_file_and_field() {
    let err = load_edited_config("\"DownEncoderBlock2D\"", "\"AttnDownEncoderBlock2D\"");
    assert!(matches!(err, ModelError::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("config.json")
            && msg.contains("down_block_types")
            && msg.contains("AttnDownEncoderBlock2D"),
        "{msg}"
    );

    let msg = load_edited_config("\"UpDecoderBlock2D\"", "\"AttnUpDecoderBlock2D\"").to_string();
    assert!(msg.contains("up_block_types"), "{msg}");

    let msg = load_edited_config("\"norm_num_groups\": 4", "\"norm_num_groups\": 3").to_string();
    assert!(msg.contains("norm_num_groups"), "{msg}");

    let msg = load_edited_config("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\"").to_string();
    assert!(msg.contains("act_fn") && msg.contains("gelu"), "{msg}");

    // A wrongly typed value: serde names the field too.
    let msg =
        load_edited_config("\"layers_per_block\": 1", "\"layers_per_block\": \"one\"").to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn sdxl_config_builds_the_full_size_vae() {
    // stabilityai/stable-diffusion-xl-base-1.0 vae/config.json; diffusers' AutoencoderKL built
    // from it has 83,653,863 parameters. Lazy parameters: nothing is allocated.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.20.0.dev0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.13025,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#,
    )
    .unwrap();
    let config = AutoencoderKLConfig::from_file(&path).unwrap();
    assert!(config.use_quant_conv && config.use_post_quant_conv && config.mid_block_add_attention);
    assert_eq!(config.shift_factor, None);
    let vae = AutoencoderKL::new(&config, &Device::flex()).unwrap();
    assert_eq!(vae.num_params(), 83_653_863);
    assert_eq!(vae.downscale_factor(), 8);
}
