//! pack → check → read → load: what goes in comes out bit for bit.

use troupe_data::check::check_shards;
use troupe_data::image_io::DecodeLimits;
use troupe_data::loader::{Loader, LoaderConfig};
use troupe_data::pack::{
    OnBadLine, PackOptions, PackReport, pack_manifest, pack_manifest_with, read_embedding_npy,
    read_npy_f32, shuffle_rows,
};
use troupe_data::plan::SizeRule;
use troupe_data::recipe::{Dropout, RecipeConfig};
use troupe_data::shard::{ShardReader, ShardWriterOptions, find_shards};
use troupe_tests::{embedding, face_keypoints, npy, npy_f32, varied_rows, write_manifest_dataset};

fn small_groups() -> ShardWriterOptions {
    ShardWriterOptions {
        rows_per_row_group: 3,
        shard_rows: 7,
        ..ShardWriterOptions::default()
    }
}

/// Packs `varied_rows(12)` under `dir`; returns the rows and the shard folder.
fn packed(
    dir: &std::path::Path,
) -> (
    Vec<troupe_tests::ManifestRow>,
    std::path::PathBuf,
    PackReport,
) {
    let rows = varied_rows(12);
    let manifest = write_manifest_dataset(&dir.join("src"), &rows);
    let out = dir.join("shards");
    let report = pack_small_groups(&manifest, &out);
    (rows, out, report)
}

/// `pack_manifest` (seed 0) into small row groups, failing on any bad line.
fn pack_small_groups(manifest: &std::path::Path, out: &std::path::Path) -> PackReport {
    pack_manifest(
        manifest,
        out,
        small_groups(),
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .unwrap()
}

#[test]
fn npy_float32_and_float64_read_exactly() {
    let v = [0.5f32, -1.25, 3.0];
    assert_eq!(
        read_npy_f32(&npy_f32(&v, "(1, 3)")).unwrap(),
        (vec![1, 3], v.to_vec())
    );
    let f64s: Vec<u8> = v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect();
    assert_eq!(
        read_npy_f32(&npy("<f8", "(3,)", &f64s)).unwrap(),
        (vec![3], v.to_vec())
    );
    // Data that does not fill the shape exactly, either way, is refused.
    let mut longer = npy_f32(&v, "(3,)");
    longer.extend_from_slice(&[0, 0, 0, 0]);
    assert!(read_npy_f32(&longer).unwrap_err().contains("bytes"));
    assert!(
        read_npy_f32(&npy_f32(&v, "(2, 2)"))
            .unwrap_err()
            .contains("bytes")
    );
    // An embedding is 512 finite values, (512,) or (1, 512).
    let e = vec![0.1f32; 512];
    assert_eq!(read_embedding_npy(&npy_f32(&e, "(1, 512)")).unwrap(), e);
    let wrong = read_embedding_npy(&npy_f32(&e, "(2, 256)")).unwrap_err();
    assert!(wrong.contains("[2, 256]"), "{wrong}");
    let mut bad = e.clone();
    bad[7] = f32::NAN;
    assert!(
        read_embedding_npy(&npy_f32(&bad, "(512,)"))
            .unwrap_err()
            .contains("value 7")
    );
    assert!(
        read_npy_f32(&npy("<i8", "(3,)", &f64s))
            .unwrap_err()
            .contains("<i8")
    );
    assert!(read_npy_f32(b"not numpy").is_err());
}

#[test]
fn packed_rows_equal_their_inputs_and_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, out, report) = packed(dir.path());
    assert_eq!(report.rows, 12);
    assert_eq!(report.shards.len(), 2, "7 rows per shard -> 2 shards");
    assert!(!out.join("shard-00000.parquet.partial").exists());

    let shards = find_shards(std::slice::from_ref(&out)).unwrap();
    let checked = check_shards(&shards, DecodeLimits::default(), 2);
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    assert_eq!(checked.rows, 12);

    let mut seen = 0;
    for path in &shards {
        let reader = ShardReader::open(path).unwrap();
        assert_eq!(reader.version(), 1);
        for g in 0..reader.num_row_groups() {
            for (_, sample) in reader.read_row_group(g).unwrap() {
                let s = sample.unwrap();
                let i: usize = s.caption.strip_prefix("row ").unwrap().parse().unwrap();
                let src =
                    std::fs::read(dir.path().join("src").join(format!("img/{i:04}.png"))).unwrap();
                assert_eq!(s.image.bytes, src, "image bytes are stored as given");
                assert_eq!((s.width, s.height), (rows[i].width, rows[i].height));
                assert_eq!(s.characters.len(), rows[i].rects.len());
                for (j, c) in s.characters.iter().enumerate() {
                    let want = embedding(10 * i as u32 + j as u32);
                    assert!(
                        c.embedding
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                    );
                    assert_eq!(c.keypoints, face_keypoints(rows[i].rects[j]));
                    assert_eq!(c.bbox, rows[i].rects[j]);
                }
                assert_eq!(s.pose.is_some(), rows[i].pose);
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 12);
}

/// Captions of the rows of the shards in `dir`, in row order, and the shards' bytes.
fn rows_in_order(dir: &std::path::Path) -> (Vec<String>, Vec<Vec<u8>>) {
    let shards = find_shards(&[dir.to_path_buf()]).unwrap();
    let mut captions = Vec::new();
    for path in &shards {
        let reader = ShardReader::open(path).unwrap();
        for g in 0..reader.num_row_groups() {
            for (_, s) in reader.read_row_group(g).unwrap() {
                captions.push(s.unwrap().caption);
            }
        }
    }
    let bytes = shards.iter().map(|p| std::fs::read(p).unwrap()).collect();
    (captions, bytes)
}

#[test]
fn rows_are_packed_in_a_seeded_order_the_same_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest_dataset(&dir.path().join("src"), &varied_rows(12));
    // CRLF line breaks and blank lines: lines are found by their place in the file.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "");
    lines.insert(5, "  ");
    std::fs::write(&manifest, lines.join("\r\n") + "\r\n\r\n").unwrap();
    let pack = |seed: u64, out: &str| {
        let options = PackOptions {
            shards: small_groups(),
            seed,
            ..PackOptions::default()
        };
        let out = dir.path().join(out);
        let report = pack_manifest_with(&manifest, &out, &options, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.rows, 12);
        rows_in_order(&out)
    };
    let in_line_order: Vec<String> = (0..12).map(|i| format!("row {i}")).collect();
    let (a, a_bytes) = pack(0, "a");
    let mut want = in_line_order.clone();
    shuffle_rows(0, &mut want);
    assert_eq!(a, want, "rows in the order of shuffle_rows");
    assert_ne!(a, in_line_order);
    let (b, b_bytes) = pack(0, "b");
    assert_eq!((&a, &a_bytes), (&b, &b_bytes), "same seed, same shards");
    let (mut c, _) = pack(7, "c");
    assert_ne!(c, a);
    c.sort_by_key(|s| s[4..].parse::<u32>().unwrap());
    assert_eq!(c, in_line_order, "another order of the same rows");
    // `pack_manifest` is seed 0.
    let out = dir.path().join("d");
    pack_small_groups(&manifest, &out);
    assert_eq!(rows_in_order(&out).1, a_bytes);
    // A problem names the line in the file (row 5 is line 8, after the two blank lines).
    std::fs::write(dir.path().join("src/img/0005.png"), b"not a png").unwrap();
    let options = PackOptions {
        on_bad: OnBadLine::Skip,
        seed: 3,
        ..PackOptions::default()
    };
    let out = dir.path().join("e");
    let report = pack_manifest_with(&manifest, &out, &options, None, &mut |_, _| {}).unwrap();
    assert_eq!(report.rows, 11);
    let skipped: Vec<_> = report
        .skipped
        .iter()
        .map(|e| (e.at.row, e.at.field.as_deref()))
        .collect();
    assert_eq!(skipped, vec![(Some(8), Some("image"))]);
}

