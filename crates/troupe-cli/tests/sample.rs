//! `troupe sample` end to end on the tiny SDXL: outputs, sidecars, determinism, and bad input
//! refused before any denoising with nothing left in `--out`.

use std::path::{Path, PathBuf};

mod common;

use common::{adapter, adapter_for, root, troupe};
use std::process::Output;

fn refs() -> PathBuf {
    root().join("crates/troupe-diffusion/tests/fixtures/pipeline")
}

/// `image=…,mask=…,embedding=…,keypoints=…` for fixture reference `k`, with overrides.
fn reference(k: usize, over: &[(&str, &Path)]) -> String {
    let d = refs();
    let mut parts = [
        ("image", d.join(format!("person_{k}.png"))),
        ("mask", d.join(format!("mask_{k}.png"))),
        ("embedding", d.join(format!("embedding_{k}.npy"))),
        ("keypoints", d.join(format!("kps_{k}.json"))),
    ];
    for (key, p) in over {
        parts.iter_mut().find(|(k, _)| k == key).unwrap().1 = p.to_path_buf();
    }
    parts
        .iter()
        .map(|(k, p)| format!("{k}={}", p.display()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `troupe sample` on the tiny SDXL, 3 steps, prompt "a person", then `extra`.
fn sample(adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    sample_without_prompt(
        adapter,
        out,
        &[&["--prompt", "a person"][..], extra].concat(),
    )
}

/// `troupe sample … extra` fails naming `want`, before creating `out`.
fn assert_refused(adapter: &Path, out: &Path, extra: &[&str], want: &str) {
    let o = sample(adapter, out, extra);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{extra:?} was accepted");
    assert!(
        stderr.contains(want),
        "{extra:?}: expected `{want}` in: {stderr}"
    );
    assert!(!out.exists(), "{extra:?}: {} was created", out.display());
}

/// [`sample`] without a prompt (for `--jobs`).
fn sample_without_prompt(adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let base = [
        "sample",
        "--model",
        "configs/tiny-sdxl",
        "--image-encoder",
        "configs/tiny-sdxl/image_encoder",
        "--steps",
        "3",
    ];
    let a = [
        &base[..],
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        extra,
    ]
    .concat();
    troupe(&a)
}

#[test]
fn writes_images_sidecars_and_grid_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let r = reference(0, &[]);
    let mut pngs = Vec::new();
    for run in ["x", "y"] {
        let out = tmp.path().join(run);
        let o = sample(
            &a,
            &out,
            &["--reference", &r, "--num-images", "2", "--seed", "3"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "grid.png",
                "image-00.json",
                "image-00.png",
                "image-01.json",
                "image-01.png"
            ]
        );
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("image-01.json")).unwrap()).unwrap();
        assert_eq!(side["seed"], 3);
        assert_eq!(side["scheduler"], "unipc");
        assert_eq!(side["adapter_sha256"].as_str().unwrap().len(), 64);
        let img = image::open(out.join("image-00.png")).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        pngs.push(std::fs::read(out.join("image-00.png")).unwrap());
    }
    assert_eq!(pngs[0], pngs[1], "same seed, different PNG");
}

#[test]
fn bad_input_is_refused_before_denoising_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let black = tmp.path().join("black.png");
    image::RgbImage::new(96, 80).save(&black).unwrap();
    let short = tmp.path().join("short.npy");
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (10,), }";
    let header = format!("{header:<117}\n");
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.extend([0u8; 40]);
    std::fs::write(&short, npy).unwrap();
    let far = tmp.path().join("far.json");
    std::fs::write(&far, "[[1,1],[2,2],[3,3],[4,4],[500,5]]").unwrap();
    let missing = tmp.path().join("missing.png");
    let other_unet = root().join("crates/troupe-models/tests/fixtures/unet/sdxl_tiny/config.json");
    let wrong = adapter_for(&other_unet, &tmp.path().join("wrong.safetensors"));

    let good = reference(0, &[]);
    let refused = |adapter: &Path, extra: &[&str], want: &str| {
        assert_refused(adapter, &tmp.path().join("out"), extra, want)
    };
    refused(&a, &["--scheduler", "heun", "--reference", &good], "heun");
    refused(&a, &["--width", "60", "--reference", &good], "--width");
    refused(&a, &["--device", "tpu", "--reference", &good], "`--device`");
    refused(&wrong, &["--reference", &good], "wrong.safetensors");
    let bad_refs = [
        (reference(0, &[("mask", &black)]), "no person pixel"),
        (
            reference(0, &[("embedding", &short)]),
            "shape [10]: an embedding is (512,)",
        ),
        (reference(0, &[("keypoints", &far)]), "outside"),
        (reference(0, &[("image", &missing)]), "missing.png"),
    ];
    for (r, want) in &bad_refs {
        refused(&a, &["--reference", r], want);
    }
}

