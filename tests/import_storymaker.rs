//! StoryMaker's reference layout on hand-made files: 1, 2 and 3 characters, odd image sizes.

use std::path::Path;

use image::{Rgb, RgbImage};
use troupe_data::Location;
use troupe_data::check::check_shards;
use troupe_data::image_io::{DecodeLimits, decode_gray, encode_png_rgb};
use troupe_data::import::{SLOT_COLOURS, import_storymaker};
use troupe_data::pack::OnBadLine;
use troupe_data::shard::{ShardReader, ShardWriterOptions, find_shards};
use troupe_pt::{Tensor, Value};
use troupe_tests::{embedding, image};

/// One entry: image size and each character's rectangle in image pixels.
struct Entry {
    size: (u32, u32),
    rects: Vec<[u32; 4]>,
}

fn entries() -> Vec<Entry> {
    vec![
        Entry {
            size: (301, 517),
            rects: vec![[40, 60, 140, 300]],
        },
        Entry {
            size: (333, 211),
            rects: vec![[5, 10, 100, 200], [150, 0, 250, 150]],
        },
        Entry {
            size: (411, 257),
            rects: vec![[0, 20, 100, 257], [120, 30, 220, 200], [260, 40, 411, 240]],
        },
    ]
}

/// Crop-relative keypoints as the reference stores them: a face-like layout inside the crop.
fn crop_kps(i: usize, j: usize) -> [f32; 10] {
    let o = (i * 3 + j) as f32;
    [
        20.0 + o,
        30.0,
        50.0 + o,
        31.0,
        35.0,
        45.0,
        24.0,
        60.0 + o,
        47.0,
        61.0,
    ]
}

fn write_faceid(path: &Path, id: &[f32], kps: &[f32; 10]) {
    let value = Value::Dict(vec![
        (
            Value::Str("id".into()),
            Value::Tensor(Tensor::from_f32(vec![1, 512], id).unwrap()),
        ),
        (
            Value::Str("kps".into()),
            Value::Tensor(Tensor::from_f32(vec![5, 2], kps).unwrap()),
        ),
    ]);
    troupe_pt::write_file(path, &value).unwrap();
}

/// Writes the reference layout under `root`; the mask is written at half size for entry 1 to
/// exercise the resize to image size.
fn write_layout(root: &Path) -> std::path::PathBuf {
    let mut index = serde_json::Map::new();
    for (i, e) in entries().iter().enumerate() {
        let (w, h) = e.size;
        std::fs::write(
            root.join(format!("{i:03}.png")),
            encode_png_rgb(&image(w, h, i as u32)),
        )
        .unwrap();
        let mut mask = RgbImage::new(w, h);
        for (j, r) in e.rects.iter().enumerate() {
            for y in r[1]..r[3] {
                for x in r[0]..r[2] {
                    mask.put_pixel(x, y, Rgb(SLOT_COLOURS[j]));
                }
            }
        }
        if i == 1 {
            mask =
                image::imageops::resize(&mask, w * 2, h * 2, image::imageops::FilterType::Nearest);
        }
        mask.save(root.join(format!("{i:03}_mask.png"))).unwrap();
        let faceid = root.join(format!("{i:03}_faceid"));
        std::fs::create_dir_all(&faceid).unwrap();
        for j in 0..e.rects.len() {
            write_faceid(
                &faceid.join(format!("{j}.bin")),
                &embedding(100 + 10 * i as u32 + j as u32),
                &crop_kps(i, j),
            );
        }
        let pose = if i == 0 {
            serde_json::json!(format!("{i:03}.png"))
        } else {
            serde_json::json!("")
        };
        let entry = serde_json::json!([
            format!("{i:03}.png"),
            pose,
            format!("{i:03}_mask.png"),
            format!("caption {i}"),
            e.rects.len(),
            format!("{i:03}_faceid")
        ]);
        index.insert(e.rects.len().to_string(), serde_json::json!([entry]));
    }
    let path = root.join("test.json");
    std::fs::write(&path, serde_json::Value::Object(index).to_string()).unwrap();
    path
}

