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

fn max_abs_diff(a: &mut StateDict, ka: &str, b: &mut StateDict, kb: &str) -> f32 {
    let device = Device::flex();
    let x: Tensor<4> = a.take_any(ka, &device).unwrap();
    let y: Tensor<4> = b.take_any(kb, &device).unwrap();
    assert_eq!(x.dims(), y.dims());
    (x - y).abs().max().into_scalar()
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
    let tmp = tempfile::tempdir().unwrap();
    let unet = fixtures().join("unet");
    let io = unet.join("sdxl_tiny/io_adapter.safetensors");
    let output = tmp.path().join("out.safetensors");
    let out = troupe(&[
        "debug",
        "forward",
        "--component",
        "unet",
        "--model",
        s(&unet.join("sdxl_tiny")),
        "--adapter",
        s(&unet.join("sdxl_tiny_adapter.safetensors")),
        "--lora-scale",
        "0.8",
        "--ip-scale",
        "0.7",
        "--inputs",
        s(&io),
        "--output",
        s(&output),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = StateDict::from_file(&output).unwrap();
    let mut want = StateDict::from_file(&io).unwrap();
    let e = max_abs_diff(&mut got, "out", &mut want, "out");
    assert!(e <= 1e-4, "max abs error {e}");
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
    let input = tmp.path().join("in.safetensors");
    write_safetensors(&input, &inputs, None).unwrap();
    let output = tmp.path().join("out.safetensors");
    let out = troupe(&[
        "debug",
        "forward",
        "--component",
        "ppr",
        "--model",
        s(&ppr.join("weights.safetensors")),
        "--inputs",
        s(&input),
        "--output",
        s(&output),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = StateDict::from_file(&output).unwrap();
    let a: Tensor<3> = got.take_any("tokens", &device).unwrap();
    let b: Tensor<3> = io.take_any("b3.output", &device).unwrap();
    let e: f32 = (a - b).abs().max().into_scalar();
    assert!(e <= 1e-4, "max abs error {e}");
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
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("vae/kl_3block");
    let io = dir.join("io.safetensors");
    for (component, output_name) in [("vae-encoder", "latent_mean"), ("vae-decoder", "sample")] {
        let output = tmp.path().join(format!("{component}.safetensors"));
        let out = troupe(&[
            "debug",
            "forward",
            "--component",
            component,
            "--model",
            s(&dir),
            "--inputs",
            s(&io),
            "--output",
            s(&output),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got = StateDict::from_file(&output).unwrap();
        let mut want = StateDict::from_file(&io).unwrap();
        let e = max_abs_diff(&mut got, output_name, &mut want, output_name);
        assert!(e <= 1e-4, "{component}: max abs error {e}");
    }
}

#[test]
fn debug_forward_clip_encoders_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
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
        let io = clip.join(dir).join("io.safetensors");
        let output = tmp.path().join(format!("{component}.safetensors"));
        let out = troupe(&[
            "debug",
            "forward",
            "--component",
            component,
            "--model",
            s(&clip.join(dir)),
            "--inputs",
            s(&io),
            "--output",
            s(&output),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = Device::flex();
        let mut got = StateDict::from_file(&output).unwrap();
        let mut want = StateDict::from_file(&io).unwrap();
        for name in outputs {
            let rank = want.shape(name).unwrap().len();
            let e: f32 = if rank == 3 {
                let (a, b): (Tensor<3>, Tensor<3>) = (
                    got.take_any(name, &device).unwrap(),
                    want.take_any(name, &device).unwrap(),
                );
                (a - b).abs().max().into_scalar()
            } else {
                let (a, b): (Tensor<2>, Tensor<2>) = (
                    got.take_any(name, &device).unwrap(),
                    want.take_any(name, &device).unwrap(),
                );
                (a - b).abs().max().into_scalar()
            };
            assert!(e <= 1e-4, "{component} {name}: max abs error {e}");
        }
    }
}
