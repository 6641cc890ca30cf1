//! `troupe data pack`: a folder of images plus a JSONL manifest → shards.
//!
//! One manifest line per image (paths relative to the manifest's folder):
//! ```json
//! {"image": "img/0001.jpg", "caption": "two friends at a cafe", "id": "0001",
//!  "pose": "pose/0001.png",
//!  "characters": [{"embedding": "emb/0001_0.npy", "keypoints": [[x, y], ...5], "mask": "mask/0001_0.png"}]}
//! ```
//! `embedding` is 512 numbers inline or a `.npy` file (float32/float64, shape (512,) or (1, 512));
//! `keypoints` are 5 (x, y) pairs or 10 numbers in image pixels; `id` defaults to the image path;
//! `pose` is optional. A character without `embedding`/`keypoints` gets them from an
//! [`IdentityProvider`] (a face detector + recogniser) when one is given, else the line fails. Every row is fully validated (as `troupe data check` does) before it is
//! written; image bytes are stored as given, masks as 8-bit grayscale PNG. Rows are written in
//! a seeded random order ([`shuffle_rows`]), not in line order.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use serde::Deserialize;

use crate::check::check_sample;
use crate::error::{DataError, Location, Result};
use crate::image_io::{DecodeLimits, decode_gray, encode_png_gray, probe};
use crate::rng::{KeyedRng, Purpose};
use crate::schema::{Character, EMBEDDING_DIM, EncodedImage, Sample};
use crate::shard::{ShardInfo, ShardWriter, ShardWriterOptions};

/// One character before packing.
#[derive(Debug, Clone)]
pub struct CharacterInput {
    /// Identity embedding (512 floats, unit norm).
    pub embedding: Vec<f32>,
    /// 5 (x, y) keypoints in image pixels, flattened.
    pub keypoints: Vec<f32>,
    /// The character's mask at image size.
    pub mask: GrayImage,
}

