//! Geometric transforms: Pillow's nearest-neighbour `Image.rotate`, the skimage/insightface
//! similarity alignment (`estimate_norm`, `norm_crop`) and OpenCV's bilinear `warpAffine`.

use image::RgbImage;

/// A 2×3 affine matrix `[[a, b, c], [d, e, f]]` mapping `(x, y)` to `(a x + b y + c, d x + e y + f)`
/// (the layout of OpenCV's `M` and of skimage's `params[0:2]`).
pub type Affine = [[f64; 3]; 2];

// ---------------------------------------------------------------------------------------------
// PIL rotate
// ---------------------------------------------------------------------------------------------

/// Python's `round(x, 15)` (correctly rounded decimal rounding, result parsed back to f64).
fn py_round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// Python's float `%` (result has the sign of the divisor).
fn py_mod(a: f64, b: f64) -> f64 {
    let m = a % b;
    if m != 0.0 && ((m < 0.0) != (b < 0.0)) {
        m + b
    } else {
        m
    }
}

/// Pillow `FLOOR(v * 65536.0 + 0.5)` (16.16 fixed point).
fn pil_fix(v: f64) -> i32 {
    let t = v * 65536.0 + 0.5;
    if t < 0.0 { t.floor() as i32 } else { t as i32 }
}

/// Pillow `COORD(v)`: -1 for negative, else truncation.
fn pil_coord(v: f64) -> i64 {
    if v < 0.0 { -1 } else { v as i64 }
}

/// `PIL.Image.rotate(angle, resample=NEAREST, expand=False, center=None, translate=None,
/// fillcolor=fill)` on an RGB image: rotation by `degrees` counter-clockwise about the image
/// centre `(w/2, h/2)`, output the same size, uncovered pixels set to `fill`.
///
/// Reproduces Pillow exactly (checked against Pillow 13 on random images and angles): the angle
/// is reduced with Python's `% 360`; 0 returns a copy, 180 (and 90/270 on square images) use the
/// exact transposes; otherwise the inverse matrix is built with `round(cos/sin, 15)` as in
/// `Image.rotate`, and sampled like `ImagingTransformAffine` — 16.16 fixed-point stepping from
/// the pixel centre (`x + 0.5`, `y + 0.5`) with floor — or, if `sin` rounds to zero, the float
/// `ImagingScaleAffine` path. Takes `f64` degrees because Pillow computes in double precision.
pub fn rotate_nearest(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let angle = py_mod(degrees, 360.0);
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return image::imageops::rotate180(img);
    }
    if (angle == 90.0 || angle == 270.0) && w == h {
        // PIL ROTATE_90 is counter-clockwise, i.e. image's rotate270.
        return if angle == 90.0 {
            image::imageops::rotate270(img)
        } else {
            image::imageops::rotate90(img)
        };
    }
    let theta = -angle.to_radians();
    let (s, c) = theta.sin_cos();
    let (a, b, d, e) = (py_round15(c), py_round15(s), py_round15(-s), py_round15(c));
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let mut cc = a * -cx + b * -cy + 0.0;
    let mut ff = d * -cx + e * -cy + 0.0;
    cc += cx;
    ff += cy;
    let m = [a, b, cc, d, e, ff];
    let mut out = RgbImage::from_pixel(w, h, image::Rgb(fill));
    if w == 0 || h == 0 {
        return out;
    }
    if m[1] == 0.0 && m[3] == 0.0 {
        pil_scale_affine(img, &m, &mut out);
        return out;
    }
    let check = |x: f64, y: f64| {
        (x * m[0] + y * m[1] + m[2]).abs() < 32768.0 && (x * m[3] + y * m[4] + m[5]).abs() < 32768.0
    };
    let (wf, hf) = (w as f64, h as f64);
    if check(0.0, 0.0) && check(wf, hf) && check(0.0, hf) && check(wf, 0.0) {
        pil_affine_fixed(img, &m, &mut out);
    } else {
        pil_affine_float(img, &m, &mut out);
    }
    out
}

