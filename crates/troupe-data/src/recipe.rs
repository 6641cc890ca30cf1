//! The per-sample recipe of StoryMaker's `mp_dataset.py` (reference §5.2), one function:
//! [`process`]. It turns a shard row into the tensors of one training sample.
//!
//! Steps, per sample: dropout draws → decode → image resized to the target size in [-1, 1];
//! per character: mask dilated 7×7 then blurred 5×5 (the soft mask), the image cropped to the
//! dilated mask's bounding box and composited on white, an aligned face crop by the 5-point
//! similarity transform to the ArcFace template, a body crop rotated by U(±10°) with white fill
//! and resized to 224² (Lanczos), both CLIP-normalised; the soft mask at 1/8 resolution for the
//! losses; the pose image resized to the target in [0, 1] (bicubic, as the reference's
//! Pillow default).

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Location, Result};
use crate::image_io::{DecodeLimits, check_pose_shape, decode_gray, decode_rgb};
use crate::ops::{self, Filter, LibraryVersions, PassOrder};
use crate::plan::Target;
use crate::rng::KeyedRng;
use crate::schema::{self, Sample, col};

/// Conditioning dropout, decided per sample from one uniform draw r (IP-Adapter's cascade):
/// r < image → drop image; next `text` → drop caption; next `both` → drop both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropout {
    /// Probability of dropping the image conditioning only (reference 0.05).
    pub image: f64,
    /// Probability of dropping the caption only (reference 0.20).
    pub text: f64,
    /// Probability of dropping both (reference 0.05).
    pub both: f64,
}

impl Default for Dropout {
    fn default() -> Self {
        Self {
            image: 0.05,
            text: 0.20,
            both: 0.05,
        }
    }
}

impl Dropout {
    /// (drop image, drop text) for a uniform draw `r` in [0, 1).
    pub fn decide(&self, r: f64) -> (bool, bool) {
        if r < self.image {
            (true, false)
        } else if r < self.image + self.text {
            (false, true)
        } else if r < self.image + self.text + self.both {
            (true, true)
        } else {
            (false, false)
        }
    }
}

/// Recipe settings; defaults are the reference values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipeConfig {
    /// Side of the CLIP crops (224 for ViT-H/14).
    pub crop_size: u32,
    /// Mask dilation kernel side (7).
    pub dilate_kernel: u32,
    /// Body crops are rotated by U(−x, x) degrees (10).
    pub max_rotation_degrees: f64,
    /// Loss masks are at 1/this of the image (8, the VAE factor).
    pub latent_downsample: u32,
    /// Conditioning dropout.
    pub dropout: Dropout,
    /// SDXL `time_ids`: with `Some((h, w))` the reference's fixed target size (1286, 960) and
    /// original size = training size; with `None` the usual SDXL (original size, crop, target).
    pub fixed_target_size: Option<(u32, u32)>,
    /// Refuse rows without a pose image (`data.require_pose`); otherwise such rows train
    /// without the ControlNet.
    pub require_pose: bool,
    /// Whose OpenCV / Pillow arithmetic the crops and resizes reproduce.
    pub versions: LibraryVersions,
}

impl Default for RecipeConfig {
    fn default() -> Self {
        Self {
            crop_size: 224,
            dilate_kernel: 7,
            max_rotation_degrees: 10.0,
            latent_downsample: 8,
            dropout: Dropout::default(),
            fixed_target_size: Some((1286, 960)),
            require_pose: false,
            versions: LibraryVersions::default(),
        }
    }
}

impl RecipeConfig {
    /// The same recipe without random augmentation: no body-crop rotation and no conditioning
    /// dropout (what `troupe data preview --no-augment` compares with the reference).
    pub fn without_augmentation(self) -> Self {
        Self {
            max_rotation_degrees: 0.0,
            dropout: Dropout {
                image: 0.0,
                text: 0.0,
                both: 0.0,
            },
            ..self
        }
    }
}

/// One character after the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedCharacter {
    /// Identity embedding (zeros when the image conditioning is dropped).
    pub embedding: Vec<f32>,
    /// CLIP-normalised body crop `[3, S, S]`; `None` (zeros) when the image is dropped.
    pub clip_body: Option<Vec<f32>>,
    /// CLIP-normalised aligned face crop `[3, S, S]`; `None` (zeros) when the image is dropped.
    pub clip_face: Option<Vec<f32>>,
    /// Soft mask at latent resolution in [0, 1], `[H/8, W/8]`.
    pub mask: Vec<f32>,
}