/// Builds a shard row and runs every check on it. Masks whose maximum is 1 (0/1 label images)
/// are scaled to 0/255, since the recipe reads masks as 8-bit opacity.
pub fn build_sample(
    id: String,
    image: EncodedImage,
    caption: String,
    characters: Vec<CharacterInput>,
    pose: Option<EncodedImage>,
    at: &Location,
    limits: DecodeLimits,
) -> std::result::Result<Sample, Vec<DataError>> {
    let (width, height) = probe(&image.bytes, &at.field("image"), limits).map_err(|e| vec![e])?;
    let characters = characters
        .into_iter()
        .map(|mut c| {
            if c.mask.iter().all(|&v| v <= 1) {
                c.mask.iter_mut().for_each(|v| *v *= 255);
            }
            let bbox =
                crate::ops::nonzero_bbox(&c.mask).map_or([0; 4], |b| [b.x0, b.y0, b.x1, b.y1]);
            Character {
                embedding: c.embedding,
                keypoints: c.keypoints,
                mask: EncodedImage {
                    bytes: encode_png_gray(&c.mask),
                    path: None,
                },
                bbox,
            }
        })
        .collect();
    let sample = Sample {
        id,
        image,
        width,
        height,
        caption,
        characters,
        pose,
    };
    let errors = check_sample(&sample, at, limits);
    if errors.is_empty() {
        Ok(sample)
    } else {
        Err(errors)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    image: String,
    caption: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    pose: Option<String>,
    characters: Vec<ManifestCharacter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestCharacter {
    #[serde(default)]
    embedding: Option<NumbersOrFile>,
    #[serde(default)]
    keypoints: Option<Keypoints>,
    mask: String,
}

/// An identity: embedding (512 floats, unit norm) and 5 face keypoints (flattened, image
/// pixels), or why there is none.
pub type Identity = std::result::Result<(Vec<f32>, Vec<f32>), String>;

/// Computes characters' identities when their manifest line has none (`troupe data pack
/// --face-detector … --face-recognizer …`).
pub trait IdentityProvider {
    /// The identity of each character that a mask of `masks` marks in `image` (one result per
    /// mask, in order; the image is analysed once).
    fn identities(&self, image: &RgbImage, masks: &[&GrayImage]) -> Vec<Identity>;
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumbersOrFile {
    Inline(Vec<f32>),
    File(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Keypoints {
    Pairs(Vec<[f32; 2]>),
    Flat(Vec<f32>),
}

/// The character field of a manifest line whose value has the wrong form, and what it should
/// be (serde names no field for a value that fits no variant of an untagged enum).
fn bad_manifest_field(line: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    for (i, c) in v.get("characters")?.as_array()?.iter().enumerate() {
        if let Some(e) = c.get("embedding").filter(|e| !e.is_null())
            && serde_json::from_value::<NumbersOrFile>(e.clone()).is_err()
        {
            return Some((
                format!("characters[{i}].embedding"),
                format!(
                    "expected a list of {EMBEDDING_DIM} numbers or the path of a .npy file, got {e}"
                ),
            ));
        }
        if let Some(k) = c.get("keypoints").filter(|k| !k.is_null())
            && serde_json::from_value::<Keypoints>(k.clone()).is_err()
        {
            return Some((
                format!("characters[{i}].keypoints"),
                format!("expected five [x, y] pairs or 10 numbers, got {k}"),
            ));
        }
    }
    None
}

/// What to do with a manifest line that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadLine {
    /// Stop, remove the shards written so far, report the line (default).
    #[default]
    Fail,
    /// Leave the line out and report it.
    Skip,
}

/// Outcome of packing.
#[derive(Debug)]
pub struct PackReport {
    /// Shards written.
    pub shards: Vec<ShardInfo>,
    /// Lines left out (with [`OnBadLine::Skip`]), each problem listed.
    pub skipped: Vec<DataError>,
    /// Lines packed.
    pub rows: u64,
    /// Things changed on the way in that the user should know of (e.g. a mask resized to
    /// its image), each naming its line or entry.
    pub notes: Vec<DataError>,
}

/// Writes shards from samples produced by `next` (one call per input item, `None` at the end).
/// On failure with [`OnBadLine::Fail`] the shards of this run are removed: inputs stay untouched
/// and no half-packed dataset is left behind.
pub fn write_shards(
    out: &Path,
    options: ShardWriterOptions,
    on_bad: OnBadLine,
    mut next: impl FnMut() -> Option<std::result::Result<Sample, Vec<DataError>>>,
) -> std::result::Result<PackReport, Vec<DataError>> {
    let mut writer = ShardWriter::new(out, options).map_err(|e| vec![e])?;
    let mut skipped = Vec::new();
    let mut rows = 0;
    let fail = |writer: ShardWriter, errors: Vec<DataError>| {
        if let Ok(done) = writer.finish() {
            for s in done {
                let _ = std::fs::remove_file(&s.path);
            }
        }
        errors
    };
    while let Some(item) = next() {
        match item {
            Ok(sample) => {
                if let Err(e) = writer.push(sample) {
                    return Err(fail(writer, vec![e]));
                }
                rows += 1;
            }
            Err(errors) if on_bad == OnBadLine::Skip => skipped.extend(errors),
            Err(errors) => return Err(fail(writer, errors)),
        }
    }
    let shards = writer.finish().map_err(|e| vec![e])?;
    Ok(PackReport {
        shards,
        skipped,
        rows,
        notes: Vec::new(),
    })
}

/// Puts rows in the order `pack` and `import-storymaker` write them: a permutation of the
/// input drawn from `seed` (the same input and seed give the same shards, byte for byte).
///
/// Inputs are often sorted: StoryMaker's index lists its entries by person count, manifests
/// by source. The loader only shuffles shards, row groups inside a shard and windows of
/// `shuffle_window` rows, so rows written in input order would reach training as long runs of
/// batches of one person count, where the reference shuffles its whole list every epoch.
/// Written in a random order, every window of rows is a fair sample of the dataset.
pub fn shuffle_rows<T>(seed: u64, rows: &mut [T]) {
    KeyedRng::new(seed, Purpose::RowOrder, 0, 0).shuffle(rows);
}

/// Writes `items` (given in input order) in the order of [`shuffle_rows`], each turned into a
/// row by `build`; rows left out (with [`OnBadLine::Skip`]) are reported in input order,
/// whatever order they were met in. With [`OnBadLine::Fail`] the first bad item met stops the
/// run (as [`write_shards`]).
pub(crate) fn write_shuffled<T>(
    out: &Path,
    options: ShardWriterOptions,
    on_bad: OnBadLine,
    seed: u64,
    items: Vec<T>,
    mut build: impl FnMut(T) -> std::result::Result<Sample, Vec<DataError>>,
) -> std::result::Result<PackReport, Vec<DataError>> {
    let mut items: Vec<(usize, T)> = items.into_iter().enumerate().collect();
    shuffle_rows(seed, &mut items);
    let mut items = items.into_iter();
    let mut skipped = Vec::new();
    let mut report = write_shards(out, options, on_bad, || {
        loop {
            let (position, item) = items.next()?;
            match build(item) {
                Err(errors) if on_bad == OnBadLine::Skip => skipped.push((position, errors)),
                result => return Some(result),
            }
        }
    })?;
    skipped.sort_by_key(|(position, _)| *position);
    report.skipped = skipped.into_iter().flat_map(|(_, e)| e).collect();
    Ok(report)
}

/// How to pack.
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    /// Shard layout.
    pub shards: ShardWriterOptions,
    /// Fail on a bad line, or skip it (reported).
    pub on_bad: OnBadLine,
    /// Image size limits.
    pub limits: DecodeLimits,
    /// Seed of the order rows are written in ([`shuffle_rows`]; default 0).
    pub seed: u64,
}

/// Packs a JSONL manifest into shards in `out` (every character's identity given in it), rows
/// in the order of seed 0.
pub fn pack_manifest(
    manifest: &Path,
    out: &Path,
    options: ShardWriterOptions,
    on_bad: OnBadLine,
    limits: DecodeLimits,
) -> std::result::Result<PackReport, Vec<DataError>> {
    let options = PackOptions {
        shards: options,
        on_bad,
        limits,
        seed: 0,
    };
    pack_manifest_with(manifest, out, &options, None, &mut |_, _| {})
}

/// Told `(done, total)` items (lines, entries, rows) as a long data command proceeds.
pub type OnProgress<'a> = dyn FnMut(u64, u64) + 'a;

/// [`pack_manifest`] with all options, `identity` computing the identity of characters that
/// lack one, and `progress` told the lines done of the manifest's non-empty lines.
///
/// Lines are written in the order of [`shuffle_rows`]; every problem names its line's number
/// in the manifest. Ids must be unique: a line whose id an earlier line of the manifest already
/// has is refused, whichever of the two is met first and whether or not the earlier one is
/// packed, so the outcome does not depend on the seed.
pub fn pack_manifest_with(
    manifest: &Path,
    out: &Path,
    options: &PackOptions,
    identity: Option<&dyn IdentityProvider>,
    progress: &mut OnProgress<'_>,
) -> std::result::Result<PackReport, Vec<DataError>> {
    let lines = manifest_lines(manifest).map_err(|e| vec![e])?;
    let (total, mut done) = (lines.len() as u64, 0u64);
    let mut file = std::fs::File::open(manifest).map_err(|e| vec![DataError::io(manifest, &e)])?;
    let base = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
    let (shards, on_bad) = (options.shards.clone(), options.on_bad);
    write_shuffled(out, shards, on_bad, options.seed, lines, |line| {
        let at = Location::line(manifest, line.number);
        let sample = match &line.same_id_as {
            // Ids are keys (resume, references, evaluation protocols): one line each.
            Some((id, first)) => Err(vec![DataError::new(
                at.field("id"),
                format!(
                    "duplicate id `{id}`: also {}",
                    Location::line(manifest, *first)
                ),
            )]),
            None => match line.read(&mut file) {
                Ok(text) => sample_from_line(&text, &base, &at, options.limits, identity),
                Err(e) => Err(vec![DataError::new(at, format!("cannot read line: {e}"))]),
            },
        };
        done += 1;
        progress(done, total);
        sample
    })
}

/// A non-blank manifest line: where it is, not what it says (lines are read again when their
/// turn comes, so a manifest of a million rows with inline embeddings is not held in memory).
struct ManifestLine {
    /// Line number, one-based.
    number: u64,
    /// Byte offset of the line in the manifest.
    offset: u64,
    /// Bytes, without the line break.
    len: usize,
    /// The line's id and the number of an earlier line with that id.
    same_id_as: Option<(String, u64)>,
}

impl ManifestLine {
    fn read(&self, file: &mut std::fs::File) -> std::io::Result<String> {
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = vec![0; self.len];
        file.read_exact(&mut bytes)?;
        String::from_utf8(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            )
        })
    }
}

/// The manifest's non-blank lines in file order, each with the earlier line whose id it repeats
/// (ids are found in file order, so which line of two is the duplicate does not depend on the
/// order lines are packed in).
fn manifest_lines(manifest: &Path) -> Result<Vec<ManifestLine>> {
    /// A line's id as [`sample_from_line`] finds it: `id`, else `image`.
    #[derive(Deserialize)]
    struct Keys {
        id: Option<String>,
        image: Option<String>,
    }
    let file = std::fs::File::open(manifest).map_err(|e| DataError::io(manifest, &e))?;
    let mut reader = BufReader::new(file);
    let (mut lines, mut ids) = (Vec::new(), HashMap::<String, u64>::new());
    let (mut buf, mut offset, mut number) = (Vec::new(), 0u64, 0u64);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| {
            DataError::new(
                Location::line(manifest, number + 1),
                format!("cannot read line: {e}"),
            )
        })?;
        if n == 0 {
            return Ok(lines);
        }
        number += 1;
        let start = offset;
        offset += n as u64;
        // Line breaks as `BufRead::lines` strips them: `\n` or `\r\n`.
        let text = match buf.strip_suffix(b"\n") {
            Some(t) => t.strip_suffix(b"\r").unwrap_or(t),
            None => &buf[..],
        };
        if std::str::from_utf8(text).is_ok_and(|t| t.trim().is_empty()) {
            continue;
        }
        let id = serde_json::from_slice::<Keys>(text)
            .ok()
            .and_then(|k| k.id.or(k.image));
        let same_id_as = id.and_then(|id| match ids.entry(id) {
            MapEntry::Occupied(e) => Some((e.key().clone(), *e.get())),
            MapEntry::Vacant(e) => {
                e.insert(number);
                None
            }
        });
        lines.push(ManifestLine {
            number,
            offset: start,
            len: text.len(),
            same_id_as,
        });
    }
}

