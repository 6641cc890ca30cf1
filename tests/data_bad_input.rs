//! Every kind of bad input gives an error that names the file, the row and the field; nothing
//! panics and nothing is dropped silently.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use troupe_data::DataError;
use troupe_data::check::check_shards;
use troupe_data::error::Location;
use troupe_data::image_io::{DecodeLimits, encode_png_gray, encode_png_rgb};
use troupe_data::loader::{BadRowPolicy, Loader, LoaderConfig};
use troupe_data::pack::{OnBadLine, pack_manifest};
use troupe_data::schema::{Character, EncodedImage, Sample};
use troupe_data::shard::{ShardReader, ShardWriter, ShardWriterOptions};
use troupe_tests::{
    embedding, face_keypoints, image, rect_mask, varied_rows, write_manifest_dataset,
};

const RECT: [u32; 4] = [10, 12, 50, 70];

fn good_sample(i: usize) -> Sample {
    let (w, h) = (97, 83);
    Sample {
        id: format!("s{i}"),
        image: EncodedImage {
            bytes: encode_png_rgb(&image(w, h, i as u32)),
            path: None,
        },
        width: w,
        height: h,
        caption: format!("sample {i}"),
        characters: vec![Character {
            embedding: embedding(i as u32),
            keypoints: face_keypoints(RECT),
            mask: EncodedImage {
                bytes: encode_png_gray(&rect_mask(w, h, RECT)),
                path: None,
            },
            bbox: RECT,
        }],
        pose: None,
    }
}

/// Writes `samples` unvalidated (the writer stores what it is given) as one shard.
fn write_raw(dir: &Path, samples: Vec<Sample>) -> PathBuf {
    let mut w = ShardWriter::new(
        dir,
        ShardWriterOptions {
            rows_per_row_group: 4,
            ..Default::default()
        },
    )
    .unwrap();
    for s in samples {
        w.push(s).unwrap();
    }
    w.finish().unwrap().remove(0).path
}

fn assert_names(errors: &[DataError], file: &Path, row: u64, field: &str, words: &str) {
    let hit = errors.iter().any(|e| {
        e.at.file == file
            && e.at.row == Some(row)
            && e.at.field.as_deref() == Some(field)
            && e.message.contains(words)
    });
    let text = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        hit,
        "expected `{field}` at row {row} of {} mentioning `{words}`, got:\n{text}",
        file.display()
    );
    let shown = errors
        .iter()
        .find(|e| e.at.row == Some(row) && e.at.field.as_deref() == Some(field))
        .unwrap()
        .to_string();
    assert!(
        shown.contains(&file.display().to_string()) && shown.contains(field),
        "Display names file and field: {shown}"
    );
}

/// The first half of a baseline JPEG of a `w`×`h` test image.
fn half_of_a_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&image(w, h, 1))
        .unwrap();
    // The whole file is accepted; half of it is not.
    let at = Location::file("whole.jpg");
    troupe_data::image_io::decode_rgb(&bytes, &at, DecodeLimits::default()).unwrap();
    bytes.truncate(bytes.len() / 2);
    bytes
}

fn check(path: &Path) -> Vec<DataError> {
    check_shards(&[path.to_path_buf()], DecodeLimits::default(), 2).problems
}

#[test]
fn check_names_file_row_and_field_for_each_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<Sample> = (0..10).map(good_sample).collect();
    let truncated = rows[1].image.bytes.len() / 2;
    rows[1].image.bytes.truncate(truncated);
    rows[2].image.bytes = b"definitely not an image".to_vec();
    rows[3].characters[0].embedding[7] = f32::NAN;
    rows[4].characters[0].embedding.pop();
    rows[5].characters[0].mask.bytes = encode_png_gray(&rect_mask(40, 40, [1, 1, 5, 5]));
    rows[6].characters[0].mask.bytes = encode_png_gray(&rect_mask(97, 83, [0, 0, 0, 0]));
    rows[7].characters.clear();
    rows[8].characters[0].keypoints[0] = 500.0;
    // A JPEG cut in half: decoders fill the rest in; Pillow and OpenCV refuse it, and so do we.
    let jpeg = half_of_a_jpeg(97, 83);
    rows[9].image.bytes = jpeg;
    let path = write_raw(dir.path(), rows);
    let errors = check(&path);
    assert_names(&errors, &path, 1, "image", "truncated PNG");
    assert_names(&errors, &path, 9, "image", "truncated JPEG");
    assert_names(&errors, &path, 2, "image", "not a recognised image");
    assert_names(&errors, &path, 3, "characters[0].embedding", "not finite");
    assert_names(
        &errors,
        &path,
        4,
        "characters[0].embedding",
        "expected 512 values, found 511",
    );
    assert_names(
        &errors,
        &path,
        5,
        "characters[0].mask",
        "mask is 40x40, the image is 97x83",
    );
    assert_names(&errors, &path, 6, "characters[0].mask", "empty");
    assert_names(
        &errors,
        &path,
        7,
        "characters",
        "expected 1 to 3 characters, found 0",
    );
    assert_names(&errors, &path, 8, "characters[0].keypoints", "outside");
    assert!(
        errors.iter().all(|e| e.at.row != Some(0)),
        "row 0 is fine: {errors:?}"
    );
}

