//! Per-sample image operations of the StoryMaker training recipe
//! (`/work/shared/reference/storymaker.md` §4 and §5.2), re-implemented to reproduce the
//! reference Python calls (OpenCV, Pillow, insightface, skimage, transformers, torchvision)
//! bit-exactly where that is practical, and otherwise as closely as measured in each item's docs.
//!
//! All operations are single-threaded and allocation-light; the mask operations work on the
//! region of interest (bounding box of the nonzero pixels) so their cost scales with the size of
//! the character, not of the image.
//!
//! Buffer types are [`image::RgbImage`] and [`image::GrayImage`]; float outputs are CHW `f32`
//! slices filled in place.
//!
//! | module | reference calls |
//! |---|---|
//! | [`morph`] | `cv2.inRange`, `cv2.dilate`, `cv2.GaussianBlur(5×5, 0)`, `cv2.boundingRect` of contours, white compositing |
//! | [`geometry`] | `PIL.Image.rotate` (nearest), skimage `SimilarityTransform.estimate`, insightface `estimate_norm` / `norm_crop`, `cv2.warpAffine` (bilinear) |
//! | [`resize`] | `PIL.Image.resize` (LANCZOS / BICUBIC / BILINEAR), `cv2.resize(INTER_LINEAR)`, StoryMaker's training-size rule |
//! | [`color`] | `CLIPImageProcessor` normalisation, torchvision `ToTensor` (+ `Normalize(0.5, 0.5)`) |
//! | [`clip_image`] | `CLIPImageProcessor` as a whole (shortest-side resize, centre crop, rescale, normalise) |
//!
//! Library versions: the defaults reproduce the StoryMaker era (OpenCV 4.x, Pillow ≤ 12).
//! Two calls changed since and have switchable variants, each verified against both behaviours:
//! `cv2.warpAffine` (float32 kernels in OpenCV 5.0, [`WarpImpl`]) and Pillow's resize pass order
//! (Pillow 13, [`PassOrder`]). `cv2.GaussianBlur` and `cv2.resize` gave identical results in
//! OpenCV 4.10 and 5.0.

#![warn(missing_docs)]

pub mod clip_image;
pub mod color;
pub mod geometry;
pub mod morph;
pub mod resize;

pub use color::{
    CLIP_MEAN, CLIP_STD, clip_denormalize, clip_normalize, from_signed_unit, from_unit,
    to_signed_unit, to_unit,
};
pub use geometry::{
    ARCFACE_TEMPLATE_112, Affine, WarpImpl, arcface_template, estimate_norm, invert_affine,
    norm_crop, norm_crop_with, rotate_nearest, similarity_transform, warp_affine,
    warp_affine_bilinear, warp_affine_bilinear_f32,
};
pub use morph::{
    color_masks, composite_on_white, composite_on_white_roi, crop_gray, crop_rgb, dilate_rect,
    dilate_rect_roi, gaussian_blur_5x5, gaussian_blur_5x5_roi, in_range_rgb, nonzero_bbox,
};
pub use resize::{
    Filter, PassOrder, Resizer, resize_mask_bilinear, resize_mask_bilinear_u8, resize_rgb,
    resize_rgb_cached,
};

/// Which library versions' arithmetic the operations reproduce where releases differ:
/// `cv2.warpAffine` (OpenCV 4 and 5) and Pillow's resize pass order (≤ 12 and 13). The default
/// is the StoryMaker era's (OpenCV 4, Pillow ≤ 12); [`LibraryVersions::current`] is today's
/// (what the pinned reference environment runs, so its fixtures need it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibraryVersions {
    /// `warpAffine` implementation of `norm_crop`.
    pub warp: WarpImpl,
    /// Pillow resize pass order.
    pub pass_order: PassOrder,
}

impl LibraryVersions {
    /// OpenCV 5 and Pillow 13 (current releases).
    pub fn current() -> Self {
        Self {
            warp: WarpImpl::OpenCv5,
            pass_order: PassOrder::Pillow13,
        }
    }
}

/// Errors of the image operations (only the operations that can meaningfully fail return it).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A source or destination image has a zero width or height.
    #[error("empty image: {what} is {width}x{height}")]
    EmptyImage {
        /// Which image ("source" / "destination").
        what: &'static str,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
    },
    /// A centre crop larger than the resized image.
    #[error("a {width}x{height} resized image is smaller than the {crop_width}x{crop_height} crop")]
    CropTooLarge {
        /// Resized width.
        width: u32,
        /// Resized height.
        height: u32,
        /// Crop width.
        crop_width: u32,
        /// Crop height.
        crop_height: u32,
    },
    /// An image so elongated that its shortest-side resize exceeds the pixel budget.
    #[error(
        "a {width}x{height} image resizes to {resized_width}x{resized_height} before the crop, over the {budget}-pixel budget (aspect ratio too extreme for CLIP's preprocessing)"
    )]
    ResizeTooLarge {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// Resized width.
        resized_width: u32,
        /// Resized height.
        resized_height: u32,
        /// Largest resized image accepted.
        budget: u64,
    },
}

/// An axis-aligned pixel rectangle `[x0, x1) × [y0, y1)` (exclusive upper bounds), as returned by
/// `cv2.boundingRect` converted from `(x, y, w, h)` to corners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BBox {
    /// First column.
    pub x0: u32,
    /// First row.
    pub y0: u32,
    /// One past the last column.
    pub x1: u32,
    /// One past the last row.
    pub y1: u32,
}