fn sample_from_line(
    line: &str,
    base: &Path,
    at: &Location,
    limits: DecodeLimits,
    identity: Option<&dyn IdentityProvider>,
) -> std::result::Result<Sample, Vec<DataError>> {
    let one = |e: DataError| vec![e];
    let entry: ManifestEntry = serde_json::from_str(line).map_err(|e| {
        let (field, what) = bad_manifest_field(line).unwrap_or_default();
        let at = if field.is_empty() {
            at.clone()
        } else {
            at.field(field)
        };
        let what = if what.is_empty() { e.to_string() } else { what };
        one(DataError::new(
            at,
            format!("not a valid manifest line: {what}"),
        ))
    })?;
    let read = |rel: &str, field: &str| -> Result<(PathBuf, Vec<u8>)> {
        let path = base.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| {
            DataError::new(
                at.field(field),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Ok((path, bytes))
    };
    let (_, image_bytes) = read(&entry.image, "image").map_err(one)?;
    let image = EncodedImage {
        bytes: image_bytes,
        path: Some(entry.image.clone()),
    };
    let pose = match &entry.pose {
        None => None,
        Some(p) => Some(EncodedImage {
            bytes: read(p, "pose").map_err(one)?.1,
            path: Some(p.clone()),
        }),
    };
    // Given identities as they are; missing ones, all characters of the image at once.
    let mut given = Vec::new();
    for (i, c) in entry.characters.iter().enumerate() {
        let field = |name: &str| format!("characters[{i}].{name}");
        let (_, mask_bytes) = read(&c.mask, &field("mask")).map_err(one)?;
        let mask = decode_gray(&mask_bytes, &at.field(field("mask")), limits).map_err(one)?;
        let embedding = match &c.embedding {
            Some(NumbersOrFile::Inline(v)) => Some(v.clone()),
            Some(NumbersOrFile::File(rel)) => {
                let (path, bytes) = read(rel, &field("embedding")).map_err(one)?;
                Some(read_embedding_npy(&bytes).map_err(|m| {
                    one(DataError::new(
                        at.field(field("embedding")),
                        format!("{}: {m}", path.display()),
                    ))
                })?)
            }
            None => None,
        };
        let keypoints = c.keypoints.as_ref().map(|k| match k {
            Keypoints::Pairs(p) => p.iter().flatten().copied().collect(),
            Keypoints::Flat(v) => v.clone(),
        });
        given.push((mask, embedding, keypoints));
    }
    let missing: Vec<usize> = (0..given.len())
        .filter(|&i| given[i].1.is_none() || given[i].2.is_none())
        .collect();
    let mut computed = vec![None; given.len()];
    if let Some(&first) = missing.first() {
        let what = if given[first].1.is_none() {
            "embedding"
        } else {
            "keypoints"
        };
        let Some(provider) = identity else {
            return Err(one(DataError::new(
                at.field(format!("characters[{first}].{what}")),
                "missing (give it in the manifest, or pass --face-detector and --face-recognizer to compute it)",
            )));
        };
        let img =
            crate::image_io::decode_rgb(&image.bytes, &at.field("image"), limits).map_err(one)?;
        let masks: Vec<&GrayImage> = missing.iter().map(|&i| &given[i].0).collect();
        for (&i, result) in missing.iter().zip(provider.identities(&img, &masks)) {
            let what = if given[i].1.is_none() {
                "embedding"
            } else {
                "keypoints"
            };
            let field = at.field(format!("characters[{i}].{what}"));
            computed[i] = Some(result.map_err(|m| one(DataError::new(field, m)))?);
        }
    }
    let characters = given
        .into_iter()
        .zip(computed)
        .map(|((mask, e, k), c)| {
            let (ce, ck) = c.unzip();
            CharacterInput {
                embedding: e.or(ce).unwrap_or_default(),
                keypoints: k.or(ck).unwrap_or_default(),
                mask,
            }
        })
        .collect();
    let id = entry.id.clone().unwrap_or_else(|| entry.image.clone());
    build_sample(id, image, entry.caption, characters, pose, at, limits)
}

/// Reads an ArcFace embedding saved with NumPy: exactly 512 finite float32/float64 values,
/// shape `(512,)` or `(1, 512)`, nothing after the data.
pub fn read_embedding_npy(bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let (shape, values) = read_npy_f32(bytes)?;
    if !(shape == [EMBEDDING_DIM] || shape == [1, EMBEDDING_DIM]) {
        return Err(format!(
            "shape {shape:?}: an embedding is ({EMBEDDING_DIM},) or (1, {EMBEDDING_DIM})"
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {}, not a finite number", values[i]));
    }
    Ok(values)
}

/// Reads a NumPy `.npy` array of float32 or float64 (little-endian, C order) as its shape and
/// `f32` values. The data must be exactly what the shape says (no missing or trailing bytes).
pub fn read_npy_f32(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = start
        .checked_add(header_len)
        .and_then(|end| bytes.get(start..end))
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    if header.contains("'fortran_order': True") {
        return Err(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let descr = header
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .ok_or("no dtype in the .npy header")?;
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or("no shape in the .npy header")?;
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| format!("bad shape entry `{d}` in the .npy header"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("the .npy shape overflows")?;
    let data = &bytes[start + header_len..];
    let size = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "dtype `{other}` is not supported; use float32 or float64"
            ));
        }
    };
    if Some(data.len()) != count.checked_mul(size) {
        return Err(format!(
            "the data is {} bytes, the header's shape {shape:?} of {descr} needs {}",
            data.len(),
            count.saturating_mul(size)
        ));
    }
    let values = match size {
        4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
    };
    Ok((shape, values))
}
