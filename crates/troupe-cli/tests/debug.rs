//! `troupe debug tokenize` against the CLIP tokenizer fixtures of `troupe-models`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .output()
        .expect("run troupe")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../troupe-models/tests/fixtures/clip_tokenizer")
}

/// SDXL's `tokenizer_2/` (pads with `!`, id 0) in a scratch folder.
fn tokenizer_2(tmp: &Path) -> PathBuf {
    let d = tmp.join("tokenizer_2");
    std::fs::create_dir(&d).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        let gz = std::fs::File::open(fixtures().join("tokenizer").join(format!("{f}.gz"))).unwrap();
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut bytes)
            .unwrap();
        std::fs::write(d.join(f), bytes).unwrap();
    }
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(fixtures().join("tokenizer_2").join(f), d.join(f)).unwrap();
    }
    d
}

#[test]
fn tokenize_prints_77_ids_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tokenizer_2(tmp.path());
    let out = troupe(&[
        "debug",
        "tokenize",
        "--model",
        dir.to_str().unwrap(),
        "a photo of a cat",
        "",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    let mut first = vec!["49406", "320", "1125", "539", "320", "2368", "49407"];
    first.extend(std::iter::repeat_n("0", 70));
    assert_eq!(lines[0], first.join(" "));
    let mut second = vec!["49406", "49407"];
    second.extend(std::iter::repeat_n("0", 75));
    assert_eq!(lines[1], second.join(" "));
}

#[test]
fn tokenize_names_the_missing_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = troupe(&[
        "debug",
        "tokenize",
        "--model",
        missing.to_str().unwrap(),
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}
