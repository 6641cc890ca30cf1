//! Decoding user images safely: the header is read first and an image whose size is over the
//! limit is refused before any pixel buffer is allocated (decompression bombs).

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageReader, Limits, RgbImage};

use crate::error::{DataError, Location, Result};

/// Refuse images larger than this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    /// 64 megapixels, 16384 px a side: far above training sizes, far below what exhausts memory.
    fn default() -> Self {
        Self {
            max_pixels: 64 << 20,
            max_side: 16384,
        }
    }
}

fn reader<'a>(bytes: &'a [u8], at: &Location) -> Result<ImageReader<Cursor<&'a [u8]>>> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::new(at.clone(), format!("cannot read image header: {e}")))
}

/// Width and height from the header alone, after checking them against `limits`.
pub fn probe(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<(u32, u32)> {
    let r = reader(bytes, at)?;
    if r.format().is_none() {
        return Err(DataError::new(
            at.clone(),
            "not a recognised image (expected PNG, JPEG or WebP bytes)",
        ));
    }
    let (w, h) = r
        .into_dimensions()
        .map_err(|e| DataError::new(at.clone(), format!("cannot read image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(DataError::new(
            at.clone(),
            format!("image has zero size {w}x{h}"),
        ));
    }
    if let Some(problem) = incomplete(bytes) {
        return Err(DataError::new(at.clone(), problem));
    }
    if w > limits.max_side || h > limits.max_side || w as u64 * h as u64 > limits.max_pixels {
        return Err(DataError::new(
            at.clone(),
            format!(
                "image is {w}x{h}, over the decode limit ({} px a side, {} pixels); refused before decoding",
                limits.max_side, limits.max_pixels
            ),
        ));
    }
    Ok((w, h))
}

/// Why `bytes` are not a complete image file, or `None`. Decoders fill a cut-off image in (a
/// JPEG cut in half decodes, its lower part gray); Pillow and OpenCV refuse those bytes, so
/// Troupe does too: a JPEG needs its end-of-image marker after the first scan, a PNG its IEND
/// chunk, a WebP its whole RIFF payload.
fn incomplete(bytes: &[u8]) -> Option<String> {
    let n = bytes.len();
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let scan = jpeg_first_scan(bytes)?;
        let ends = bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]);
        return (!ends).then(|| {
            format!("truncated JPEG: the data ({n} bytes) ends without its end-of-image marker")
        });
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let complete = bytes.len() >= 12 && bytes[..n].windows(8).any(|w| w == b"IEND\xAEB`\x82");
        return (!complete)
            .then(|| format!("truncated PNG: the data ({n} bytes) has no IEND chunk"));
    }
    if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        let declared = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize + 8;
        return (n < declared).then(|| {
            format!("truncated WebP: the RIFF header declares {declared} bytes, the data has {n}")
        });
    }
    None
}

/// Offset of the first start-of-scan segment of a JPEG (walking the marker segments, so
/// markers inside EXIF thumbnails are not mistaken for the image's), or `None` when the
/// segments run past the data (the decoder then reports the damage itself).
fn jpeg_first_scan(bytes: &[u8]) -> Option<usize> {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            0xD0..=0xD7 | 0x01 => i += 2,
            0xDA => return Some(i),
            _ => {
                let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                i += 2 + len;
            }
        }
    }
    None
}

fn decode(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<DynamicImage> {
    let (w, h) = probe(bytes, at, limits)?;
    let mut r = reader(bytes, at)?;
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    // Room for the decoded image plus the decoder's own buffers.
    l.max_alloc = Some(w as u64 * h as u64 * 16 + (64 << 20));
    r.limits(l);
    r.decode().map_err(|e| {
        DataError::new(
            at.clone(),
            format!("cannot decode image (corrupt or truncated?): {e}"),
        )
    })
}

/// Whether two images have the same shape up to the rounding of a resize: one scaled to the
/// other's width is within a pixel of its height, or scaled to its height within a pixel of
/// its width (a 1440×960 pose for a 1280×853 image, as in StoryMaker's example data). Such an
/// image may be resized to the other; anything else (a transposed or cropped one) may not.
pub fn same_aspect((aw, ah): (u32, u32), (bw, bh): (u32, u32)) -> bool {
    let (aw, ah, bw, bh) = (aw as f64, ah as f64, bw as f64, bh as f64);
    (ah * bw / aw - bh).abs() <= 1.0 || (aw * bh / ah - bw).abs() <= 1.0
}

/// A pose image may be resized to its image only if it has the image's shape
/// ([`same_aspect`]); otherwise (transposed, cropped, another image's) it is refused at `at`.
pub fn check_pose_shape(pose: (u32, u32), image: (u32, u32), at: &Location) -> Result<()> {
    if same_aspect(pose, image) {
        return Ok(());
    }
    Err(DataError::new(
        at.clone(),
        format!(
            "pose is {}x{}, the image is {}x{}: not the same shape (another image's pose?)",
            pose.0, pose.1, image.0, image.1
        ),
    ))
}

/// Whether `bytes` are a JPEG file (decoded by libjpeg, as Pillow: [`crate::jpeg`]).
fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes to 8-bit RGB (alpha dropped, gray expanded) as Pillow's `.convert("RGB")` does;
/// JPEGs through libjpeg-turbo's decoder ([`crate::jpeg`]), bit for bit as Pillow.
pub fn decode_rgb(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<RgbImage> {
    if is_jpeg(bytes) {
        probe(bytes, at, limits)?;
        return crate::jpeg::decode_rgb(bytes, at, limits);
    }
    Ok(match decode(bytes, at, limits)? {
        DynamicImage::ImageRgb8(img) => img,
        other => other.to_rgb8(),
    })
}

/// Decodes to 8-bit single channel. Masks are stored as 8-bit grayscale PNG; other colour types
/// are converted to luma.
pub fn decode_gray(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<GrayImage> {
    if is_jpeg(bytes) {
        // Pillow's RGB → L (`L24`): exact for gray JPEGs, which libjpeg expands to R = G = B.
        let rgb = decode_rgb(bytes, at, limits)?;
        let (w, h) = rgb.dimensions();
        let luma = rgb
            .pixels()
            .map(|p| {
                let [r, g, b] = p.0.map(u32::from);
                ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
            })
            .collect();
        return Ok(GrayImage::from_raw(w, h, luma).expect("sized buffer"));
    }
    Ok(match decode(bytes, at, limits)? {
        DynamicImage::ImageLuma8(img) => img,
        other => other.to_luma8(),
    })
}

/// Encodes an 8-bit grayscale image as PNG.
pub fn encode_png_gray(img: &GrayImage) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::L8,
        )
        .expect("PNG encoding to memory cannot fail");
    out
}

/// Encodes an RGB image as PNG.
pub fn encode_png_rgb(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding to memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_aspect_allows_resize_rounding_only() {
        // StoryMaker's example pose and mask for its 1280×853 image.
        assert!(same_aspect((1440, 960), (1280, 853)));
        assert!(same_aspect((640, 426), (1280, 853)));
        assert!(same_aspect((64, 64), (64, 64)));
        assert!(!same_aspect((96, 64), (64, 96)));
        assert!(!same_aspect((1280, 720), (1280, 853)));
    }
}