#[test]
fn the_loader_fails_naming_the_row_or_skips_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<Sample> = (0..6).map(good_sample).collect();
    rows[4].characters[0].embedding[0] = f32::INFINITY;
    let path = write_raw(dir.path(), rows);
    let config = |policy| LoaderConfig {
        batch_size: 2,
        workers: 2,
        on_bad_row: policy,
        ..LoaderConfig::default()
    };

    let mut failing = Loader::new(std::slice::from_ref(&path), config(BadRowPolicy::Fail)).unwrap();
    let err = (0..3)
        .map(|_| failing.next_batch())
        .find_map(Result::err)
        .expect("the bad row stops the loader");
    assert_eq!(
        (err.at.row, err.at.field.as_deref()),
        (Some(4), Some("characters[0].embedding"))
    );

    let mut skipping =
        Loader::new(std::slice::from_ref(&path), config(BadRowPolicy::Skip)).unwrap();
    let mut yielded = 0;
    while skipping.state().epoch == 0 {
        yielded += skipping.next_batch().unwrap().len();
    }
    assert_eq!(yielded, 5, "every good row is yielded");
    let skipped = skipping.take_skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].at.row, Some(4));
    assert_eq!(
        skipping.state().skipped,
        1,
        "the count survives in the saved position"
    );
}

#[test]
fn unreadable_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_raw(dir.path(), (0..3).map(good_sample).collect());

    // Truncated Parquet.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = ShardReader::open(&cut).unwrap_err();
    assert!(
        e.to_string().contains("cut.parquet") && e.message.contains("truncated or corrupt"),
        "{e}"
    );
    let problems = check(&cut);
    assert_eq!(
        problems.len(),
        1,
        "check reports the file, does not panic: {problems:?}"
    );

    // Unknown schema version, missing column, mistyped column: written with arrow directly.
    use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
    use arrow_schema::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let write = |name: &str, version: &str, columns: Vec<(&str, ArrayRef)>| -> PathBuf {
        let p = dir.path().join(name);
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_key_value_metadata(Some(vec![KeyValue::new(
                "troupe.schema_version".into(),
                version.to_string(),
            )]))
            .build();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&p).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        p
    };
    let id: ArrayRef = Arc::new(StringArray::from(vec!["a"]));
    let p = write("v7.parquet", "7", vec![("id", id.clone())]);
    let e = ShardReader::open(&p).unwrap_err();
    assert!(e.message.contains("version `7` is not known"), "{e}");
    let p = write("missing.parquet", "1", vec![("id", id.clone())]);
    let e = ShardReader::open(&p).unwrap_err();
    assert_eq!(e.at.field.as_deref(), Some("image"), "{e}");
    assert!(e.message.contains("missing"), "{e}");
    let p = write(
        "mistyped.parquet",
        "1",
        vec![("id", Arc::new(Int32Array::from(vec![1])) as ArrayRef)],
    );
    let e = ShardReader::open(&p).unwrap_err();
    assert_eq!(e.at.field.as_deref(), Some("id"));
    assert!(
        e.message.contains("Int32") && e.message.contains("Utf8"),
        "{e}"
    );
}

/// A PNG whose header claims `w`×`h` (CRC fixed so decoders accept the header).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode_png_rgb(&image(1, 1, 0));
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn huge_images_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = good_sample(0);
    s.image.bytes = png_claiming(60_000, 60_000);
    let path = write_raw(dir.path(), vec![s]);
    let errors = check(&path);
    assert_names(&errors, &path, 0, "image", "refused before decoding");
}

