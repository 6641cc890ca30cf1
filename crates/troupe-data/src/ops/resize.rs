//! Resizing: Pillow's convolution resampling of RGB images (`Image.resize`, bit-exact),
//! OpenCV `INTER_LINEAR` resizing of 8-bit masks (bit-exact), and StoryMaker's training-size
//! rule.

use super::OpsError;
use image::{GrayImage, RgbImage};
use std::cell::RefCell;

/// Resampling filter of [`resize_rgb`], named after the Pillow filter it reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `PIL.Image.LANCZOS` (Lanczos, support 3).
    Lanczos3,
    /// `PIL.Image.BICUBIC` (cubic with a = −0.5, i.e. Catmull-Rom; Pillow's default for
    /// `Image.resize`).
    CatmullRom,
    /// `PIL.Image.BILINEAR` (triangle filter).
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos3 => 3.0,
            Filter::CatmullRom => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    /// Pillow's filter functions (`Resample.c`), in f64.
    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Lanczos3 => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::CatmullRom => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
        }
    }
}

/// Pillow `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Fixed-point filter taps of one axis (Pillow `precompute_coeffs` + `normalize_coeffs_8bpc`).
#[derive(Clone, Debug, PartialEq)]
struct Coeffs {
    in_size: u32,
    out_size: u32,
    filter: Filter,
    /// Per output index: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size × ksize` taps (unused tail zero).
    k: Vec<i32>,
    ksize: usize,
}