#[test]
fn the_loader_yields_every_row_once_per_epoch_with_exact_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, out, _) = packed(dir.path());
    let shards = find_shards(&[out]).unwrap();
    let no_dropout = RecipeConfig {
        dropout: Dropout {
            image: 0.0,
            text: 0.0,
            both: 0.0,
        },
        ..RecipeConfig::default()
    };
    let config = LoaderConfig {
        batch_size: 2,
        seed: 3,
        shuffle_window: 5,
        workers: 2,
        prefetch_batches: 2,
        size_rule: SizeRule::buckets(256 * 256, 64, 2.0),
        recipe: no_dropout,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(&shards, config).unwrap();
    let mut captions = Vec::new();
    while loader.state().epoch == 0 {
        let b = loader.next_batch().unwrap();
        let (n, c) = (b.len(), b.max_characters);
        let (h, w) = (b.height as usize, b.width as usize);
        assert_eq!(b.pixels.len(), n * 3 * h * w);
        assert_eq!(
            b.masks.len(),
            n * c * (h / 8) * (w / 8),
            "masks at 1/8 resolution"
        );
        assert_eq!(b.char_pixels.len(), n * c * 3 * 224 * 224);
        assert_eq!(b.face_pixels.len(), n * c * 3 * 224 * 224);
        assert_eq!(b.time_ids.len(), n * 6);
        assert!(b.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(b.masks.iter().all(|v| (0.0..=1.0).contains(v)));
        for (k, caption) in b.captions.iter().enumerate() {
            let i: usize = caption.strip_prefix("row ").unwrap().parse().unwrap();
            assert_eq!(b.num_characters[k], rows[i].rects.len());
            for j in 0..c {
                let real = j < rows[i].rects.len();
                assert_eq!(b.character_mask[k * c + j], if real { 1.0 } else { 0.0 });
                let got = &b.id_embeds[(k * c + j) * 512..(k * c + j + 1) * 512];
                if real {
                    let want = embedding(10 * i as u32 + j as u32);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "row {i} char {j}"
                    );
                    let m = &b.masks
                        [(k * c + j) * (h / 8) * (w / 8)..(k * c + j + 1) * (h / 8) * (w / 8)];
                    assert!(
                        m.iter().any(|&v| v > 0.5),
                        "a character's loss mask covers it"
                    );
                } else {
                    assert!(got.iter().all(|&v| v == 0.0), "padding is zero");
                }
            }
            captions.push(i);
        }
    }
    captions.sort();
    assert_eq!(
        captions,
        (0..12).collect::<Vec<_>>(),
        "each row exactly once per epoch"
    );
}