#[test]
fn jobs_batched_equal_jobs_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let one = reference(0, &[]);
    let two = [reference(0, &[]), reference(1, &[])];
    let jobs = tmp.path().join("jobs.jsonl");
    let lines = [
        serde_json::json!({"prompt": "a person", "references": [one], "seed": 1, "name": "a"}),
        serde_json::json!({"prompt": "two people", "references": two, "seed": 2, "num_images": 2,
                           "negative_prompt": "ugly", "name": "b"}),
        serde_json::json!({"prompt": "a person", "references": [one], "seed": 3, "scheduler": "euler-a",
                           "name": "c"}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&jobs, text.join("\n")).unwrap();
    let run = |batch: &str, out: &Path| {
        let jobs = jobs.to_str().unwrap();
        let o = sample_without_prompt(&a, out, &["--jobs", jobs, "--batch-size", batch]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (batched, single) = (tmp.path().join("batched"), tmp.path().join("single"));
    run("4", &batched);
    run("1", &single);
    for f in ["a-00.png", "b-00.png", "b-01.png", "c-00.png"] {
        let (x, y) = (
            std::fs::read(batched.join(f)).unwrap(),
            std::fs::read(single.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between batched and one-at-a-time generation"
        );
    }
}

#[test]
fn a_jobs_line_with_an_unknown_key_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let jobs = tmp.path().join("jobs.jsonl");
    let good = serde_json::json!({"prompt": "a person", "references": [reference(0, &[])]});
    let typo =
        serde_json::json!({"prompt": "a person", "references": [reference(0, &[])], "stpes": 3});
    std::fs::write(&jobs, format!("{good}\n\n{typo}\n")).unwrap();
    let out = tmp.path().join("out");
    let o = sample_without_prompt(&a, &out, &["--jobs", jobs.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("line 3") && stderr.contains("stpes"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn a_plain_photo_reference_gets_its_identity_from_face_analysis() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let faces = root().join("crates/troupe-faces/tests/fixtures");
    let photo = faces.join("astronaut.png");
    let mask = tmp.path().join("mask.png");
    image::RgbImage::from_pixel(256, 256, image::Rgb([255, 255, 255]))
        .save(&mask)
        .unwrap();
    let r = format!("photo={},mask={}", photo.display(), mask.display());
    let out = tmp.path().join("out");
    let (det, rec) = (faces.join("det_tiny.onnx"), faces.join("rec_tiny.onnx"));
    let detector = [
        "--face-detector",
        det.to_str().unwrap(),
        "--face-recognizer",
        rec.to_str().unwrap(),
        "--det-size",
        "160",
        "--reference",
        &r,
    ];
    let o = sample(&a, &out, &detector);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("image-00.json")).unwrap()).unwrap();
    assert!(
        side["references"][0]
            .as_str()
            .unwrap()
            .starts_with("photo=")
    );
    // Without the face models the reference is refused, naming what is missing.
    let o = sample(&a, &tmp.path().join("out2"), &["--reference", &r]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--face-detector"));
}

#[test]
fn a_pose_through_a_controlnet_batches_with_jobs_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter(tmp.path());
    let pose = refs().join("pose.png"); // 160×128: resized to 80×64
    let one = reference(0, &[]);
    let jobs = tmp.path().join("jobs.jsonl");
    let lines = [
        serde_json::json!({"prompt": "a person", "references": [one], "seed": 1, "name": "posed",
                           "pose": pose, "controlnet_scale": 0.8}),
        serde_json::json!({"prompt": "a person", "references": [one], "seed": 1, "name": "free",
                           "controlnet_scale": 0.8}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&jobs, text.join("\n")).unwrap();
    let cn = "configs/tiny-sdxl/controlnet";
    let run = |batch: &str, out: &Path| {
        let extra = [
            "--jobs",
            jobs.to_str().unwrap(),
            "--batch-size",
            batch,
            "--controlnet",
            cn,
            "--width",
            "80",
            "--height",
            "64",
        ];
        let o = sample_without_prompt(&a, out, &extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (batched, single) = (tmp.path().join("batched"), tmp.path().join("single"));
    run("4", &batched);
    run("1", &single);
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for f in ["posed-00.png", "free-00.png"] {
        assert!(
            read(&batched, f) == read(&single, f),
            "{f}: batched differs"
        );
    }
    // Same seed and prompt: only the pose differs.
    assert!(read(&batched, "posed-00.png") != read(&batched, "free-00.png"));
    let side: serde_json::Value = serde_json::from_slice(&read(&batched, "posed-00.json")).unwrap();
    assert!(side["pose"].as_str().unwrap().ends_with("pose.png"));
    assert_eq!(side["controlnet_scale"], 0.8);
    assert_eq!(side["controlnet_context"], "text");
    let side: serde_json::Value = serde_json::from_slice(&read(&batched, "free-00.json")).unwrap();
    assert!(side["pose"].is_null());

    // Refused before any denoising, nothing left in --out.
    let good = reference(0, &[]);
    let missing = tmp.path().join("missing.png");
    let other = root().join("crates/troupe-models/tests/fixtures/controlnet/sd15_bgr");
    let refused = |extra: &[&str], want: &str| {
        let extra = [&["--reference", &good][..], extra].concat();
        assert_refused(&a, &tmp.path().join("out"), &extra, want)
    };
    let pose = pose.to_str().unwrap();
    refused(
        &["--controlnet", cn, "--pose", missing.to_str().unwrap()],
        "missing.png",
    );
    // 160×128 for a 64×64 image.
    refused(&["--controlnet", cn, "--pose", pose], "not the same shape");
    refused(&["--pose", pose], "--controlnet");
    refused(
        &[
            "--controlnet",
            other.to_str().unwrap(),
            "--pose",
            pose,
            "--width",
            "80",
        ],
        "sd15_bgr",
    );
}