impl Coeffs {
    fn new(in_size: u32, out_size: u32, filter: Filter) -> Self {
        // box = (0, in_size) as floats, as Image.resize passes.
        let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size as usize);
        let mut k = vec![0i32; out_size as usize * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size as usize {
            let center = 0.0 + (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i32).max(0); // C (int) truncates
            let xmax = ((center + support + 0.5) as i32).min(in_size as i32);
            let n = (xmax - xmin).max(0) as usize;
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = filter.eval((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale);
                *wx = v;
                ww += v;
            }
            let kk = &mut k[xx * ksize..xx * ksize + n];
            for (kx, &wx) in kk.iter_mut().zip(&w[..n]) {
                let v = if ww != 0.0 { wx / ww } else { wx };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                *kx = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            bounds.push((xmin as usize, n));
        }
        Self {
            in_size,
            out_size,
            filter,
            bounds,
            k,
            ksize,
        }
    }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Transposes 8 rows of `len` bytes (`rows[r]`, missing rows read as zero) into `out`
/// (`len × 8`, column-major: `out[j * 8 + r] = rows[r][j]`).
fn transpose_in(rows: &[&[u8]; 8], len: usize, out: &mut [u8]) {
    let out = &mut out[..len * 8];
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        while j + 16 <= len {
            // SAFETY: every row has at least `len` bytes and `out` has `len * 8`; loads and
            // stores are unaligned and in bounds (j + 16 <= len). SSE2 is baseline on x86_64.
            unsafe {
                let ld = |r: usize| _mm_loadu_si128(rows[r].as_ptr().add(j) as *const __m128i);
                let (a0, a1, a2, a3) = (ld(0), ld(1), ld(2), ld(3));
                let (a4, a5, a6, a7) = (ld(4), ld(5), ld(6), ld(7));
                let t0 = _mm_unpacklo_epi8(a0, a1);
                let t1 = _mm_unpackhi_epi8(a0, a1);
                let t2 = _mm_unpacklo_epi8(a2, a3);
                let t3 = _mm_unpackhi_epi8(a2, a3);
                let t4 = _mm_unpacklo_epi8(a4, a5);
                let t5 = _mm_unpackhi_epi8(a4, a5);
                let t6 = _mm_unpacklo_epi8(a6, a7);
                let t7 = _mm_unpackhi_epi8(a6, a7);
                let u0 = _mm_unpacklo_epi16(t0, t2);
                let u1 = _mm_unpackhi_epi16(t0, t2);
                let u2 = _mm_unpacklo_epi16(t1, t3);
                let u3 = _mm_unpackhi_epi16(t1, t3);
                let u4 = _mm_unpacklo_epi16(t4, t6);
                let u5 = _mm_unpackhi_epi16(t4, t6);
                let u6 = _mm_unpacklo_epi16(t5, t7);
                let u7 = _mm_unpackhi_epi16(t5, t7);
                let o = out.as_mut_ptr().add(j * 8) as *mut __m128i;
                _mm_storeu_si128(o, _mm_unpacklo_epi32(u0, u4));
                _mm_storeu_si128(o.add(1), _mm_unpackhi_epi32(u0, u4));
                _mm_storeu_si128(o.add(2), _mm_unpacklo_epi32(u1, u5));
                _mm_storeu_si128(o.add(3), _mm_unpackhi_epi32(u1, u5));
                _mm_storeu_si128(o.add(4), _mm_unpacklo_epi32(u2, u6));
                _mm_storeu_si128(o.add(5), _mm_unpackhi_epi32(u2, u6));
                _mm_storeu_si128(o.add(6), _mm_unpacklo_epi32(u3, u7));
                _mm_storeu_si128(o.add(7), _mm_unpackhi_epi32(u3, u7));
            }
            j += 16;
        }
    }
    for (jj, o) in out.chunks_exact_mut(8).enumerate().skip(j) {
        for (r, v) in o.iter_mut().enumerate() {
            *v = rows[r][jj];
        }
    }
}

/// Inverse of [`transpose_in`]: `blk` is `len × 8` column-major; writes the first `nr` rows
/// (`rows[r][j] = blk[j * 8 + r]`).
fn transpose_out(blk: &[u8], len: usize, rows: &mut [&mut [u8]], nr: usize) {
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if nr == 8 {
        use std::arch::x86_64::*;
        while j + 8 <= len {
            // SAFETY: `blk` has `len * 8` bytes and each row `len`; j + 8 <= len. SSE2 is
            // baseline on x86_64.
            unsafe {
                let p = blk.as_ptr().add(j * 8);
                let ld = |i: usize| _mm_loadl_epi64(p.add(i * 8) as *const __m128i);
                let a0 = _mm_unpacklo_epi8(ld(0), ld(1));
                let a1 = _mm_unpacklo_epi8(ld(2), ld(3));
                let a2 = _mm_unpacklo_epi8(ld(4), ld(5));
                let a3 = _mm_unpacklo_epi8(ld(6), ld(7));
                let b0 = _mm_unpacklo_epi16(a0, a1);
                let b1 = _mm_unpackhi_epi16(a0, a1);
                let b2 = _mm_unpacklo_epi16(a2, a3);
                let b3 = _mm_unpackhi_epi16(a2, a3);
                let c = [
                    _mm_unpacklo_epi32(b0, b2),
                    _mm_unpackhi_epi32(b0, b2),
                    _mm_unpacklo_epi32(b1, b3),
                    _mm_unpackhi_epi32(b1, b3),
                ];
                for (i, v) in c.iter().enumerate() {
                    _mm_storel_epi64(rows[2 * i].as_mut_ptr().add(j) as *mut __m128i, *v);
                    _mm_storel_epi64(
                        rows[2 * i + 1].as_mut_ptr().add(j) as *mut __m128i,
                        _mm_unpackhi_epi64(*v, *v),
                    );
                }
            }
            j += 8;
        }
    }
    for jj in j..len {
        let col = &blk[jj * 8..jj * 8 + 8];
        for (r, row) in rows.iter_mut().enumerate().take(nr) {
            row[jj] = col[r];
        }
    }
}

/// One output pixel of 8 rows: 24 accumulators (`[channel][row]`) over the taps.
#[inline(always)]
fn taps24(taps: &[u8], ks: &[i32], o: &mut [u8; 24]) {
    let mut acc = [HALF; 24];
    for (b, &k) in taps.chunks_exact(24).zip(ks) {
        let b: &[u8; 24] = b.try_into().unwrap();
        for i in 0..24 {
            acc[i] += b[i] as i32 * k;
        }
    }
    for i in 0..24 {
        o[i] = clip8(acc[i]);
    }
}

/// [`taps24`] with the accumulators pinned in three AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn taps24_avx2(taps: &[u8], ks: &[i32], o: &mut [u8; 24]) {
    use std::arch::x86_64::*;
    assert!(taps.len() >= ks.len() * 24);
    let half = _mm256_set1_epi32(HALF);
    let (mut a0, mut a1, mut a2) = (half, half, half);
    let p = taps.as_ptr();
    for (t, &k) in ks.iter().enumerate() {
        let kv = _mm256_set1_epi32(k);
        // SAFETY: 24 bytes at t * 24 are in bounds (asserted above); unaligned 8-byte loads.
        unsafe {
            let q = p.add(t * 24);
            let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
            let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8) as *const __m128i));
            let b2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(16) as *const __m128i));
            a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(b0, kv));
            a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(b1, kv));
            a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(b2, kv));
        }
    }
    // >> 22, then saturate to u8 (= clamp to 0..=255, as clip8).
    let s0 = _mm256_srai_epi32::<22>(a0);
    let s1 = _mm256_srai_epi32::<22>(a1);
    let s2 = _mm256_srai_epi32::<22>(a2);
    let mut tmp = [0i32; 24];
    // SAFETY: `tmp` holds 24 i32 = three 32-byte unaligned stores.
    unsafe {
        _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, s0);
        _mm256_storeu_si256(tmp.as_mut_ptr().add(8) as *mut __m256i, s1);
        _mm256_storeu_si256(tmp.as_mut_ptr().add(16) as *mut __m256i, s2);
    }
    for i in 0..24 {
        o[i] = tmp[i].clamp(0, 255) as u8;
    }
}

