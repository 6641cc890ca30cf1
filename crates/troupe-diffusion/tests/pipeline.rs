//! The StoryMaker pipeline against the reference's own `pipeline_sdxl_storymaker.py` on the
//! tiny SDXL (`configs/tiny-sdxl`) with a random non-trivial adapter: crops, conditioning,
//! every sampler step's latents and the decoded image. Fixtures:
//! `scripts/make_pipeline_fixtures.py` (tests/fixtures/pipeline/). With a pose ControlNet,
//! against diffusers' `StableDiffusionXLControlNetPipeline` with the same processors:
//! `scripts/make_controlnet_pipeline_fixtures.py`.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use troupe_diffusion::conditioning::CharacterFeatures;
use troupe_diffusion::control::{ControlContext, read_pose};
use troupe_diffusion::pipeline::{Pipeline, Request, Settings, to_rgb8};
use troupe_diffusion::reference::{CropOps, Reference};
use troupe_diffusion::samplers::SamplerKind;
use troupe_models::adapter::{AdapterSpec, processor_count};
use troupe_models::adapter_file::{AdapterFile, AdapterFormat, ExportDType, write_adapter};
use troupe_models::ppr::FaceIdPlusConfig;
use troupe_models::weights::StateDict;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

/// The fixture adapter (a reference `torch.save` file, no metadata) with its tiny
/// architecture from `adapter.json`.
fn adapter_file() -> AdapterFile {
    let mut file = AdapterFile::read(&fixtures().join("adapter.bin")).unwrap();
    let a = json("adapter.json");
    let u = |k: &str| a[k].as_u64().unwrap() as usize;
    let keys: Vec<String> = file.tensors.iter().map(|(k, _)| k.clone()).collect();
    let spec = AdapterSpec {
        lora_rank: u("lora_rank"),
        processors: processor_count(&keys),
        ppr: FaceIdPlusConfig::new()
            .with_cross_attention_dim(u("cross_attention_dim"))
            .with_id_embeddings_dim(u("id_embeddings_dim"))
            .with_clip_embeddings_dim(u("clip_embeddings_dim"))
            .with_num_tokens(u("num_tokens"))
            .with_resampler_depth(u("resampler_depth"))
            .with_resampler_dim_head(u("resampler_dim_head"))
            .with_resampler_num_queries(u("resampler_num_queries"))
            .with_resampler_ff_mult(u("resampler_ff_mult"))
            .with_max_characters(u("max_characters")),
    };
    let (k, v) = spec.metadata();
    file.metadata.insert(k, v);
    file
}

fn load(file: &AdapterFile) -> Pipeline {
    let base = root().join("configs/tiny-sdxl");
    let mut p = Pipeline::load(&base, &base.join("image_encoder"), file, &Device::flex()).unwrap();
    // The fixtures were made with OpenCV 5 and Pillow 13 (the pinned reference environment).
    p.crop_ops = CropOps::current();
    p
}

/// Max |a − b|; fails on any non-finite value or a length mismatch.
fn max_diff(got: &[f32], want: &[f32], what: &str) -> f32 {
    troupe_pt::parity::max_abs_diff(got, want, what) as f32
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

struct Outputs(StateDict);

impl Outputs {
    fn open() -> Self {
        Self(StateDict::from_file(fixtures().join("outputs.safetensors")).unwrap())
    }
    fn get<const D: usize>(&mut self, key: &str) -> Tensor<D> {
        self.0.take_any::<D>(key, &Device::flex()).unwrap()
    }
}

fn references(case: &serde_json::Value) -> Vec<Reference> {
    let f = fixtures();
    case["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let p = |k: &str| f.join(r[k].as_str().unwrap());
            Reference::from_files(&p("image"), &p("mask"), &p("embedding"), &p("kps")).unwrap()
        })
        .collect()
}

