//! CLIP-T and CLIP-I against transformers on a tiny random `CLIPModel`: the processor's pixel
//! values and the scores. Fixtures: `scripts/make_clip_score_fixtures.py`.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use troupe_data::ops::resize::PassOrder;
use troupe_eval::clip_score::{ClipScorer, read_image, scores};
use troupe_models::weights::StateDict;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_score")
}

/// The fixture model with the real CLIP tokenizer files beside it, as a hub folder has them
/// (`configs/tiny-scorers/clip` links both).
fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-scorers/clip")
}

/// Max |a − b|; fails on any non-finite value or a length mismatch.
fn max_diff(got: &[f64], want: &[f64], what: &str) -> f64 {
    troupe_pt::parity::max_abs_diff(got, want, what)
}

#[test]
fn clip_t_and_clip_i_match_transformers() {
    // The fixtures were made with Pillow 13 (the pinned reference environment).
    let scorer = ClipScorer::load(&model_dir(), PassOrder::Pillow13, &Device::flex()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("scores.json")).unwrap())
            .unwrap();
    let paths: Vec<PathBuf> = want["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| fixtures().join(p.as_str().unwrap()))
        .collect();
    let images: Vec<_> = paths.iter().map(|p| read_image(p).unwrap()).collect();
    let mut pixels = StateDict::from_file(fixtures().join("pixels.safetensors")).unwrap();
    for (k, (img, path)) in images.iter().zip(&paths).enumerate() {
        let got: Vec<f64> = scorer
            .pixel_values(img, path)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let t: Tensor<3> = pixels
            .take_any(&format!("image_{k}"), &Device::flex())
            .unwrap();
        let want: Vec<f64> = t
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .unwrap();
        assert!(
            max_diff(&got, &want, "pixels") <= 1e-6,
            "image {k}: pixel values differ"
        );
    }
    let refs: Vec<(&image::RgbImage, &Path)> = images
        .iter()
        .zip(paths.iter().map(PathBuf::as_path))
        .collect();
    let img = scorer.image_features(&refs).unwrap();
    let captions: Vec<String> = serde_json::from_value(want["captions"].clone()).unwrap();
    let txt = scorer.text_features(&captions).unwrap();
    for (name, got) in [
        ("clip_t", scores(img.clone(), txt)),
        ("clip_i", scores(img.clone(), img)),
    ] {
        let want: Vec<Vec<f64>> = serde_json::from_value(want[name].clone()).unwrap();
        let d = max_diff(&got.concat(), &want.concat(), name);
        eprintln!("{name}: max |troupe − transformers| = {d:.2e}");
        assert!(d <= 1e-4, "{name} differs by {d}");
    }
}

#[test]
fn a_folder_without_a_preprocessor_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("clip");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "preprocessor_config.json" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let err = ClipScorer::load(&dir, PassOrder::Pillow13, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("preprocessor_config.json"), "{err}");
}
