//! Checks `ClipTokenizer` id for id against transformers 5.23's `CLIPTokenizer`.
//!
//! The fixtures come from `scripts/make_tokenizer_fixtures.py`: SDXL-style `tokenizer/` and
//! `tokenizer_2/` folders built from the real CLIP BPE vocabulary (vocab.json and merges.txt stored
//! once, gzipped, under `tokenizer/`) and `expected.json`, the ids transformers produced for a few
//! hundred prompts. No network and no Python are needed here.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use troupe_models::tokenizer::{ClipTokenizer, TokenizerError};

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_tokenizer")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Materialises `tokenizer/` and `tokenizer_2/` (configs + shared vocab/merges) in a scratch dir.
fn materialise() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixture_root();
    let vocab = gunzip(&root.join("tokenizer/vocab.json.gz"));
    let merges = gunzip(&root.join("tokenizer/merges.txt.gz"));
    for name in ["tokenizer", "tokenizer_2"] {
        let d = tmp.path().join(name);
        fs::create_dir(&d).unwrap();
        fs::write(d.join("vocab.json"), &vocab).unwrap();
        fs::write(d.join("merges.txt"), &merges).unwrap();
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            fs::copy(root.join(name).join(f), d.join(f)).unwrap();
        }
    }
    tmp
}

struct Case {
    prompt: String,
    expected: Vec<u32>,
}

fn cases(folder: &str) -> Vec<Case> {
    let text = fs::read_to_string(fixture_root().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            // Where transformers' slow and fast names disagreed the fixture records both; SDXL
            // pipelines use `CLIPTokenizer` (the `folder` key). In transformers 5.x they agree.
            Case {
                prompt: c["prompt"].as_str().unwrap().to_owned(),
                expected: ids(&c[folder]),
            }
        })
        .collect()
}

/// Compares every fixture prompt; returns (matches, total) and prints the mismatches.
fn compare(tok: &ClipTokenizer, folder: &str) -> (usize, usize) {
    let cases = cases(folder);
    let mut matched = 0;
    for c in &cases {
        let got = tok.encode(&c.prompt).unwrap();
        assert_eq!(got.len(), 77);
        if got == c.expected {
            matched += 1;
        } else {
            eprintln!(
                "{folder}: MISMATCH {:?}\n  got      {got:?}\n  expected {:?}",
                c.prompt, c.expected
            );
        }
    }
    eprintln!(
        "{folder}: {matched}/{} prompts match transformers exactly",
        cases.len()
    );
    (matched, cases.len())
}

#[test]
fn tokenizer_matches_transformers() {
    let tmp = materialise();
    let tok = ClipTokenizer::from_dir(&tmp.path().join("tokenizer")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 49407, 77)
    );
    let (matched, total) = compare(&tok, "tokenizer");
    assert!(total > 300, "fixture has only {total} prompts");
    assert_eq!(matched, total);
}

#[test]
fn tokenizer_2_matches_transformers() {
    let tmp = materialise();
    let tok = ClipTokenizer::from_dir(&tmp.path().join("tokenizer_2")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 0, 77)
    );
    let (matched, total) = compare(&tok, "tokenizer_2");
    assert_eq!(matched, total);
}

#[test]
fn known_prompts() {
    let tmp = materialise();
    let t1 = ClipTokenizer::from_dir(&tmp.path().join("tokenizer")).unwrap();
    let t2 = ClipTokenizer::from_dir(&tmp.path().join("tokenizer_2")).unwrap();
    let ids = t1.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == 49407));
    let ids = t2.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == 0));
    // Empty prompt: BOS, EOS, padding.
    assert_eq!(&t1.encode("").unwrap()[..3], &[49406, 49407, 49407]);
    assert_eq!(&t2.encode("").unwrap()[..3], &[49406, 49407, 0]);
    // Truncation keeps BOS + 75 tokens + EOS.
    let long = "word ".repeat(200);
    let ids = t1.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&i| i == ids[1]));
}

#[test]
fn encode_batch_matches_encode() {
    let tmp = materialise();
    let tok = ClipTokenizer::from_dir(&tmp.path().join("tokenizer_2")).unwrap();
    let cases = cases("tokenizer_2");
    let prompts: Vec<&str> = cases.iter().map(|c| c.prompt.as_str()).collect();
    let batch = tok.encode_batch(&prompts).unwrap();
    assert_eq!(batch.len(), prompts.len());
    for (p, ids) in prompts.iter().zip(&batch) {
        assert_eq!(ids, &tok.encode(p).unwrap(), "{p:?}");
    }
}

/// A folder with only `tokenizer.json` (as transformers saves it) tokenises the same way.
#[test]
fn tokenizer_json_folder_matches() {
    let tmp = materialise();
    let src = tmp.path().join("tokenizer_2");
    let vocab: Value = serde_json::from_slice(&fs::read(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<Value> = fs::read_to_string(src.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| Value::String(l.to_owned()))
        .collect();
    let added = |id: u32, content: &str, normalized: bool| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": normalized, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "!", false), added(49406, "<|startoftext|>", true),
                         added(49407, "<|endoftext|>", false)],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let d = tmp.path().join("json_only");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("tokenizer.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let tok = ClipTokenizer::from_dir(&d).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let (matched, total) = compare(&tok, "tokenizer_2");
    assert_eq!(matched, total);
}

#[test]
fn defaults_without_configs() {
    // No tokenizer_config.json / special_tokens_map.json: CLIPTokenizer's defaults, 77, pad EOS.
    let tmp = materialise();
    let d = tmp.path().join("tokenizer");
    fs::remove_file(d.join("tokenizer_config.json")).unwrap();
    fs::remove_file(d.join("special_tokens_map.json")).unwrap();
    let tok = ClipTokenizer::from_dir(&d).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 49407, 77)
    );
    assert_eq!(
        &tok.encode("a photo of a cat").unwrap()[..8],
        &[49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    );
}

#[test]
fn errors_name_the_file() {
    let tmp = materialise();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = ClipTokenizer::from_dir(&empty).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");

    let d = tmp.path().join("tokenizer");
    fs::remove_file(d.join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_dir(&d).unwrap_err();
    assert!(err.to_string().contains("merges.txt"), "{err}");

    let d = tmp.path().join("tokenizer_2");
    fs::write(d.join("tokenizer_config.json"), "{not json").unwrap();
    let err = ClipTokenizer::from_dir(&d).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}
