//! The `troupe data` commands as a user runs them: exit status, and messages that say where.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .output()
        .expect("run troupe")
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/tiny")
}

#[test]
fn every_data_command_has_help() {
    for cmd in [
        "pack",
        "import-storymaker",
        "check",
        "stats",
        "synth",
        "preview",
        "bench",
    ] {
        let out = troupe(&["data", cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{cmd}"
        );
    }
}

#[test]
fn the_bundled_tiny_dataset_checks_clean_and_streams() {
    let out = troupe(&["data", "check", tiny().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("48 rows: 0 problem(s)"));
    let out = troupe(&[
        "data",
        "preview",
        tiny().to_str().unwrap(),
        "--batches",
        "3",
        "--batch-size",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("epoch 0 batch")
            .count(),
        3
    );
}

/// `data preview --dump` on the tiny dataset: every sample's files, and `sample.json` consistent
/// with them; `--no-augment` leaves rotation and dropout out.
#[test]
fn preview_dumps_what_the_loader_produced() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny();
    let dump = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out_dir = dir.path().join(name);
        let mut args = vec![
            "data",
            "preview",
            tiny.to_str().unwrap(),
            "--batches",
            "48",
            "--batch-size",
            "1",
            "--dump",
            out_dir.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = troupe(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 48 sample(s)"));
        let mut samples = Vec::new();
        for entry in std::fs::read_dir(&out_dir).unwrap() {
            let d = entry.unwrap().path();
            let text = std::fs::read_to_string(d.join("sample.json")).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(json["id"].as_str().unwrap(), d.file_name().unwrap());
            let [w, h] = [0, 1].map(|k| json["size"][k].as_u64().unwrap() as u32);
            let gt = image::open(d.join("gt.png")).unwrap();
            assert_eq!((gt.width(), gt.height()), (w, h));
            let n = json["characters"].as_array().unwrap().len();
            for i in 0..n {
                let mask = image::open(d.join(format!("mask_{i}.png"))).unwrap();
                assert_eq!((mask.width(), mask.height()), (w / 8, h / 8));
                let dropped = json["drop_image"].as_bool().unwrap();
                for crop in ["body", "face"] {
                    let path = d.join(format!("{crop}_{i}.png"));
                    assert_eq!(path.exists(), !dropped, "{}", path.display());
                }
            }
            assert!(!d.join(format!("mask_{n}.png")).exists());
            samples.push(json);
        }
        assert_eq!(samples.len(), 48);
        samples
    };
    let rotations = |samples: &[serde_json::Value]| -> Vec<f64> {
        samples
            .iter()
            .flat_map(|s| s["characters"].as_array().unwrap().clone())
            .map(|c| c["rotation_degrees"].as_f64().unwrap())
            .collect()
    };
    let drops = |samples: &[serde_json::Value]| {
        samples
            .iter()
            .filter(|s| s["drop_image"] == true || s["drop_text"] == true)
            .count()
    };
    let augmented = dump("augmented", &[]);
    assert!(rotations(&augmented).iter().all(|r| r.abs() <= 10.0));
    assert!(rotations(&augmented).iter().any(|r| r.abs() > 0.1));
    assert!(drops(&augmented) > 0, "48 samples at 30 % dropout");
    let plain = dump("plain", &["--no-augment"]);
    assert!(rotations(&plain).iter().all(|r| *r == 0.0));
    assert_eq!(drops(&plain), 0);
}

#[test]
fn check_exits_non_zero_naming_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // A shard whose second row group is cut off: the footer is gone, so the file is unreadable.
    let src = std::fs::read(tiny().join("shard-00000.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &src[..src.len() / 2]).unwrap();
    let out = troupe(&["data", "check", cut.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cut.parquet") && err.contains("truncated or corrupt"),
        "{err}"
    );

    // A manifest line with a wrong-length embedding: pack names the line and field and exits 1.
    let img = dir.path().join("a.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9]))
        .save(&img)
        .unwrap();
    image::GrayImage::from_pixel(16, 16, image::Luma([255]))
        .save(dir.path().join("m.png"))
        .unwrap();
    let line = serde_json::json!({"image": "a.png", "caption": "x", "characters": [
        {"embedding": [1.0, 0.0], "keypoints": [1, 1, 2, 2, 3, 3, 4, 4, 5, 5], "mask": "m.png"}]});
    std::fs::write(dir.path().join("m.jsonl"), line.to_string()).unwrap();
    let out = troupe(&[
        "data",
        "pack",
        dir.path().join("m.jsonl").to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "m.jsonl: line 1: field `characters[0].embedding`: expected 512 values, found 2"
        ),
        "{err}"
    );
}

#[test]
fn the_bundled_datasets_regenerate_bit_for_bit() {
    // The commands datasets/README.md and configs/tiny.toml give for them.
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "tiny",
            &[
                "--rows",
                "48",
                "--rows-per-shard",
                "24",
                "--rows-per-row-group",
                "8",
                "--seed",
                "0",
            ],
            &["shard-00000.parquet", "shard-00001.parquet"],
        ),
        (
            "tiny-val",
            &["--rows", "8", "--rows-per-row-group", "8", "--seed", "1"],
            &["shard-00000.parquet"],
        ),
    ];
    for (name, args, files) in cases {
        let out_dir = tmp.path().join(name);
        let out = out_dir.to_str().unwrap();
        let o = troupe(&[&["data", "synth", "--out", out][..], args].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let committed = tiny().join("..").join(name);
        for f in files {
            let (a, b) = (
                std::fs::read(out_dir.join(f)).unwrap(),
                std::fs::read(committed.join(f)).unwrap(),
            );
            assert!(
                a == b,
                "datasets/{name}/{f} differs from a fresh `troupe data synth`"
            );
        }
    }
}