#[test]
fn import_reads_masks_embeddings_and_crop_relative_keypoints() {
    let dir = tempfile::tempdir().unwrap();
    let index = write_layout(dir.path());
    let out = dir.path().join("shards");
    let report = import_storymaker(
        &index,
        &out,
        ShardWriterOptions::default(),
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .unwrap();
    assert_eq!(report.rows, 3);
    let shards = find_shards(&[out]).unwrap();
    let checked = check_shards(&shards, DecodeLimits::default(), 1);
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);

    let reader = ShardReader::open(&shards[0]).unwrap();
    let rows: Vec<_> = reader
        .read_row_group(0)
        .unwrap()
        .into_iter()
        .map(|(_, s)| s.unwrap())
        .collect();
    for (i, e) in entries().iter().enumerate() {
        let s = &rows[i];
        assert_eq!((s.width, s.height), e.size);
        assert_eq!(s.caption, format!("caption {i}"));
        assert_eq!(s.pose.is_some(), i == 0);
        assert_eq!(s.characters.len(), e.rects.len());
        for (j, c) in s.characters.iter().enumerate() {
            let want = embedding(100 + 10 * i as u32 + j as u32);
            assert!(
                c.embedding
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert_eq!(
                c.bbox, e.rects[j],
                "the mask is exactly the character's colour"
            );
            let mask =
                decode_gray(&c.mask.bytes, &Location::default(), DecodeLimits::default()).unwrap();
            assert!(mask.iter().all(|&v| v == 0 || v == 255));
            // The crop is the 7x7-dilated mask's bounding box: the rectangle grown by 3, clipped.
            let (x0, y0) = (
                e.rects[j][0].saturating_sub(3) as f32,
                e.rects[j][1].saturating_sub(3) as f32,
            );
            let kps = crop_kps(i, j);
            for k in 0..5 {
                assert_eq!(c.keypoints[2 * k], kps[2 * k] + x0);
                assert_eq!(c.keypoints[2 * k + 1], kps[2 * k + 1] + y0);
            }
        }
    }
}

#[test]
fn import_errors_name_the_entry_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let index = write_layout(dir.path());
    // Character 1 of entry "2" loses its colour; a faceid file of entry "3" is a pickle bomb.
    let mut mask = image::open(dir.path().join("001_mask.png"))
        .unwrap()
        .to_rgb8();
    mask.pixels_mut()
        .filter(|p| p.0 == SLOT_COLOURS[1])
        .for_each(|p| *p = Rgb([0, 0, 0]));
    mask.save(dir.path().join("001_mask.png")).unwrap();
    std::fs::write(
        dir.path().join("002_faceid/2.bin"),
        b"PK\x03\x04 not really a zip",
    )
    .unwrap();
    let out = dir.path().join("shards");
    let errors = import_storymaker(
        &index,
        &out,
        ShardWriterOptions::default(),
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .unwrap_err();
    let e = &errors[0];
    assert_eq!(e.at.field.as_deref(), Some("\"2\"[0].mask"), "{e}");
    assert!(e.message.contains("character 1"), "{e}");

    let report = import_storymaker(
        &index,
        &dir.path().join("skip"),
        ShardWriterOptions::default(),
        OnBadLine::Skip,
        DecodeLimits::default(),
    )
    .unwrap();
    assert_eq!(report.rows, 1);
    assert_eq!(report.skipped.len(), 2);
    assert!(
        report.skipped[1].to_string().contains("2.bin"),
        "{}",
        report.skipped[1]
    );
}

/// A change to an index.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// Imports `index` (fail on the first bad entry); the problems, or the notes of a success.
fn import(index: &Path, out: &Path) -> Result<Vec<String>, Vec<String>> {
    import_storymaker(
        index,
        out,
        ShardWriterOptions::default(),
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .map(|r| r.notes.iter().map(|n| n.to_string()).collect())
    .map_err(|e| e.iter().map(|n| n.to_string()).collect())
}

#[test]
fn import_refuses_what_the_reference_would_misread_and_reports_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let index = write_layout(dir.path());
    // The double-size mask of entry "2" has the image's aspect: resized, and said.
    let notes = import(&index, &dir.path().join("ok")).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("001_mask.png is 666x422") && notes[0].contains("resized"));

    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "non-numeric key",
            Box::new(|v| {
                let e = v.as_object_mut().unwrap().remove("1").unwrap();
                v["one"] = e;
            }),
            "index keys are person counts",
        ),
        (
            "num_persons differs from the key",
            Box::new(|v| v["2"][0][4] = 3.into()),
            "listed under \"2\"",
        ),
        (
            "null caption",
            Box::new(|v| v["1"][0][3] = serde_json::Value::Null),
            "\"1\"[0].caption",
        ),
        (
            "one image twice",
            Box::new(|v| {
                let e = v["1"][0].clone();
                v["1"].as_array_mut().unwrap().push(e);
            }),
            "duplicate id `000`",
        ),
    ];
    for (i, (what, edit, want)) in cases.iter().enumerate() {
        let mut v = original.clone();
        edit(&mut v);
        let path = dir.path().join(format!("case{i}.json"));
        std::fs::write(&path, v.to_string()).unwrap();
        let errors = import(&path, &dir.path().join(format!("out{i}"))).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{what}: {errors:?}"
        );
    }

    // A transposed mask is another shape, not a resize.
    let mask = image::open(dir.path().join("000_mask.png"))
        .unwrap()
        .to_rgb8();
    image::imageops::rotate90(&mask)
        .save(dir.path().join("000_mask.png"))
        .unwrap();
    let errors = import(&index, &dir.path().join("transposed")).unwrap_err();
    assert!(
        errors[0].contains("000_mask.png is 517x301, the image is 301x517"),
        "{errors:?}"
    );
    image::imageops::rotate270(&image::imageops::rotate90(&mask))
        .save(dir.path().join("000_mask.png"))
        .unwrap();
    // A non-finite embedding names its file.
    let mut id = embedding(1);
    id[3] = f32::INFINITY;
    write_faceid(&dir.path().join("000_faceid/0.bin"), &id, &crop_kps(0, 0));
    let errors = import(&index, &dir.path().join("nan")).unwrap_err();
    assert!(
        errors[0].contains("000_faceid/0.bin") && errors[0].contains("value 3"),
        "{errors:?}"
    );
}
