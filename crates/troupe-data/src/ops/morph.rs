//! Character-mask operations: colour keying, dilation, 5×5 Gaussian blur, bounding box, cropping
//! and compositing on white (StoryMaker `mp_dataset.py`, reference §5.2; inference `crop_image`,
//! §4.3).
//!
//! Every mask operation has a region-of-interest variant whose cost is proportional to the
//! bounding box of the mask's nonzero pixels (plus the kernel radius); the full-image variants
//! find that box first (a fast scan) and then call the ROI variant, so they are cheap too.

use super::BBox;
use image::{GrayImage, RgbImage};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Scanning helpers
// ---------------------------------------------------------------------------------------------

const SCAN_CHUNK: usize = 64;

/// Index of the first nonzero byte (OR-reduction per chunk so the scan vectorises).
fn first_nonzero(s: &[u8]) -> Option<usize> {
    let mut base = 0;
    for chunk in s.chunks(SCAN_CHUNK) {
        if chunk.iter().fold(0u8, |a, &b| a | b) != 0 {
            return chunk.iter().position(|&v| v != 0).map(|p| base + p);
        }
        base += chunk.len();
    }
    None
}

/// Index of the last nonzero byte.
fn last_nonzero(s: &[u8]) -> Option<usize> {
    let mut end = s.len();
    while end > 0 {
        let start = end.saturating_sub(SCAN_CHUNK);
        let chunk = &s[start..end];
        if chunk.iter().fold(0u8, |a, &b| a | b) != 0 {
            return chunk.iter().rposition(|&v| v != 0).map(|p| start + p);
        }
        end = start;
    }
    None
}

/// Bounding box of the nonzero pixels of `mask` (exclusive upper bounds), `None` if all zero.
///
/// Reproduces the StoryMaker `bounding_rectangle` helper: the union of `cv2.boundingRect` over
/// the external contours of `cv2.findContours(mask, RETR_EXTERNAL, ...)`, which is exactly the
/// bounding box of all nonzero pixels (holes and nested blobs lie inside an external contour).
pub fn nonzero_bbox(mask: &GrayImage) -> Option<BBox> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if w == 0 || h == 0 {
        return None;
    }
    nonzero_bbox_in(mask.as_raw(), w, BBox::full(w as u32, h as u32))
}

/// Bounding box of the nonzero pixels of a row-major `stride`-wide buffer inside `region`.
fn nonzero_bbox_in(buf: &[u8], stride: usize, region: BBox) -> Option<BBox> {
    let (rx0, rx1) = (region.x0 as usize, region.x1 as usize);
    let row = |y: u32| &buf[y as usize * stride + rx0..y as usize * stride + rx1];
    let y0 = (region.y0..region.y1).find(|&y| first_nonzero(row(y)).is_some())?;
    let y1 = (y0..region.y1)
        .rev()
        .find(|&y| first_nonzero(row(y)).is_some())
        .map_or(y0 + 1, |y| y + 1);
    // Columns: each row only needs scanning up to the current left / from the current right.
    let mut x0 = rx1 - rx0;
    let mut x1 = 0usize;
    for y in y0..y1 {
        let r = row(y);
        if let Some(p) = first_nonzero(&r[..x0]) {
            x0 = p;
        }
        if x1 < r.len()
            && let Some(p) = last_nonzero(&r[x1..])
        {
            x1 += p + 1;
        }
    }
    debug_assert!(x0 < x1);
    Some(BBox::new((rx0 + x0) as u32, y0, (rx0 + x1) as u32, y1))
}

/// Writes 255/0 for pixels equal to `k`; returns the OR of the written bytes.
#[inline(always)]
fn eq_row_body(src: &[u8], k: [u8; 3], dst: &mut [u8]) -> u8 {
    let (px, _) = src.as_chunks::<3>();
    let mut any = 0u8;
    for (p, d) in px.iter().zip(dst.iter_mut()) {
        let o = 0u8.wrapping_sub(((p[0] == k[0]) & (p[1] == k[1]) & (p[2] == k[2])) as u8);
        *d = o;
        any |= o;
    }
    any
}

