//! `troupe eval run / score / report` on the tiny protocol (configs/eval/tiny.toml): the files a
//! user reads, the scores of known cases, continuing an interrupted run, and every bad input
//! named.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{adapter, ok, root, stderr_of, troupe};

const PROTOCOL: &str = "configs/eval/tiny.toml";
/// Images the tiny protocol names: 2 subjects × 4 prompts × 2, plus one pair × 2.
const IMAGES: usize = 18;

/// `troupe eval SUB --protocol PROTOCOL --FLAG INPUT --out OUT EXTRA…`.
fn eval(sub: &str, protocol: &str, flag: &str, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let (input, out) = (input.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec![
        "eval",
        sub,
        "--protocol",
        protocol,
        flag,
        input,
        "--out",
        out,
    ];
    args.extend(extra);
    troupe(&args)
}

/// `troupe eval run` with `adapter`.
fn run(adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    eval("run", PROTOCOL, "--adapter", adapter, out, extra)
}

/// `troupe eval score` of the folder `images`.
fn score(images: &Path, out: &Path, extra: &[&str]) -> Output {
    eval("score", PROTOCOL, "--images", images, out, extra)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every image file under `dir`, relative.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for case in std::fs::read_dir(dir).unwrap() {
        let case = case.unwrap().path();
        for f in std::fs::read_dir(&case).unwrap() {
            out.push(f.unwrap().path().strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

#[test]
fn eval_run_writes_scores_summary_and_a_self_contained_report_and_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(tmp.path());
    let out = tmp.path().join("eval");
    ok(&run(&adapter, &out, &[]));

    let scores = lines(&out.join("scores.jsonl"));
    assert_eq!(scores.len(), IMAGES);
    let first = &scores[0];
    assert_eq!(first["file"], "man-in-blue/p000-s0-i00.png");
    assert_eq!(first["prompt"], "a man wearing a red hat");
    assert_eq!(first["category"], "accessory");
    let pair = scores
        .iter()
        .find(|l| l["subjects"].as_array().unwrap().len() == 2)
        .unwrap();
    assert_eq!(pair["prompt"], "a man and a woman talking in a cafe");
    for l in &scores {
        let n = l["subjects"].as_array().unwrap().len();
        assert!(l["clip_t"].as_f64().unwrap().is_finite(), "{l}");
        for key in ["face_detected", "face_sim", "clip_i"] {
            assert_eq!(l[key].as_array().unwrap().len(), n, "{key} in {l}");
        }
        assert!(l["faces_found"].is_u64(), "{l}");
    }
    assert_eq!(files(&out.join("images")).len(), IMAGES);

    let summary = json(&out.join("summary.json"));
    let overall = &summary["overall"];
    assert_eq!(overall["images"], IMAGES);
    assert_eq!(overall["clip_t"]["n"], IMAGES);
    // Per (image, subject): 16 single-subject images and the pair's 2 × 2.
    assert_eq!(overall["clip_i"]["n"], 20);
    assert_eq!(overall["face_sim"]["n"], 20);
    let mean_t = scores
        .iter()
        .map(|l| l["clip_t"].as_f64().unwrap())
        .sum::<f64>()
        / 18.0;
    assert!((overall["clip_t"]["mean"].as_f64().unwrap() - mean_t).abs() < 1e-9);
    let subjects: Vec<&String> = summary["per_subject"].as_object().unwrap().keys().collect();
    assert_eq!(subjects, ["man-in-blue", "old-woman"]);
    assert_eq!(summary["per_category"]["context"]["images"], 8);
    assert!(
        summary["conventions"]["no_face"]
            .as_str()
            .unwrap()
            .contains("scores 0")
    );
    assert!(
        summary["conventions"]["negative_face_sim"]
            .as_str()
            .unwrap()
            .contains("max(similarity, 0)")
    );
    assert_eq!(summary["images_dir"], "images");

    // Self-contained: every image is embedded (18 generated + 4 reference thumbnails).
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(
        html.matches("<img src=\"data:image/jpeg;base64,").count(),
        IMAGES + 4
    );
    assert_eq!(html.matches("<img ").count(), IMAGES + 4);
    assert!(html.contains("a woman in the snow") && html.contains("Per subject"));

    // A rerun into the same folder keeps the images and scores the same.
    let before = std::fs::read(out.join("scores.jsonl")).unwrap();
    let again = run(&adapter, &out, &[]);
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("18 of 18 images already in"));
    assert_eq!(std::fs::read(out.join("scores.jsonl")).unwrap(), before);
    // An interrupted run (a missing image) generates just that image again, identically.
    let victim = out.join("images/old-woman/p002-s0-i01.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    ok(&run(&adapter, &out, &[]));
    assert_eq!(std::fs::read(&victim).unwrap(), bytes);

    // Another adapter is refused in that folder.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = common::adapter_seeded(
        &root().join("configs/tiny-sdxl/unet/config.json"),
        &other_dir.join("a.safetensors"),
        1,
    );
    let e = stderr_of(&run(&other, &out, &[]));
    assert!(
        e.contains("run.json") && e.contains("another adapter"),
        "{e}"
    );

    // Two runs side by side.
    let cmp = tmp.path().join("cmp.html");
    ok(&troupe(&[
        "eval",
        "report",
        out.to_str().unwrap(),
        out.to_str().unwrap(),
        "--labels",
        "step 0,step 0 again",
        "--out",
        cmp.to_str().unwrap(),
    ]));
    let html = std::fs::read_to_string(&cmp).unwrap();
    assert!(html.contains("step 0 again"));
    assert_eq!(html.matches("<img ").count(), 2 * IMAGES + 4);
    let e = stderr_of(&troupe(&[
        "eval",
        "report",
        tmp.path().to_str().unwrap(),
        "--out",
        cmp.to_str().unwrap(),
    ]));
    assert!(e.contains("summary.json"), "{e}");
}

/// The references themselves as the "generated" images: each subject's face similarity and
/// CLIP-I are 100 (the same image), with every face found.
#[test]
fn scoring_the_references_themselves_gives_100() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(tmp.path());
    // The references, as the scorer saw them, from a run.
    let run_dir = tmp.path().join("run");
    ok(&run(&adapter, &run_dir, &[]));
    let images = tmp.path().join("images");
    for f in files(&run_dir.join("images")) {
        let case = f.parent().unwrap().to_str().unwrap();
        let subject = case.split('+').next().unwrap();
        let src = run_dir.join("references").join(format!("{subject}.png"));
        std::fs::create_dir_all(images.join(case)).unwrap();
        // One subject's images under `.jpg` names: the layout's stem with another image
        // extension is found (files are decoded by content).
        let name = if subject == "old-woman" {
            f.with_extension("jpg")
        } else {
            f.clone()
        };
        std::fs::copy(&src, images.join(name)).unwrap();
    }
    let out = tmp.path().join("scored");
    ok(&score(&images, &out, &[]));
    for l in lines(&out.join("scores.jsonl"))
        .iter()
        .filter(|l| l["subjects"].as_array().unwrap().len() == 1)
    {
        assert_eq!(l["face_detected"][0], true, "{l}");
        assert!(
            (l["face_sim"][0].as_f64().unwrap() - 100.0).abs() < 1e-3,
            "{l}"
        );
        assert!(
            (l["clip_i"][0].as_f64().unwrap() - 100.0).abs() < 1e-3,
            "{l}"
        );
    }
    let scored = lines(&out.join("scores.jsonl"));
    assert!(
        scored
            .iter()
            .any(|l| l["file"] == "old-woman/p000-s0-i00.jpg")
    );
    let summary = json(&out.join("summary.json"));
    let man = &summary["per_subject"]["man-in-blue"];
    assert_eq!(man["face_detection_rate"], 1.0);
    assert!(summary["images_dir"].as_str().unwrap().ends_with("images"));
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(tmp.path());
    let run_dir = tmp.path().join("run");
    ok(&run(&adapter, &run_dir, &[]));
    let images = run_dir.join("images");

    // A missing image: named, nothing averaged, nothing written.
    let partial = tmp.path().join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    for f in files(&images) {
        std::fs::create_dir_all(partial.join(f.parent().unwrap())).unwrap();
        std::fs::copy(images.join(&f), partial.join(&f)).unwrap();
    }
    std::fs::remove_file(partial.join("old-woman/p003-s0-i00.png")).unwrap();
    let out = tmp.path().join("out");
    let e = stderr_of(&score(&partial, &out, &[]));
    assert!(
        e.contains("partial")
            && e.contains("1 of the protocol's 18 images are missing")
            && e.contains("old-woman/p003-s0-i00.png"),
        "{e}"
    );
    assert!(!out.join("scores.jsonl").exists());

    // An image too long to score (the decoder's 16384-pixel side limit).
    let strip = image::RgbImage::from_pixel(1, 20000, image::Rgb([90, 90, 90]));
    strip
        .save(partial.join("old-woman/p003-s0-i00.png"))
        .unwrap();
    let e = stderr_of(&score(&partial, &out, &[]));
    assert!(e.contains("old-woman/p003-s0-i00.png"), "{e}");

    // Scorer models: a missing file, and a recogniser given as the detector.
    let e = stderr_of(&score(&images, &out, &["--clip", "models/no-such-clip"]));
    assert!(e.contains("models/no-such-clip"), "{e}");
    let rec = root().join("configs/tiny-scorers/rec_tiny.onnx");
    let e = stderr_of(&score(
        &images,
        &out,
        &["--face-detector", rec.to_str().unwrap()],
    ));
    assert!(
        e.contains("rec_tiny.onnx") && e.contains("not an SCRFD detector"),
        "{e}"
    );

    // A protocol with an unknown key, and one without subjects.
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(root().join(PROTOCOL)).unwrap();
    std::fs::write(
        &bad,
        text.replace(
            "images_per_prompt = 2",
            "images_per_prompt = 2\nimage_per_prompt = 3",
        ),
    )
    .unwrap();
    let o = eval(
        "score",
        bad.to_str().unwrap(),
        "--images",
        &images,
        &out,
        &[],
    );
    let e = stderr_of(&o);
    assert!(
        e.contains("bad.toml") && e.contains("unknown field `image_per_prompt`"),
        "{e}"
    );
    let o = eval(
        "score",
        "configs/eval/fastcomposer.toml",
        "--images",
        &images,
        &out,
        &[],
    );
    let e = stderr_of(&o);
    assert!(
        e.contains("fastcomposer.toml") && e.contains("no subjects"),
        "{e}"
    );
    assert!(!out.join("scores.jsonl").exists());
}

#[test]
fn the_fastcomposer_protocol_has_40_prompts_in_4_categories() {
    let tmp = tempfile::tempdir().unwrap();
    let subjects = tmp.path().join("subjects.toml");
    let shard = root().join("datasets/tiny/shard-00000.parquet");
    std::fs::write(
        &subjects,
        format!(
            "[[subjects]]\nname = \"a\"\nclass = \"man\"\nreference = \"{}#synth-0-000013\"\n",
            shard.display()
        ),
    )
    .unwrap();
    // With an empty images folder the error counts what the protocol names: 40 × 4 images.
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let extra = [
        "--subjects",
        subjects.to_str().unwrap(),
        "--clip",
        "configs/tiny-scorers/clip",
    ];
    let o = eval(
        "score",
        "configs/eval/fastcomposer.toml",
        "--images",
        &images,
        &tmp.path().join("out"),
        &extra,
    );
    let e = stderr_of(&o);
    assert!(
        e.contains("160 of the protocol's 160 images are missing"),
        "{e}"
    );
    assert!(e.contains("a/p000-s0-i00.png"), "{e}");
    let text = std::fs::read_to_string(root().join("configs/eval/fastcomposer.toml")).unwrap();
    for (category, n) in [
        ("accessory", 10),
        ("style", 10),
        ("action", 10),
        ("context", 10),
    ] {
        assert_eq!(
            text.matches(&format!("category = \"{category}\"")).count(),
            n
        );
    }
}