fn settings(case: &serde_json::Value) -> Settings {
    let a = &case["args"];
    let u = |k: &str| a[k].as_u64().unwrap() as usize;
    let f = |k: &str| a[k].as_f64().unwrap();
    let mut s = Settings::new(a["prompt"].as_str().unwrap(), u("width"), u("height"));
    s.negative_prompt = a["negative_prompt"].as_str().map(str::to_string);
    s.steps = u("num_inference_steps");
    s.sampler = SamplerKind::UniPc;
    s.guidance = f("guidance_scale");
    s.ip_scale = f("ip_adapter_scale");
    s.lora_scale = f("lora_scale");
    s.num_images = u("num_images_per_prompt");
    s
}

fn check_case(pipeline: &Pipeline, name: &str) {
    let cases = json("cases.json");
    let case = &cases["cases"][name];
    let mut out = Outputs::open();
    let refs = references(case);
    let s = pipeline.encoders.image_size as u32;
    // Crops: the CLIP pixel values of the reference's `crop_image`.
    let n = refs.len();
    let (mut body, mut face) = (Vec::new(), Vec::new());
    for r in &refs {
        let c = r.crops(s, &pipeline.crop_ops).unwrap();
        body.extend(c.body);
        face.extend(c.face);
    }
    let want_body = values(out.get::<4>(&format!("{name}.body_pixels")));
    let want_face = values(out.get::<4>(&format!("{name}.face_pixels")));
    let d = max_diff(&body, &want_body, "body");
    assert!(d <= 1e-6, "{name}: body crops differ by {d}");
    let d = max_diff(&face, &want_face, "face");
    let n_diff = face
        .iter()
        .zip(&want_face)
        .filter(|(a, b)| (*a - *b).abs() > 1e-6)
        .count();
    assert!(
        d <= 1e-6,
        "{name}: face crops differ by {d} in {n_diff} of {} values",
        face.len()
    );

    let settings = settings(case);
    let characters = pipeline.characters(&refs).unwrap();
    assert_eq!(characters.id_embeds.dims(), [n, 512]);
    let latents = out.get::<4>(&format!("{name}.latents"));
    let mut steps = Vec::new();
    let images = pipeline
        .generate(&settings, &characters, Some(latents), &mut |_, x| {
            steps.push(values(x.clone()))
        })
        .unwrap();
    assert_eq!(steps.len(), settings.steps);
    let mut worst = 0f32;
    for (i, got) in steps.iter().enumerate() {
        let want = values(out.get::<4>(&format!("{name}.step{i:02}")));
        let d = max_diff(got, &want, &format!("{name} step {i}"));
        assert!(d <= 1e-4, "{name}: step {i}: latents differ by {d}");
        worst = worst.max(d);
    }
    // The image: NCHW here, NHWC in the fixture.
    let got = values(images.permute([0, 2, 3, 1]));
    let want = values(out.get::<4>(&format!("{name}.image")));
    let d = max_diff(&got, &want, &format!("{name} image"));
    eprintln!("{name}: max latent error {worst:.2e}, image {d:.2e}");
    assert!(d <= 1e-3, "{name}: images differ by {d}");
}

#[test]
fn one_character_matches_the_reference_pipeline() {
    check_case(&load(&adapter_file()), "one");
}

#[test]
fn two_characters_two_images_no_negative_prompt_odd_latents() {
    check_case(&load(&adapter_file()), "two");
}

#[test]
fn zero_scales_match_plain_sdxl() {
    check_case(&load(&adapter_file()), "plain");
    // The reference run with both scales 0 equals diffusers' plain SDXL pipeline exactly.
    let mut out = Outputs::open();
    let a = values(out.get::<4>("plain.image"));
    let b = values(out.get::<4>("plain.diffusers_image"));
    assert_eq!(max_diff(&a, &b, "plain"), 0.0);
}