/// Writes 255/0 for pixels with `lo <= p <= hi` per channel; returns the OR of the bytes.
#[inline(always)]
fn range_row_body(src: &[u8], lo: [u8; 3], hi: [u8; 3], dst: &mut [u8]) -> u8 {
    let (px, _) = src.as_chunks::<3>();
    let mut any = 0u8;
    for (p, d) in px.iter().zip(dst.iter_mut()) {
        let ok = (p[0] >= lo[0])
            & (p[0] <= hi[0])
            & (p[1] >= lo[1])
            & (p[1] <= hi[1])
            & (p[2] >= lo[2])
            & (p[2] <= hi[2]);
        let o = 0u8.wrapping_sub(ok as u8);
        *d = o;
        any |= o;
    }
    any
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn key_row_avx2(src: &[u8], lo: [u8; 3], hi: [u8; 3], dst: &mut [u8]) -> u8 {
    if lo == hi {
        eq_row_body(src, lo, dst)
    } else {
        range_row_body(src, lo, hi, dst)
    }
}

/// One mask row of `cv2.inRange` (AVX2 byte shuffles make the 3-byte pixel loads cheap).
#[inline]
fn key_row(src: &[u8], lo: [u8; 3], hi: [u8; 3], dst: &mut [u8]) -> u8 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { key_row_avx2(src, lo, hi, dst) };
    }
    if lo == hi {
        eq_row_body(src, lo, dst)
    } else {
        range_row_body(src, lo, hi, dst)
    }
}

/// Grows `bbox` by the nonzero span of mask row `y` (if `any` says it has one).
#[inline]
fn add_row_span(bbox: &mut Option<BBox>, drow: &[u8], y: usize, any: u8) {
    if any != 0 {
        let a = first_nonzero(drow).unwrap_or(0) as u32;
        let b = last_nonzero(drow).map_or(0, |p| p + 1) as u32;
        let rb = BBox::new(a, y as u32, b, y as u32 + 1);
        *bbox = Some(bbox.map_or(rb, |bb| bb.union(&rb)));
    }
}

/// `cv2.inRange(img, lo, hi)` on a 3-channel image: 255 where `lo[c] <= px[c] <= hi[c]` for all
/// three channels, else 0. Also returns the bounding box of the 255 pixels (as
/// [`nonzero_bbox`] would), computed in the same pass.
///
/// StoryMaker keys character `i` of the colour mask with `cv2.inRange(BGR(mask), c_i, c_i)`;
/// pass the colour in the channel order of `img` (RGB here: char 0 = (0,0,255), char 1 =
/// (0,255,0), char 2 = (255,0,0)).
pub fn in_range_rgb(img: &RgbImage, lo: [u8; 3], hi: [u8; 3]) -> (GrayImage, Option<BBox>) {
    let (w, h) = img.dimensions();
    let mut out = GrayImage::new(w, h);
    if w == 0 || h == 0 {
        return (out, None);
    }
    let wu = w as usize;
    let dst: &mut [u8] = &mut out;
    let mut bbox: Option<BBox> = None;
    for (y, (srow, drow)) in img
        .as_raw()
        .chunks_exact(wu * 3)
        .zip(dst.chunks_exact_mut(wu))
        .enumerate()
    {
        let any = key_row(srow, lo, hi, drow);
        add_row_span(&mut bbox, drow, y, any);
    }
    (out, bbox)
}

/// One pass of exact-colour keying for several colours at once: for each `colors[i]`, the mask
/// `cv2.inRange(img, colors[i], colors[i])` (255 where the pixel equals the colour) and its
/// nonzero bounding box. Same results as calling [`in_range_rgb`] per colour, about
/// `colors.len()` times cheaper.
pub fn color_masks(img: &RgbImage, colors: &[[u8; 3]]) -> Vec<(GrayImage, Option<BBox>)> {
    let (w, h) = img.dimensions();
    let mut masks: Vec<GrayImage> = colors.iter().map(|_| GrayImage::new(w, h)).collect();
    let mut boxes: Vec<Option<BBox>> = vec![None; colors.len()];
    if w > 0 && h > 0 {
        let wu = w as usize;
        for (y, srow) in img.as_raw().chunks_exact(wu * 3).enumerate() {
            for ((m, c), bbox) in masks.iter_mut().zip(colors).zip(boxes.iter_mut()) {
                let drow = &mut m.as_mut()[y * wu..(y + 1) * wu];
                let any = key_row(srow, *c, *c, drow);
                add_row_span(bbox, drow, y, any);
            }
        }
    }
    masks.into_iter().zip(boxes).collect()
}

// ---------------------------------------------------------------------------------------------
// Dilation
// ---------------------------------------------------------------------------------------------

