//! Writing generated images: PNG files and JSON sidecars written atomically (temporary file,
//! fsync, rename: a reader never sees half a file), and contact-sheet grids.

use std::io::Write;
use std::path::Path;

use image::RgbImage;

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// PNG bytes of an RGB image.
pub fn png(img: &RgbImage) -> Vec<u8> {
    troupe_data::image_io::encode_png_rgb(img)
}

/// Images laid out `columns` per row on a white sheet with a 2-pixel gap; cells take the
/// largest image's size.
pub fn contact_sheet(images: &[RgbImage], columns: usize) -> RgbImage {
    const GAP: u32 = 2;
    let columns = columns.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(columns).max(1);
    let cw = images.iter().map(RgbImage::width).max().unwrap_or(1);
    let ch = images.iter().map(RgbImage::height).max().unwrap_or(1);
    let w = columns as u32 * (cw + GAP) + GAP;
    let h = rows as u32 * (ch + GAP) + GAP;
    let mut sheet = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let x = GAP + (i % columns) as u32 * (cw + GAP);
        let y = GAP + (i / columns) as u32 * (ch + GAP);
        image::imageops::replace(&mut sheet, img, x as i64, y as i64);
    }
    sheet
}
