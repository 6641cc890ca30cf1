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
        // A resumed run may start within the second of an earlier file: never overwrite one.
        let base = format!("events.out.tfevents.{}.{host}", now.as_secs());
        let mut path = dir.join(&base);
        for n in 1.. {
            if !path.exists() {
                break;
            }
            path = dir.join(format!("{base}.{n}"));
        }
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
        self.out.flush()?;
        crate::faults::write_point();
        Ok(())
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
        self.out.flush()?;
        crate::faults::write_point();
        Ok(())
    }
}

/// A record's byte range in its file and its event's step.
type Record = (std::ops::Range<usize>, Option<u64>);

/// Each whole, checksum-valid record of a TFRecord file with its byte range and its event's
/// step; a torn or damaged tail ends the list (the bool says whether one was found).
fn records(bytes: &[u8]) -> (Vec<Record>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else {
            return (out, true);
        };
        let len_bytes: [u8; 8] = head[..8].try_into().expect("8 bytes");
        let len = u64::from_le_bytes(len_bytes);
        let crc_ok =
            u32::from_le_bytes(head[8..12].try_into().expect("4")) == masked_crc(&len_bytes);
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| (at + 12).checked_add(l));
        let Some((data, crc)) = end
            .filter(|_| crc_ok)
            .and_then(|end| Some((bytes.get(at + 12..end)?, bytes.get(end..end + 4)?)))
        else {
            return (out, true);
        };
        if u32::from_le_bytes(crc.try_into().expect("4")) != masked_crc(data) {
            return (out, true);
        }
        let next = at + 12 + data.len() + 4;
        out.push((at..next, event_step(data)));
        at = next;
    }
    (out, false)
}

/// The `step` (field 2) of an encoded `Event`.
fn event_step(mut data: &[u8]) -> Option<u64> {
    fn read_varint(data: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = data.split_first()?;
            *data = rest;
            v |= ((b & 0x7F) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    while !data.is_empty() {
        let key = read_varint(&mut data)?;
        let skip = match (key >> 3, key & 7) {
            (2, 0) => return read_varint(&mut data),
            (_, 0) => {
                read_varint(&mut data)?;
                0
            }
            (_, 1) => 8,
            (_, 5) => 4,
            (_, 2) => read_varint(&mut data)? as usize,
            _ => return None,
        };
        data = data.get(skip..)?;
    }
    None
}

/// The steps of the events in the event files of `dir` (all files, in name order), the
/// file-version header left out.
pub fn event_steps(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events.out.tfevents.") && !n.ends_with(".partial"))
        })
        .collect();
    files.sort();
    let mut steps = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f)?;
        let (all, _) = records(&bytes);
        // The first record of a file is its `file_version` header.
        steps.extend(all.iter().skip(1).filter_map(|(_, s)| *s));
    }
    Ok(steps)
}

/// Removes, from every event file in `dir`, the events after `step` and any torn last record
/// (a run resumed from the checkpoint at `step` logs those steps again). Each changed file is
/// rewritten atomically; files needing no cut are left alone.
pub fn cut_event_files(dir: &Path, step: u64) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        let named = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !named.starts_with("events.out.tfevents.") || named.ends_with(".partial") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let (all, torn) = records(&bytes);
        let keep: Vec<_> = all
            .iter()
            .filter(|(_, s)| s.is_none_or(|s| s <= step))
            .collect();
        if keep.len() == all.len() && !torn {
            continue;
        }
        let mut out = Vec::with_capacity(bytes.len());
        for (range, _) in keep {
            out.extend_from_slice(&bytes[range.clone()]);
        }
        crate::checkpoint::write_atomic(&path, &out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for step in 1..=6 {
            w.scalars(step, &[("loss", step as f64)]).unwrap();
        }
        let path = w.path().to_path_buf();
        drop(w);
        let whole = std::fs::read(&path).unwrap();
        // A kill in the middle of the last record.
        std::fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        cut_event_files(dir.path(), 3).unwrap();
        let (kept, torn) = records(&std::fs::read(&path).unwrap());
        assert!(!torn);
        let steps: Vec<Option<u64>> = kept.iter().map(|(_, s)| *s).collect();
        assert_eq!(steps, [Some(0), Some(1), Some(2), Some(3)]);
        // The kept records are byte for byte the ones written.
        assert_eq!(std::fs::read(&path).unwrap(), whole[..kept[3].0.end]);
        // A second writer in the same second gets its own file.
        let again = EventWriter::create(dir.path()).unwrap();
        assert_ne!(again.path(), path);
    }

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
