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

/// Decodes to 8-bit RGB (alpha dropped, gray expanded).
pub fn decode_rgb(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<RgbImage> {
    Ok(match decode(bytes, at, limits)? {
        DynamicImage::ImageRgb8(img) => img,
        other => other.to_rgb8(),
    })
}

/// Decodes to 8-bit single channel. Masks are stored as 8-bit grayscale PNG; other colour types
/// are converted to luma.
pub fn decode_gray(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<GrayImage> {
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