/// Pillow `affine_fixed` (nearest, 16.16 fixed point), only touching covered pixels.
fn pil_affine_fixed(img: &RgbImage, m: &[f64; 6], out: &mut RgbImage) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let ow = out.width() as usize;
    let (a0, a1, a3, a4) = (pil_fix(m[0]), pil_fix(m[1]), pil_fix(m[3]), pil_fix(m[4]));
    let mut a2 = pil_fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = pil_fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    let (xlim, ylim) = (w << 16, h << 16);
    let (spx, _) = img.as_raw().as_chunks::<3>();
    let wu = w as usize;
    let dst: &mut [u8] = out;
    for drow in dst.chunks_exact_mut(ow * 3) {
        // xx(x) = a2 + x*a0 and yy(x) = a5 + x*a3 are linear, so the covered x form an interval.
        let inside = |x: i64| {
            let xx = a2 as i64 + x * a0 as i64;
            let yy = a5 as i64 + x * a3 as i64;
            xx >= 0 && xx < xlim && yy >= 0 && yy < ylim
        };
        let (mut lo, mut hi) = (0i64, ow as i64);
        // Clip [lo, hi) by each half-line constraint using exact integer arithmetic.
        let mut clip = |base: i64, step: i64, lim: i64| {
            // want 0 <= base + x*step < lim
            if step == 0 {
                if base < 0 || base >= lim {
                    hi = lo;
                }
            } else if step > 0 {
                lo = lo.max(div_ceil(-base, step));
                hi = hi.min(div_ceil(lim - base, step));
            } else {
                let (s, b) = (-step, base);
                // base - x*s >= 0  <=> x <= base/s ; base - x*s < lim <=> x > (base-lim)/s
                hi = hi.min(b.div_euclid(s) + 1);
                lo = lo.max((b - lim).div_euclid(s) + 1);
            }
        };
        clip(a2 as i64, a0 as i64, xlim);
        clip(a5 as i64, a3 as i64, ylim);
        if lo < hi {
            debug_assert!(inside(lo) && inside(hi - 1));
            debug_assert!(lo == 0 || !inside(lo - 1));
            debug_assert!(hi == ow as i64 || !inside(hi));
            let mut xx = a2.wrapping_add((lo as i32).wrapping_mul(a0));
            let mut yy = a5.wrapping_add((lo as i32).wrapping_mul(a3));
            let (dpx, _) = drow[lo as usize * 3..hi as usize * 3].as_chunks_mut::<3>();
            for d in dpx {
                // In range by construction of [lo, hi): 0 <= xx >> 16 < w, 0 <= yy >> 16 < h.
                let (xin, yin) = ((xx >> 16) as usize, (yy >> 16) as usize);
                *d = spx[yin * wu + xin];
                xx = xx.wrapping_add(a0);
                yy = yy.wrapping_add(a3);
            }
        }
        a2 = a2.wrapping_add(a1);
        a5 = a5.wrapping_add(a4);
    }
}

fn div_ceil(a: i64, b: i64) -> i64 {
    // b > 0
    -((-a).div_euclid(b))
}

/// Pillow's float fallback of `ImagingTransformAffine` (only for coordinates beyond ±32768).
fn pil_affine_float(img: &RgbImage, m: &[f64; 6], out: &mut RgbImage) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ow, oh) = out.dimensions();
    let mut xo = m[2] + m[1] * 0.5 + m[0] * 0.5;
    let mut yo = m[5] + m[4] * 0.5 + m[3] * 0.5;
    for y in 0..oh {
        let (mut xx, mut yy) = (xo, yo);
        for x in 0..ow {
            let xin = pil_coord(xx);
            if xin >= 0 && xin < w {
                let yin = pil_coord(yy);
                if yin >= 0 && yin < h {
                    out.put_pixel(x, y, *img.get_pixel(xin as u32, yin as u32));
                }
            }
            xx += m[0];
            yy += m[3];
        }
        xo += m[1];
        yo += m[4];
    }
}

/// Pillow `ImagingScaleAffine` (used when the matrix has no shear terms).
fn pil_scale_affine(img: &RgbImage, m: &[f64; 6], out: &mut RgbImage) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ow, oh) = out.dimensions();
    let mut xo = m[2] + m[0] * 0.5;
    let mut yo = m[5] + m[4] * 0.5;
    let mut xin_tab = vec![-1i64; ow as usize];
    for t in xin_tab.iter_mut() {
        let xin = pil_coord(xo);
        if xin >= 0 && xin < w {
            *t = xin;
        }
        xo += m[0];
    }
    for y in 0..oh {
        let yi = pil_coord(yo);
        if yi >= 0 && yi < h {
            for (x, &xin) in xin_tab.iter().enumerate() {
                if xin >= 0 {
                    out.put_pixel(x as u32, y, *img.get_pixel(xin as u32, yi as u32));
                }
            }
        }
        yo += m[4];
    }
}

