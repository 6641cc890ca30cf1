//! `troupe inspect` and `troupe debug forward` on the tiny diffusers fixtures of troupe-models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use troupe_models::weights::{StateDict, to_host, write_safetensors};

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .output()
        .expect("run troupe")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../troupe-models/tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Max abs difference between tensor `ka` of file `a` and `kb` of file `b` (any rank, f32).
fn max_abs_diff(a: &Path, ka: &str, b: &Path, kb: &str) -> f32 {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    let (x, y) = (sa.tensor(ka).unwrap(), sb.tensor(kb).unwrap());
    assert_eq!(x.shape(), y.shape(), "{ka}");
    let f = |d: &[u8]| {
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    troupe_pt::parity::max_abs_diff(&f(x.data()), &f(y.data()), ka) as f32
}

/// Runs `troupe debug forward` and checks each named output against the reference file.
fn forward_matches(component: &str, model: &Path, inputs: &Path, outputs: &[&str], extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("out.safetensors");
    let mut args = vec![
        "debug",
        "forward",
        "--component",
        component,
        "--model",
        s(model),
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--inputs", s(inputs), "--output", s(&output)]);
    let out = troupe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in outputs {
        let e = max_abs_diff(&output, name, inputs, name);
        assert!(e <= 1e-4, "{component} {name}: max abs error {e}");
    }
}

#[test]
fn inspect_reports_a_unet_and_exits_zero() {
    let out = troupe(&["inspect", s(&fixtures().join("unet/sdxl_tiny"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("UNet2DConditionModel"), "{text}");
    assert!(text.contains("parameters: 197540"), "{text}");
    assert!(text.contains("attention processors: 34"), "{text}");
    assert!(text.contains("float32 × 618"), "{text}");
}

#[test]
fn inspect_lists_missing_keys_and_fails() {
    // A UNet folder whose weights lack one tensor: named, exit status 1.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("unet/sd15_tiny");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors_subset(&bytes, "conv_out.bias");
    write_safetensors(
        &tmp.path().join("diffusion_pytorch_model.safetensors"),
        &st,
        None,
    )
    .unwrap();

    let out = troupe(&["inspect", s(tmp.path())]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("missing keys (1)") && text.contains("conv_out.bias"),
        "{text}"
    );
}

/// Every tensor of a safetensors buffer except `skip`, as host tensors.
fn safetensors_subset(bytes: &[u8], skip: &str) -> Vec<(String, troupe_pt::Tensor)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(k, _)| k != skip)
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            (
                k,
                troupe_pt::Tensor::new(
                    troupe_pt::DType::F32,
                    v.shape().to_vec(),
                    v.data().to_vec(),
                )
                .unwrap(),
            )
        })
        .collect()
}

#[test]
fn debug_forward_unet_with_adapter_matches_the_reference() {
    let unet = fixtures().join("unet");
    let model = unet.join("sdxl_tiny");
    forward_matches(
        "unet",
        &model,
        &model.join("io_even.safetensors"),
        &["out"],
        &[],
    );
    let adapter = unet.join("sdxl_tiny_adapter.safetensors");
    let scales = [
        "--adapter",
        s(&adapter),
        "--lora-scale",
        "0.8",
        "--ip-scale",
        "0.7",
    ];
    forward_matches(
        "unet",
        &model,
        &model.join("io_adapter.safetensors"),
        &["out"],
        &scales,
    );
}

#[test]
fn debug_forward_ppr_matches_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let ppr = fixtures().join("ppr");
    let device = Device::flex();
    let mut io = StateDict::from_file(ppr.join("io.safetensors")).unwrap();
    let inputs: Vec<(String, troupe_pt::Tensor)> = vec![
        (
            "id_embeds".into(),
            to_host(io.take_any::<2>("b3.id_embeds", &device).unwrap()),
        ),
        (
            "clip_char".into(),
            to_host(io.take_any::<3>("b3.clip_embeds", &device).unwrap()),
        ),
        (
            "clip_face".into(),
            to_host(io.take_any::<3>("b3.face_embeds", &device).unwrap()),
        ),
    ];
    // Inputs plus the expected output, under the name the command writes.
    let want = tmp.path().join("io.safetensors");
    let tokens = to_host(io.take_any::<3>("b3.output", &device).unwrap());
    let mut with_want = inputs.clone();
    with_want.push(("tokens".into(), tokens));
    write_safetensors(&want, &with_want, None).unwrap();
    forward_matches(
        "ppr",
        &ppr.join("weights.safetensors"),
        &want,
        &["tokens"],
        &[],
    );
}

#[test]
fn debug_forward_names_a_missing_input() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = fixtures().join("unet");
    let input = tmp.path().join("in.safetensors");
    let device = Device::flex();
    let sample = to_host(Tensor::<4>::zeros([1, 4, 8, 8], &device));
    write_safetensors(&input, &[("sample".to_string(), sample)], None).unwrap();
    let out = troupe(&[
        "debug",
        "forward",
        "--component",
        "unet",
        "--model",
        s(&unet.join("sd15_tiny")),
        "--inputs",
        s(&input),
        "--output",
        s(&tmp.path().join("o.safetensors")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing key `timestep`"), "{err}");
}

#[test]
fn debug_forward_vae_encoder_and_decoder_match_diffusers() {
    let dir = fixtures().join("vae/kl_3block");
    let io = dir.join("io.safetensors");
    forward_matches("vae-encoder", &dir, &io, &["latent_mean"], &[]);
    forward_matches("vae-decoder", &dir, &io, &["sample"], &[]);
}

#[test]
fn debug_forward_clip_encoders_match_transformers() {
    let clip = fixtures().join("clip");
    for (component, dir, outputs) in [
        (
            "text-encoder",
            "text_quick",
            &["last_hidden_state", "penultimate_hidden_state", "pooled"][..],
        ),
        (
            "text-encoder-2",
            "text_proj",
            &["penultimate_hidden_state", "text_embeds"][..],
        ),
        (
            "image-encoder",
            "vision",
            &["penultimate_hidden_state", "image_embeds"][..],
        ),
    ] {
        let d = clip.join(dir);
        forward_matches(component, &d, &d.join("io.safetensors"), outputs, &[]);
    }
}

#[test]
fn controlnet_forward_and_inspect_match_diffusers() {
    let dir = fixtures().join("controlnet/sdxl_tiny");
    let names: Vec<String> = (0..9)
        .map(|i| format!("down_block_res_samples.{i}"))
        .chain(["mid_block_res_sample".to_string()])
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    forward_matches(
        "controlnet",
        &dir,
        &dir.join("io_even.safetensors"),
        &names,
        &[],
    );
    let out = troupe(&["inspect", s(&dir)]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    // diffusers' own count: sum(p.numel() for p in ControlNetModel.parameters()).
    assert!(
        text.contains("ControlNetModel") && text.contains("parameters: 92652"),
        "{text}"
    );
    assert!(text.contains("residuals: 9"), "{text}");
}
