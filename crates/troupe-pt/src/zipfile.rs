//! The zip container: reading with the `zip` crate (STORED entries only,
//! zip64 supported by it), and a small hand-written writer, because torch's
//! layout needs every entry's data 64-byte aligned (padding in a local-header
//! extra field, as torch's own writer does) and no data descriptors.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Cursor, Read, Seek, Write};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use crate::materialize::{StorageSource, materialize};
use crate::{ErrorKind, Value, pickle, pickle_write};

/// Largest `data.pkl` we accept; real ones are KBs to a few MB.
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// What `torch.save` pickles first in the pre-1.6 format: protocol 2 and the
/// LONG1 magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
/// Data alignment torch uses (and records in `.storage_alignment`).
const ALIGN: u64 = 64;

pub(crate) fn read_file(path: &Path) -> Result<Value, ErrorKind> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut head = Vec::with_capacity(LEGACY_MAGIC.len());
    (&mut file)
        .take(LEGACY_MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    sniff(&head)?;
    file.rewind()?;
    read_archive(BufReader::with_capacity(1 << 16, file), len)
}

pub(crate) fn read_bytes(bytes: &[u8]) -> Result<Value, ErrorKind> {
    sniff(bytes)?;
    read_archive(Cursor::new(bytes), bytes.len() as u64)
}

/// Recognises what the file is before handing it to the zip reader, so that
/// legacy and non-torch files get a useful message.
fn sniff(head: &[u8]) -> Result<(), ErrorKind> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    if head.is_empty() {
        return Err(ErrorKind::NotCheckpoint("the file is empty".into()));
    }
    if head.starts_with(LEGACY_MAGIC) {
        return Err(ErrorKind::LegacyFormat);
    }
    if head[0] == 0x80 {
        return Err(ErrorKind::NotCheckpoint(
            "a plain pickle file, not the torch.save zip format".into(),
        ));
    }
    if head.starts_with(b"\x93NUMPY") {
        return Err(ErrorKind::NotCheckpoint("a numpy .npy file".into()));
    }
    Err(ErrorKind::NotCheckpoint(
        "the file does not start with a zip header".into(),
    ))
}

fn zip_err(e: zip::result::ZipError) -> ErrorKind {
    match e {
        zip::result::ZipError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            ErrorKind::Zip("the file is truncated".into())
        }
        e => ErrorKind::Zip(e.to_string()),
    }
}

struct Archive<R: Read + Seek> {
    zip: ZipArchive<R>,
    /// The single top-level folder (`<stem>/data.pkl`).
    stem: String,
    /// Archive length, bounding any size a header may claim.
    len: u64,
}