/// Sliding-window maximum of width `k` by doubling: on return `p[t] = max(orig[t .. t+k])` for
/// `t + k <= len` is available as `max(p[t], p[t + k - w])` with the returned `w`. `q` is scratch
/// of the same length. Works on whole rows of a 2-D buffer too (`unit` = row length).
fn window_max_doubling(p: &mut Vec<u8>, q: &mut Vec<u8>, k: usize, unit: usize) -> usize {
    let mut w = 1usize;
    while 2 * w <= k {
        let n = p.len() - w * unit;
        q.clear();
        q.extend(p[..n].iter().zip(&p[w * unit..]).map(|(&a, &b)| a.max(b)));
        // Keep the tail so indices stay aligned (it is never read for valid outputs).
        q.extend_from_slice(&p[n..]);
        std::mem::swap(p, q);
        w *= 2;
    }
    w
}

/// `cv2.dilate(mask, np.ones((ksize, ksize), np.uint8))` — one iteration, default anchor
/// (centre, `ksize/2`), default border (pixels outside the image are ignored).
///
/// Separable running max, computed only over the nonzero bounding box grown by the kernel;
/// the rest of the output is zero. `ksize == 0` is treated as 1 (identity).
pub fn dilate_rect(mask: &GrayImage, ksize: u32) -> GrayImage {
    match nonzero_bbox(mask) {
        None => GrayImage::new(mask.width(), mask.height()),
        Some(b) => dilate_rect_roi(mask, ksize, b).0,
    }
}

/// [`dilate_rect`] when a box containing every nonzero pixel of `mask` is already known
/// (e.g. from [`in_range_rgb`]). Cost is O(area of `nonzero` grown by `ksize`).
///
/// Returns the dilated mask and the box outside which it is zero: `nonzero` grown by
/// `ksize - 1 - ksize/2` on the left/top and `ksize/2` on the right/bottom, clipped. When
/// `nonzero` is the exact bounding box of the input, that box is the exact bounding box of the
/// output (= `cv2.boundingRect` of the dilated mask's contours).
pub fn dilate_rect_roi(mask: &GrayImage, ksize: u32, nonzero: BBox) -> (GrayImage, BBox) {
    let (w, h) = mask.dimensions();
    let mut out = GrayImage::new(w, h);
    let nz = nonzero.clip(w, h);
    if nz.is_empty() {
        return (out, BBox::new(nz.x0, nz.y0, nz.x0, nz.y0));
    }
    let k = ksize.max(1);
    let a = k / 2; // anchor
    let reach_lo = k - 1 - a; // output extends this far before the input box
    let reach_hi = a; // ... and this far after it
    let ob = nz.expand_clip(reach_lo, reach_lo, reach_hi, reach_hi, w, h);
    let (ow, oh) = (ob.width() as usize, ob.height() as usize);
    let (k, a) = (k as usize, a as i64);
    let (wu, src) = (w as usize, mask.as_raw());

    // Horizontal pass into a vertically padded buffer: row t <-> image row ob.y0 - a + t.
    let prow_len = ow + k - 1;
    let vrows = oh + k - 1;
    let mut hbuf = vec![0u8; vrows * ow];
    let mut p = Vec::with_capacity(prow_len);
    let mut q = Vec::with_capacity(prow_len);
    let col_base = ob.x0 as i64 - a; // image column of p[0]
    let lo = (nz.x0 as i64).max(col_base);
    let hi = (nz.x1 as i64).min(col_base + prow_len as i64);
    for t in 0..vrows {
        let y = ob.y0 as i64 - a + t as i64;
        if y < nz.y0 as i64 || y >= nz.y1 as i64 {
            continue; // zero row
        }
        p.clear();
        p.resize(prow_len, 0);
        if lo < hi {
            let s = &src[y as usize * wu..][lo as usize..hi as usize];
            p[(lo - col_base) as usize..(hi - col_base) as usize].copy_from_slice(s);
        }
        let ww = window_max_doubling(&mut p, &mut q, k, 1);
        let dst = &mut hbuf[t * ow..(t + 1) * ow];
        for (c, d) in dst.iter_mut().enumerate() {
            *d = p[c].max(p[c + k - ww]);
        }
    }
    // Vertical pass over whole rows.
    let mut q2 = Vec::with_capacity(hbuf.len());
    let ww = window_max_doubling(&mut hbuf, &mut q2, k, ow);
    let dst: &mut [u8] = &mut out;
    for i in 0..oh {
        let r0 = &hbuf[i * ow..(i + 1) * ow];
        let r1 = &hbuf[(i + k - ww) * ow..(i + k - ww + 1) * ow];
        let d = &mut dst[(ob.y0 as usize + i) * wu + ob.x0 as usize..][..ow];
        for ((d, &x), &y) in d.iter_mut().zip(r0).zip(r1) {
            *d = x.max(y);
        }
    }
    (out, ob)
}

