//! transformers' `CLIPImageProcessor` (PIL backend) on uint8 RGB, as one operation: Pillow
//! bicubic resize of the shortest side to `shortest_edge` (the other side
//! `int(shortest_edge · long / short)`), centre crop (`(h − crop) // 2`), rescale
//! `x · rescale_factor` in float64 cast to float32, normalise `(x − mean) / std` in float32 —
//! the same arithmetic as [`super::clip_normalize`], for any rescale/mean/std.

use image::RgbImage;

use super::OpsError;
use super::color::{CLIP_MEAN, CLIP_STD};
use super::resize::{Filter, PassOrder, Resizer, resize_rgb};

/// The settings of one `CLIPImageProcessor` (its `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// Target of the shorter side.
    pub shortest_edge: u32,
    /// Centre-crop width.
    pub crop_width: u32,
    /// Centre-crop height.
    pub crop_height: u32,
    /// 1/255.
    pub rescale_factor: f64,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel std.
    pub std: [f32; 3],
    /// Pillow's resize pass order (13 changed it).
    pub pass_order: PassOrder,
}

impl ClipImageProcessor {
    /// `CLIPImageProcessor()` defaults for an encoder of input side `size` (224 for ViT-H/14):
    /// shortest edge and crop `size`, 1/255, OpenAI's CLIP mean and std.
    pub fn square(size: u32, pass_order: PassOrder) -> Self {
        Self {
            shortest_edge: size,
            crop_width: size,
            crop_height: size,
            rescale_factor: 1.0 / 255.0,
            mean: CLIP_MEAN.map(|m| m as f32),
            std: CLIP_STD.map(|s| s as f32),
            pass_order,
        }
    }

    /// `(width, height)` after the shortest-side resize of a `w × h` image.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let (short, long) = (w.min(h), w.max(h));
        let s = self.shortest_edge;
        let other = (s as f64 * long as f64 / short.max(1) as f64) as u32;
        if w <= h { (s, other) } else { (other, s) }
    }

    /// Pixel values `[3, crop_height, crop_width]`. An image whose resized size is smaller
    /// than the crop is an error.
    pub fn process(&self, img: &RgbImage) -> Result<Vec<f32>, OpsError> {
        let (w, h) = img.dimensions();
        let (nw, nh) = self.resized_size(w, h);
        let (cw, ch) = (self.crop_width, self.crop_height);
        // A very elongated image resizes to a huge one before the crop: refuse it rather than
        // exhaust memory (the budget is the decoder's).
        let budget = crate::image_io::DecodeLimits::default().max_pixels;
        if nw as u64 * nh as u64 > budget {
            return Err(OpsError::ResizeTooLarge {
                width: w,
                height: h,
                resized_width: nw,
                resized_height: nh,
                budget,
            });
        }
        if nw < cw || nh < ch {
            return Err(OpsError::CropTooLarge {
                width: nw,
                height: nh,
                crop_width: cw,
                crop_height: ch,
            });
        }
        let resized = resize_rgb(
            &mut Resizer::with_order(self.pass_order),
            img,
            nw,
            nh,
            Filter::CatmullRom,
        )?;
        let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|p| {
                let x = (p as f64 * self.rescale_factor) as f32;
                (x - self.mean[c]) / self.std[c]
            })
        });
        let (top, left) = ((nh - ch) / 2, (nw - cw) / 2);
        let plane = (cw * ch) as usize;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..ch {
            for x in 0..cw {
                let px = resized.get_pixel(left + x, top + y).0;
                for c in 0..3 {
                    out[c * plane + (y * cw + x) as usize] = lut[c][px[c] as usize];
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_defaults_equal_clip_normalize_on_a_square_image() {
        // At the encoder's own size the resize is a copy and the crop a no-op, so the result
        // is `clip_normalize` of the image.
        let img = RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 31) as u8, (y * 29) as u8, (x * y) as u8])
        });
        let got = ClipImageProcessor::square(8, PassOrder::default())
            .process(&img)
            .unwrap();
        let mut want = vec![0f32; 3 * 64];
        super::super::clip_normalize(&img, &mut want);
        assert_eq!(got, want);
    }

    #[test]
    fn shortest_side_rule_and_too_small_crop() {
        let p = ClipImageProcessor::square(32, PassOrder::default());
        assert_eq!(p.resized_size(37, 61), (32, 52)); // int(32 · 61 / 37) = 52
        assert_eq!(p.resized_size(200, 4), (1600, 32));
        let mut q = p.clone();
        q.crop_width = 40;
        let e = q.process(&RgbImage::new(32, 32)).unwrap_err().to_string();
        assert!(e.contains("40"), "{e}");
        // 1 × 16384 (the decoder's longest side) at CLIP's 224 would resize to 224 × 3.7M.
        let clip = ClipImageProcessor::square(224, PassOrder::default());
        let e = clip
            .process(&RgbImage::new(1, 16384))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1x16384") && e.contains("224x3670016"), "{e}");
    }
}
