//! JPEG decoding with libjpeg-turbo's decoder (through `mozjpeg-sys`, which vendors and
//! compiles its C sources: no system library, no download), configured as Pillow configures it:
//! the accurate integer IDCT (`JDCT_ISLOW`), "fancy" chroma upsampling, libjpeg's own YCbCr →
//! RGB; grayscale expanded to RGB; CMYK and YCCK read as CMYK, inverted as Pillow assumes
//! ("Adobe conventions", `CMYK;I`) and converted with Pillow's `cmyk2rgb`. EXIF orientation is
//! not applied and ICC profiles are ignored, as `Image.open(path).convert("RGB")` does. So the
//! pixels equal the reference's (Pillow's) bit for bit, where a Rust decoder's IDCT and
//! upsampling differ by a few levels on a few percent of values.
//!
//! libjpeg reports fatal errors through a callback that must not return; it raises a panic
//! here (mozjpeg-sys's `C-unwind` ABI), caught by [`crate::error::catch_quietly`] and turned
//! into an error naming the file. Data that ends early is an error too (libjpeg would fill the
//! rest with gray, Pillow refuses it).

use std::ffi::{c_int, c_ulong};

use image::RgbImage;
use mozjpeg_sys::*;

use crate::error::{DataError, Location, Result};
use crate::image_io::DecodeLimits;

/// libjpeg's fatal error handler: formats the message and unwinds out of the C code.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let message = unsafe { message(cinfo) };
    std::panic::panic_any(message);
}

/// Warnings are counted by libjpeg; the one that matters (premature end of data) is checked
/// after decoding. Nothing is printed.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level < 0 {
        let err = unsafe { &mut *cinfo.err };
        if err.num_warnings == 0 || err.msg_code == JWRN_JPEG_EOF as c_int {
            err.last_jpeg_message = err.msg_code;
        }
        err.num_warnings += 1;
    }
}

unsafe fn message(cinfo: &mut jpeg_common_struct) -> String {
    let buffer = [0u8; 80];
    let err = unsafe { &*cinfo.err };
    if let Some(format) = err.format_message {
        unsafe { format(cinfo, &buffer) };
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Decodes a JPEG to 8-bit RGB as Pillow does (see the module docs).
pub fn decode_rgb(bytes: &[u8], at: &Location, limits: DecodeLimits) -> Result<RgbImage> {
    let fail = |why: String| DataError::new(at.clone(), format!("cannot decode JPEG: {why}"));
    crate::error::catch_quietly(|| unsafe { decode(bytes, limits) })
        .map_err(&fail)?
        .map_err(fail)
}

/// The decoder proper; errors as text, fatal libjpeg errors as panics.
unsafe fn decode(bytes: &[u8], limits: DecodeLimits) -> std::result::Result<RgbImage, String> {
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    let mut cinfo: jpeg_decompress_struct = unsafe { std::mem::zeroed() };
    cinfo.common.err = unsafe { jpeg_std_error(&mut err) };
    // Through the pointer libjpeg keeps (the one it will call through).
    let handlers = unsafe { &mut *cinfo.common.err };
    handlers.error_exit = Some(error_exit);
    handlers.emit_message = Some(emit_message);
    unsafe { jpeg_create_decompress(&mut cinfo) };
    // Destroyed on every path, unwinding included.
    struct Guard<'a>(&'a mut jpeg_decompress_struct);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            unsafe { jpeg_destroy_decompress(self.0) };
        }
    }
    let guard = Guard(&mut cinfo);
    let cinfo = &mut *guard.0;
    unsafe { jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong) };
    unsafe { jpeg_read_header(cinfo, 1) };
    let (w, h) = (cinfo.image_width, cinfo.image_height);
    if w > limits.max_side || h > limits.max_side || w as u64 * h as u64 > limits.max_pixels {
        return Err(format!("{w}x{h} is over the size limit"));
    }
    let cmyk = matches!(
        cinfo.jpeg_color_space,
        J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK
    );
    cinfo.out_color_space = if cmyk {
        J_COLOR_SPACE::JCS_CMYK
    } else {
        J_COLOR_SPACE::JCS_RGB
    };
    cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    unsafe { jpeg_start_decompress(cinfo) };
    let channels = cinfo.output_components as usize;
    let (ow, oh) = (cinfo.output_width as usize, cinfo.output_height as usize);
    let mut raw = vec![0u8; ow * oh * channels];
    while (cinfo.output_scanline as usize) < oh {
        let mut row = unsafe {
            raw.as_mut_ptr()
                .add(cinfo.output_scanline as usize * ow * channels)
        };
        if unsafe { jpeg_read_scanlines(cinfo, &mut row, 1) } != 1 {
            return Err("the decoder stopped early".into());
        }
    }
    let eof = unsafe { &*cinfo.common.err }.last_jpeg_message == JWRN_JPEG_EOF as c_int;
    if eof {
        return Err("the data ends early (truncated)".into());
    }
    unsafe { jpeg_finish_decompress(cinfo) };
    let rgb = if cmyk { cmyk_to_rgb(&raw) } else { raw };
    Ok(RgbImage::from_raw(ow as u32, oh as u32, rgb).expect("sized buffer"))
}

/// Pillow's `CMYK;I` (inverted, Adobe conventions) then `cmyk2rgb`:
/// `c' = nk − c·nk/255` with `nk = 255 − k`, its rounded integer division (`MULDIV255`).
fn cmyk_to_rgb(raw: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    raw.chunks_exact(4)
        .flat_map(|p| {
            let [c, m, y, k] = [255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]].map(u32::from);
            let nk = 255 - k;
            [c, m, y].map(|v| (nk - muldiv255(v, nk)) as u8)
        })
        .collect()
}
