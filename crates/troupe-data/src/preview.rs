//! `troupe data preview --dump DIR`: what the loader produced for each sample, as files a person
//! can look at or compare with the reference's dataset code.
//!
//! Per sample, in `DIR/<sample id>/`: `gt.png` (the training image), `pose.png` (when the row has
//! one), per character i (from 0) `mask_<i>.png` (the loss mask at latent resolution, 0–1 as
//! 0–255) and, unless the image conditioning was dropped, `body_<i>.png` and `face_<i>.png` (the
//! 224² crops before CLIP normalisation), and `sample.json` (sizes, time ids, dropout decision,
//! crop boxes, keypoints, rotation angles). The images are recovered from the batch's tensors;
//! every 8-bit level maps back to itself (see [`crate::ops::clip_denormalize`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::GrayImage;
use serde::Serialize;

use crate::error::{DataError, Location, Result};
use crate::image_io::{encode_png_gray, encode_png_rgb};
use crate::loader::Batch;
use crate::ops;
use crate::recipe::{CharacterTrace, RecipeConfig};

/// `sample.json`.
#[derive(Serialize)]
struct SampleJson<'a> {
    id: &'a str,
    epoch: u64,
    batch: u64,
    caption: &'a str,
    /// Output (training) size, width × height.
    size: [u32; 2],
    source_size: [u32; 2],
    /// x, y, w, h of the source region resized to `size`.
    source_crop: [u32; 4],
    time_ids: &'a [f32],
    drop_image: bool,
    drop_text: bool,
    has_pose: bool,
    characters: &'a [CharacterTrace],
}

/// Writes samples of batches under one folder; a sample seen again (oversampling, a later
/// epoch) gets `<id>~1`, `<id>~2`, … so nothing is overwritten.
pub struct Dumper {
    dir: PathBuf,
    seen: HashMap<String, usize>,
}

impl Dumper {
    /// Dumps into `dir` (created when missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            seen: HashMap::new(),
        }
    }

    /// Writes every sample of `batch` (made with `cfg`); returns the sample folders.
    pub fn write_batch(&mut self, batch: &Batch, cfg: &RecipeConfig) -> Result<Vec<PathBuf>> {
        (0..batch.len())
            .map(|i| self.write_sample(batch, i, cfg))
            .collect()
    }

    fn folder(&mut self, id: &str) -> PathBuf {
        // Ids are user text: keep them readable but unable to leave the dump folder.
        let mut name: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() || name.chars().all(|c| c == '.') {
            name = format!("_{name}");
        }
        let n = self.seen.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            name = format!("{name}~{}", *n - 1);
        }
        self.dir.join(name)
    }

    fn write_sample(&mut self, b: &Batch, i: usize, cfg: &RecipeConfig) -> Result<PathBuf> {
        let dir = self.folder(&b.ids[i]);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DataError::new(Location::file(&dir), format!("cannot create: {e}")))?;
        let (w, h) = (b.width, b.height);
        let plane = 3 * (w * h) as usize;
        let gt = ops::from_signed_unit(&b.pixels[i * plane..(i + 1) * plane], w, h);
        write(&dir.join("gt.png"), &encode_png_rgb(&gt))?;
        if let (Some(pose), true) = (&b.pose, b.has_pose[i] > 0.0) {
            let img = ops::from_unit(&pose[i * plane..(i + 1) * plane], w, h);
            write(&dir.join("pose.png"), &encode_png_rgb(&img))?;
        }
        let s = cfg.crop_size;
        let crop = 3 * (s * s) as usize;
        let (mw, mh) = (w / cfg.latent_downsample, h / cfg.latent_downsample);
        let mask_len = (mw * mh) as usize;
        for j in 0..b.num_characters[i] {
            let k = i * b.max_characters + j;
            let mask = &b.masks[k * mask_len..(k + 1) * mask_len];
            let levels = mask
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            let gray = GrayImage::from_raw(mw, mh, levels).expect("mask holds mw*mh values");
            write(&dir.join(format!("mask_{j}.png")), &encode_png_gray(&gray))?;
            if !b.drop_image[i] {
                for (name, pixels) in [("body", &b.char_pixels), ("face", &b.face_pixels)] {
                    let img = ops::clip_denormalize(&pixels[k * crop..(k + 1) * crop], s, s);
                    write(&dir.join(format!("{name}_{j}.png")), &encode_png_rgb(&img))?;
                }
            }
        }
        let t = &b.traces[i];
        let json = SampleJson {
            id: &b.ids[i],
            epoch: b.epoch,
            batch: b.index,
            caption: &b.captions[i],
            size: [w, h],
            source_size: [t.source_size.0, t.source_size.1],
            source_crop: t.source_crop,
            time_ids: &b.time_ids[i * 6..(i + 1) * 6],
            drop_image: b.drop_image[i],
            drop_text: b.drop_text[i],
            has_pose: b.has_pose[i] > 0.0,
            characters: &t.characters,
        };
        let text = serde_json::to_string_pretty(&json).expect("plain data serialises");
        write(&dir.join("sample.json"), text.as_bytes())?;
        Ok(dir)
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes)
        .map_err(|e| DataError::new(Location::file(path), format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_stay_inside_the_dump_and_repeats_do_not_overwrite() {
        let mut d = Dumper::new("/dump");
        assert_eq!(d.folder("001"), Path::new("/dump/001"));
        assert_eq!(d.folder("001"), Path::new("/dump/001~1"));
        assert_eq!(d.folder("../etc/x"), Path::new("/dump/.._etc_x"));
        assert_eq!(d.folder(".."), Path::new("/dump/_.."));
        assert_eq!(d.folder(""), Path::new("/dump/_"));
    }
}