/// Horizontal pass on 8 rows at once: the rows are transposed to `[x][channel][row]` so one
/// filter tap updates 24 accumulators with contiguous loads, and the results are transposed
/// back.
#[inline(always)]
fn horizontal_rgb(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    c: &Coeffs,
    scratch: &mut HScratch,
    out: &mut [u8],
    avx2: bool,
) {
    let HScratch { blk, oblk } = scratch;
    let out_stride = c.out_size as usize * 3;
    let in_stride = src_w * 3;
    let zero = vec![
        0u8;
        if rows.len().is_multiple_of(8) {
            0
        } else {
            in_stride
        }
    ];
    blk.resize(src_w * 24, 0);
    oblk.resize(out_stride * 8, 0);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let nr = (rows.end - r0).min(8);
        let rr: [&[u8]; 8] = std::array::from_fn(|r| {
            if r < nr {
                &src[(r0 + r) * in_stride..(r0 + r + 1) * in_stride]
            } else {
                &zero[..]
            }
        });
        transpose_in(&rr, in_stride, blk);
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let ks = &c.k[xx * c.ksize..xx * c.ksize + n];
            let taps = &blk[xmin * 24..(xmin + n) * 24];
            let o: &mut [u8; 24] = (&mut oblk[xx * 24..xx * 24 + 24]).try_into().unwrap();
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 availability was checked by the caller (`avx2` is only true then).
                unsafe { taps24_avx2(taps, ks, o) };
                continue;
            }
            taps24(taps, ks, o);
        }
        let base = (r0 - rows.start) * out_stride;
        let mut orows: Vec<&mut [u8]> = out[base..base + nr * out_stride]
            .chunks_exact_mut(out_stride)
            .collect();
        transpose_out(oblk, out_stride, &mut orows, nr);
        r0 += nr;
    }
}

/// Vertical pass: every output row is a weighted sum of whole source rows (contiguous).
#[inline(always)]
fn vertical(
    src: &[u8],
    stride: usize,
    row_offset: usize,
    c: &Coeffs,
    acc: &mut Vec<i32>,
    out: &mut [u8],
    avx2: bool,
) {
    for (yy, (&(ymin, n), orow)) in c
        .bounds
        .iter()
        .zip(out.chunks_exact_mut(stride))
        .enumerate()
    {
        let ks = &c.k[yy * c.ksize..yy * c.ksize + n];
        let base = (ymin - row_offset) * stride;
        let rows = &src[base..base + n * stride];
        let mut x = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 availability was checked by the caller (`avx2` is only true then).
            x = unsafe { vertical_row_avx2(rows, stride, ks, orow) };
        }
        if x < stride {
            acc.clear();
            acc.resize(stride - x, HALF);
            for (t, &k) in ks.iter().enumerate() {
                let row = &rows[t * stride + x..(t + 1) * stride];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += p as i32 * k;
                }
            }
            for (o, &a) in orow[x..].iter_mut().zip(acc.iter()) {
                *o = clip8(a);
            }
        }
    }
}