fn read_archive<R: Read + Seek>(reader: R, len: u64) -> Result<Value, ErrorKind> {
    let zip = ZipArchive::new(reader).map_err(zip_err)?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let stems: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .collect();
    let stem = match stems[..] {
        [s] => s.to_owned(),
        [] if names
            .iter()
            .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/")) =>
        {
            return Err(ErrorKind::NotCheckpoint(
                "a TorchScript archive (torch.jit.save), not a torch.save checkpoint".into(),
            ));
        }
        [] => {
            return Err(ErrorKind::NotCheckpoint(
                "the zip has no <folder>/data.pkl entry".into(),
            ));
        }
        _ => {
            return Err(ErrorKind::NotCheckpoint(format!(
                "the zip has several data.pkl entries: {stems:?}"
            )));
        }
    };
    let mut archive = Archive { zip, stem, len };
    let pkl = archive
        .record("data.pkl", MAX_PICKLE_BYTES)?
        .expect("found above");
    let big_endian = match archive.record("byteorder", 16)?.as_deref() {
        None | Some(b"little") => false,
        Some(b"big") => true,
        Some(other) => {
            return Err(ErrorKind::NotCheckpoint(format!(
                "unknown byteorder {:?}",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let unpickled = pickle::unpickle(&pkl)?;
    drop(pkl);
    materialize(unpickled, &mut archive, big_endian)
}

impl<R: Read + Seek> Archive<R> {
    /// Reads `<stem>/<name>` in one copy, or `None` if it does not exist.
    fn record(&mut self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, ErrorKind> {
        let full = format!("{}/{name}", self.stem);
        if self.zip.index_for_name(&full).is_none() {
            return Ok(None);
        }
        let mut entry = self.zip.by_name(&full).map_err(zip_err)?;
        if entry.compression() != CompressionMethod::Stored {
            return Err(ErrorKind::Zip(format!(
                "entry {full} is compressed ({}); torch.save writes uncompressed entries only",
                entry.compression()
            )));
        }
        if entry.encrypted() {
            return Err(ErrorKind::Zip(format!("entry {full} is encrypted")));
        }
        let size = entry.size();
        // A header can claim any size: never allocate more than the file holds.
        let end = entry.data_start().unwrap_or(0).checked_add(size);
        if size > limit || end.is_none_or(|e| e > self.len) || entry.compressed_size() != size {
            return Err(ErrorKind::Zip(format!(
                "entry {full} claims {size} bytes, more than the archive ({} bytes) can hold",
                self.len
            )));
        }
        let size =
            usize::try_from(size).map_err(|_| ErrorKind::Zip(format!("entry {full} too large")))?;
        let mut buf = vec![0u8; size];
        entry.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ErrorKind::Zip(format!("entry {full} is truncated")),
            _ => ErrorKind::Zip(format!("reading entry {full}: {e}")),
        })?;
        Ok(Some(buf))
    }
}

impl<R: Read + Seek> StorageSource for Archive<R> {
    fn load(&mut self, key: &str) -> Result<Vec<u8>, ErrorKind> {
        self.record(&format!("data/{key}"), u64::MAX)?
            .ok_or_else(|| ErrorKind::Storage {
                key: key.to_owned(),
                msg: format!(
                    "record {}/data/{key} is missing from the archive",
                    self.stem
                ),
            })
    }
}

// ---------------------------------------------------------------- writing

/// Where the tensors' bytes come from when writing.
pub(crate) enum TensorData<'a> {
    /// From the tensors in the value.
    Inline,
    /// From this function, asked for tensor `i` (storage key order) when it is written.
    Streamed(&'a mut crate::TensorBytes<'a>),
}

pub(crate) fn write_file(path: &Path, value: &Value, force_zip64: bool) -> Result<(), ErrorKind> {
    write_file_with(path, value, force_zip64, TensorData::Inline)
}

pub(crate) fn write_file_with(
    path: &Path,
    value: &Value,
    force_zip64: bool,
    data: TensorData<'_>,
) -> Result<(), ErrorKind> {
    // torch names the top-level folder after the file; any name is accepted
    // on load, so fall back to "archive" for odd names.
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        })
        .unwrap_or("archive");
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial);
    let result = (|| -> Result<(), ErrorKind> {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(partial)?);
        write_to_with(&mut w, stem, value, force_zip64, data)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(partial, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(partial);
    }
    result
}

pub(crate) fn write_to<W: Write>(
    w: W,
    stem: &str,
    value: &Value,
    force_zip64: bool,
) -> Result<(), ErrorKind> {
    write_to_with(w, stem, value, force_zip64, TensorData::Inline)
}

fn write_to_with<W: Write>(
    w: W,
    stem: &str,
    value: &Value,
    force_zip64: bool,
    mut data: TensorData<'_>,
) -> Result<(), ErrorKind> {
    let inline = matches!(data, TensorData::Inline);
    let (pkl, tensors) = pickle_write::dump(value, inline)?;
    let mut z = ZipWriter {
        w,
        pos: 0,
        entries: Vec::new(),
        force_zip64,
    };
    // Same records and order as torch 2.x.
    z.entry(&format!("{stem}/data.pkl"), &pkl)?;
    z.entry(&format!("{stem}/.format_version"), b"1")?;
    z.entry(
        &format!("{stem}/.storage_alignment"),
        ALIGN.to_string().as_bytes(),
    )?;
    z.entry(&format!("{stem}/byteorder"), b"little")?;
    for (i, t) in tensors.iter().enumerate() {
        let name = format!("{stem}/data/{i}");
        match &mut data {
            TensorData::Inline => z.entry(&name, &t.data)?,
            TensorData::Streamed(fetch) => {
                let bytes = fetch(i, t).map_err(ErrorKind::Tensor)?;
                let want = t.numel() * t.dtype.itemsize();
                if bytes.len() != want {
                    return Err(ErrorKind::Tensor(format!(
                        "tensor {i}: {} bytes given for {want}",
                        bytes.len()
                    )));
                }
                z.entry(&name, &bytes)?;
            }
        }
    }
    z.entry(&format!("{stem}/version"), b"3\n")?;
    z.finish()?;
    Ok(())
}

struct CdEntry {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

struct ZipWriter<W: Write> {
    w: W,
    pos: u64,
    entries: Vec<CdEntry>,
    force_zip64: bool,
}

const U32_MAX: u64 = 0xffff_ffff;
/// DOS date 1980-01-01, time 00:00 (a fixed timestamp keeps output reproducible).
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = (1 << 5) | 1;
/// General purpose flags: bit 11, names are UTF-8.
const FLAGS: u16 = 1 << 11;

impl<W: Write> ZipWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes one STORED entry with its data aligned to [`ALIGN`].
    fn entry(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let name_len =
            u16::try_from(name.len()).map_err(|_| io::Error::other("entry name too long"))?;
        let size = data.len() as u64;
        let crc = crc32fast::hash(data);
        let offset = self.pos;
        let zip64 = self.force_zip64 || size >= U32_MAX;

        let mut extra = Vec::new();
        if zip64 {
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes()); // uncompressed
            extra.extend_from_slice(&size.to_le_bytes()); // compressed
        }
        // Padding field "FB" (torch's id), filled with 'Z' like torch.
        let unpadded_end = offset + 30 + name.len() as u64 + extra.len() as u64 + 4;
        let pad = ((ALIGN - unpadded_end % ALIGN) % ALIGN) as usize;
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.resize(extra.len() + pad, b'Z');

        let size32 = if zip64 { U32_MAX as u32 } else { size as u32 };
        let mut h = Vec::with_capacity(30 + name.len() + extra.len());
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&(if zip64 { 45u16 } else { 20 }).to_le_bytes());
        h.extend_from_slice(&FLAGS.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // STORED
        h.extend_from_slice(&DOS_TIME.to_le_bytes());
        h.extend_from_slice(&DOS_DATE.to_le_bytes());
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&size32.to_le_bytes());
        h.extend_from_slice(&size32.to_le_bytes());
        h.extend_from_slice(&name_len.to_le_bytes());
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        self.put(&h)?;
        debug_assert_eq!(self.pos % ALIGN, 0);
        self.put(data)?;
        self.entries.push(CdEntry {
            name: name.to_owned(),
            crc,
            size,
            offset,
        });
        Ok(())
    }

    /// Writes the central directory and end records (zip64 ones if needed).
    fn finish(mut self) -> io::Result<()> {
        let cd_start = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let big_size = self.force_zip64 || e.size >= U32_MAX;
            let big_offset = self.force_zip64 || e.offset >= U32_MAX;
            let mut extra = Vec::new();
            if big_size || big_offset {
                // Only the fields whose 32-bit slot is saturated, in this order.
                let mut fields = Vec::new();
                if big_size {
                    fields.extend_from_slice(&e.size.to_le_bytes());
                    fields.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_offset {
                    fields.extend_from_slice(&e.offset.to_le_bytes());
                }
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(fields.len() as u16).to_le_bytes());
                extra.extend_from_slice(&fields);
            }
            let version: u16 = if extra.is_empty() { 20 } else { 45 };
            let size32 = if big_size {
                U32_MAX as u32
            } else {
                e.size as u32
            };
            let offset32 = if big_offset {
                U32_MAX as u32
            } else {
                e.offset as u32
            };
            let mut h = Vec::with_capacity(46 + e.name.len() + extra.len());
            h.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            h.extend_from_slice(&version.to_le_bytes()); // made by
            h.extend_from_slice(&version.to_le_bytes()); // needed
            h.extend_from_slice(&FLAGS.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&DOS_TIME.to_le_bytes());
            h.extend_from_slice(&DOS_DATE.to_le_bytes());
            h.extend_from_slice(&e.crc.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // comment length
            h.extend_from_slice(&0u16.to_le_bytes()); // disk number
            h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            h.extend_from_slice(&offset32.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            h.extend_from_slice(&extra);
            self.put(&h)?;
        }
        let cd_size = self.pos - cd_start;
        let count = entries.len() as u64;
        let zip64 =
            self.force_zip64 || count >= 0xffff || cd_start >= U32_MAX || cd_size >= U32_MAX;
        if zip64 {
            let record_start = self.pos;
            let mut r = Vec::with_capacity(56 + 20);
            r.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            r.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
            r.extend_from_slice(&45u16.to_le_bytes());
            r.extend_from_slice(&45u16.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&cd_size.to_le_bytes());
            r.extend_from_slice(&cd_start.to_le_bytes());
            // Locator.
            r.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&record_start.to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            self.put(&r)?;
        }
        let count16 = if zip64 { 0xffff } else { count as u16 };
        let mut r = Vec::with_capacity(22);
        r.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes());
        r.extend_from_slice(&count16.to_le_bytes());
        r.extend_from_slice(&count16.to_le_bytes());
        r.extend_from_slice(
            &(if zip64 {
                U32_MAX as u32
            } else {
                cd_size as u32
            })
            .to_le_bytes(),
        );
        r.extend_from_slice(
            &(if zip64 {
                U32_MAX as u32
            } else {
                cd_start as u32
            })
            .to_le_bytes(),
        );
        r.extend_from_slice(&0u16.to_le_bytes());
        self.put(&r)?;
        self.w.flush()
    }
}
