//! `troupe eval clip` prints the score transformers computes (fixtures of troupe-eval).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("crates/troupe-eval/tests/fixtures/clip_score")
}

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run troupe")
}

/// The fixture `CLIPModel` with the real CLIP tokenizer files beside it.
fn model_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("clip");
    std::fs::create_dir_all(&dir).unwrap();
    for src in [
        fixtures().join("model"),
        root().join("configs/tiny-sdxl/tokenizer"),
    ] {
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn clip_t_and_clip_i_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
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
