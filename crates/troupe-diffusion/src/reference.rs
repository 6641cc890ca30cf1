//! A character reference for generation: a person image, a person mask (white = person), and
//! the identity (an ArcFace embedding with its 5 face keypoints in image pixels), from files or
//! from a shard row, turned into the CLIP inputs exactly as the StoryMaker pipeline's
//! `crop_image` does (storymaker.md §4.3–4.5):
//!
//! * body crop: bounding box of the mask's channel-0 pixels (the union of the external
//!   contours' boxes) → crop image and mask → 5×5 Gaussian blur of the cropped mask →
//!   composite on white → Pillow bicubic resize to 224² (aspect not kept);
//! * face crop: `norm_crop` of the original image to 224² from the keypoints;
//! * both through `CLIPImageProcessor` (bicubic resize of the shortest side to the encoder's
//!   input size, centre crop, CLIP mean/std; no-ops but the normalisation at 224).
//!
//! Every problem is found before any denoising and names the file and field.

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use troupe_data::error::Location;
use troupe_data::image_io::{DecodeLimits, decode_rgb};
use troupe_data::ops::LibraryVersions;
use troupe_data::ops::clip_image::ClipImageProcessor;
use troupe_data::ops::geometry::norm_crop_with;
use troupe_data::ops::morph::{
    composite_on_white, crop_gray, crop_rgb, gaussian_blur_5x5, nonzero_bbox,
};
use troupe_data::ops::resize::{Filter, Resizer, resize_rgb};

use crate::DiffusionError;

/// Side of the crops the reference pipeline makes before CLIP preprocessing.
pub const CROP_SIZE: u32 = 224;
/// Width of an ArcFace identity embedding.
pub const EMBEDDING_DIM: usize = 512;

/// One character to condition on.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Where it came from (a description for messages and sidecars).
    pub source: String,
    /// The person image.
    pub image: RgbImage,
    /// The person mask at image size, as RGB (the reference reads it with `.convert("RGB")`).
    pub mask: RgbImage,
    /// ArcFace embedding (`normed_embedding`), [`EMBEDDING_DIM`] floats.
    pub embedding: Vec<f32>,
    /// Five face keypoints in image pixels.
    pub keypoints: [[f32; 2]; 5],
}

/// Which library versions' arithmetic the crops reproduce (the data crate's
/// [`LibraryVersions`]: `warpAffine` and Pillow's resize pass order).
pub type CropOps = LibraryVersions;

/// Pillow's bicubic resize with `ops`' pass order.
fn resize_bicubic(
    ops: &CropOps,
    img: &RgbImage,
    w: u32,
    h: u32,
    source: &str,
) -> Result<RgbImage, DiffusionError> {
    resize_rgb(
        &mut Resizer::with_order(ops.pass_order),
        img,
        w,
        h,
        Filter::CatmullRom,
    )
    .map_err(|e| err(source, "", e.to_string()))
}

/// CLIP-normalised crops of one reference: `[3, S, S]` each.
#[derive(Debug, Clone)]
pub struct ReferenceCrops {
    /// The masked body crop.
    pub body: Vec<f32>,
    /// The aligned face crop.
    pub face: Vec<f32>,
}