/// One output row of the vertical pass, 32 bytes at a time with the accumulators in
/// registers; returns how many leading bytes it wrote (a multiple of 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_row_avx2(rows: &[u8], stride: usize, ks: &[i32], orow: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    assert!(rows.len() >= ks.len() * stride && orow.len() >= stride);
    let half = _mm256_set1_epi32(HALF);
    let mut x = 0;
    while x + 32 <= stride {
        let (mut a0, mut a1, mut a2, mut a3) = (half, half, half, half);
        for (t, &k) in ks.iter().enumerate() {
            let kv = _mm256_set1_epi32(k);
            // SAFETY: bytes t * stride + x .. + 32 lie inside `rows` (asserted above).
            unsafe {
                let q = rows.as_ptr().add(t * stride + x);
                let ld =
                    |o: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(o) as *const __m128i));
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(ld(0), kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(ld(8), kv));
                a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(ld(16), kv));
                a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(ld(24), kv));
            }
        }
        // >> 22, pack with signed then unsigned saturation (= clamp to 0..=255); packs work
        // per 128-bit lane, so restore the order with a permute.
        let s01 = _mm256_packs_epi32(_mm256_srai_epi32::<22>(a0), _mm256_srai_epi32::<22>(a1));
        let s23 = _mm256_packs_epi32(_mm256_srai_epi32::<22>(a2), _mm256_srai_epi32::<22>(a3));
        let b = _mm256_packus_epi16(s01, s23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: x + 32 <= stride <= orow.len().
        unsafe { _mm256_storeu_si256(orow.as_mut_ptr().add(x) as *mut __m256i, b) };
        x += 32;
    }
    x
}

#[inline(always)]
fn resample_rgb_body(
    r: &mut Resizer,
    img: &RgbImage,
    w: u32,
    h: u32,
    filter: Filter,
    avx2: bool,
) -> RgbImage {
    let (sw, sh) = img.dimensions();
    let need_h = w != sw;
    let need_v = h != sh;
    let mut out = RgbImage::new(w, h);
    if !need_h && !need_v {
        out.copy_from_slice(img.as_raw());
        return out;
    }
    let cv = r.take_coeffs(sh, h, filter, 1);
    let horizontal_first = match r.order {
        PassOrder::HorizontalFirst => true,
        PassOrder::Pillow13 => {
            let (dy, dx) = (sh as i64 - h as i64, sw as i64 - w as i64);
            !(dy > 0 && dy > dx * 2)
        }
    };
    let mut tmp = std::mem::take(&mut r.tmp);
    if need_h {
        let ch = r.take_coeffs(sw, w, filter, 0);
        if need_v && horizontal_first {
            // Only the source rows the vertical pass reads.
            let first = cv.bounds[0].0;
            let last = cv.bounds[h as usize - 1];
            let rows = first..last.0 + last.1;
            tmp.clear();
            tmp.resize(rows.len() * w as usize * 3, 0);
            horizontal_rgb(
                img.as_raw(),
                sw as usize,
                rows.clone(),
                &ch,
                &mut r.hs,
                &mut tmp,
                avx2,
            );
            vertical(
                &tmp,
                w as usize * 3,
                rows.start,
                &cv,
                &mut r.acc,
                &mut out,
                avx2,
            );
        } else if need_v {
            // Pillow >= 13 when the height shrinks much more than the width: vertical first.
            tmp.clear();
            tmp.resize(sw as usize * h as usize * 3, 0);
            vertical(
                img.as_raw(),
                sw as usize * 3,
                0,
                &cv,
                &mut r.acc,
                &mut tmp,
                avx2,
            );
            horizontal_rgb(
                &tmp,
                sw as usize,
                0..h as usize,
                &ch,
                &mut r.hs,
                &mut out,
                avx2,
            );
        } else {
            horizontal_rgb(
                img.as_raw(),
                sw as usize,
                0..sh as usize,
                &ch,
                &mut r.hs,
                &mut out,
                avx2,
            );
        }
        r.cache[0] = Some(ch);
    } else {
        vertical(
            img.as_raw(),
            sw as usize * 3,
            0,
            &cv,
            &mut r.acc,
            &mut out,
            avx2,
        );
    }
    r.tmp = tmp;
    r.cache[1] = Some(cv);
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn resample_rgb_avx2(r: &mut Resizer, img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    resample_rgb_body(r, img, w, h, filter, true)
}

fn resample_rgb_generic(
    r: &mut Resizer,
    img: &RgbImage,
    w: u32,
    h: u32,
    filter: Filter,
) -> RgbImage {
    resample_rgb_body(r, img, w, h, filter, false)
}

/// Order of the two passes of a 2-D resize (the intermediate is rounded to 8 bits, so the order
/// changes results by up to ~2 levels).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PassOrder {
    /// Pillow ≤ 12 (the StoryMaker era): always horizontal first, over only the source rows
    /// the vertical pass reads.
    #[default]
    HorizontalFirst,
    /// Pillow ≥ 13: vertical first when the height shrinks by more than twice as many pixels
    /// as the width (`H_in − H_out > 0 && H_in − H_out > 2 (W_in − W_out)`), else as above.
    Pillow13,
}