impl BBox {
    /// A box from its corners (`x1`, `y1` exclusive).
    pub const fn new(x0: u32, y0: u32, x1: u32, y1: u32) -> Self {
        Self { x0, y0, x1, y1 }
    }

    /// The whole `width × height` image.
    pub const fn full(width: u32, height: u32) -> Self {
        Self::new(0, 0, width, height)
    }

    /// Width in pixels (0 for an empty or inverted box).
    pub const fn width(&self) -> u32 {
        self.x1.saturating_sub(self.x0)
    }

    /// Height in pixels (0 for an empty or inverted box).
    pub const fn height(&self) -> u32 {
        self.y1.saturating_sub(self.y0)
    }

    /// True when the box holds no pixel.
    pub const fn is_empty(&self) -> bool {
        self.width() == 0 || self.height() == 0
    }

    /// `cv2.boundingRect`-style `(x, y, w, h)`.
    pub const fn xywh(&self) -> (u32, u32, u32, u32) {
        (self.x0, self.y0, self.width(), self.height())
    }

    /// The box grown by `left`/`top`/`right`/`bottom` pixels and clipped to a
    /// `width × height` image.
    pub fn expand_clip(
        &self,
        left: u32,
        top: u32,
        right: u32,
        bottom: u32,
        width: u32,
        height: u32,
    ) -> Self {
        Self {
            x0: self.x0.saturating_sub(left).min(width),
            y0: self.y0.saturating_sub(top).min(height),
            x1: self.x1.saturating_add(right).min(width),
            y1: self.y1.saturating_add(bottom).min(height),
        }
    }

    /// The box clipped to a `width × height` image.
    pub fn clip(&self, width: u32, height: u32) -> Self {
        self.expand_clip(0, 0, 0, 0, width, height)
    }

    /// Smallest box containing both (an empty box is the identity).
    pub fn union(&self, other: &Self) -> Self {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        Self {
            x0: self.x0.min(other.x0),
            y0: self.y0.min(other.y0),
            x1: self.x1.max(other.x1),
            y1: self.y1.max(other.y1),
        }
    }
}

/// Helpers shared by the unit tests: fixture loading (files written by
/// `scripts/make_ops_expected.py`).
#[cfg(test)]
pub(crate) mod testutil {
    use image::{GrayImage, RgbImage};
    use std::path::PathBuf;

    pub fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ops")
            .join(name)
    }

    pub fn load_gray(name: &str) -> GrayImage {
        let p = fixture_path(name);
        image::open(&p)
            .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
            .to_luma8()
    }

    pub fn load_rgb(name: &str) -> RgbImage {
        let p = fixture_path(name);
        image::open(&p)
            .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
            .to_rgb8()
    }

    /// Lines of whitespace-separated fields from a text fixture; `#` starts a comment line.
    pub fn load_table(name: &str) -> Vec<Vec<String>> {
        let p = fixture_path(name);
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()));
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// Little-endian f32 values from a binary fixture.
    pub fn load_f32(name: &str) -> Vec<f32> {
        let p = fixture_path(name);
        let bytes = std::fs::read(&p)
            .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()));
        assert_eq!(bytes.len() % 4, 0);
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// (max abs difference, number of differing samples) of two equally sized u8 buffers.
    pub fn diff_u8(a: &[u8], b: &[u8]) -> (u8, usize) {
        assert_eq!(a.len(), b.len(), "buffer sizes differ");
        let mut max = 0u8;
        let mut n = 0usize;
        for (&x, &y) in a.iter().zip(b) {
            let d = x.abs_diff(y);
            if d != 0 {
                n += 1;
                max = max.max(d);
            }
        }
        (max, n)
    }

    pub fn assert_same_gray(got: &GrayImage, want: &GrayImage, what: &str) {
        assert_eq!(got.dimensions(), want.dimensions(), "{what}: dimensions");
        let (max, n) = diff_u8(got.as_raw(), want.as_raw());
        assert_eq!(
            (max, n),
            (0, 0),
            "{what}: max abs diff {max}, {n} differing pixels"
        );
    }

    pub fn assert_same_rgb(got: &RgbImage, want: &RgbImage, what: &str) {
        assert_eq!(got.dimensions(), want.dimensions(), "{what}: dimensions");
        let (max, n) = diff_u8(got.as_raw(), want.as_raw());
        assert_eq!(
            (max, n),
            (0, 0),
            "{what}: max abs diff {max}, {n} differing samples"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::BBox;

    #[test]
    fn bbox_expand_clip_union() {
        let b = BBox::new(3, 4, 10, 6);
        assert_eq!((b.width(), b.height()), (7, 2));
        assert_eq!(b.xywh(), (3, 4, 7, 2));
        assert_eq!(b.expand_clip(5, 1, 3, 100, 12, 20), BBox::new(0, 3, 12, 20));
        assert!(BBox::new(2, 2, 2, 9).is_empty());
        let e = BBox::default();
        assert_eq!(e.union(&b), b);
        assert_eq!(b.union(&BBox::new(0, 5, 4, 9)), BBox::new(0, 4, 10, 9));
        assert_eq!(
            BBox::new(5, 5, 30, 40).clip(20, 10),
            BBox::new(5, 5, 20, 10)
        );
    }
}