fn err(file: &str, field: &str, message: impl Into<String>) -> DiffusionError {
    DiffusionError::input(file, field, message)
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

fn read_bytes(path: &Path, field: &str) -> Result<Vec<u8>, DiffusionError> {
    std::fs::read(path).map_err(|e| err(&shown(path), field, format!("cannot read: {e}")))
}

impl Reference {
    /// Reads a reference from files: image, mask (same size), embedding `.npy` (512 floats),
    /// keypoints JSON (`[[x, y], …]` × 5, in image pixels).
    pub fn from_files(
        image: &Path,
        mask: &Path,
        embedding: &Path,
        keypoints: &Path,
    ) -> Result<Self, DiffusionError> {
        let limits = DecodeLimits::default();
        let decode = |path: &Path, field: &str| {
            decode_rgb(&read_bytes(path, field)?, &Location::file(path), limits)
                .map_err(|e| err(&shown(path), field, e.to_string()))
        };
        let img = decode(image, "image")?;
        let mask_img = decode(mask, "mask")?;
        let emb = troupe_data::pack::read_embedding_npy(&read_bytes(embedding, "embedding")?)
            .map_err(|m| err(&shown(embedding), "embedding", m))?;
        let kps_text = String::from_utf8(read_bytes(keypoints, "keypoints")?)
            .map_err(|_| err(&shown(keypoints), "keypoints", "not UTF-8 text"))?;
        let kps: Vec<Vec<f32>> = serde_json::from_str(&kps_text).map_err(|e| {
            err(
                &shown(keypoints),
                "keypoints",
                format!("expected [[x, y], …] × 5: {e}"),
            )
        })?;
        let flat: Vec<f32> = kps.iter().flatten().copied().collect();
        if kps.len() != 5 || kps.iter().any(|p| p.len() != 2) {
            return Err(err(
                &shown(keypoints),
                "keypoints",
                "expected 5 [x, y] pairs",
            ));
        }
        let source = format!(
            "image={},mask={},embedding={},keypoints={}",
            image.display(),
            mask.display(),
            embedding.display(),
            keypoints.display()
        );
        Self::checked(source, img, mask_img, emb, &flat, &shown(image), true)
    }

    /// Reads character `character` of the row whose id is `id` in the shard `shard`.
    pub fn from_shard(shard: &Path, id: &str, character: usize) -> Result<Self, DiffusionError> {
        let file = shown(shard);
        let reader = troupe_data::shard::ShardReader::open(shard)
            .map_err(|e| err(&file, "", e.to_string()))?;
        for g in 0..reader.num_row_groups() {
            let rows = reader
                .read_row_group(g)
                .map_err(|e| err(&file, "", e.to_string()))?;
            for (row, sample) in rows {
                let Ok(sample) = sample else { continue };
                if sample.id != id {
                    continue;
                }
                let at = format!("{file} row {row}");
                let n = sample.characters.len();
                let c = sample.characters.get(character).ok_or_else(|| {
                    err(
                        &at,
                        "characters",
                        format!("has {n} characters, no character {character}"),
                    )
                })?;
                let limits = DecodeLimits::default();
                let loc = Location::row(shard, row);
                let image = decode_rgb(&sample.image.bytes, &loc.field("image"), limits)
                    .map_err(|e| err(&at, "image", e.to_string()))?;
                let mask = decode_rgb(&c.mask.bytes, &loc.field("mask"), limits).map_err(|e| {
                    err(&at, &format!("characters[{character}].mask"), e.to_string())
                })?;
                let source = format!("{file}#{id}:{character}");
                return Self::checked(
                    source,
                    image,
                    mask,
                    c.embedding.clone(),
                    &c.keypoints,
                    &at,
                    true,
                );
            }
        }
        Err(err(&file, "id", format!("no row with id `{id}`")))
    }

    /// Parses a command-line reference: `SHARD.parquet#ROW_ID[:CHARACTER]`, or
    /// `image=IMG,mask=MASK,embedding=EMB.npy,keypoints=KPS.json` (paths relative to `base`).
    /// (A plain photo, `photo=IMG,mask=MASK`, needs a face detector: the command line resolves
    /// it with `troupe-faces` and [`Reference::from_parts`].)
    pub fn parse(arg: &str, base: &Path) -> Result<Self, DiffusionError> {
        let at = |p: &str| -> PathBuf { base.join(p) };
        if let Some((shard, row)) = arg.split_once('#') {
            let (id, character) = match row.rsplit_once(':') {
                Some((id, c)) => (
                    id,
                    c.parse().map_err(|_| {
                        err(arg, "character", format!("`{c}` is not a character index"))
                    })?,
                ),
                None => (row, 0),
            };
            return Self::from_shard(&at(shard), id, character);
        }
        let mut parts = std::collections::BTreeMap::new();
        for kv in arg.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                err(
                    arg,
                    "",
                    "expected SHARD#ROW_ID[:C] or image=…,mask=…,embedding=…,keypoints=…",
                )
            })?;
            parts.insert(k.trim(), v.trim());
        }
        let get = |k: &str| {
            parts
                .get(k)
                .map(|v| at(v))
                .ok_or_else(|| err(arg, k, "missing"))
        };
        if let Some(k) = parts
            .keys()
            .find(|k| !["image", "mask", "embedding", "keypoints"].contains(k))
        {
            return Err(err(
                arg,
                k,
                "unknown field (expected image, mask, embedding, keypoints)",
            ));
        }
        Self::from_files(
            &get("image")?,
            &get("mask")?,
            &get("embedding")?,
            &get("keypoints")?,
        )
    }

    /// A reference from decoded parts (identity from a face detector), checked as the file
    /// readers check theirs except that keypoints may lie outside the image (a detector's do
    /// for faces at the border; `norm_crop` fills with black, as the reference pipeline does).
    /// `file` names the source in errors; `keypoints` are `x0, y0, …, x4, y4` in image pixels.
    pub fn from_parts(
        source: String,
        image: RgbImage,
        mask: RgbImage,
        embedding: Vec<f32>,
        keypoints: &[f32],
        file: &str,
    ) -> Result<Self, DiffusionError> {
        if keypoints.len() != 10 {
            return Err(err(
                file,
                "keypoints",
                format!("has {} values, expected 10", keypoints.len()),
            ));
        }
        Self::checked(source, image, mask, embedding, keypoints, file, false)
    }

    /// Validates the parts; `check_inside` refuses keypoints outside the image (given ones).
    fn checked(
        source: String,
        image: RgbImage,
        mask: RgbImage,
        embedding: Vec<f32>,
        keypoints: &[f32],
        file: &str,
        check_inside: bool,
    ) -> Result<Self, DiffusionError> {
        let (w, h) = image.dimensions();
        if mask.dimensions() != (w, h) {
            let (mw, mh) = mask.dimensions();
            return Err(err(
                file,
                "mask",
                format!("is {mw}x{mh}, the image is {w}x{h}"),
            ));
        }
        if embedding.len() != EMBEDDING_DIM {
            let n = embedding.len();
            return Err(err(
                file,
                "embedding",
                format!("has {n} values, expected {EMBEDDING_DIM}"),
            ));
        }
        if let Some(i) = embedding.iter().position(|x| !x.is_finite()) {
            return Err(err(file, "embedding", format!("value {i} is not finite")));
        }
        let mut kps = [[0f32; 2]; 5];
        for (i, p) in kps.iter_mut().enumerate() {
            let (x, y) = (keypoints[2 * i], keypoints[2 * i + 1]);
            let inside = (0.0..w as f32).contains(&x) && (0.0..h as f32).contains(&y);
            if !(x.is_finite() && y.is_finite() && (inside || !check_inside)) {
                return Err(err(
                    file,
                    "keypoints",
                    format!("point {i} ({x}, {y}) is outside the {w}x{h} image"),
                ));
            }
            *p = [x, y];
        }
        if nonzero_bbox(&channel(&mask, 0)).is_none() {
            return Err(err(file, "mask", "has no person pixel (all black)"));
        }
        Ok(Self {
            source,
            image,
            mask,
            embedding,
            keypoints: kps,
        })
    }

    /// The CLIP inputs of this reference for an image encoder of input side `clip_size`.
    pub fn crops(&self, clip_size: u32, ops: &CropOps) -> Result<ReferenceCrops, DiffusionError> {
        let body = self.body_crop(ops)?;
        let face = norm_crop_with(&self.image, &self.keypoints, CROP_SIZE, ops.warp);
        let processor = ClipImageProcessor::square(clip_size, ops.pass_order);
        let process = |img: &RgbImage| {
            processor
                .process(img)
                .map_err(|e| err(&self.source, "", e.to_string()))
        };
        Ok(ReferenceCrops {
            body: process(&body)?,
            face: process(&face)?,
        })
    }

    /// The masked body crop at 224² (`crop_image` before CLIP preprocessing).
    pub fn body_crop(&self, ops: &CropOps) -> Result<RgbImage, DiffusionError> {
        let channels: Vec<GrayImage> = (0..3).map(|c| channel(&self.mask, c)).collect();
        let bbox = nonzero_bbox(&channels[0])
            .ok_or_else(|| err(&self.source, "mask", "has no person pixel (all black)"))?;
        let crop = crop_rgb(&self.image, bbox);
        // The mask is blurred after cropping (borders reflect at the crop's edges), per channel.
        let blurred: Vec<GrayImage> = channels
            .iter()
            .map(|m| gaussian_blur_5x5(&crop_gray(m, bbox)))
            .collect();
        let mut out = composite_on_white(&crop, &blurred[0]);
        if blurred[1] != blurred[0] || blurred[2] != blurred[0] {
            for (c, mask) in blurred.iter().enumerate().skip(1) {
                let other = composite_on_white(&crop, mask);
                for (o, p) in out.pixels_mut().zip(other.pixels()) {
                    o.0[c] = p.0[c];
                }
            }
        }
        resize_bicubic(ops, &out, CROP_SIZE, CROP_SIZE, &self.source)
    }
}

fn channel(img: &RgbImage, c: usize) -> GrayImage {
    let (w, h) = img.dimensions();
    GrayImage::from_fn(w, h, |x, y| image::Luma([img.get_pixel(x, y).0[c]]))
}
