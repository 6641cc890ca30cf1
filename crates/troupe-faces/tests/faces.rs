//! SCRFD detection, alignment and ArcFace embeddings against insightface's python package on
//! random-weight models with the buffalo_l graph interfaces (fixtures:
//! `scripts/make_face_fixtures.py`): every stage of one case, and every face of six cases
//! (two images, three detector sizes).

use std::path::{Path, PathBuf};

use troupe_data::ops::geometry::WarpImpl;
use troupe_faces::{ArcFaceRecognizer, Face, FaceAnalysis, ScrfdDetector, largest};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("faces.json")).unwrap()).unwrap()
}

fn rgb(name: &str) -> image::RgbImage {
    image::open(fixtures().join(name)).unwrap().to_rgb8()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| out.extend(floats(x))),
        x => out.push(x.as_f64().unwrap() as f32),
    }
    out
}

/// Max |a − b|; fails on any non-finite value or a length mismatch.
fn max_diff(got: &[f32], want: &[f32], what: &str) -> f32 {
    troupe_pt::parity::max_abs_diff(got, want, what) as f32
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn analysis(det_size: (usize, usize)) -> FaceAnalysis {
    FaceAnalysis {
        detector: ScrfdDetector::load(&fixtures().join("det_tiny.onnx"), det_size).unwrap(),
        // The fixtures were made with OpenCV 5 (the pinned reference environment).
        recognizer: ArcFaceRecognizer::load(&fixtures().join("rec_tiny.onnx"), WarpImpl::OpenCv5)
            .unwrap(),
    }
}

#[test]
fn every_case_matches_insightface() {
    let all = json();
    let (mut worst_px, mut worst_score, mut worst_cos) = (0f32, 0f32, 1f64);
    for case in all["cases"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let size = floats(&case["det_size"]);
        let fa = analysis((size[0] as usize, size[1] as usize));
        let img = rgb(name);
        let faces: Vec<Face> = fa.get(&img).unwrap();
        let want = case["faces"].as_array().unwrap();
        let what = format!("{name} at {size:?}");
        assert_eq!(faces.len(), want.len(), "{what}: face count");
        for (i, (f, w)) in faces.iter().zip(want).enumerate() {
            let d = &f.detection;
            let kps: Vec<f32> = d.kps.iter().flatten().copied().collect();
            let px = max_diff(&d.bbox, &floats(&w["bbox"]), &what).max(max_diff(
                &kps,
                &floats(&w["kps"]),
                &what,
            ));
            assert!(
                px <= 1e-3,
                "{what}: face {i}: box/keypoints differ by {px} px"
            );
            let score = (d.score - w["det_score"].as_f64().unwrap() as f32).abs();
            assert!(score <= 1e-5, "{what}: face {i}: score differs by {score}");
            let cos = cosine(&f.embedding, &floats(&w["embedding"]));
            assert!(cos >= 0.9999, "{what}: face {i}: embedding cosine {cos}");
            let normed = max_diff(
                &f.normed_embedding(),
                &floats(&w["normed_embedding"]),
                &what,
            );
            assert!(
                normed <= 1e-3,
                "{what}: face {i}: normed embedding differs by {normed}"
            );
            (worst_px, worst_score, worst_cos) =
                (worst_px.max(px), worst_score.max(score), worst_cos.min(cos));
        }
        let largest_index = case["largest"].as_u64().unwrap() as usize;
        let best = largest(faces.clone()).unwrap();
        assert_eq!(best, faces[largest_index], "{what}: largest face");
    }
    eprintln!(
        "max box/keypoint error {worst_px:.2e} px, score {worst_score:.2e}, min embedding cosine {worst_cos:.8}"
    );
}

#[test]
fn the_stages_of_one_case_match() {
    // The case marked `stages`: the synthetic 203×150 image letterboxed into 160×160.
    let all = json();
    let case = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c.get("stages").is_some())
        .unwrap();
    let size = floats(&case["det_size"]);
    let fa = analysis((size[0] as usize, size[1] as usize));
    let img = rgb(case["image"].as_str().unwrap());
    let mut stages = std::collections::HashMap::new();
    let bytes = std::fs::read(fixtures().join("stages.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (k, v) in st.tensors() {
        let vals: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        stages.insert(k, vals);
    }
    let (blob, _) = fa.detector.blob(&img);
    assert_eq!(
        max_diff(&blob, &stages["blob"], "blob"),
        0.0,
        "letterboxed blob"
    );
    let outputs = fa.detector.run(blob).unwrap();
    let names = [
        "score_8", "score_16", "score_32", "bbox_8", "bbox_16", "bbox_32", "kps_8", "kps_16",
        "kps_32",
    ];
    for (out, name) in outputs.iter().zip(names) {
        let d = max_diff(out, &stages[name], name);
        assert!(d <= 1e-4, "raw output {name} differs by {d}");
    }
}

#[test]
fn the_aligned_crop_matches_norm_crop() {
    // The case marked `aligned`: its face `face` aligned to 112×112.
    let all = json();
    let case = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c.get("aligned").is_some())
        .unwrap();
    let size = floats(&case["det_size"]);
    let fa = analysis((size[0] as usize, size[1] as usize));
    let img = rgb(case["image"].as_str().unwrap());
    let face = &case["faces"][case["aligned"]["face"].as_u64().unwrap() as usize];
    let k = floats(&face["kps"]);
    let kps = [
        [k[0], k[1]],
        [k[2], k[3]],
        [k[4], k[5]],
        [k[6], k[7]],
        [k[8], k[9]],
    ];
    // scikit-image 0.26 estimates the similarity in float32 for float32 landmarks; ours runs
    // in float64 (the StoryMaker era's result), so the matrices agree to float32 precision...
    let m = troupe_data::ops::geometry::estimate_norm(&kps, 112).unwrap();
    let want: Vec<f32> = floats(&case["aligned"]["matrix"]);
    for (g, w) in m.iter().flatten().zip(&want) {
        assert!(
            (g - *w as f64).abs() <= 1e-6 * (1.0 + g.abs()),
            "matrix {m:?} vs {want:?}"
        );
    }
    // ...and the 112×112 crops differ at a handful of pixels by a level.
    let got = fa.recognizer.align(&img, &kps);
    let want = rgb(case["aligned"]["image"].as_str().unwrap());
    assert_eq!(got.dimensions(), want.dimensions());
    let diffs: Vec<u8> = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    assert!(
        diffs.len() <= 20 && diffs.iter().all(|&d| d <= 1),
        "crop differs: {diffs:?}"
    );
}

#[test]
fn a_model_of_the_wrong_kind_says_what_was_expected() {
    let e = ScrfdDetector::load(&fixtures().join("rec_tiny.onnx"), (160, 160))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rec_tiny.onnx") && e.contains("not an SCRFD detector"),
        "{e}"
    );
    let e = ArcFaceRecognizer::load(&fixtures().join("det_tiny.onnx"), WarpImpl::OpenCv5)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("det_tiny.onnx") && e.contains("expected an ArcFace recogniser"),
        "{e}"
    );
    let e = ScrfdDetector::load(Path::new("no/such/det.onnx"), (160, 160))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no/such/det.onnx"), "{e}");
}