/// Reusable state of [`resize_rgb`]: the Pillow pass order to emulate, scratch buffers and the
/// last filter taps per axis (recomputing taps costs more than a small resize; the same sizes
/// recur in a data loader).
#[derive(Default)]
pub struct Resizer {
    order: PassOrder,
    cache: [Option<Coeffs>; 2],
    tmp: Vec<u8>,
    hs: HScratch,
    acc: Vec<i32>,
}

/// Scratch of the horizontal pass: 8 source rows and 8 output rows, transposed.
#[derive(Default)]
struct HScratch {
    blk: Vec<u8>,
    oblk: Vec<u8>,
}

impl Resizer {
    /// A resizer emulating Pillow ≤ 12 ([`PassOrder::HorizontalFirst`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A resizer emulating the given Pillow pass order.
    pub fn with_order(order: PassOrder) -> Self {
        Self {
            order,
            ..Self::default()
        }
    }

    /// The emulated pass order.
    pub fn order(&self) -> PassOrder {
        self.order
    }

    /// The taps for this axis, from the cache slot when they match (the caller puts them back).
    fn take_coeffs(&mut self, in_size: u32, out_size: u32, filter: Filter, slot: usize) -> Coeffs {
        match self.cache[slot].take() {
            Some(c) if c.in_size == in_size && c.out_size == out_size && c.filter == filter => c,
            _ => Coeffs::new(in_size, out_size, filter),
        }
    }
}