/// What the recipe decided for one sample, for inspection (`troupe data preview --dump` writes
/// it to `sample.json`); small, no tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleTrace {
    /// Source image size (width, height).
    pub source_size: (u32, u32),
    /// The region of the source image resized to the output, x, y, w, h (the whole image under
    /// the reference resize rule; a centre crop for aspect buckets).
    pub source_crop: [u32; 4],
    /// Per character, in slot order.
    pub characters: Vec<CharacterTrace>,
}

/// The recipe's decisions for one character: where it cropped and how it rotated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CharacterTrace {
    /// Crop box x0, y0, x1, y1 (exclusive) in source-image pixels (the soft mask's bounding
    /// box, the reference's `bounding_rectangle`).
    pub crop_box: [u32; 4],
    /// Face keypoints (x, y) in source-image pixels, as stored in the shard.
    pub keypoints: [[f32; 2]; 5],
    /// The same keypoints relative to the crop box: what the face alignment uses (the
    /// reference's `.bin` keypoints).
    pub crop_keypoints: [[f32; 2]; 5],
    /// Body-crop rotation drawn, in degrees (drawn even when the image conditioning is dropped,
    /// so the random stream does not depend on it; then unused).
    pub rotation_degrees: f64,
}

/// One sample after the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedSample {
    /// Sample id.
    pub id: String,
    /// Caption (empty when dropped).
    pub caption: String,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// Image in [-1, 1], `[3, H, W]`.
    pub pixels: Vec<f32>,
    /// Characters in slot order.
    pub characters: Vec<ProcessedCharacter>,
    /// Pose in [0, 1], `[3, H, W]`.
    pub pose: Option<Vec<f32>>,
    /// Image conditioning dropped.
    pub drop_image: bool,
    /// Caption dropped.
    pub drop_text: bool,
    /// SDXL time ids.
    pub time_ids: [f32; 6],
    /// Crop boxes, keypoints and rotations.
    pub trace: SampleTrace,
}

/// Reusable per-thread buffers (the resizer keeps its coefficient caches).
#[derive(Default)]
pub struct Scratch {
    resizer: ops::Resizer,
    order: PassOrder,
}

impl Scratch {
    /// The resizer, emulating Pillow's `order`.
    fn resizer(&mut self, order: PassOrder) -> &mut ops::Resizer {
        if order != self.order {
            (self.resizer, self.order) = (ops::Resizer::with_order(order), order);
        }
        &mut self.resizer
    }
}

