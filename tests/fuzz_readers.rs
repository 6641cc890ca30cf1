//! Property-based fuzzing of every reader of user files: valid files mutated at random (bytes
//! flipped, overwritten, cut short, inserted) and random bytes must give `Ok` or an error,
//! never a panic, a hang or an allocation abort. Each target runs `PROPTEST_CASES` cases
//! (default 300, a few thousand in all); a longer run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release -p troupe-tests --test fuzz_readers
//! ```

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::Config;
use troupe_data::image_io::DecodeLimits;
use troupe_data::import::{ImportOptions, import_storymaker};
use troupe_data::pack::{OnBadLine, pack_manifest, read_npy_f32};
use troupe_data::shard::{ShardReader, ShardWriterOptions};
use troupe_pt::{Tensor, Value};
use troupe_tests::{varied_rows, write_manifest_dataset};

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite the byte at this fraction of the length.
    Set(f64, u8),
    /// Flip one bit there.
    Flip(f64, u8),
    /// Insert bytes there.
    Insert(f64, Vec<u8>),
    /// Keep only this fraction of the bytes.
    Cut(f64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0, any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        4 => (0.0..1.0, 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        1 => (0.0..1.0, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (0.0..1.0).prop_map(Mutation::Cut),
    ]
}

fn mutated(valid: &[u8], changes: &[Mutation]) -> Vec<u8> {
    let mut b = valid.to_vec();
    for m in changes {
        let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len.saturating_sub(1));
        match m {
            Mutation::Set(p, v) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] = *v;
            }
            Mutation::Flip(p, bit) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] ^= 1 << bit;
            }
            Mutation::Insert(p, bytes) => {
                let i = at(*p, b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Cut(p) => b.truncate((p * b.len() as f64) as usize),
            _ => {}
        }
    }
    b
}

/// Mutated copies of `valid` (1–8 changes) and, now and then, random bytes.
fn inputs(valid: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        9 => proptest::collection::vec(mutation(), 1..8).prop_map(move |m| mutated(valid, &m)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// A small packed dataset (2 rows): its shard bytes and the manifest folder.
fn dataset() -> &'static (Vec<u8>, tempfile::TempDir) {
    static D: OnceLock<(Vec<u8>, tempfile::TempDir)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_manifest_dataset(&dir.path().join("src"), &varied_rows(2));
        let report = pack_manifest(
            &manifest,
            &dir.path().join("out"),
            ShardWriterOptions::default(),
            OnBadLine::Fail,
            DecodeLimits::default(),
        )
        .unwrap();
        (std::fs::read(&report.shards[0].path).unwrap(), dir)
    })
}

fn read_shard(path: &Path) {
    let Ok(reader) = ShardReader::open(path) else {
        return;
    };
    let _ = reader.read_sizes();
    let _ = reader.read_character_counts();
    for g in 0..reader.num_row_groups() {
        let _ = reader.read_row_group(g);
    }
}

fn torch_zip() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let t = |n: usize| Value::Tensor(Tensor::from_f32(vec![n, 2], &vec![0.5; 2 * n]).unwrap());
        let value = Value::Dict(vec![
            (Value::Str("id".into()), t(1)),
            (Value::Str("kps".into()), t(5)),
            (Value::Str("meta".into()), Value::Str("x".into())),
        ]);
        troupe_pt::write_bytes(&value, "archive").unwrap()
    })
}

fn safetensors_file() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors = vec![
            (
                "a.weight".to_string(),
                Tensor::from_f32(vec![2, 3], &[1.0; 6]).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::from_f32(vec![4], &[2.0; 4]).unwrap(),
            ),
        ];
        let meta = [("k".to_string(), "v".to_string())].into_iter().collect();
        troupe_models::weights::write_safetensors(&path, &tensors, Some(meta)).unwrap();
        std::fs::read(path).unwrap()
    })
}

fn read_safetensors(bytes: Vec<u8>) {
    let Ok(mut sd) = troupe_models::weights::StateDict::from_bytes(bytes) else {
        return;
    };
    let device = burn::prelude::Device::flex();
    for key in sd.keys() {
        let _ = match sd.shape(&key).map_or(0, <[usize]>::len) {
            1 => sd.take_any::<1>(&key, &device).map(|_| ()),
            2 => sd.take_any::<2>(&key, &device).map(|_| ()),
            _ => Ok(()),
        };
    }
}

const INDEX: &str = r#"{"1": [["000.png", "", "000_mask.png", "a caption", 1, "000_faceid"]],
 "2": [["001.png", "001.png", "001_mask.png", "two", 2, "001_faceid"]]}"#;

const MANIFEST_LINE: &str = r#"{"image": "img/0000.png", "caption": "c", "id": "x", "characters": [{"embedding": "img/0000_0.npy", "keypoints": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], "mask": "img/0000_0.png"}]}"#;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn shard_reader(bytes in inputs(&dataset().0)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        std::fs::write(&path, bytes).unwrap();
        read_shard(&path);
    }

    #[test]
    fn torch_zip_and_pickle_reader(bytes in inputs(torch_zip())) {
        let _ = troupe_pt::read_bytes(&bytes, "fuzz.bin");
    }

    #[test]
    fn safetensors_reader(bytes in inputs(safetensors_file())) {
        read_safetensors(bytes);
    }

    #[test]
    fn npy_reader(bytes in inputs(Box::leak(troupe_tests::npy_f32(&[1.0; 512], "(1, 512)").into_boxed_slice()))) {
        let _ = read_npy_f32(&bytes);
        let _ = troupe_data::pack::read_embedding_npy(&bytes);
    }

    #[test]
    fn storymaker_index_reader(bytes in inputs(INDEX.as_bytes())) {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index.json");
        std::fs::write(&index, bytes).unwrap();
        let _ = import_storymaker(
            &index,
            &dir.path().join("out"),
            &ImportOptions {
                on_bad: OnBadLine::Skip,
                ..Default::default()
            },
        );
    }

    #[test]
    fn manifest_parser(bytes in inputs(MANIFEST_LINE.as_bytes())) {
        // The manifest sits next to the packed dataset's files, so mutated lines that still
        // parse reach the image, mask and .npy readers.
        let src = dataset().1.path().join("src");
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifest.jsonl");
        let mut text = bytes;
        text.push(b'\n');
        std::fs::write(&manifest, text).unwrap();
        let linked = src.join(format!("fuzz-{}.jsonl", std::process::id()));
        let _ = std::fs::copy(&manifest, &linked);
        let _ = pack_manifest(
            &linked,
            &dir.path().join("out"),
            ShardWriterOptions::default(),
            OnBadLine::Skip,
            DecodeLimits::default(),
        );
    }
}