// ---------------------------------------------------------------------------------------------
// Gaussian blur 5x5
// ---------------------------------------------------------------------------------------------

/// OpenCV `borderInterpolate(p, len, BORDER_REFLECT_101)`.
fn reflect101(mut p: i64, len: i64) -> usize {
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        if p < 0 {
            p = -p;
        } else {
            p = 2 * (len - 1) - p;
        }
    }
    p as usize
}

/// Blur `src` into `out` for the pixels of `reg` only (reads the whole image as needed).
fn blur5_region(src: &GrayImage, reg: BBox, out: &mut GrayImage) {
    let (w, h) = (src.width() as i64, src.height() as i64);
    let (ow, oh) = (reg.width() as usize, reg.height() as usize);
    if ow == 0 || oh == 0 {
        return;
    }
    let (wu, s) = (w as usize, src.as_raw());
    // Column map for the horizontally padded row (reflect-101 at the image border).
    let cols: Vec<usize> = (0..ow + 4)
        .map(|t| reflect101(reg.x0 as i64 - 2 + t as i64, w))
        .collect();
    let direct = reg.x0 >= 2 && (reg.x1 as i64) + 2 <= w; // no reflection needed
    let mut hrows = vec![0u16; (oh + 4) * ow];
    let mut prow = vec![0u8; ow + 4];
    for t in 0..oh + 4 {
        let y = reflect101(reg.y0 as i64 - 2 + t as i64, h);
        let row = &s[y * wu..(y + 1) * wu];
        let p: &[u8] = if direct {
            &row[reg.x0 as usize - 2..reg.x1 as usize + 2]
        } else {
            for (d, &c) in prow.iter_mut().zip(&cols) {
                *d = row[c];
            }
            &prow
        };
        let hr = &mut hrows[t * ow..(t + 1) * ow];
        let (p0, p1, p2, p3, p4) = (
            &p[..ow],
            &p[1..ow + 1],
            &p[2..ow + 2],
            &p[3..ow + 3],
            &p[4..ow + 4],
        );
        for i in 0..ow {
            hr[i] = p0[i] as u16
                + 4 * p1[i] as u16
                + 6 * p2[i] as u16
                + 4 * p3[i] as u16
                + p4[i] as u16;
        }
    }
    let dst: &mut [u8] = out;
    for i in 0..oh {
        let r = |j: usize| &hrows[(i + j) * ow..(i + j + 1) * ow];
        let (r0, r1, r2, r3, r4) = (r(0), r(1), r(2), r(3), r(4));
        let d = &mut dst[(reg.y0 as usize + i) * wu + reg.x0 as usize..][..ow];
        let (r0, r1, r2, r3, r4) = (&r0[..ow], &r1[..ow], &r2[..ow], &r3[..ow], &r4[..ow]);
        for x in 0..ow {
            // max 16*4080 + 128 = 65408: fits u16.
            let v = r0[x] + 4 * r1[x] + 6 * r2[x] + 4 * r3[x] + r4[x] + 128;
            d[x] = (v >> 8) as u8;
        }
    }
}

/// `cv2.GaussianBlur(mask, (5, 5), 0)` on an 8-bit single-channel image, bit-exact.
///
/// With `sigma = 0` and `ksize = 5` OpenCV uses the fixed kernel `[1, 4, 6, 4, 1] / 16` in each
/// direction, `BORDER_REFLECT_101`, and its bit-exact fixed-point path for 8U, which rounds
/// the exact sum half up: `out = (Σ k_i k_j p + 128) >> 8` (verified on OpenCV 4.10 and 5.0).
pub fn gaussian_blur_5x5(mask: &GrayImage) -> GrayImage {
    let (w, h) = mask.dimensions();
    let mut out = GrayImage::new(w, h);
    blur5_region(mask, BBox::full(w, h), &mut out);
    out
}

/// [`gaussian_blur_5x5`] when a box containing every nonzero pixel of `mask` is known; cost is
/// O(area of the box grown by 2). Returns the blurred mask (zero outside the returned box) and
/// that box (`nonzero` grown by 2 on each side, clipped).
pub fn gaussian_blur_5x5_roi(mask: &GrayImage, nonzero: BBox) -> (GrayImage, BBox) {
    let (w, h) = mask.dimensions();
    let mut out = GrayImage::new(w, h);
    let nz = nonzero.clip(w, h);
    if nz.is_empty() {
        return (out, BBox::new(nz.x0, nz.y0, nz.x0, nz.y0));
    }
    let reg = nz.expand_clip(2, 2, 2, 2, w, h);
    blur5_region(mask, reg, &mut out);
    (out, reg)
}