// ---------------------------------------------------------------------------------------------
// Similarity alignment
// ---------------------------------------------------------------------------------------------

/// insightface's 112×112 ArcFace landmark template (`arcface_dst`, float32): left eye, right
/// eye, nose tip, left and right mouth corner.
pub const ARCFACE_TEMPLATE_112: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// insightface ≥ 0.7 `estimate_norm` destination points for `image_size`, in float32 like numpy:
/// if `image_size % 112 == 0`: `ratio = size/112`, `diff_x = 0`; else `ratio = size/128`,
/// `diff_x = 8·ratio`; `dst = arcface_dst * ratio; dst[:, 0] += diff_x`.
/// (insightface asserts `size % 112 == 0 || size % 128 == 0`; other sizes take the /128 branch.)
pub fn arcface_template(image_size: u32) -> [[f32; 2]; 5] {
    let (ratio, diff_x) = if image_size.is_multiple_of(112) {
        (image_size as f64 / 112.0, 0.0f64)
    } else {
        let r = image_size as f64 / 128.0;
        (r, 8.0 * r)
    };
    let (ratio, diff_x) = (ratio as f32, diff_x as f32);
    ARCFACE_TEMPLATE_112.map(|[x, y]| [(x as f32) * ratio + diff_x, (y as f32) * ratio])
}

/// skimage `SimilarityTransform().estimate(src, dst)` (Umeyama 1991 with scaling, no
/// reflection): the least-squares `dst ≈ s·R·src + t`; returns `params[0:2]`.
///
/// Uses the closed form of the 2-D case (`R` from `atan2(Σ x∧x', Σ x·x')` of the centred
/// points, `s = |·| / Σ|x|²`), which equals skimage's SVD solution for every rank case; computed
/// in f64 (matches skimage on f64 inputs to ~1e-12; skimage on float32 inputs computes in
/// float32, ~1e-7 relative). `None` when skimage would return NaN (fewer than one point, all
/// `src` points equal, or zero cross-covariance) or the inputs are not finite.
///
/// # Panics
/// If `src` and `dst` have different lengths.
pub fn similarity_transform(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Option<Affine> {
    assert_eq!(
        src.len(),
        dst.len(),
        "similarity_transform: point counts differ"
    );
    let n = src.len();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let mean = |p: &[[f32; 2]]| {
        let (mut sx, mut sy) = (0.0f64, 0.0f64);
        for q in p {
            sx += q[0] as f64;
            sy += q[1] as f64;
        }
        (sx / nf, sy / nf)
    };
    let (smx, smy) = mean(src);
    let (dmx, dmy) = mean(dst);
    let (mut p, mut q, mut var) = (0.0f64, 0.0f64, 0.0f64);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy) = (s[0] as f64 - smx, s[1] as f64 - smy);
        let (dx, dy) = (d[0] as f64 - dmx, d[1] as f64 - dmy);
        p += sx * dx + sy * dy;
        q += sx * dy - sy * dx;
        var += sx * sx + sy * sy;
    }
    let r = p.hypot(q);
    let positive_finite = |v: f64| v.is_finite() && v > 0.0;
    if !positive_finite(var) || !positive_finite(r) {
        return None;
    }
    let scale = r / var;
    let (c, s) = (p / r * scale, q / r * scale);
    let tx = dmx - (c * smx - s * smy);
    let ty = dmy - (s * smx + c * smy);
    Some([[c, -s, tx], [s, c, ty]])
}

/// insightface `face_align.estimate_norm(lmk, image_size)` (≥ 0.7, `mode='arcface'`):
/// [`similarity_transform`] from the 5 landmarks to [`arcface_template`]`(image_size)`.
pub fn estimate_norm(kps: &[[f32; 2]; 5], image_size: u32) -> Option<Affine> {
    similarity_transform(kps, &arcface_template(image_size))
}

/// insightface `face_align.norm_crop(img, landmark=kps, image_size)`:
/// `cv2.warpAffine(img, estimate_norm(kps, size), (size, size), borderValue=0.0)` with the
/// OpenCV 4.x warp ([`WarpImpl::OpenCv4`], StoryMaker's era). Degenerate landmarks (no
/// transform) give an all-black image.
pub fn norm_crop(img: &RgbImage, kps: &[[f32; 2]; 5], image_size: u32) -> RgbImage {
    norm_crop_with(img, kps, image_size, WarpImpl::OpenCv4)
}

