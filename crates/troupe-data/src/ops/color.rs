//! Conversion of 8-bit RGB images to normalised CHW `f32` tensors, with the reference float
//! operations in the reference order (bit-exact).

use image::RgbImage;
use std::sync::OnceLock;

/// `OPENAI_CLIP_MEAN` of `CLIPImageProcessor`.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD` of `CLIPImageProcessor`.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

type Lut3 = [[f32; 256]; 3];

fn clip_lut() -> &'static Lut3 {
    static LUT: OnceLock<Lut3> = OnceLock::new();
    LUT.get_or_init(|| {
        // transformers `rescale`: (x.astype(float64) * (1/255)).astype(float32);
        // `normalize`: (x - mean) / std with mean/std as float32 arrays, in float32.
        let scale = 1.0f64 / 255.0;
        std::array::from_fn(|c| {
            let (m, s) = (CLIP_MEAN[c] as f32, CLIP_STD[c] as f32);
            std::array::from_fn(|p| {
                let x = (p as f64 * scale) as f32;
                (x - m) / s
            })
        })
    })
}

/// Per-channel conversion, with the reference float operations (CLIP through a table built
/// with them, the others computed directly; the tests check all three against numpy's values).
#[derive(Clone, Copy)]
enum Conv {
    /// `((p as f64 * (1/255)) as f32 - mean) / std` (table).
    Clip,
    /// `p as f32 / 255`.
    Unit,
    /// `(p as f32 / 255 - 0.5) / 0.5`.
    Signed,
}