/// Runs the recipe on one row. `at` names the row; errors name the field too.
pub fn process(
    sample: &Sample,
    target: &Target,
    cfg: &RecipeConfig,
    limits: DecodeLimits,
    rng: &mut KeyedRng,
    at: &Location,
    scratch: &mut Scratch,
) -> Result<ProcessedSample> {
    if let Some(e) = schema::validate_fields(sample, at).into_iter().next() {
        return Err(e);
    }
    // Random draws first, in a fixed order, so they do not depend on the data path taken.
    let (drop_image, drop_text) = cfg.dropout.decide(rng.uniform());
    let angles: Vec<f64> = sample
        .characters
        .iter()
        .map(|_| rng.uniform_range(-cfg.max_rotation_degrees, cfg.max_rotation_degrees))
        .collect();

    let image = decode_rgb(&sample.image.bytes, &at.field(col::IMAGE), limits)?;
    if image.dimensions() != (sample.width, sample.height) {
        return Err(DataError::new(
            at.field("width/height"),
            format!(
                "the columns say {}x{} but the image decodes to {}x{}",
                sample.width,
                sample.height,
                image.width(),
                image.height()
            ),
        ));
    }
    let (w, h) = (target.width, target.height);
    let [cx, cy, cw, ch] = target.crop;
    let view = region(&image, target.crop);
    let resized = resize(
        scratch,
        cfg.versions.pass_order,
        view.as_ref().unwrap_or(&image),
        w,
        h,
        Filter::CatmullRom,
        at,
    )?;
    let mut pixels = vec![0.0; 3 * (w * h) as usize];
    ops::to_signed_unit(&resized, &mut pixels);

    let (mw, mh) = (w / cfg.latent_downsample, h / cfg.latent_downsample);
    let s = cfg.crop_size;
    let mut characters = Vec::with_capacity(sample.characters.len());
    let mut trace = SampleTrace {
        source_size: (sample.width, sample.height),
        source_crop: target.crop,
        characters: Vec::with_capacity(sample.characters.len()),
    };
    for (i, character) in sample.characters.iter().enumerate() {
        let field = |name: &str| at.field(format!("{}[{i}].{name}", col::CHARACTERS));
        let mask = decode_gray(&character.mask.bytes, &field(col::MASK), limits)?;
        if mask.dimensions() != image.dimensions() {
            return Err(DataError::new(
                field(col::MASK),
                format!(
                    "mask is {}x{}, the image is {}x{}",
                    mask.width(),
                    mask.height(),
                    image.width(),
                    image.height()
                ),
            ));
        }
        let Some(soft) = soft_mask(&mask, cfg.dilate_kernel) else {
            return Err(DataError::new(
                field(col::MASK),
                "mask is empty (no non-zero pixel)",
            ));
        };
        let loss_mask = ops::resize_mask_bilinear(
            region(&soft.mask, target.crop)
                .as_ref()
                .unwrap_or(&soft.mask),
            mw,
            mh,
        );
        let [x0, y0, x1, y1] = soft.bbox;
        // Keypoints are stored in image pixels; the reference's are relative to the crop.
        let mut t = CharacterTrace {
            crop_box: soft.bbox,
            keypoints: [[0.0; 2]; 5],
            crop_keypoints: [[0.0; 2]; 5],
            rotation_degrees: angles[i],
        };
        for (k, p) in character.keypoints.chunks_exact(2).enumerate() {
            t.keypoints[k] = [p[0], p[1]];
            t.crop_keypoints[k] = [p[0] - x0 as f32, p[1] - y0 as f32];
        }
        let (clip_body, clip_face, embedding) = if drop_image {
            (None, None, vec![0.0; schema::EMBEDDING_DIM])
        } else {
            let crop = image::imageops::crop_imm(&image, x0, y0, x1 - x0, y1 - y0).to_image();
            let mcrop = image::imageops::crop_imm(&soft.mask, x0, y0, x1 - x0, y1 - y0).to_image();
            let white = ops::composite_on_white(&crop, &mcrop);
            let face = ops::norm_crop_with(&white, &t.crop_keypoints, s, cfg.versions.warp);
            let rotated = ops::rotate_nearest(&white, angles[i], [255, 255, 255]);
            let body = resize(
                scratch,
                cfg.versions.pass_order,
                &rotated,
                s,
                s,
                Filter::Lanczos3,
                at,
            )?;
            let mut clip_face = vec![0.0; 3 * (s * s) as usize];
            let mut clip_body = vec![0.0; 3 * (s * s) as usize];
            ops::clip_normalize(&face, &mut clip_face);
            ops::clip_normalize(&body, &mut clip_body);
            (
                Some(clip_body),
                Some(clip_face),
                character.embedding.clone(),
            )
        };
        characters.push(ProcessedCharacter {
            embedding,
            clip_body,
            clip_face,
            mask: loss_mask,
        });
        trace.characters.push(t);
    }

    let pose = match &sample.pose {
        None if cfg.require_pose => {
            return Err(DataError::new(
                at.field(col::POSE),
                "no pose image, and `data.require_pose` is set",
            ));
        }
        None => None,
        Some(p) => {
            let pose = decode_rgb(&p.bytes, &at.field(col::POSE), limits)?;
            check_pose_shape(pose.dimensions(), image.dimensions(), &at.field(col::POSE))?;
            // A pose of another size is resized with the image, as the reference's
            // `pose.resize((gt_w, gt_h))` (Pillow's default, bicubic): the same relative
            // region (the bucket's crop), then the target size.
            let sx = pose.width() as f64 / image.width() as f64;
            let sy = pose.height() as f64 / image.height() as f64;
            let pc = [
                (cx as f64 * sx) as u32,
                (cy as f64 * sy) as u32,
                ((cw as f64 * sx).round() as u32).clamp(1, pose.width()),
                ((ch as f64 * sy).round() as u32).clamp(1, pose.height()),
            ];
            let pose_view = region(&pose, pc);
            let resized = resize(
                scratch,
                cfg.versions.pass_order,
                pose_view.as_ref().unwrap_or(&pose),
                w,
                h,
                Filter::CatmullRom,
                at,
            )?;
            let mut out = vec![0.0; 3 * (w * h) as usize];
            ops::to_unit(&resized, &mut out);
            Some(out)
        }
    };

    let time_ids = match cfg.fixed_target_size {
        Some((th, tw)) => [h as f32, w as f32, 0.0, 0.0, th as f32, tw as f32],
        None => {
            let top = (cy as f64 * h as f64 / ch as f64).round() as f32;
            let left = (cx as f64 * w as f64 / cw as f64).round() as f32;
            [
                sample.height as f32,
                sample.width as f32,
                top,
                left,
                h as f32,
                w as f32,
            ]
        }
    };
    Ok(ProcessedSample {
        id: sample.id.clone(),
        caption: if drop_text {
            String::new()
        } else {
            sample.caption.clone()
        },
        width: w,
        height: h,
        pixels,
        characters,
        pose,
        drop_image,
        drop_text,
        time_ids,
        trace,
    })
}