/// [`norm_crop`] with a chosen `cv2.warpAffine` implementation.
pub fn norm_crop_with(
    img: &RgbImage,
    kps: &[[f32; 2]; 5],
    image_size: u32,
    imp: WarpImpl,
) -> RgbImage {
    match estimate_norm(kps, image_size) {
        Some(m) => warp_affine(img, &m, image_size, image_size, [0, 0, 0], imp),
        None => RgbImage::new(image_size, image_size),
    }
}

/// Which OpenCV version's bilinear `warpAffine` to reproduce (they differ by up to ~4 levels).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum WarpImpl {
    /// OpenCV 4.x (verified 4.10, 4.11): fixed point, 1/32-pixel grid ([`warp_affine_bilinear`]).
    #[default]
    OpenCv4,
    /// OpenCV 5.x (verified 5.0): float32 kernels ([`warp_affine_bilinear_f32`]).
    OpenCv5,
}

/// `cv2.warpAffine(img, m, (out_w, out_h), flags=INTER_LINEAR, borderValue=border)` with the
/// chosen implementation.
pub fn warp_affine(
    img: &RgbImage,
    m: &Affine,
    out_w: u32,
    out_h: u32,
    border: [u8; 3],
    imp: WarpImpl,
) -> RgbImage {
    match imp {
        WarpImpl::OpenCv4 => warp_affine_bilinear(img, m, out_w, out_h, border),
        WarpImpl::OpenCv5 => warp_affine_bilinear_f32(img, m, out_w, out_h, border),
    }
}

// ---------------------------------------------------------------------------------------------
// OpenCV warpAffine
// ---------------------------------------------------------------------------------------------

/// `cv2.invertAffineTransform` as done inside `cv2.warpAffine` (f64, same operation order).
/// A singular matrix gives the zero matrix (OpenCV's `D = 0` convention).
pub fn invert_affine(m: &Affine) -> Affine {
    let [[m0, m1, m2], [m3, m4, m5]] = *m;
    let mut d = m0 * m4 - m1 * m3;
    d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a22) = (m4 * d, m0 * d);
    let (n0, n1, n3, n4) = (a11, m1 * -d, m3 * -d, a22);
    let b1 = -n0 * m2 - n1 * m5;
    let b2 = -n3 * m2 - n4 * m5;
    [[n0, n1, b1], [n3, n4, b2]]
}

/// OpenCV `cvRound` of a double (round half to even), saturating.
#[inline]
fn cv_round(v: f64) -> i32 {
    v.round_ties_even() as i32
}

#[inline]
fn fetch_px(src: &[u8], stride: usize, w: i32, h: i32, x: i32, y: i32, bv: [u8; 3]) -> [u8; 3] {
    if x >= 0 && y >= 0 && x < w && y < h {
        let o = y as usize * stride + x as usize * 3;
        [src[o], src[o + 1], src[o + 2]]
    } else {
        bv
    }
}