// ---------------------------------------------------------------------------------------------
// Cropping and compositing
// ---------------------------------------------------------------------------------------------

/// `img[y0:y1, x0:x1]` (box clipped to the image).
pub fn crop_rgb(img: &RgbImage, b: BBox) -> RgbImage {
    let b = b.clip(img.width(), img.height());
    let (bw, bh) = (b.width() as usize, b.height() as usize);
    let mut out = RgbImage::new(bw as u32, bh as u32);
    let stride = img.width() as usize * 3;
    let dst: &mut [u8] = &mut out;
    for (i, d) in dst.chunks_exact_mut(bw * 3).enumerate() {
        let off = (b.y0 as usize + i) * stride + b.x0 as usize * 3;
        d.copy_from_slice(&img.as_raw()[off..off + bw * 3]);
    }
    out
}

/// `mask[y0:y1, x0:x1]` (box clipped to the image).
pub fn crop_gray(mask: &GrayImage, b: BBox) -> GrayImage {
    let b = b.clip(mask.width(), mask.height());
    let (bw, bh) = (b.width() as usize, b.height() as usize);
    let mut out = GrayImage::new(bw as u32, bh as u32);
    let stride = mask.width() as usize;
    let dst: &mut [u8] = &mut out;
    for (i, d) in dst.chunks_exact_mut(bw.max(1)).take(bh).enumerate() {
        let off = (b.y0 as usize + i) * stride + b.x0 as usize;
        d.copy_from_slice(&mask.as_raw()[off..off + bw]);
    }
    out
}

/// `LUT[m * 256 + p]` = numpy `(p * (m/255) + 255 * (1 - m/255)).astype(np.uint8)` in float64.
fn composite_lut() -> &'static [u8] {
    static LUT: OnceLock<Box<[u8]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = vec![0u8; 256 * 256];
        for m in 0..256usize {
            let mf = m as f64 / 255.0;
            let white = 255.0 * (1.0 - mf);
            for p in 0..256usize {
                // Same operation order as numpy: (crop * m) + (255 * (1 - m)), then truncation.
                t[m * 256 + p] = ((p as f64) * mf + white) as u8;
            }
        }
        t.into_boxed_slice()
    })
}

#[inline]
fn composite_row(src: &[u8], mask: &[u8], dst: &mut [u8], lut: &[u8]) {
    for ((s, &m), d) in src.chunks_exact(3).zip(mask).zip(dst.chunks_exact_mut(3)) {
        match m {
            0 => d.copy_from_slice(&[255, 255, 255]),
            255 => d.copy_from_slice(s),
            _ => {
                let row = &lut[m as usize * 256..m as usize * 256 + 256];
                d[0] = row[s[0] as usize];
                d[1] = row[s[1] as usize];
                d[2] = row[s[2] as usize];
            }
        }
    }
}

/// Composite `img` on white with the soft mask `mask` (same size): StoryMaker's
/// `m = mask / 255; out = (img * m + 255 * (1 - m)).astype(np.uint8)` evaluated in float64 and
/// truncated — reproduced exactly through a 256×256 table built with the same f64 operations
/// (e.g. `p = 255, m = 43` gives 254, not 255, as numpy does).
///
/// # Panics
/// If the sizes differ.
pub fn composite_on_white(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    assert_eq!(
        img.dimensions(),
        mask.dimensions(),
        "composite_on_white: size mismatch"
    );
    composite_on_white_roi(img, mask, BBox::full(img.width(), img.height()))
}

