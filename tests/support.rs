//! Helpers shared by the cross-crate tests: small hand-built datasets on disk.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use troupe_data::image_io::encode_png_rgb;

/// A unit-norm 512-vector, deterministic from `seed`.
pub fn embedding(seed: u32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..512)
        .map(|i| (i as f32 * 0.37 + seed as f32 * 1.7).sin())
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A `.npy` file of float32 values with the given shape text, e.g. "(1, 512)".
pub fn npy_f32(values: &[f32], shape: &str) -> Vec<u8> {
    npy(
        "<f4",
        shape,
        &values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
}

/// A `.npy` file with dtype `descr` (e.g. "<f8"), shape text and raw little-endian data.
pub fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A textured RGB image (so crops and resizes are not trivially constant).
pub fn image(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 + seed * 13) as u8,
            (y * 5 + x) as u8,
            ((x ^ y) + seed) as u8,
        ])
    })
}

/// A rectangular mask with 255 inside `[x0, y0, x1, y1)`.
pub fn rect_mask(w: u32, h: u32, r: [u32; 4]) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([if x >= r[0] && x < r[2] && y >= r[1] && y < r[3] {
            255
        } else {
            0
        }])
    })
}

/// Five keypoints laid out like a face inside the rectangle, in image pixels.
pub fn face_keypoints(r: [u32; 4]) -> Vec<f32> {
    let (x0, y0) = (r[0] as f32, r[1] as f32);
    let (w, h) = ((r[2] - r[0]) as f32, (r[3] - r[1]) as f32);
    let rel = [
        (0.35, 0.3),
        (0.65, 0.3),
        (0.5, 0.45),
        (0.38, 0.6),
        (0.62, 0.6),
    ];
    rel.iter()
        .flat_map(|(a, b)| [x0 + a * w, y0 + b * h])
        .collect()
}

/// One row of a hand-made manifest dataset.
pub struct ManifestRow {
    pub width: u32,
    pub height: u32,
    pub rects: Vec<[u32; 4]>,
    pub pose: bool,
}

/// Writes images, masks, `.npy` embeddings and `manifest.jsonl` into `dir`; returns the
/// manifest path. Row i's character j has embedding `embedding(10 * i + j)`.
pub fn write_manifest_dataset(dir: &Path, rows: &[ManifestRow]) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let img = format!("img/{i:04}.png");
        std::fs::write(
            dir.join(&img),
            encode_png_rgb(&image(row.width, row.height, i as u32)),
        )
        .unwrap();
        let mut chars = Vec::new();
        for (j, r) in row.rects.iter().enumerate() {
            let mask = format!("img/{i:04}_{j}.png");
            rect_mask(row.width, row.height, *r)
                .save(dir.join(&mask))
                .unwrap();
            let emb = format!("img/{i:04}_{j}.npy");
            std::fs::write(
                dir.join(&emb),
                npy_f32(&embedding(10 * i as u32 + j as u32), "(1, 512)"),
            )
            .unwrap();
            chars.push(serde_json::json!({"embedding": emb, "keypoints": face_keypoints(*r), "mask": mask}));
        }
        let mut line =
            serde_json::json!({"image": img, "caption": format!("row {i}"), "characters": chars});
        if row.pose {
            let pose = format!("img/{i:04}_pose.png");
            image(row.width / 2, row.height / 2, 99)
                .save(dir.join(&pose))
                .unwrap();
            line["pose"] = serde_json::json!(pose);
        }
        lines.push(line.to_string());
    }
    let manifest = dir.join("manifest.jsonl");
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    manifest
}

/// A small varied dataset: odd sizes, 1–3 characters, some poses.
pub fn varied_rows(n: usize) -> Vec<ManifestRow> {
    (0..n)
        .map(|i| {
            let (w, h) = [(257, 193), (193, 257), (320, 240), (211, 211)][i % 4];
            let k = 1 + i % 3;
            let rects = (0..k as u32)
                .map(|j| [8 + j * 60, 20, 60 + j * 60, 20 + 90])
                .collect();
            ManifestRow {
                width: w,
                height: h,
                rects,
                pose: i % 2 == 0,
            }
        })
        .collect()
}