/// `cv2.warpAffine(img, m, (out_w, out_h), flags=INTER_LINEAR, borderMode=BORDER_CONSTANT,
/// borderValue=border)` as implemented by OpenCV 4.x — bit-exact (verified against
/// opencv-python 4.10.0.84 and 4.11.0.86 on random images and `norm_crop`-like matrices).
///
/// That implementation inverts `m`, steps the source coordinates in 1/1024 px
/// (`cvRound(M·x·1024)`, `+16` rounding), keeps 1/32 px (INTER_BITS = 5), and interpolates with
/// integer weights `(32−ty)(32−tx)…` summing to 1024, `(Σ + 512) >> 10`; source pixels outside
/// the image read as `border`, and pixels whose 2×2 neighbourhood lies fully outside get
/// `border`. OpenCV 5.0 computes in float32 instead: see
/// [`warp_affine_bilinear_f32`]; the two differ by up to ~4–6 levels on a few percent of the
/// samples. StoryMaker (2024) ran on the 4.x implementation, so this is the default
/// used by [`norm_crop`]. Non-finite matrices give an image filled with `border`.
pub fn warp_affine_bilinear(
    img: &RgbImage,
    m: &Affine,
    out_w: u32,
    out_h: u32,
    border: [u8; 3],
) -> RgbImage {
    let mut out = RgbImage::from_pixel(out_w, out_h, image::Rgb(border));
    let mi = invert_affine(m);
    if mi.iter().flatten().any(|v| !v.is_finite()) || out_w == 0 || out_h == 0 {
        return out;
    }
    let (w, h) = (img.width() as i32, img.height() as i32);
    let src = img.as_raw();
    let stride = w as usize * 3;
    let adelta: Vec<i32> = (0..out_w)
        .map(|x| cv_round(mi[0][0] * x as f64 * 1024.0))
        .collect();
    let bdelta: Vec<i32> = (0..out_w)
        .map(|x| cv_round(mi[1][0] * x as f64 * 1024.0))
        .collect();
    let dst: &mut [u8] = &mut out;
    for (y, drow) in dst.chunks_exact_mut(out_w as usize * 3).enumerate() {
        let yf = y as f64;
        let x0 = cv_round((mi[0][1] * yf + mi[0][2]) * 1024.0).wrapping_add(16);
        let y0 = cv_round((mi[1][1] * yf + mi[1][2]) * 1024.0).wrapping_add(16);
        for ((d, &ad), &bd) in drow.chunks_exact_mut(3).zip(&adelta).zip(&bdelta) {
            let xx = x0.wrapping_add(ad) >> 5;
            let yy = y0.wrapping_add(bd) >> 5;
            // OpenCV saturates these to i16; that only matters for coordinates beyond ±32767,
            // which are outside any image OpenCV accepts (< SHRT_MAX), i.e. border either way.
            let (sx, sy) = (xx >> 5, yy >> 5);
            let (tx, ty) = (xx & 31, yy & 31);
            let w00 = (32 - ty) * (32 - tx);
            let w01 = (32 - ty) * tx;
            let w10 = ty * (32 - tx);
            let w11 = ty * tx;
            if sx >= 0 && sy >= 0 && sx < w - 1 && sy < h - 1 {
                let o = sy as usize * stride + sx as usize * 3;
                let r0: &[u8; 6] = src[o..o + 6].try_into().unwrap();
                let r1: &[u8; 6] = src[o + stride..o + stride + 6].try_into().unwrap();
                for c in 0..3 {
                    let v = r0[c] as i32 * w00
                        + r0[c + 3] as i32 * w01
                        + r1[c] as i32 * w10
                        + r1[c + 3] as i32 * w11;
                    // Weights sum to 1024, so the result is within 0..=255.
                    d[c] = ((v + 512) >> 10) as u8;
                }
            } else if sx >= w || sx + 1 < 0 || sy >= h || sy + 1 < 0 {
                // fully outside: keep the border value
            } else {
                let p00 = fetch_px(src, stride, w, h, sx, sy, border);
                let p01 = fetch_px(src, stride, w, h, sx + 1, sy, border);
                let p10 = fetch_px(src, stride, w, h, sx, sy + 1, border);
                let p11 = fetch_px(src, stride, w, h, sx + 1, sy + 1, border);
                for c in 0..3 {
                    let v = p00[c] as i32 * w00
                        + p01[c] as i32 * w01
                        + p10[c] as i32 * w10
                        + p11[c] as i32 * w11;
                    d[c] = ((v + 512) >> 10).clamp(0, 255) as u8;
                }
            }
        }
    }
    out
}

/// float32 fused multiply-add `a*b + c` with a single rounding (exact product in f64; the f64
/// sum is rounded once more to f32, which differs from a true FMA only on exact f32 ties).
#[inline]
fn fma32(a: f32, b: f32, c: f32) -> f32 {
    (a as f64 * b as f64 + c as f64) as f32
}

/// `saturate_cast<uchar>(float)`: round half to even, clamp to 0..=255 (adding 2^23 rounds
/// to an integer under the default rounding mode without a libm call).
#[inline]
fn round_u8(v: f32) -> u8 {
    const MAGIC: f32 = 8_388_608.0; // 2^23
    let c = v.clamp(0.0, 255.0);
    ((c + MAGIC) - MAGIC) as u8
}

#[inline]
fn floor_i32(v: f32) -> i32 {
    let i = v as i32;
    if (i as f32) > v { i - 1 } else { i }
}