/// [`composite_on_white`] of the crop `b` of both `img` and `mask` (full-size, same size) in one
/// pass: equals `composite_on_white(&crop_rgb(img, b), &crop_gray(mask, b))`.
///
/// # Panics
/// If the sizes of `img` and `mask` differ.
pub fn composite_on_white_roi(img: &RgbImage, mask: &GrayImage, b: BBox) -> RgbImage {
    assert_eq!(
        img.dimensions(),
        mask.dimensions(),
        "composite_on_white: size mismatch"
    );
    let b = b.clip(img.width(), img.height());
    let (bw, bh) = (b.width() as usize, b.height() as usize);
    let mut out = RgbImage::new(bw as u32, bh as u32);
    if bw == 0 || bh == 0 {
        return out;
    }
    let lut = composite_lut();
    let w = img.width() as usize;
    let dst: &mut [u8] = &mut out;
    for (i, d) in dst.chunks_exact_mut(bw * 3).enumerate() {
        let y = b.y0 as usize + i;
        let s = &img.as_raw()[(y * w + b.x0 as usize) * 3..][..bw * 3];
        let m = &mask.as_raw()[y * w + b.x0 as usize..][..bw];
        composite_row(s, m, d, lut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn gray(w: u32, h: u32, px: &[u8]) -> GrayImage {
        GrayImage::from_raw(w, h, px.to_vec()).unwrap()
    }

    /// Straightforward reference dilation (max over the window, out-of-image ignored).
    fn naive_dilate(m: &GrayImage, k: u32) -> GrayImage {
        let (w, h) = m.dimensions();
        let a = (k / 2) as i64;
        GrayImage::from_fn(w, h, |x, y| {
            let mut v = 0u8;
            for j in -a..(k as i64 - a) {
                for i in -a..(k as i64 - a) {
                    let (xx, yy) = (x as i64 + i, y as i64 + j);
                    if xx >= 0 && yy >= 0 && xx < w as i64 && yy < h as i64 {
                        v = v.max(m.get_pixel(xx as u32, yy as u32)[0]);
                    }
                }
            }
            image::Luma([v])
        })
    }

    #[test]
    fn bbox_hand_made() {
        assert_eq!(nonzero_bbox(&GrayImage::new(5, 4)), None);
        let mut m = GrayImage::new(7, 5);
        m.put_pixel(2, 1, image::Luma([1]));
        assert_eq!(nonzero_bbox(&m), Some(BBox::new(2, 1, 3, 2)));
        m.put_pixel(6, 4, image::Luma([200]));
        m.put_pixel(0, 3, image::Luma([9]));
        assert_eq!(nonzero_bbox(&m), Some(BBox::new(0, 1, 7, 5)));
        // Wide rows exercise the chunked scans (> 64 px).
        let mut m = GrayImage::new(300, 3);
        m.put_pixel(130, 2, image::Luma([5]));
        m.put_pixel(70, 1, image::Luma([5]));
        m.put_pixel(199, 1, image::Luma([5]));
        assert_eq!(nonzero_bbox(&m), Some(BBox::new(70, 1, 200, 3)));
    }

    #[test]
    fn in_range_hand_made() {
        let img = RgbImage::from_raw(
            3,
            2,
            vec![
                0, 0, 255, 0, 0, 254, 0, 255, 0, 1, 0, 255, 0, 0, 255, 255, 0, 0,
            ],
        )
        .unwrap();
        let (m, b) = in_range_rgb(&img, [0, 0, 255], [0, 0, 255]);
        assert_eq!(m.as_raw(), &vec![255, 0, 0, 0, 255, 0]);
        assert_eq!(b, Some(BBox::new(0, 0, 2, 2)));
        let (m, b) = in_range_rgb(&img, [0, 0, 250], [1, 0, 255]);
        assert_eq!(m.as_raw(), &vec![255, 255, 0, 255, 255, 0]);
        assert_eq!(b, Some(BBox::new(0, 0, 2, 2)));
        let (_, b) = in_range_rgb(&img, [9, 9, 9], [9, 9, 9]);
        assert_eq!(b, None);
    }

    #[test]
    fn keying_paths_agree() {
        // Dispatched (AVX2 when available) and portable row kernels give the same bytes.
        let mut st = 99u32;
        let row: Vec<u8> = (0..3 * 301)
            .map(|_| {
                st = st.wrapping_mul(1664525).wrapping_add(1013904223);
                [0u8, 255, 254, 1][(st >> 30) as usize]
            })
            .collect();
        let (mut a, mut b) = (vec![0u8; 301], vec![0u8; 301]);
        for (lo, hi) in [([0u8, 255, 0], [0u8, 255, 0]), ([0, 250, 0], [1, 255, 254])] {
            let any = key_row(&row, lo, hi, &mut a);
            let any2 = if lo == hi {
                eq_row_body(&row, lo, &mut b)
            } else {
                range_row_body(&row, lo, hi, &mut b)
            };
            assert_eq!((any, &a), (any2, &b));
            assert!(a.contains(&255) && a.contains(&0));
        }
    }

    #[test]
    fn color_masks_equal_in_range() {
        let mut st = 7u32;
        let pal = [
            [0u8, 0, 255],
            [0, 255, 0],
            [255, 0, 0],
            [0, 0, 0],
            [0, 0, 254],
        ];
        let img = RgbImage::from_fn(37, 23, |_, _| {
            st = st.wrapping_mul(1664525).wrapping_add(1013904223);
            image::Rgb(pal[(st >> 24) as usize % pal.len()])
        });
        let colors = [[0u8, 0, 255], [0, 255, 0], [255, 0, 0], [9, 9, 9]];
        let all = color_masks(&img, &colors);
        for (c, (m, b)) in colors.iter().zip(&all) {
            let (m2, b2) = in_range_rgb(&img, *c, *c);
            assert_eq!(m, &m2);
            assert_eq!(b, &b2);
            assert_eq!(*b, nonzero_bbox(m));
        }
        assert!(all[3].1.is_none());
    }

    #[test]
    fn dilate_hand_made() {
        // One pixel at (1,1) in a 5x4 image, 3x3 kernel -> 3x3 block.
        let mut m = GrayImage::new(5, 4);
        m.put_pixel(1, 1, image::Luma([7]));
        let d = dilate_rect(&m, 3);
        #[rustfmt::skip]
        let want = [7, 7, 7, 0, 0,
                    7, 7, 7, 0, 0,
                    7, 7, 7, 0, 0,
                    0, 0, 0, 0, 0];
        assert_eq!(d.as_raw().as_slice(), &want);
        // Even kernel: anchor 2 -> offsets -2..=1, i.e. pixel spreads 1 left/up, 2 right/down.
        let mut m = GrayImage::new(6, 6);
        m.put_pixel(2, 2, image::Luma([1]));
        let (d, b) = dilate_rect_roi(&m, 4, BBox::new(2, 2, 3, 3));
        assert_eq!(b, BBox::new(1, 1, 5, 5));
        assert_eq!(nonzero_bbox(&d), Some(BBox::new(1, 1, 5, 5)));
        assert_eq!(d, naive_dilate(&m, 4));
        // ksize 1 is the identity.
        assert_eq!(dilate_rect(&m, 1), m);
    }

    #[test]
    fn dilate_matches_naive_on_pseudo_random_masks() {
        let mut s = 12345u32;
        for &(w, h, k) in &[
            (31u32, 17u32, 7u32),
            (64, 40, 3),
            (9, 50, 5),
            (70, 3, 7),
            (20, 20, 8),
        ] {
            let m = GrayImage::from_fn(w, h, |_, _| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                image::Luma([if s >> 28 == 0 { (s >> 20) as u8 } else { 0 }])
            });
            let want = naive_dilate(&m, k);
            assert_eq!(dilate_rect(&m, k), want, "{w}x{h} k={k}");
            // A loose (larger) ROI gives the same result.
            let (d, _) = dilate_rect_roi(&m, k, BBox::full(w, h));
            assert_eq!(d, want);
        }
    }

    #[test]
    fn dilate_matches_cv2_fixture() {
        let m = load_gray("dilate_in.png");
        assert_same_gray(
            &dilate_rect(&m, 7),
            &load_gray("dilate_k7.png"),
            "dilate k7",
        );
        assert_same_gray(
            &dilate_rect(&m, 3),
            &load_gray("dilate_k3.png"),
            "dilate k3",
        );
        let b = nonzero_bbox(&m).unwrap();
        let (d, ob) = dilate_rect_roi(&m, 7, b);
        assert_same_gray(&d, &load_gray("dilate_k7.png"), "dilate roi k7");
        // boundingRect of the cv2 output (from the fixture table) = our returned box.
        let t = load_table("dilate_bbox.txt");
        let v: Vec<u32> = t[0].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(ob.xywh(), (v[0], v[1], v[2], v[3]));
        assert_eq!(nonzero_bbox(&d), Some(ob));
    }

    #[test]
    fn blur_hand_made() {
        // Constant image stays constant.
        let m = gray(6, 5, &[77; 30]);
        assert_eq!(gaussian_blur_5x5(&m).as_raw(), &vec![77u8; 30]);
        // Single 255 pixel in the middle of a 9x9 image: the output is the outer product
        // [1,4,6,4,1]^T [1,4,6,4,1] * 255 / 256, rounded half up.
        let mut m = GrayImage::new(9, 9);
        m.put_pixel(4, 4, image::Luma([255]));
        let b = gaussian_blur_5x5(&m);
        let k = [1u32, 4, 6, 4, 1];
        for y in 0..9u32 {
            for x in 0..9u32 {
                let (dx, dy) = (x as i32 - 2, y as i32 - 2);
                let want = if (0..5).contains(&dx) && (0..5).contains(&dy) {
                    ((k[dx as usize] * k[dy as usize] * 255 + 128) >> 8) as u8
                } else {
                    0
                };
                assert_eq!(b.get_pixel(x, y)[0], want, "({x},{y})");
            }
        }
        assert_eq!(b.get_pixel(4, 4)[0], 36); // (36*255 + 128) >> 8
        // Reflect-101 at the corner: for y = 0 the row window -2..=2 maps to rows 2,1,0,1,2, so
        // row 0 only gets the centre weight 6; likewise for the columns.
        let mut m = GrayImage::new(5, 5);
        m.put_pixel(0, 0, image::Luma([255]));
        let b = gaussian_blur_5x5(&m);
        assert_eq!(b.get_pixel(0, 0)[0], ((6 * 6 * 255 + 128) >> 8) as u8); // 36
        // x = 1: columns 1,0,1,2,3 -> column 0 has weight 4.
        assert_eq!(b.get_pixel(1, 0)[0], ((6 * 4 * 255 + 128) >> 8) as u8); // 24
        // x = 2: columns 0..=4 -> column 0 has weight 1.
        assert_eq!(b.get_pixel(2, 0)[0], ((6 * 255 + 128) >> 8) as u8); // 6
    }

    #[test]
    fn blur_matches_cv2_fixtures() {
        for name in [
            "blur_37x53",
            "blur_1x7",
            "blur_7x1",
            "blur_2x9",
            "blur_3x2",
            "blur_4x4",
        ] {
            let m = load_gray(&format!("{name}_in.png"));
            let want = load_gray(&format!("{name}_out.png"));
            assert_same_gray(&gaussian_blur_5x5(&m), &want, name);
        }
        // ROI variant on a sparse mask touching the image border.
        let m = load_gray("blur_roi_in.png");
        let want = load_gray("blur_roi_out.png");
        let b = nonzero_bbox(&m).unwrap();
        let (got, reg) = gaussian_blur_5x5_roi(&m, b);
        assert_same_gray(&got, &want, "blur roi");
        assert_same_gray(&gaussian_blur_5x5(&m), &want, "blur full on sparse mask");
        let nb = nonzero_bbox(&want).unwrap();
        assert_eq!(
            nb.union(&reg),
            reg,
            "nonzero output outside the returned box"
        );
    }

    #[test]
    fn composite_hand_made() {
        let img =
            RgbImage::from_raw(4, 1, vec![10, 20, 30, 255, 0, 17, 0, 100, 200, 7, 8, 9]).unwrap();
        let mask = gray(4, 1, &[255, 43, 0, 128]);
        let out = composite_on_white(&img, &mask);
        // m=255 -> original; m=0 -> white; m=43: exact values 255, 212, 214.86 but float64
        // rounding makes numpy give 254 and 211 for the first two; m=128, p=7: 130.5 -> 130.
        assert_eq!(
            out.as_raw(),
            &vec![10, 20, 30, 254, 211, 214, 255, 255, 255, 130, 131, 131]
        );
    }

    #[test]
    fn composite_table_matches_numpy() {
        // The fixture lists every (p, m) where numpy's float64 result, truncated, differs from
        // the exact rational floor(p*m/255 + 255 - m) (i.e. where rounding bites).
        let t = load_table("composite_exceptions.txt");
        let mut exc = std::collections::HashMap::new();
        for r in &t {
            let v: Vec<u32> = r.iter().map(|s| s.parse().unwrap()).collect();
            exc.insert((v[0], v[1]), v[2] as u8);
        }
        assert!(!exc.is_empty());
        let lut = composite_lut();
        for m in 0..256u32 {
            for p in 0..256u32 {
                // exact: 255 - m + p*m/255 = (255*255 - 255*m + p*m) / 255, floored
                let exact = ((255 * 255 - 255 * m + p * m) / 255) as u8;
                let want = exc.get(&(p, m)).copied().unwrap_or(exact);
                assert_eq!(lut[(m * 256 + p) as usize], want, "p={p} m={m}");
            }
        }
        // And the ROI version equals crop-then-composite.
        let img = load_rgb("composite_img.png");
        let mask = load_gray("composite_mask.png");
        let want = load_rgb("composite_out.png");
        assert_same_rgb(&composite_on_white(&img, &mask), &want, "composite");
        let b = BBox::new(3, 2, 17, 11);
        assert_eq!(
            composite_on_white_roi(&img, &mask, b),
            composite_on_white(&crop_rgb(&img, b), &crop_gray(&mask, b))
        );
    }
}
