//! A minimal TensorBoard event-file writer for scalar metrics and PNG images
//! (`events.out.tfevents.<time>.<host>` in the run directory, read by `tensorboard --logdir`).
//!
//! The format is TFRecord: each record is `len (u64 LE) | masked crc32c(len) | data |
//! masked crc32c(data)`, with `data` an `Event` protocol buffer. Only the few protobuf fields
//! scalars need are encoded, by hand: a dependency on a protobuf stack for three messages would
//! be heavier than this file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise; records are small and written once per logged step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

/// Appends scalar summaries to one event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "troupe".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let mut w = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let e = event(now.as_secs_f64(), 0, |e| {
            field_bytes(3, b"brain.Event:2", e)
        });
        w.record(&e)?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())?;
        Ok(())
    }

    /// Writes `tag = value` scalars at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let e = event(wall_time(), step as i64, |e| {
            let mut summary = Vec::new();
            for (tag, v) in values {
                // Summary.Value { tag = 1 (string), simple_value = 2 (float) }
                let mut value = Vec::new();
                field_bytes(1, tag.as_bytes(), &mut value);
                value.push(0x15); // field 2, 32-bit
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                field_bytes(1, &value, &mut summary);
            }
            field_bytes(5, &summary, e);
        });
        self.record(&e)?;
        self.out.flush()
    }

    /// Writes an encoded PNG (`width` × `height`, RGB) as the image summary `tag` at `step`.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> std::io::Result<()> {
        let e = event(wall_time(), step as i64, |e| {
            // Summary.Image { height = 1, width = 2, colorspace = 3 (varints), encoded = 4 }
            let mut image = Vec::new();
            for (field, v) in [(1u64, height as u64), (2, width as u64), (3, 3)] {
                varint(field << 3, &mut image);
                varint(v, &mut image);
            }
            field_bytes(4, png, &mut image);
            // Summary.Value { tag = 1, image = 4 }
            let mut value = Vec::new();
            field_bytes(1, tag.as_bytes(), &mut value);
            field_bytes(4, &image, &mut value);
            let mut summary = Vec::new();
            field_bytes(1, &value, &mut summary);
            field_bytes(5, &summary, e);
        });
        self.record(&e)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
