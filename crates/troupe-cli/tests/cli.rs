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