fn resize(
    scratch: &mut Scratch,
    order: PassOrder,
    img: &RgbImage,
    w: u32,
    h: u32,
    filter: Filter,
    at: &Location,
) -> Result<RgbImage> {
    ops::resize_rgb(scratch.resizer(order), img, w, h, filter)
        .map_err(|e| DataError::new(at.clone(), e.to_string()))
}

/// `Some(copy)` of the region when it is not the whole image.
fn region<P: image::Pixel + 'static>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    crop: [u32; 4],
) -> Option<image::ImageBuffer<P, Vec<P::Subpixel>>> {
    let [x, y, w, h] = crop;
    ((x, y, w, h) != (0, 0, img.width(), img.height()))
        .then(|| image::imageops::crop_imm(img, x, y, w, h).to_image())
}

/// A character's soft mask at full resolution and its crop box.
pub struct SoftMask {
    /// Dilated then blurred mask.
    pub mask: GrayImage,
    /// x0, y0, x1, y1 (exclusive) of the soft mask's non-zero pixels: the reference's crop
    /// (`bounding_rectangle` of the external contours of the dilated *and blurred* mask, so the
    /// blur's 2-pixel spread is inside it).
    pub bbox: [u32; 4],
}

/// Dilation (k×k) then 5×5 Gaussian blur, computed on the mask's bounding box plus the margin
/// both operations can reach, so the cost follows the character's size, not the image's.
/// `None` for an empty mask.
pub fn soft_mask(mask: &GrayImage, kernel: u32) -> Option<SoftMask> {
    let b = ops::nonzero_bbox(mask)?;
    // Dilation reaches k/2, the blur 2 more, and 2 more keep the blur's border reflection on zeros.
    let m = kernel / 2 + 4;
    let (x0, y0) = (b.x0.saturating_sub(m), b.y0.saturating_sub(m));
    let (x1, y1) = ((b.x1 + m).min(mask.width()), (b.y1 + m).min(mask.height()));
    let roi = image::imageops::crop_imm(mask, x0, y0, x1 - x0, y1 - y0).to_image();
    let dilated = ops::dilate_rect(&roi, kernel);
    let blurred = ops::gaussian_blur_5x5(&dilated);
    let d =
        ops::nonzero_bbox(&blurred).expect("blurring a dilated non-empty mask keeps it non-empty");
    let mut full = GrayImage::new(mask.width(), mask.height());
    image::imageops::replace(&mut full, &blurred, x0 as i64, y0 as i64);
    Some(SoftMask {
        mask: full,
        bbox: [x0 + d.x0, y0 + d.y0, x0 + d.x1, y0 + d.y1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_cascade_matches_the_reference_thresholds() {
        let d = Dropout::default();
        assert_eq!(d.decide(0.0), (true, false));
        assert_eq!(d.decide(0.049), (true, false));
        assert_eq!(d.decide(0.05), (false, true));
        assert_eq!(d.decide(0.2499), (false, true));
        assert_eq!(d.decide(0.25), (true, true));
        assert_eq!(d.decide(0.2999), (true, true));
        assert_eq!(d.decide(0.30), (false, false));
    }

    #[test]
    fn soft_mask_on_the_roi_equals_the_full_image_computation() {
        // A blob near the border and one inside: the ROI shortcut must not change a pixel.
        for (bx, by) in [(1u32, 2u32), (40, 30), (57, 61)] {
            let mut m = GrayImage::new(64, 70);
            for y in by..(by + 6).min(70) {
                for x in bx..(bx + 5).min(64) {
                    m.put_pixel(x, y, image::Luma([200]));
                }
            }
            let fast = soft_mask(&m, 7).unwrap();
            let full = ops::gaussian_blur_5x5(&ops::dilate_rect(&m, 7));
            assert_eq!(fast.mask, full, "blob at {bx},{by}");
            let d = ops::nonzero_bbox(&full).unwrap();
            assert_eq!(fast.bbox, [d.x0, d.y0, d.x1, d.y1]);
        }
    }
}