/// `PIL.Image.resize((w, h), resample)` of an RGB image (whole-image box, no `reducing_gap`),
/// bit-exact with Pillow: `precompute_coeffs` taps in f64 (support scaled by the downscale
/// factor, i.e. antialiasing), normalised to 22-bit integers, two separable passes each rounding
/// `(Σ + 2^21) >> 22` and clipping to 8 bits. The pass order follows the resizer's
/// [`PassOrder`] (default: Pillow ≤ 12, horizontal first; verified by the tests against Pillow 13
/// run pass by pass, and against Pillow 13 one-shot for [`PassOrder::Pillow13`]). A same-size
/// resize returns a copy, like Pillow. Uses AVX2 when the CPU has it (same results).
///
/// Keep one [`Resizer`] per worker thread (or use [`resize_rgb_cached`]).
pub fn resize_rgb(
    resizer: &mut Resizer,
    img: &RgbImage,
    w: u32,
    h: u32,
    filter: Filter,
) -> Result<RgbImage, OpsError> {
    let (sw, sh) = img.dimensions();
    if sw == 0 || sh == 0 {
        return Err(OpsError::EmptyImage {
            what: "source",
            width: sw,
            height: sh,
        });
    }
    if w == 0 || h == 0 {
        return Err(OpsError::EmptyImage {
            what: "destination",
            width: w,
            height: h,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return Ok(unsafe { resample_rgb_avx2(resizer, img, w, h, filter) });
    }
    Ok(resample_rgb_generic(resizer, img, w, h, filter))
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// [`resize_rgb`] with a thread-local default [`Resizer`] (Pillow ≤ 12 pass order).
pub fn resize_rgb_cached(
    img: &RgbImage,
    w: u32,
    h: u32,
    filter: Filter,
) -> Result<RgbImage, OpsError> {
    RESIZER.with(|r| resize_rgb(&mut r.borrow_mut(), img, w, h, filter))
}

// ---------------------------------------------------------------------------------------------
// OpenCV INTER_LINEAR (8U)
// ---------------------------------------------------------------------------------------------

/// `INTER_RESIZE_COEF_SCALE` (2^11).
const COEF_SCALE: f32 = 2048.0;

/// Per-destination-index source offset and the two 11-bit weights, as `cv::resize` computes
/// them: `f = (float)((d + 0.5) * scale - 0.5)`, `s = floor(f)`, weights
/// `cvRound((1 - f') * 2048)`, `cvRound(f' * 2048)`. `clamp` = the horizontal rule (indices
/// clamped *with* zeroed fraction); the vertical rule keeps the fraction and clamps the rows.
fn linear_coeffs(dst_len: u32, src_len: u32, clamp: bool) -> Vec<(i32, i32, i32)> {
    let inv_scale = dst_len as f64 / src_len as f64;
    let scale = 1.0 / inv_scale;
    (0..dst_len)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i32;
            f -= s as f32;
            if clamp {
                if s < 0 {
                    s = 0;
                    f = 0.0;
                }
                if s >= src_len as i32 - 1 {
                    s = src_len as i32 - 1;
                    f = 0.0;
                }
            }
            let a0 = ((1.0 - f) * COEF_SCALE).round_ties_even() as i32;
            let a1 = (f * COEF_SCALE).round_ties_even() as i32;
            (s, a0, a1)
        })
        .collect()
}

/// `cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)` on an 8-bit mask, bit-exact
/// (verified against OpenCV 4.10 and 5.0 on random sizes, up- and downscaling).
///
/// No antialiasing: source coordinate `(d + 0.5)·scale − 0.5`; horizontal pass
/// `S = p0·a0 + p1·a1` with 11-bit weights (indices clamped at the borders), vertical pass as
/// OpenCV's SIMD kernel `(((S0 >> 4)·b0 >> 16) + ((S1 >> 4)·b1 >> 16) + 2) >> 2`, saturated
/// (OpenCV's exact 2×2 downscale switch to `INTER_AREA` gives the same values). Cost is
/// O(w·h), independent of the source size.
///
/// # Panics
/// If the mask is empty while `w·h > 0`.
pub fn resize_mask_bilinear_u8(mask: &GrayImage, w: u32, h: u32) -> GrayImage {
    let (sw, sh) = mask.dimensions();
    let mut out = GrayImage::new(w, h);
    if w == 0 || h == 0 {
        return out;
    }
    assert!(sw > 0 && sh > 0, "resize_mask_bilinear: empty source");
    let xc = linear_coeffs(w, sw, true);
    let yc = linear_coeffs(h, sh, false);
    let src = mask.as_raw();
    let swu = sw as usize;
    let hrow = |y: i32, buf: &mut Vec<i32>| {
        let y = y.clamp(0, sh as i32 - 1) as usize;
        let row = &src[y * swu..(y + 1) * swu];
        buf.clear();
        buf.extend(xc.iter().map(|&(s, a0, a1)| {
            let s = s as usize;
            let s1 = (s + 1).min(swu - 1);
            row[s] as i32 * a0 + row[s1] as i32 * a1
        }));
    };
    let (mut r0, mut r1) = (
        Vec::with_capacity(w as usize),
        Vec::with_capacity(w as usize),
    );
    let mut cached: Option<(i32, i32)> = None; // clamped source rows held in r0 / r1
    let dst: &mut [u8] = &mut out;
    for (drow, &(sy, b0, b1)) in dst.chunks_exact_mut(w as usize).zip(&yc) {
        let ya = sy.clamp(0, sh as i32 - 1);
        let yb = (sy + 1).clamp(0, sh as i32 - 1);
        match cached {
            Some((ca, cb)) if (ca, cb) == (ya, yb) => {}
            Some((_, cb)) if cb == ya => {
                std::mem::swap(&mut r0, &mut r1);
                hrow(yb, &mut r1);
            }
            _ => {
                hrow(ya, &mut r0);
                hrow(yb, &mut r1);
            }
        }
        cached = Some((ya, yb));
        for ((d, &s0), &s1) in drow.iter_mut().zip(&r0).zip(&r1) {
            let v = (((s0 >> 4) * b0) >> 16) + (((s1 >> 4) * b1) >> 16) + 2;
            *d = (v >> 2).clamp(0, 255) as u8;
        }
    }
    out
}

/// StoryMaker's loss-mask resize: `cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR) / 255`
/// as `f32` in `[0, 1]`, row-major `h × w` ([`resize_mask_bilinear_u8`], then division in f64
/// rounded to f32 like `torch.from_numpy(x / 255).float()`).
pub fn resize_mask_bilinear(mask: &GrayImage, w: u32, h: u32) -> Vec<f32> {
    let lut: [f32; 256] = std::array::from_fn(|v| (v as f64 / 255.0) as f32);
    resize_mask_bilinear_u8(mask, w, h)
        .as_raw()
        .iter()
        .map(|&v| lut[v as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn mask_resize_hand_made() {
        // 2x downscale of a 4x2 mask: average of 2x2 blocks, (sum + 2) >> 2.
        let m = GrayImage::from_raw(4, 2, vec![0, 255, 10, 11, 255, 255, 12, 13]).unwrap();
        let r = resize_mask_bilinear_u8(&m, 2, 1);
        assert_eq!(r.as_raw(), &vec![191, 12]); // (765+2)>>2 = 191, (46+2)>>2 = 12
        // Constant mask stays constant in both directions.
        let c = GrayImage::from_raw(5, 3, vec![200; 15]).unwrap();
        assert_eq!(
            resize_mask_bilinear_u8(&c, 11, 7).as_raw(),
            &vec![200u8; 77]
        );
        assert_eq!(resize_mask_bilinear_u8(&c, 2, 2).as_raw(), &vec![200u8; 4]);
        let f = resize_mask_bilinear(&c, 2, 2);
        assert_eq!(f, vec![(200.0f64 / 255.0) as f32; 4]);
    }

    #[test]
    fn mask_resize_matches_cv2_fixtures() {
        let t = load_table("mask_resize_cases.txt");
        assert!(t.len() >= 5);
        for r in &t {
            let m = load_gray(&r[0]);
            let (w, h): (u32, u32) = (r[1].parse().unwrap(), r[2].parse().unwrap());
            let want = load_gray(&r[3]);
            assert_same_gray(&resize_mask_bilinear_u8(&m, w, h), &want, &r[3]);
            let f = resize_mask_bilinear(&m, w, h);
            assert_eq!(f.len(), (w * h) as usize);
            for (a, &b) in f.iter().zip(want.as_raw()) {
                assert_eq!(*a, (b as f64 / 255.0) as f32);
            }
        }
    }

    #[test]
    fn rgb_resize_matches_pil() {
        // Rows: input w h filter out_pillow<=12 out_pillow13 (Pillow 13 output; the <= 12 one
        // computed with Pillow 13 pass by pass, horizontal first).
        let t = load_table("rgb_resize_cases.txt");
        assert!(t.len() >= 8);
        let mut old = Resizer::new();
        let mut new = Resizer::with_order(PassOrder::Pillow13);
        let mut n_order_matters = 0;
        for r in &t {
            let img = load_rgb(&r[0]);
            let (w, h): (u32, u32) = (r[1].parse().unwrap(), r[2].parse().unwrap());
            let filter = match r[3].as_str() {
                "lanczos" => Filter::Lanczos3,
                "bicubic" => Filter::CatmullRom,
                "bilinear" => Filter::Bilinear,
                f => panic!("unknown filter {f}"),
            };
            let (want12, want13) = (load_rgb(&r[4]), load_rgb(&r[5]));
            n_order_matters += (want12 != want13) as usize;
            for (rz, want, what) in [(&mut old, &want12, &r[4]), (&mut new, &want13, &r[5])] {
                let got = resize_rgb(rz, &img, w, h, filter).unwrap();
                assert_same_rgb(&got, want, what);
                // The portable path (no AVX2) gives the same bytes.
                let mut fresh = Resizer::with_order(rz.order());
                let generic = resample_rgb_generic(&mut fresh, &img, w, h, filter);
                assert_same_rgb(&generic, want, what);
            }
            assert_eq!(&resize_rgb_cached(&img, w, h, filter).unwrap(), &want12);
        }
        assert!(
            n_order_matters >= 2,
            "fixtures should exercise the pass order"
        );
        let img = RgbImage::new(3, 3);
        assert!(resize_rgb(&mut old, &img, 0, 5, Filter::Bilinear).is_err());
        assert_eq!(
            resize_rgb(&mut old, &img, 3, 3, Filter::Bilinear).unwrap(),
            img
        );
    }
}
