//! `troupe data import-storymaker`: StoryMaker's reference dataset layout → shards.
//!
//! The layout (reference `mp_dataset.py`): a JSON index keyed by person count,
//! `{"1": [entry, …], "2": […], "3": […]}`, each entry `[image, pose, mask, caption, num_persons,
//! faceid_dir]` with paths relative to the data root (the reference opens them from its working
//! directory: `examples/` for its own `examples/datasets/test.json`); a colour-coded mask where
//! character 0/1/2 is pure blue/green/red in RGB, resized to the image as the reference does
//! (Pillow's default bicubic on the RGB mask) and then matched exactly (`cv2.inRange` with equal
//! bounds); `faceid_dir/{i}.bin` PyTorch files `{'id': (1, 512) f32, 'kps': (5, 2) f32}` with
//! keypoints relative to character i's crop (the bounding box of its 7×7-dilated, 5×5-blurred
//! mask, `crop_refimg` → `bounding_rectangle`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{DataError, Location, Result};
use crate::image_io::{DecodeLimits, decode_rgb, probe, same_aspect};
use crate::ops::{Filter, LibraryVersions, Resizer, color_masks, resize_rgb};
use crate::pack::{CharacterInput, OnBadLine, OnProgress, PackReport, build_sample, write_shards};
use crate::recipe::soft_mask;
use crate::schema::{EMBEDDING_DIM, EncodedImage, MAX_CHARACTERS, Sample};
use crate::shard::ShardWriterOptions;

/// Mask colour of character slot i, in RGB (the reference lists them in BGR: red, green, blue).
pub const SLOT_COLOURS: [[u8; 3]; MAX_CHARACTERS] = [[0, 0, 255], [0, 255, 0], [255, 0, 0]];

/// The reference's dilation before cropping, which defines the crop keypoints are relative to.
const CROP_DILATION: u32 = 7;

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The folder the index's paths are relative to (`None`: the index's own folder).
    pub root: Option<PathBuf>,
    /// Shard layout.
    pub shards: ShardWriterOptions,
    /// Fail on a bad entry, or skip it (reported).
    pub on_bad: OnBadLine,
    /// Image size limits.
    pub limits: DecodeLimits,
    /// Whose Pillow arithmetic the mask resize reproduces.
    pub versions: LibraryVersions,
}

/// Imports a StoryMaker index into shards in `out`.
pub fn import_storymaker(
    index: &Path,
    out: &Path,
    options: &ImportOptions,
) -> std::result::Result<PackReport, Vec<DataError>> {
    import_storymaker_with(index, out, options, &mut |_, _| {})
}

/// [`import_storymaker`], telling `progress` the entries done of the index's.
pub fn import_storymaker_with(
    index: &Path,
    out: &Path,
    options: &ImportOptions,
    progress: &mut OnProgress<'_>,
) -> std::result::Result<PackReport, Vec<DataError>> {
    let entries = read_index(index).map_err(|e| vec![e])?;
    let (total, mut done) = (entries.len() as u64, 0u64);
    let base = match &options.root {
        Some(root) => root.clone(),
        None => index.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    let mut iter = entries.into_iter();
    let mut notes = Vec::new();
    // Ids (image file stems) are keys: two images with one stem would collide.
    let mut ids: HashMap<String, Location> = HashMap::new();
    let mut report = write_shards(out, options.shards.clone(), options.on_bad, || {
        let (at, persons, entry) = iter.next()?;
        let sample = import_entry(&entry, persons, &base, &at, options, &mut notes);
        done += 1;
        progress(done, total);
        if let Ok(s) = &sample {
            if let Some(first) = ids.get(&s.id) {
                return Some(Err(vec![DataError::new(
                    at.clone(),
                    format!(
                        "duplicate id `{}` (the image's file stem): also {first}",
                        s.id
                    ),
                )]));
            }
            ids.insert(s.id.clone(), at.clone());
        }
        Some(sample)
    })?;
    report.notes = notes;
    Ok(report)
}

/// One index entry with the location used in its error messages.
type Entry = Vec<serde_json::Value>;

/// The index's entries: location, person count (the key they are listed under), values.
fn read_index(index: &Path) -> Result<Vec<(Location, usize, Entry)>> {
    let text = std::fs::read_to_string(index).map_err(|e| DataError::io(index, &e))?;
    let root: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DataError::new(Location::file(index), format!("not valid JSON: {e}")))?;
    let map = root.as_object().ok_or_else(|| {
        DataError::new(
            Location::file(index),
            "expected an object keyed by person count, like {\"1\": [...], \"2\": [...]}",
        )
    })?;
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let persons = key
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_CHARACTERS).contains(n))
            .ok_or_else(|| {
                DataError::new(
                    Location::file(index).field(format!("\"{key}\"")),
                    format!("index keys are person counts \"1\" to \"{MAX_CHARACTERS}\", found \"{key}\""),
                )
            })?;
        let list = map[key].as_array().ok_or_else(|| {
            DataError::new(
                Location::file(index).field(format!("\"{key}\"")),
                "expected a list of entries",
            )
        })?;
        for (j, entry) in list.iter().enumerate() {
            let at = Location::entry(index, out.len() as u64).field(format!("\"{key}\"[{j}]"));
            let entry = entry.as_array().cloned().ok_or_else(|| {
                DataError::new(
                    at.clone(),
                    "expected [image, pose, mask, caption, num_persons, faceid_dir]",
                )
            })?;
            out.push((at, persons, entry));
        }
    }
    Ok(out)
}