/// `cv2.warpAffine(..., INTER_LINEAR, BORDER_CONSTANT)` as implemented by OpenCV 5.0
/// (`warpAffineLinearInvoker_8UC3`, float32 kernels, default `ALGO_HINT_ACCURATE`):
/// inverse matrix cast to float32, per row `M1·y + M2` in float32, per pixel
/// `sx = fma(M0, x, ·)`, floor, and `v = fma(α, p01 − p00, p00)` … rounded half-to-even.
/// Bit-exact against opencv-python 5.0.0 (AVX2+FMA dispatch) on random images and `norm_crop`
/// matrices. OpenCV's scalar tail (last < 16 pixels of a row) and its non-FMA builds round
/// slightly differently in theory; no difference was observed.
pub fn warp_affine_bilinear_f32(
    img: &RgbImage,
    m: &Affine,
    out_w: u32,
    out_h: u32,
    border: [u8; 3],
) -> RgbImage {
    let mut out = RgbImage::from_pixel(out_w, out_h, image::Rgb(border));
    let mi = invert_affine(m);
    if mi.iter().flatten().any(|v| !v.is_finite()) || out_w == 0 || out_h == 0 {
        return out;
    }
    let mf = [
        mi[0][0] as f32,
        mi[0][1] as f32,
        mi[0][2] as f32,
        mi[1][0] as f32,
        mi[1][1] as f32,
        mi[1][2] as f32,
    ];
    let (w, h) = (img.width() as i32, img.height() as i32);
    let src = img.as_raw();
    let stride = w as usize * 3;
    let dst: &mut [u8] = &mut out;
    for (y, drow) in dst.chunks_exact_mut(out_w as usize * 3).enumerate() {
        let yf = y as f32;
        let mx = yf * mf[1] + mf[2];
        let my = yf * mf[4] + mf[5];
        for (x, d) in drow.chunks_exact_mut(3).enumerate() {
            let xf = x as f32;
            let sx = fma32(mf[0], xf, mx);
            let sy = fma32(mf[3], xf, my);
            if !(sx.abs() < 1e9 && sy.abs() < 1e9) {
                continue;
            }
            let (ix, iy) = (floor_i32(sx), floor_i32(sy));
            let (ax, ay) = (sx - ix as f32, sy - iy as f32);
            if (ix as u32).wrapping_add(1) >= (w + 1) as u32
                || (iy as u32).wrapping_add(1) >= (h + 1) as u32
            {
                continue; // fully outside: border value
            }
            let (p00, p01, p10, p11);
            if ix >= 0 && iy >= 0 && ix < w - 1 && iy < h - 1 {
                let o = iy as usize * stride + ix as usize * 3;
                let s = &src[o..o + 6];
                let t = &src[o + stride..o + stride + 6];
                p00 = [s[0] as f32, s[1] as f32, s[2] as f32];
                p01 = [s[3] as f32, s[4] as f32, s[5] as f32];
                p10 = [t[0] as f32, t[1] as f32, t[2] as f32];
                p11 = [t[3] as f32, t[4] as f32, t[5] as f32];
            } else {
                let f = |x, y| fetch_px(src, stride, w, h, x, y, border).map(|v| v as f32);
                p00 = f(ix, iy);
                p01 = f(ix + 1, iy);
                p10 = f(ix, iy + 1);
                p11 = f(ix + 1, iy + 1);
            }
            for c in 0..3 {
                let v0 = fma32(ax, p01[c] - p00[c], p00[c]);
                let v1 = fma32(ax, p11[c] - p10[c], p10[c]);
                let v = fma32(ay, v1 - v0, v0);
                d[c] = round_u8(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn f(s: &str) -> f64 {
        s.parse().unwrap()
    }

    #[test]
    fn py_helpers() {
        assert_eq!(py_mod(-5.5, 360.0), 354.5);
        assert_eq!(py_mod(725.0, 360.0), 5.0);
        assert_eq!(py_mod(-360.0, 360.0), 0.0);
        assert_eq!(py_round15(0.123_456_789_012_345_68), 0.123456789012346);
        assert_eq!(py_round15(1e-17), 0.0);
        assert_eq!(pil_fix(-0.25), -16384);
        assert_eq!(pil_fix(1.0), 65536);
    }

    #[test]
    fn rotate_special_angles() {
        let img = RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8, y as u8, 9]));
        assert_eq!(rotate_nearest(&img, 0.0, [1, 2, 3]), img);
        assert_eq!(rotate_nearest(&img, 360.0, [1, 2, 3]), img);
        let r = rotate_nearest(&img, 180.0, [1, 2, 3]);
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(3, 2));
        assert_eq!(r.get_pixel(3, 0), img.get_pixel(0, 2));
        // 90° CCW on a square image: the top-right corner moves to the top-left.
        let sq = RgbImage::from_fn(3, 3, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let r = rotate_nearest(&sq, 90.0, [0, 0, 0]);
        assert_eq!(r.get_pixel(0, 0), sq.get_pixel(2, 0));
        let r = rotate_nearest(&sq, -90.0, [0, 0, 0]);
        assert_eq!(r.get_pixel(2, 0), sq.get_pixel(0, 0));
    }

    #[test]
    fn rotate_matches_pil_fixtures() {
        let t = load_table("rotate_cases.txt");
        assert!(t.len() >= 8);
        for row in &t {
            let (input, angle, fill, output) = (&row[0], f(&row[1]), &row[2], &row[3]);
            let fill: Vec<u8> = fill.split(',').map(|v| v.parse().unwrap()).collect();
            let img = load_rgb(input);
            let got = rotate_nearest(&img, angle, [fill[0], fill[1], fill[2]]);
            assert_same_rgb(&got, &load_rgb(output), &format!("rotate {input} {angle}"));
        }
    }

    /// Applies an affine matrix to a point.
    fn apply(m: &Affine, p: [f64; 2]) -> [f64; 2] {
        [
            m[0][0] * p[0] + m[0][1] * p[1] + m[0][2],
            m[1][0] * p[0] + m[1][1] * p[1] + m[1][2],
        ]
    }

    #[test]
    fn similarity_recovers_known_transform() {
        // dst = s R src + t exactly (points exactly representable in f32): the estimate must
        // return (s, θ, t).
        let src: Vec<[f32; 2]> = vec![[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [3.0, 5.0], [-2.0, 1.0]];
        for &(s, theta, tx, ty) in &[
            (2.0f64, 0.0f64, 10.0f64, -4.0f64),
            (0.5, std::f64::consts::FRAC_PI_2, 3.0, 7.0),
            (1.0, std::f64::consts::PI, 0.0, 0.0),
            (1.25, -0.3, 100.5, 20.25),
        ] {
            let m0 = [
                [s * theta.cos(), -s * theta.sin(), tx],
                [s * theta.sin(), s * theta.cos(), ty],
            ];
            let dst: Vec<[f32; 2]> = src
                .iter()
                .map(|p| {
                    let q = apply(&m0, [p[0] as f64, p[1] as f64]);
                    [q[0] as f32, q[1] as f32]
                })
                .collect();
            let m = similarity_transform(&src, &dst).unwrap();
            for i in 0..2 {
                for j in 0..3 {
                    // dst was rounded to f32, so allow f32-level error.
                    assert!(
                        (m[i][j] - m0[i][j]).abs() < 2e-5 * (1.0 + m0[i][j].abs()),
                        "{m:?} vs {m0:?}"
                    );
                }
            }
        }
        // Template -> template is the identity; template -> 2*template is scale 2.
        let t = arcface_template(112);
        let m = similarity_transform(&t, &t).unwrap();
        assert!((m[0][0] - 1.0).abs() < 1e-12 && m[0][1].abs() < 1e-12 && m[0][2].abs() < 1e-9);
        let t2 = arcface_template(224);
        let m = similarity_transform(&t, &t2).unwrap();
        assert!((m[0][0] - 2.0).abs() < 1e-12 && m[1][0].abs() < 1e-12 && m[1][2].abs() < 1e-9);
        // A reflected point set still gives a proper rotation (det > 0).
        let refl: Vec<[f32; 2]> = src.iter().map(|p| [-p[0], p[1]]).collect();
        let m = similarity_transform(&src, &refl).unwrap();
        assert!(m[0][0] * m[1][1] - m[0][1] * m[1][0] > 0.0);
        // Degenerate inputs.
        assert!(similarity_transform(&[[1.0, 1.0]; 5], &t).is_none());
        assert!(similarity_transform(&[], &[]).is_none());
    }

    #[test]
    fn arcface_template_sizes() {
        let t = arcface_template(112);
        assert_eq!(t[0], [38.2946f64 as f32, 51.6963f64 as f32]);
        let t = arcface_template(224);
        assert_eq!(t[4], [(70.7299f64 as f32) * 2.0, (92.2041f64 as f32) * 2.0]);
        // 128: ratio 1, diff_x 8.
        let t = arcface_template(128);
        assert_eq!(t[2], [(56.0252f64 as f32) + 8.0, 71.7366f64 as f32]);
    }

    #[test]
    fn similarity_matches_numpy_umeyama() {
        // Rows: 10 kps values, size, then 6 matrix values from the float64 numpy Umeyama
        // (SVD form, as in skimage) applied to the float32 kps and insightface template.
        let t = load_table("similarity_cases.txt");
        assert!(t.len() >= 5);
        for row in &t {
            let v: Vec<f64> = row.iter().map(|s| f(s)).collect();
            let kps: [[f32; 2]; 5] =
                std::array::from_fn(|i| [v[2 * i] as f32, v[2 * i + 1] as f32]);
            let size = v[10] as u32;
            let m = estimate_norm(&kps, size).unwrap();
            for i in 0..2 {
                for j in 0..3 {
                    let want = v[11 + 3 * i + j];
                    assert!(
                        (m[i][j] - want).abs() <= 1e-9 * (1.0 + want.abs()),
                        "{m:?} vs {v:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn invert_affine_roundtrip() {
        let m = [[1.5, -0.25, 10.0], [0.3, 0.9, -7.0]];
        let mi = invert_affine(&m);
        for p in [[0.0, 0.0], [3.0, -2.0], [100.0, 50.0]] {
            let q = apply(&mi, apply(&m, p));
            assert!((q[0] - p[0]).abs() < 1e-12 && (q[1] - p[1]).abs() < 1e-12);
        }
        assert_eq!(invert_affine(&[[0.0; 3]; 2]), [[0.0; 3]; 2]);
    }

    #[test]
    fn warp_identity_and_translation() {
        let img = RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 5]));
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        for warp in [warp_affine_bilinear, warp_affine_bilinear_f32] {
            assert_eq!(warp(&img, &id, 9, 7, [0, 0, 0]), img);
            // Shift by +2 px in x: dst(x) = src(x - 2); the two first columns are border.
            let sh = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]];
            let out = warp(&img, &sh, 9, 7, [1, 2, 3]);
            assert_eq!(out.get_pixel(0, 3), &image::Rgb([1, 2, 3]));
            assert_eq!(out.get_pixel(5, 3), img.get_pixel(3, 3));
            // Half-pixel shift in y: average of two rows (30*y and 30*(y+1) -> 30*y + 15).
            let hy = [[1.0, 0.0, 0.0], [0.0, 1.0, -0.5]];
            let out = warp(&img, &hy, 9, 7, [0, 0, 0]);
            assert_eq!(out.get_pixel(4, 2)[1], 75);
        }
    }

    #[test]
    fn warp_matches_cv2_fixtures() {
        let t = load_table("warp_cases.txt");
        assert!(t.len() >= 3);
        for row in &t {
            // input, 6 matrix values, out_w, out_h, border, legacy output, cv5 output
            let img = load_rgb(&row[0]);
            let v: Vec<f64> = row[1..7].iter().map(|s| f(s)).collect();
            let m = [[v[0], v[1], v[2]], [v[3], v[4], v[5]]];
            let (ow, oh): (u32, u32) = (row[7].parse().unwrap(), row[8].parse().unwrap());
            let b: Vec<u8> = row[9].split(',').map(|s| s.parse().unwrap()).collect();
            let b = [b[0], b[1], b[2]];
            let got = warp_affine_bilinear(&img, &m, ow, oh, b);
            assert_same_rgb(
                &got,
                &load_rgb(&row[10]),
                &format!("warp legacy {}", row[10]),
            );
            let got = warp_affine_bilinear_f32(&img, &m, ow, oh, b);
            assert_same_rgb(&got, &load_rgb(&row[11]), &format!("warp f32 {}", row[11]));
        }
    }

    #[test]
    fn norm_crop_matches_cv2_fixture() {
        let t = load_table("norm_crop_cases.txt");
        assert!(!t.is_empty());
        for row in &t {
            // input, 10 kps, size, legacy output
            let img = load_rgb(&row[0]);
            let v: Vec<f32> = row[1..11].iter().map(|s| s.parse().unwrap()).collect();
            let kps: [[f32; 2]; 5] = std::array::from_fn(|i| [v[2 * i], v[2 * i + 1]]);
            let size: u32 = row[11].parse().unwrap();
            let got = norm_crop(&img, &kps, size);
            let want = load_rgb(&row[12]);
            assert_eq!(got.dimensions(), want.dimensions());
            let (max, n) = diff_u8(got.as_raw(), want.as_raw());
            // Expected output computed with the float64 Umeyama matrix: exact.
            assert_eq!((max, n), (0, 0), "norm_crop {}", row[12]);
            let m = estimate_norm(&kps, size).unwrap();
            assert_eq!(
                norm_crop_with(&img, &kps, size, WarpImpl::OpenCv5),
                warp_affine_bilinear_f32(&img, &m, size, size, [0, 0, 0])
            );
        }
    }
}
