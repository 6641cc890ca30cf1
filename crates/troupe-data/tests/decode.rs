//! Every file of the decode corpus (`scripts/make_decode_fixtures.py`: JPEGs and WebPs from
//! Pillow's and OpenCV's encoders) decodes to exactly the RGB pixels Pillow gives
//! (`Image.open(path).convert("RGB")`, what the reference's loader reads).

use std::path::PathBuf;

use troupe_data::Location;
use troupe_data::image_io::{DecodeLimits, decode_rgb};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decode")
}

/// `(file, values that differ from Pillow's, largest difference)` for each file with `ext`.
fn mismatches(ext: &str) -> Vec<(String, usize, i32)> {
    let listed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(corpus().join("corpus.json")).unwrap())
            .unwrap();
    let mut out = Vec::new();
    for name in listed
        .as_object()
        .unwrap()
        .keys()
        .filter(|n| n.ends_with(ext))
    {
        let path = corpus().join(name);
        let bytes = std::fs::read(&path).unwrap();
        let got = decode_rgb(&bytes, &Location::file(&path), DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let want = image::open(path.with_extension("png")).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{name}");
        let diffs: Vec<i32> = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .filter(|&d| d > 0)
            .collect();
        out.push((
            name.clone(),
            diffs.len(),
            diffs.iter().copied().max().unwrap_or(0),
        ));
    }
    assert!(!out.is_empty(), "no .{ext} files in the corpus");
    out
}

#[test]
fn jpegs_decode_exactly_as_pillow() {
    let all = mismatches("jpg");
    let bad: Vec<_> = all.iter().filter(|m| m.1 > 0).collect();
    assert!(
        bad.is_empty(),
        "differ from Pillow (file, values, max): {bad:?}"
    );
    assert!(all.len() >= 14, "{} JPEGs", all.len());
}

#[test]
fn webps_decode_exactly_as_pillow() {
    let all = mismatches("webp");
    let bad: Vec<_> = all.iter().filter(|m| m.1 > 0).collect();
    assert!(
        bad.is_empty(),
        "differ from Pillow (file, values, max): {bad:?}"
    );
}