fn import_entry(
    entry: &Entry,
    persons: usize,
    base: &Path,
    at: &Location,
    options: &ImportOptions,
    notes: &mut Vec<DataError>,
) -> std::result::Result<Sample, Vec<DataError>> {
    let limits = options.limits;
    let one = |e: DataError| vec![e];
    let field_at = |name: &str| {
        let prefix = at.field.clone().unwrap_or_default();
        at.field(format!("{prefix}.{name}"))
    };
    if entry.len() != 6 {
        return Err(one(DataError::new(
            at.clone(),
            format!(
                "expected 6 values [image, pose, mask, caption, num_persons, faceid_dir], found {}",
                entry.len()
            ),
        )));
    }
    // Structure first: a wrong count is reported before any file is read.
    let n = entry[4]
        .as_u64()
        .filter(|n| (1..=MAX_CHARACTERS as u64).contains(n))
        .ok_or_else(|| {
            one(DataError::new(
                field_at("num_persons"),
                format!(
                    "expected an integer from 1 to {MAX_CHARACTERS}, found {}",
                    entry[4]
                ),
            ))
        })? as usize;
    if n != persons {
        return Err(one(DataError::new(
            field_at("num_persons"),
            format!("is {n}, but the entry is listed under \"{persons}\""),
        )));
    }
    let text = |i: usize, name: &str| -> Result<Option<String>> {
        match &entry[i] {
            serde_json::Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
            serde_json::Value::String(_) | serde_json::Value::Null => Ok(None),
            other => Err(DataError::new(
                field_at(name),
                format!("expected a string, found {other}"),
            )),
        }
    };
    let required = |i: usize, name: &str| -> Result<String> {
        text(i, name)?.ok_or_else(|| DataError::new(field_at(name), "missing"))
    };
    let read = |rel: &str, name: &str| -> Result<Vec<u8>> {
        let path = base.join(rel);
        std::fs::read(&path).map_err(|e| {
            DataError::new(
                field_at(name),
                format!(
                    "cannot read {}: {e}{}",
                    path.display(),
                    root_hint(base, rel)
                ),
            )
        })
    };
    let image_rel = required(0, "image").map_err(one)?;
    let image_bytes = read(&image_rel, "image").map_err(one)?;
    let (w, h) = probe(&image_bytes, &field_at("image"), limits).map_err(one)?;
    let pose = match text(1, "pose").map_err(one)? {
        None => None,
        Some(rel) => Some(EncodedImage {
            bytes: read(&rel, "pose").map_err(one)?,
            path: Some(rel),
        }),
    };
    let mask_rel = required(2, "mask").map_err(one)?;
    let mask_rgb = decode_rgb(
        &read(&mask_rel, "mask").map_err(one)?,
        &field_at("mask"),
        limits,
    )
    .map_err(one)?;
    let (mw, mh) = mask_rgb.dimensions();
    let mask_rgb: RgbImage = if (mw, mh) == (w, h) {
        mask_rgb
    } else if same_aspect((mw, mh), (w, h)) {
        // Resized exactly as the reference does (`Image.open(mask).convert("RGB").resize((w,
        // h))`: Pillow's default, bicubic); the colours matched afterwards are exact, so the
        // mixed colours at the edges belong to no character, there as here. And said.
        notes.push(DataError::new(
            field_at("mask"),
            format!(
                "{mask_rel} is {mw}x{mh}, the image {w}x{h}: resized to the image (bicubic, as the reference)"
            ),
        ));
        resize_rgb(
            &mut Resizer::with_order(options.versions.pass_order),
            &mask_rgb,
            w,
            h,
            Filter::CatmullRom,
        )
        .map_err(|e| one(DataError::new(field_at("mask"), e.to_string())))?
    } else {
        return Err(one(DataError::new(
            field_at("mask"),
            format!(
                "{mask_rel} is {mw}x{mh}, the image is {w}x{h}: not the same shape (transposed or another image's mask?)"
            ),
        )));
    };
    let caption = match &entry[3] {
        serde_json::Value::String(s) => s.clone(),
        other => {
            return Err(one(DataError::new(
                field_at("caption"),
                format!("expected a string, found {other}"),
            )));
        }
    };
    let faceid_dir = base.join(required(5, "faceid_dir").map_err(one)?);

    let mut characters = Vec::with_capacity(n);
    for (i, ((mask, _), colour)) in color_masks(&mask_rgb, &SLOT_COLOURS[..n])
        .into_iter()
        .zip(SLOT_COLOURS)
        .enumerate()
    {
        let Some(crop) = soft_mask(&mask, CROP_DILATION) else {
            return Err(one(DataError::new(
                field_at("mask"),
                format!("character {i} has no pixel of its colour {colour:?} (RGB) in {mask_rel}"),
            )));
        };
        let (embedding, kps) = read_faceid(&faceid_dir.join(format!("{i}.bin"))).map_err(one)?;
        let [x0, y0, _, _] = crop.bbox;
        let keypoints = kps
            .chunks_exact(2)
            .flat_map(|p| [p[0] + x0 as f32, p[1] + y0 as f32])
            .collect();
        characters.push(CharacterInput {
            embedding,
            keypoints,
            mask,
        });
    }
    let id = Path::new(&image_rel)
        .file_stem()
        .map_or(image_rel.clone(), |s| s.to_string_lossy().into_owned());
    build_sample(
        id,
        EncodedImage {
            bytes: image_bytes,
            path: Some(image_rel),
        },
        caption,
        characters,
        pose,
        at,
        limits,
    )
}