#[inline(always)]
fn to_chw_body(src: &[u8], n: usize, out: &mut [f32], conv: Conv) {
    let (px, _) = src.as_chunks::<3>();
    let px = &px[..n];
    for (c, plane) in out.chunks_exact_mut(n).enumerate() {
        match conv {
            Conv::Clip => {
                // Table lookup (the f64 -> f32 conversion makes the arithmetic slower).
                let lut = &clip_lut()[c];
                for (o, p) in plane.iter_mut().zip(px) {
                    *o = lut[p[c] as usize];
                }
            }
            Conv::Unit => {
                for (o, p) in plane.iter_mut().zip(px) {
                    *o = p[c] as f32 / 255.0;
                }
            }
            Conv::Signed => {
                for (o, p) in plane.iter_mut().zip(px) {
                    *o = (p[c] as f32 / 255.0 - 0.5) / 0.5;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn to_chw_avx2(src: &[u8], n: usize, out: &mut [f32], conv: Conv) {
    to_chw_body(src, n, out, conv)
}

fn to_chw(img: &RgbImage, out: &mut [f32], conv: Conv, what: &str) {
    let n = img.width() as usize * img.height() as usize;
    assert_eq!(out.len(), 3 * n, "{what}: output must hold 3*w*h values");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { to_chw_avx2(img.as_raw(), n, out, conv) };
    }
    to_chw_body(img.as_raw(), n, out, conv)
}

/// `CLIPImageProcessor()(images=img)` pixel values for an image that is already 224×224 (its
/// resize and centre crop are then no-ops): `(x/255 − mean) / std` per channel, CHW, written
/// into `out` (`3·w·h` values). Bit-exact with the numpy implementation of `transformers`
/// (rescale in float64 then cast to float32, normalise in float32).
///
/// # Panics
/// If `out.len() != 3·w·h`.
pub fn clip_normalize(img: &RgbImage, out: &mut [f32]) {
    to_chw(img, out, Conv::Clip, "clip_normalize");
}

/// torchvision `Normalize(0.5, 0.5)(ToTensor()(img))`: CHW in `[-1, 1]`, `(x/255 − 0.5)/0.5`
/// in float32 (≈ `x/127.5 − 1`), bit-exact with torch.
///
/// # Panics
/// If `out.len() != 3·w·h`.
pub fn to_signed_unit(img: &RgbImage, out: &mut [f32]) {
    to_chw(img, out, Conv::Signed, "to_signed_unit");
}

/// torchvision `ToTensor()(img)`: CHW in `[0, 1]`, `x / 255` in float32.
///
/// # Panics
/// If `out.len() != 3·w·h`.
pub fn to_unit(img: &RgbImage, out: &mut [f32]) {
    to_chw(img, out, Conv::Unit, "to_unit");
}

/// The 8-bit CHW image whose conversion by `conv` is `chw` (exact for values the conversion
/// produced: neighbouring levels are ≥ 1/255 apart after any of them, far above f32 rounding).
fn from_chw(chw: &[f32], width: u32, height: u32, conv: Conv) -> RgbImage {
    let n = width as usize * height as usize;
    assert_eq!(chw.len(), 3 * n, "from_chw: input must hold 3*w*h values");
    RgbImage::from_fn(width, height, |x, y| {
        let i = y as usize * width as usize + x as usize;
        image::Rgb(std::array::from_fn(|c| {
            let v = chw[c * n + i] as f64;
            let level = match conv {
                Conv::Clip => (v * CLIP_STD[c] + CLIP_MEAN[c]) * 255.0,
                Conv::Unit => v * 255.0,
                Conv::Signed => (v + 1.0) * 127.5,
            };
            level.round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// Inverse of [`clip_normalize`]: the 224² crop as the 8-bit image the CLIP encoder was given.
///
/// # Panics
/// If `chw.len() != 3·w·h`.
pub fn clip_denormalize(chw: &[f32], width: u32, height: u32) -> RgbImage {
    from_chw(chw, width, height, Conv::Clip)
}

/// Inverse of [`to_signed_unit`].
///
/// # Panics
/// If `chw.len() != 3·w·h`.
pub fn from_signed_unit(chw: &[f32], width: u32, height: u32) -> RgbImage {
    from_chw(chw, width, height, Conv::Signed)
}

/// Inverse of [`to_unit`].
///
/// # Panics
/// If `chw.len() != 3·w·h`.
pub fn from_unit(chw: &[f32], width: u32, height: u32) -> RgbImage {
    from_chw(chw, width, height, Conv::Unit)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// Image whose pixel i holds (i, 255 - i, (7 i) mod 256): all 256 values in every channel.
    fn ramp() -> RgbImage {
        RgbImage::from_fn(16, 16, |x, y| {
            let i = (y * 16 + x) as u8;
            image::Rgb([i, 255 - i, i.wrapping_mul(7)])
        })
    }

    #[test]
    fn layout_and_hand_values() {
        let img = RgbImage::from_raw(2, 1, vec![0, 255, 51, 255, 0, 102]).unwrap();
        let mut out = [0f32; 6];
        to_unit(&img, &mut out);
        assert_eq!(out, [0.0, 1.0, 1.0, 0.0, 0.2, 0.4]);
        to_signed_unit(&img, &mut out);
        assert_eq!(&out[..4], &[-1.0, 1.0, 1.0, -1.0]);
        assert!((out[4] + 0.6).abs() < 1e-6 && (out[5] + 0.2).abs() < 1e-6);
        clip_normalize(&img, &mut out);
        let want = [
            (0.0 - 0.48145466) / 0.26862954,
            (1.0 - 0.48145466) / 0.26862954,
            (1.0 - 0.4578275) / 0.26130258,
            (0.0 - 0.4578275) / 0.26130258,
            (0.2 - 0.40821073) / 0.27577711,
            (0.4 - 0.40821073) / 0.27577711,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn fast_and_generic_paths_agree() {
        // The tables themselves are checked against numpy in `luts_match_numpy_bit_exactly`.
        let img = ramp();
        let n = 256;
        let (mut a, mut b) = (vec![0f32; 3 * n], vec![0f32; 3 * n]);
        for conv in [Conv::Clip, Conv::Unit, Conv::Signed] {
            to_chw(&img, &mut a, conv, "test");
            to_chw_body(img.as_raw(), n, &mut b, conv);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn inverses_recover_every_level() {
        let img = ramp();
        let mut v = vec![0f32; 3 * 256];
        clip_normalize(&img, &mut v);
        assert_eq!(clip_denormalize(&v, 16, 16), img);
        to_unit(&img, &mut v);
        assert_eq!(from_unit(&v, 16, 16), img);
        to_signed_unit(&img, &mut v);
        assert_eq!(from_signed_unit(&v, 16, 16), img);
    }

    #[test]
    fn luts_match_numpy_bit_exactly() {
        // Fixture: for each of CLIP (3 channels), ToTensor, ToTensor+Normalize(0.5,0.5): the 256
        // float32 values numpy produces with the reference operation order.
        let v = load_f32("color_luts.f32");
        assert_eq!(v.len(), 256 * 5);
        let img = ramp();
        let n = 256;
        let mut out = vec![0f32; 3 * n];
        let idx = |c: usize, p: usize| -> usize {
            // position in the ramp image of value p in channel c
            (0..n)
                .find(|&i| img.as_raw()[3 * i + c] as usize == p)
                .unwrap()
        };
        clip_normalize(&img, &mut out);
        for c in 0..3 {
            for p in 0..256 {
                let got = out[c * n + idx(c, p)];
                assert_eq!(got.to_bits(), v[c * 256 + p].to_bits(), "clip c={c} p={p}");
            }
        }
        to_unit(&img, &mut out);
        for p in 0..256 {
            assert_eq!(
                out[idx(0, p)].to_bits(),
                v[3 * 256 + p].to_bits(),
                "unit p={p}"
            );
        }
        to_signed_unit(&img, &mut out);
        for p in 0..256 {
            assert_eq!(
                out[n + idx(1, p)].to_bits(),
                v[4 * 256 + p].to_bits(),
                "signed p={p}"
            );
        }
    }
}