#[test]
fn pack_names_the_manifest_line_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let manifest = write_manifest_dataset(&src, &varied_rows(4));
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.insert(2, "{\"image\": \"img/0000.png\", \"caption\": 5".into()); // unreadable JSON
    std::fs::write(&manifest, lines.join("\n")).unwrap();
    std::fs::write(src.join("img/0003.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap(); // corrupt image, line 5

    let out = dir.path().join("out");
    let opts = || ShardWriterOptions {
        rows_per_row_group: 1,
        ..Default::default()
    };
    let errors = pack_manifest(
        &manifest,
        &out,
        opts(),
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .unwrap_err();
    // Lines are packed in a seeded random order: the first bad line met stops the run, and
    // the error names its line in the manifest.
    let line = errors[0].at.row;
    assert!(
        errors[0].at.unit == "line" && matches!(line, Some(3 | 5)),
        "{errors:?}"
    );
    assert!(
        errors[0]
            .to_string()
            .contains(&format!("manifest.jsonl: line {}", line.unwrap())),
        "{}",
        errors[0]
    );
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert!(
        left.is_empty(),
        "a failed pack removes the shards it wrote: {left:?}"
    );

    let report = pack_manifest(
        &manifest,
        &dir.path().join("out2"),
        opts(),
        OnBadLine::Skip,
        DecodeLimits::default(),
    )
    .unwrap();
    assert_eq!(report.rows, 3);
    // Skipped lines are reported in manifest order, whatever order they were met in.
    let lines: Vec<_> = report
        .skipped
        .iter()
        .map(|e| (e.at.row, e.at.field.clone()))
        .collect();
    assert_eq!(
        lines,
        vec![(Some(3), None), (Some(5), Some("image".into()))]
    );
}

#[test]
fn skipping_every_row_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<Sample> = (0..5).map(good_sample).collect();
    for r in &mut rows {
        r.characters[0].embedding[0] = f32::NAN;
    }
    let path = write_raw(dir.path(), rows);
    let config = LoaderConfig {
        batch_size: 2,
        workers: 2,
        on_bad_row: BadRowPolicy::Skip,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(std::slice::from_ref(&path), config).unwrap();
    let err = loader.next_batch().expect_err("no row is usable");
    let text = err.to_string();
    assert!(
        text.contains("5 rows skipped") && text.contains("embedding"),
        "{text}"
    );
    assert_eq!(err.at.file, path);
}

#[test]
fn pack_refuses_duplicate_ids_and_malformed_identities_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let manifest = write_manifest_dataset(&src, &varied_rows(3));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pack = |edit: &dyn Fn(&mut Vec<serde_json::Value>)| {
        let mut l = lines.clone();
        edit(&mut l);
        let text: Vec<String> = l.iter().map(|v| v.to_string()).collect();
        std::fs::write(&manifest, text.join("\n")).unwrap();
        let out = tempfile::tempdir().unwrap();
        pack_manifest(
            &manifest,
            out.path(),
            ShardWriterOptions::default(),
            OnBadLine::Fail,
            DecodeLimits::default(),
        )
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
    };
    let e = pack(&|l| {
        l[0]["id"] = "same".into();
        l[2]["id"] = "same".into();
    });
    assert!(
        e[0].contains("line 3") && e[0].contains("duplicate id `same`") && e[0].contains("line 1"),
        "{e:?}"
    );
    let e = pack(&|l| l[1]["characters"][0]["embedding"] = serde_json::json!({"a": 1}));
    assert!(
        e[0].contains("characters[0].embedding") && e[0].contains("512 numbers"),
        "{e:?}"
    );
    let e = pack(&|l| l[1]["characters"][0]["keypoints"] = "nose".into());
    assert!(e[0].contains("characters[0].keypoints"), "{e:?}");
    // An .npy of the right count but the wrong shape, and one with bytes after its data.
    let npy = src.join("img/0000_0.npy");
    std::fs::write(&npy, troupe_tests::npy_f32(&embedding(0), "(2, 256)")).unwrap();
    let e = pack(&|_| {});
    assert!(
        e[0].contains("0000_0.npy") && e[0].contains("[2, 256]"),
        "{e:?}"
    );
    let mut longer = troupe_tests::npy_f32(&embedding(0), "(512,)");
    longer.extend_from_slice(&[0; 8]);
    std::fs::write(&npy, longer).unwrap();
    let e = pack(&|_| {});
    assert!(
        e[0].contains("0000_0.npy") && e[0].contains("bytes"),
        "{e:?}"
    );
}

#[test]
fn poses_of_another_shape_or_missing_when_required_are_refused_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let pose = |w, h| {
        Some(EncodedImage {
            bytes: encode_png_rgb(&image(w, h, 5)),
            path: None,
        })
    };
    let mut rows: Vec<Sample> = (0..4).map(good_sample).collect();
    rows[1].pose = pose(194, 166); // twice the image's size: resized, fine
    rows[2].pose = pose(83, 97); // transposed
    rows[3].pose = Some(EncodedImage {
        bytes: b"not a pose".to_vec(),
        path: None,
    });
    let path = write_raw(dir.path(), rows);
    let errors = check(&path);
    assert_names(
        &errors,
        &path,
        2,
        "pose",
        "pose is 83x97, the image is 97x83",
    );
    assert_names(&errors, &path, 3, "pose", "not a recognised image");
    assert!(errors.iter().all(|e| e.at.row != Some(1)), "{errors:?}");

    // The loader refuses the same rows, and with `require_pose` a row without one.
    let load = |rows: Vec<Sample>, require_pose| {
        let d = tempfile::tempdir().unwrap();
        let path = write_raw(d.path(), rows);
        let mut config = LoaderConfig {
            batch_size: 1,
            workers: 1,
            ..LoaderConfig::default()
        };
        config.recipe.require_pose = require_pose;
        let mut loader = Loader::new(std::slice::from_ref(&path), config).unwrap();
        (0..2).map(|_| loader.next_batch()).find_map(Result::err)
    };
    let mut transposed = good_sample(0);
    transposed.pose = pose(83, 97);
    let err = load(vec![transposed], false).expect("refused");
    assert_eq!(err.at.field.as_deref(), Some("pose"), "{err}");
    let err = load(vec![good_sample(0)], true).expect("refused");
    assert!(
        err.at.field.as_deref() == Some("pose") && err.message.contains("require_pose"),
        "{err}"
    );
    let mut resized = good_sample(0);
    resized.pose = pose(194, 166);
    assert!(load(vec![resized], true).is_none());
}