/// When `rel` is not under `base` but is under one of its parents: which `--root` would work
/// (the reference reads index paths from its working directory, often a parent of the index).
fn root_hint(base: &Path, rel: &str) -> String {
    base.ancestors()
        .skip(1)
        .find(|dir| dir.join(rel).exists())
        .map(|dir| {
            let shown = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            format!(
                " (it exists under {}: pass `--root {}`, the folder the index's paths are relative to)",
                shown.display(),
                shown.display()
            )
        })
        .unwrap_or_default()
}

/// Reads one `faceid_dir/{i}.bin`: the identity embedding (512) and keypoints (10, crop-relative).
pub fn read_faceid(path: &PathBuf) -> Result<(Vec<f32>, Vec<f32>)> {
    let at = Location::file(path);
    let value =
        troupe_pt::read_file(path).map_err(|e| DataError::new(at.clone(), e.to_string()))?;
    let tensor = |key: &str, len: usize| -> Result<Vec<f32>> {
        let t = value.get_tensor(key).ok_or_else(|| {
            DataError::new(
                at.field(key),
                format!("no tensor `{key}` (found a {} )", value.type_name()),
            )
        })?;
        let v = t
            .to_f32_vec()
            .map_err(|e| DataError::new(at.field(key), e.to_string()))?;
        if v.len() != len {
            return Err(DataError::new(
                at.field(key),
                format!("expected {len} values, found shape {:?}", t.shape),
            ));
        }
        Ok(v)
    };
    let (id, kps) = (tensor("id", EMBEDDING_DIM)?, tensor("kps", 10)?);
    for (key, values) in [("id", &id), ("kps", &kps)] {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(DataError::new(
                at.field(key),
                format!("value {i} is {}, not a finite number", values[i]),
            ));
        }
    }
    Ok((id, kps))
}
