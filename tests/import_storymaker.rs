//! StoryMaker's reference layout on hand-made files: 1, 2 and 3 characters, odd image sizes.

use std::path::Path;

use image::{GrayImage, Rgb, RgbImage};
use troupe_data::Location;
use troupe_data::check::check_shards;
use troupe_data::image_io::{DecodeLimits, decode_gray, encode_png_rgb};
use troupe_data::import::{ImportOptions, SLOT_COLOURS, import_storymaker};
use troupe_data::ops::LibraryVersions;
use troupe_data::pack::OnBadLine;
use troupe_data::shard::{ShardReader, find_shards};
use troupe_models::weights::StateDict;
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
    let report = import_storymaker(&index, &out, &ImportOptions::default()).unwrap();
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
    assert_eq!(rows.len(), 3);
    for (i, e) in entries().iter().enumerate() {
        // Rows are written in a seeded random order: find entry i's row by its id.
        let s = rows.iter().find(|s| s.id == format!("{i:03}")).unwrap();
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
            // Exactly the character's colour; entry 1's mask was resized (bicubic, as the
            // reference), and its edge pixels mixed colours, so it lost a pixel at each side.
            if i == 1 {
                let near = c
                    .bbox
                    .iter()
                    .zip(e.rects[j])
                    .all(|(a, b)| a.abs_diff(b) <= 1);
                assert!(near, "{:?} vs {:?}", c.bbox, e.rects[j]);
            } else {
                assert_eq!(c.bbox, e.rects[j]);
            }
            let mask =
                decode_gray(&c.mask.bytes, &Location::default(), DecodeLimits::default()).unwrap();
            assert!(mask.iter().all(|&v| v == 0 || v == 255));
            // The crop is the box of the 7x7-dilated, 5x5-blurred mask: the rectangle grown by
            // 3 + 2, clipped (the reference's `bounding_rectangle`).
            let (x0, y0) = (
                c.bbox[0].saturating_sub(5) as f32,
                c.bbox[1].saturating_sub(5) as f32,
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
    let errors = import_storymaker(&index, &out, &ImportOptions::default()).unwrap_err();
    // Entries are imported in a seeded random order: the first bad one met stops the run.
    let e = &errors[0];
    assert!(
        e.at.field.as_deref() == Some("\"2\"[0].mask") || e.to_string().contains("2.bin"),
        "{e}"
    );

    let report = import_storymaker(
        &index,
        &dir.path().join("skip"),
        &ImportOptions {
            on_bad: OnBadLine::Skip,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.rows, 1);
    assert_eq!(report.skipped.len(), 2);
    // Skipped entries are reported in index order, whatever order they were met in.
    let e = &report.skipped[0];
    assert_eq!(e.at.field.as_deref(), Some("\"2\"[0].mask"), "{e}");
    assert!(e.message.contains("character 1"), "{e}");
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
    import_storymaker(index, out, &ImportOptions::default())
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

/// The reference-layout fixture of `scripts/make_storymaker_layout_fixtures.py`: sample `001`
/// with a half-size mask and two characters, `002` with a full-size mask and three (one
/// touching the image's edges); index paths relative to the folder above the index (as
/// StoryMaker's own example).
fn layout() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/storymaker_layout")
}

const LAYOUT_IDS: [&str; 2] = ["001", "002"];

/// What the reference's dataset code made of sample `id`.
fn expected_dir(id: &str) -> std::path::PathBuf {
    layout().join("expected").join(id)
}

/// The reference's values (`expected/<id>/expected.safetensors`) of `key`, flattened.
fn expected(id: &str, key: &str) -> Vec<f32> {
    let sd = StateDict::from_file(expected_dir(id).join("expected.safetensors")).unwrap();
    sd.read_host(key).unwrap().to_f32_vec().unwrap()
}

/// Imports the fixture layout with today's library arithmetic (what the fixture was made
/// with); the shards and their rows by id.
fn import_layout(out: &Path) -> (Vec<std::path::PathBuf>, Vec<troupe_data::Sample>) {
    let options = ImportOptions {
        root: Some(layout()),
        versions: LibraryVersions::current(),
        ..Default::default()
    };
    let index = layout().join("datasets/test.json");
    let report = import_storymaker(&index, out, &options).unwrap();
    assert_eq!(report.rows, LAYOUT_IDS.len() as u64);
    let shards = find_shards(&[out.to_path_buf()]).unwrap();
    let reader = ShardReader::open(&shards[0]).unwrap();
    let mut rows: Vec<_> = reader
        .read_row_group(0)
        .unwrap()
        .into_iter()
        .map(|(_, s)| s.unwrap())
        .collect();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    let ids: Vec<_> = rows.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, LAYOUT_IDS);
    (shards, rows)
}

fn png_gray(path: &Path) -> GrayImage {
    image::open(path).unwrap().to_luma8()
}

fn png_rgb(path: &Path) -> RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn half_and_full_size_masks_import_exactly_as_the_reference_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    // The index's paths are relative to the folder above it: without --root they are not
    // found, and the error says which root works.
    let index = layout().join("datasets/test.json");
    let err = import_storymaker(&index, &dir.path().join("x"), &ImportOptions::default())
        .unwrap_err()[0]
        .to_string();
    assert!(
        err.contains("datasets/datasets/00") && err.contains("--root"),
        "{err}"
    );

    let (_, rows) = import_layout(&dir.path().join("shards"));
    for (s, id) in rows.iter().zip(LAYOUT_IDS) {
        assert_eq!(s.characters.len(), if id == "001" { 2 } else { 3 });
        for (i, c) in s.characters.iter().enumerate() {
            // The stored mask is the reference's `cv2.inRange` of its (resized) colour mask.
            let mask =
                decode_gray(&c.mask.bytes, &Location::default(), DecodeLimits::default()).unwrap();
            let want = png_gray(&expected_dir(id).join(format!("stored_mask_{i}.png")));
            let differ = mask.iter().zip(want.iter()).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{id} character {i}: {differ} mask pixels differ");
            // Keypoints in image pixels: the `.bin` ones + the reference's crop origin, bit for
            // bit.
            let kps = expected(id, &format!("kps_abs.{i}"));
            assert_eq!(c.keypoints.len(), 10);
            for (k, (a, b)) in c.keypoints.iter().zip(&kps).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{id} character {i} keypoint value {k}: {a} vs {b}"
                );
            }
        }
    }
}