#[test]
fn same_seed_same_png_and_safetensors_equals_mask_bin() {
    let file = adapter_file();
    let tmp = tempfile::tempdir().unwrap();
    let spec = file.spec().unwrap();
    let meta: std::collections::HashMap<String, String> = [spec.metadata()].into();
    let mut pngs = Vec::new();
    for (format, name) in [
        (AdapterFormat::Safetensors, "a.safetensors"),
        (AdapterFormat::StorymakerBin, "mask.bin"),
    ] {
        let path = tmp.path().join(name);
        write_adapter(&path, &file.tensors, format, ExportDType::F32, meta.clone()).unwrap();
        let pipeline = load(&AdapterFile::read(&path).unwrap());
        let refs = references(&json("cases.json")["cases"]["one"]);
        let characters = pipeline.characters(&refs).unwrap();
        let mut s = Settings::new("a person", 64, 64);
        s.steps = 4;
        s.seed = 5;
        for _ in 0..2 {
            let images = pipeline
                .generate(&s, &characters, None, &mut |_, _| {})
                .unwrap();
            let img = to_rgb8(images).remove(0);
            pngs.push(troupe_data::image_io::encode_png_rgb(&img));
        }
    }
    assert!(pngs.windows(2).all(|w| w[0] == w[1]), "images differ");
}

/// The settings of `controlnet.json`, the characters of case `one` and the pose (160×128,
/// resized to 80×64 as diffusers' control image processor does).
fn pose_case(pipeline: &Pipeline) -> (Settings, CharacterFeatures, Vec<f32>) {
    let meta = json("controlnet.json");
    let a = &meta["args"];
    let u = |k: &str| a[k].as_u64().unwrap() as usize;
    let f = |k: &str| a[k].as_f64().unwrap();
    let mut s = Settings::new(a["prompt"].as_str().unwrap(), u("width"), u("height"));
    s.negative_prompt = a["negative_prompt"].as_str().map(str::to_string);
    s.steps = u("num_inference_steps");
    s.guidance = f("guidance_scale");
    s.controlnet_scale = f("controlnet_conditioning_scale");
    s.num_images = u("num_images_per_prompt");
    (s.ip_scale, s.lora_scale) = (
        meta["ip_adapter_scale"].as_f64().unwrap(),
        meta["lora_scale"].as_f64().unwrap(),
    );
    let refs = references(&json("cases.json")["cases"]["one"]);
    let characters = pipeline.characters(&refs).unwrap();
    let pose = read_pose(&fixtures().join("pose.png"), s.width, s.height).unwrap();
    (s, characters, pose)
}

#[test]
fn a_pose_controlnet_matches_diffusers_controlnet_pipeline() {
    let pipeline = load(&adapter_file())
        .with_control(
            &root().join("configs/tiny-sdxl/controlnet"),
            ControlContext::Text,
        )
        .unwrap();
    let (settings, characters, pose) = pose_case(&pipeline);
    let mut out = StateDict::from_file(fixtures().join("controlnet.safetensors")).unwrap();
    let device = Device::flex();
    let request = Request {
        settings: &settings,
        characters: &characters,
        latents: Some(out.take_any::<4>("pose.latents", &device).unwrap()),
        pose: Some(&pose),
    };
    let mut steps = Vec::new();
    let images = pipeline
        .generate_batch(vec![request], &mut |_, x| steps.push(values(x.clone())))
        .unwrap();
    assert_eq!(steps.len(), settings.steps);
    for (i, got) in steps.iter().enumerate() {
        let want = values(
            out.take_any::<4>(&format!("pose.step{i:02}"), &device)
                .unwrap(),
        );
        let d = max_diff(got, &want, &format!("pose step {i}"));
        assert!(d <= 1e-4, "step {i}: latents differ by {d}");
    }
    let got = values(images[0].clone().permute([0, 2, 3, 1]));
    let want = values(out.take_any::<4>("pose.image", &device).unwrap());
    let d = max_diff(&got, &want, "pose image");
    assert!(d <= 1e-3, "images differ by {d}");
}

#[test]
fn a_pose_needs_a_controlnet_and_the_image_shape() {
    let pipeline = load(&adapter_file());
    let (settings, characters, pose) = pose_case(&pipeline);
    let request = Request {
        settings: &settings,
        characters: &characters,
        latents: None,
        pose: Some(&pose),
    };
    let err = pipeline
        .generate_batch(vec![request], &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--controlnet"), "{err}");
    // A pose of another shape than the image (here: transposed) is refused, naming the file.
    let err = read_pose(&fixtures().join("pose.png"), 64, 80)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pose.png") && err.contains("160x128"), "{err}");
}
