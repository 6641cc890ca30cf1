//! `troupe eval clip` prints the score transformers computes (fixtures of troupe-eval).

use std::path::PathBuf;

mod common;

use common::{root, troupe};

fn fixtures() -> PathBuf {
    root().join("crates/troupe-eval/tests/fixtures/clip_score")
}

/// The tiny `CLIPModel` (the fixture's weights with the real CLIP tokenizer files).
fn model_dir() -> PathBuf {
    root().join("configs/tiny-scorers/clip")
}

#[test]
fn clip_t_and_clip_i_on_the_command_line() {
    let model = model_dir();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("scores.json")).unwrap())
            .unwrap();
    let img = |k: usize| {
        fixtures()
            .join(format!("image_{k}.png"))
            .display()
            .to_string()
    };
    let caption = want["captions"][2].as_str().unwrap();
    let m = model.display().to_string();
    let image = img(0);
    for (args, expected) in [
        (
            vec!["--text", caption],
            want["clip_t"][0][2].as_f64().unwrap(),
        ),
        (
            vec!["--ref-image", &img(1)],
            want["clip_i"][0][1].as_f64().unwrap(),
        ),
    ] {
        let a = [
            &["eval", "clip", "--model", &m, "--image", &image][..],
            &args,
        ]
        .concat();
        let o = troupe(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(
            (got - expected).abs() <= 1e-4,
            "{args:?}: {got} vs {expected}"
        );
    }
    let o = troupe(&[
        "eval",
        "clip",
        "--model",
        "no/such/clip",
        "--image",
        &img(0),
        "--text",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/clip"));
}

fn face_fixtures() -> PathBuf {
    root().join("crates/troupe-faces/tests/fixtures")
}

/// The insightface results of the fixture case `image` at a square `size`.
fn face_case(image: &str, size: u64) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(face_fixtures().join("faces.json")).unwrap())
            .unwrap();
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image && c["det_size"] == serde_json::json!([size, size]))
        .unwrap()
        .clone()
}

#[test]
fn faces_and_face_sim_on_the_command_line() {
    let f = face_fixtures();
    let models = [
        "--detector".to_string(),
        f.join("det_tiny.onnx").display().to_string(),
        "--recognizer".into(),
        f.join("rec_tiny.onnx").display().to_string(),
        "--det-size".into(),
        "320".into(),
        "--opencv-5".into(),
    ];
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    let astronaut = f.join("astronaut.png").display().to_string();
    let synthetic = f.join("synthetic.png").display().to_string();
    let o = troupe(&[&["eval", "faces"][..], &models, &[&astronaut]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let case = face_case("astronaut.png", 320);
    assert_eq!(lines.len(), case["faces"].as_array().unwrap().len());
    // Largest first: the first line is insightface's largest face.
    let largest = &case["faces"][case["largest"].as_u64().unwrap() as usize];
    for (g, w) in lines[0]["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .zip(largest["bbox"].as_array().unwrap())
    {
        assert!(
            (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-3,
            "{g} vs {w}"
        );
    }
    assert_eq!(lines[0]["embedding"].as_array().unwrap().len(), 512);

    let o = troupe(
        &[
            &["eval", "face-sim"][..],
            &models,
            &[&astronaut, &synthetic],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let other = face_case("synthetic.png", 320);
    let emb = |c: &serde_json::Value| -> Vec<f64> {
        let face = &c["faces"][c["largest"].as_u64().unwrap() as usize];
        face["normed_embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let want: f64 = emb(&case).iter().zip(emb(&other)).map(|(a, b)| a * b).sum();
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");

    // A recogniser given as the detector: the message says what was expected.
    let wrong = f.join("rec_tiny.onnx").display().to_string();
    let o = troupe(&[
        "eval",
        "faces",
        "--detector",
        &wrong,
        "--recognizer",
        &wrong,
        &astronaut,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an SCRFD detector"));
}

#[test]
fn pack_computes_a_missing_identity_with_the_face_models() {
    let tmp = tempfile::tempdir().unwrap();
    let f = face_fixtures();
    std::fs::copy(f.join("synthetic.png"), tmp.path().join("photo.png")).unwrap();
    image::GrayImage::from_pixel(203, 150, image::Luma([255]))
        .save(tmp.path().join("mask.png"))
        .unwrap();
    let manifest = tmp.path().join("manifest.jsonl");
    let line = r#"{"image": "photo.png", "caption": "a person", "id": "p0", "characters": [{"mask": "mask.png"}]}"#;
    std::fs::write(&manifest, line).unwrap();
    let out = tmp.path().join("shards");
    let (m, o) = (manifest.display().to_string(), out.display().to_string());
    // Without face models the missing identity is an error naming the field and the remedy.
    let r = troupe(&["data", "pack", &m, "--out", &o]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        stderr.contains("characters[0].embedding") && stderr.contains("--face-detector"),
        "{stderr}"
    );
    let (det, rec) = (f.join("det_tiny.onnx"), f.join("rec_tiny.onnx"));
    let r = troupe(&[
        "data",
        "pack",
        &m,
        "--out",
        &o,
        "--face-detector",
        det.to_str().unwrap(),
        "--face-recognizer",
        rec.to_str().unwrap(),
        "--det-size",
        "160",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let shard = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let reader = troupe_data::shard::ShardReader::open(&shard).unwrap();
    let (_, sample) = reader.read_row_group(0).unwrap().remove(0);
    let c = &sample.unwrap().characters[0];
    // insightface's largest face of this image at det_size 160 (aligned with OpenCV 4 here,
    // OpenCV 5 in the fixture: the embedding agrees to cosine 0.9999).
    let case = face_case("synthetic.png", 160);
    let want = &case["faces"][case["largest"].as_u64().unwrap() as usize];
    let kps: Vec<f64> = want["kps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (g, w) in c.keypoints.iter().zip(&kps) {
        assert!((*g as f64 - w).abs() < 1e-3, "keypoint {g} vs {w}");
    }
    let e: Vec<f64> = want["normed_embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let cos: f64 = c.embedding.iter().zip(&e).map(|(a, b)| *a as f64 * b).sum();
    assert!(cos >= 0.9999, "embedding cosine {cos}");
}