/// Values of `got` that differ from `want`, and by how many levels at most.
fn differing(got: &RgbImage, want: &RgbImage) -> (usize, u8) {
    assert_eq!(got.dimensions(), want.dimensions());
    got.iter()
        .zip(want.iter())
        .filter(|(a, b)| a != b)
        .fold((0, 0), |(n, m), (a, b)| (n + 1, m.max(a.abs_diff(*b))))
}

/// The loader (recipe without augmentation, today's library arithmetic) over the imported
/// fixture, batch by batch, and its `--dump` of every sample.
#[test]
fn the_loader_and_its_dump_equal_the_reference_dataset() {
    use troupe_data::loader::{Loader, LoaderConfig};
    use troupe_data::preview::Dumper;
    use troupe_data::recipe::RecipeConfig;

    let dir = tempfile::tempdir().unwrap();
    let (shards, _) = import_layout(&dir.path().join("shards"));
    let recipe = RecipeConfig {
        versions: LibraryVersions::current(),
        ..RecipeConfig::default()
    }
    .without_augmentation();
    let config = LoaderConfig {
        batch_size: 1,
        recipe: recipe.clone(),
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(&shards, config).unwrap();
    let dump = dir.path().join("dump");
    let mut dumper = Dumper::new(&dump);
    let mut seen = Vec::new();
    for _ in LAYOUT_IDS {
        let batch = loader.next_batch().unwrap();
        dumper.write_batch(&batch, &recipe).unwrap();
        let id = batch.ids[0].clone();
        // The loss masks as tensors: the reference's `mask_gt` in float.
        let n = batch.num_characters[0];
        let len = batch.masks.len() / n;
        for i in 0..n {
            let want = expected(&id, &format!("mask_gt.{i}"));
            let got = &batch.masks[i * len..(i + 1) * len];
            let e = troupe_pt::parity::max_abs_diff(got, &want, "loss mask");
            assert!(e <= 1e-6, "{id} character {i}: loss mask differs by {e}");
        }
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, LAYOUT_IDS);

    for id in LAYOUT_IDS {
        let (got, want) = (dump.join(id), expected_dir(id));
        // The training image and the pose (bicubic, as Pillow's default), level for level.
        for name in ["gt.png", "pose.png"] {
            let d = differing(&png_rgb(&got.join(name)), &png_rgb(&want.join(name)));
            assert_eq!(
                d.0, 0,
                "{id} {name}: {} values differ, by up to {}",
                d.0, d.1
            );
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(got.join("sample.json")).unwrap())
                .unwrap();
        assert_eq!(json["drop_image"], false);
        assert_eq!(json["drop_text"], false);
        let characters = json["characters"].as_array().unwrap();
        for (i, c) in characters.iter().enumerate() {
            // The crop box of the dilated and blurred mask, and the `.bin` keypoints relative
            // to it.
            let f32s = |v: &serde_json::Value| -> Vec<f32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|x| match x.as_array() {
                        Some(a) => a.iter().map(|y| y.as_f64().unwrap() as f32).collect(),
                        None => vec![x.as_f64().unwrap() as f32],
                    })
                    .collect()
            };
            assert_eq!(
                f32s(&c["crop_box"]),
                expected(id, &format!("box.{i}")),
                "{id} {i}"
            );
            assert_eq!(
                f32s(&c["crop_keypoints"]),
                expected(id, &format!("kps.{i}"))
            );
            assert_eq!(c["rotation_degrees"], 0.0);
            let d = differing(
                &png_rgb(&got.join(format!("body_{i}.png"))),
                &png_rgb(&want.join(format!("body_{i}.png"))),
            );
            assert_eq!(
                d.0, 0,
                "{id} body {i}: {} values differ, by up to {}",
                d.0, d.1
            );
            // The aligned face. skimage's Umeyama runs in float32 on float32 keypoints (LAPACK
            // `sgesdd`), Troupe's closed form in f64: the transforms differ by ~1e-7 relative,
            // which moves a sample of OpenCV 5's float32 warp across a rounding boundary now
            // and then (1 to 15 values of 150,528 here, by one level; skimage in float64 moves
            // as many the other way). Exact: every other value.
            let d = differing(
                &png_rgb(&got.join(format!("face_{i}.png"))),
                &png_rgb(&want.join(format!("face_{i}.png"))),
            );
            assert!(d.0 <= 30 && d.1 <= 1, "{id} face {i}: {d:?}");
            // The loss mask file: the tensor above at 0–255.
            let mask = png_gray(&got.join(format!("mask_{i}.png")));
            let want = expected(id, &format!("mask_gt.{i}"));
            assert_eq!(mask.len(), want.len());
            for (a, b) in mask.iter().zip(&want) {
                assert!((*a as f32 - b * 255.0).abs() <= 0.5 + 1e-3, "{id} mask {i}");
            }
        }
        assert_eq!(characters.len(), if id == "001" { 2 } else { 3 });
    }
}
