//! `troupe data check`: validates every row of every shard and reports each problem with its
//! file, row and field. `troupe data stats`: what is in a dataset, from metadata and captions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Location, Result};
use crate::image_io::{DecodeLimits, check_pose_shape, decode_gray, decode_rgb};
use crate::pack::OnProgress;
use crate::schema::{self, Sample, col};
use crate::shard::ShardReader;

/// Every problem of one row, checking what needs decoding too: the image decodes at the stated
/// size; each mask decodes at the image size, is non-empty and its bounding box matches `bbox`;
/// the pose decodes. (Field-level checks come from [`schema::validate_fields`].)
pub fn check_sample(sample: &Sample, at: &Location, limits: DecodeLimits) -> Vec<DataError> {
    let mut errors = schema::validate_fields(sample, at);
    let size = match decode_rgb(&sample.image.bytes, &at.field(col::IMAGE), limits) {
        Ok(img) => {
            if img.dimensions() != (sample.width, sample.height) {
                errors.push(DataError::new(
                    at.field("width/height"),
                    format!(
                        "the columns say {}x{} but the image decodes to {}x{}",
                        sample.width,
                        sample.height,
                        img.width(),
                        img.height()
                    ),
                ));
            }
            Some(img.dimensions())
        }
        Err(e) => {
            errors.push(e);
            None
        }
    };
    for (i, ch) in sample.characters.iter().enumerate() {
        let field = at.field(format!("{}[{i}].{}", col::CHARACTERS, col::MASK));
        let mask = match decode_gray(&ch.mask.bytes, &field, limits) {
            Ok(m) => m,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(size) = size
            && mask.dimensions() != size
        {
            errors.push(DataError::new(
                field.clone(),
                format!(
                    "mask is {}x{}, the image is {}x{}",
                    mask.width(),
                    mask.height(),
                    size.0,
                    size.1
                ),
            ));
        }
        match crate::ops::nonzero_bbox(&mask) {
            None => errors.push(DataError::new(field, "mask is empty (no non-zero pixel)")),
            Some(b) if [b.x0, b.y0, b.x1, b.y1] != ch.bbox => errors.push(DataError::new(
                at.field(format!("{}[{i}].{}", col::CHARACTERS, col::BBOX)),
                format!(
                    "bbox is {:?} but the mask's non-zero pixels span {:?}",
                    ch.bbox,
                    [b.x0, b.y0, b.x1, b.y1]
                ),
            )),
            Some(_) => {}
        }
    }
    if let Some(pose) = &sample.pose {
        let field = at.field(col::POSE);
        match decode_rgb(&pose.bytes, &field, limits) {
            Err(e) => errors.push(e),
            Ok(p) => {
                if let Some(e) =
                    size.and_then(|s| check_pose_shape(p.dimensions(), s, &field).err())
                {
                    errors.push(e);
                }
            }
        }
    }
    errors
}

/// Result of checking shards.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Shards opened.
    pub files: usize,
    /// Rows read.
    pub rows: u64,
    /// Rows with at least one problem.
    pub bad_rows: u64,
    /// Every problem, in file and row order.
    pub problems: Vec<DataError>,
}

/// Checks every row of every shard on `threads` threads. File-level problems (unreadable file,
/// unknown schema version, missing column) are reported and the next file is checked.
pub fn check_shards(paths: &[PathBuf], limits: DecodeLimits, threads: usize) -> CheckReport {
    check_shards_with(paths, limits, threads, &mut |_, _| {})
}

/// [`check_shards`], telling `progress` the rows checked of all shards' rows (from their
/// footers; unreadable shards count 0).
pub fn check_shards_with(
    paths: &[PathBuf],
    limits: DecodeLimits,
    threads: usize,
    progress: &mut OnProgress<'_>,
) -> CheckReport {
    let mut report = CheckReport::default();
    let mut ids = std::collections::HashMap::new();
    let total: u64 = paths
        .iter()
        .filter_map(|p| ShardReader::open(p).ok().map(|r| r.num_rows()))
        .sum();
    for path in paths {
        report.files += 1;
        let step = Step {
            limits,
            threads: threads.max(1),
            total,
        };
        if let Err(e) = check_shard(path, &step, &mut report, &mut ids, progress) {
            report.problems.push(e);
        }
    }
    report
}

/// Settings of one [`check_shards_with`] pass.
struct Step {
    limits: DecodeLimits,
    threads: usize,
    total: u64,
}

fn check_shard(
    path: &Path,
    step: &Step,
    report: &mut CheckReport,
    ids: &mut std::collections::HashMap<String, Location>,
    progress: &mut OnProgress<'_>,
) -> Result<()> {
    let (limits, threads) = (step.limits, step.threads);
    let reader = ShardReader::open(path)?;
    for g in 0..reader.num_row_groups() {
        let rows = reader.read_row_group(g)?;
        report.rows += rows.len() as u64;
        progress(report.rows, step.total);
        let chunk = rows.len().div_ceil(threads).max(1);
        let per_row: Vec<Vec<DataError>> = std::thread::scope(|s| {
            let handles: Vec<_> = rows
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(row, sample)| match sample {
                                Ok(sample) => {
                                    check_sample(sample, &Location::row(path, *row), limits)
                                }
                                Err(e) => vec![e.clone()],
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("check thread panicked"))
                .collect()
        });
        for ((row, sample), mut errs) in rows.iter().zip(per_row) {
            // Ids are keys (resume, references, evaluation protocols): each names one row.
            if let Ok(sample) = sample {
                let at = Location::row(path, *row).field(crate::schema::col::ID);
                if let Some(first) = ids.get(&sample.id) {
                    errs.push(DataError::new(
                        at,
                        format!("duplicate id `{}`: also {first}", sample.id),
                    ));
                } else {
                    ids.insert(sample.id.clone(), Location::row(path, *row));
                }
            }
            if !errs.is_empty() {
                report.bad_rows += 1;
                report.problems.extend(errs);
            }
        }
    }
    Ok(())
}

/// Summary statistics of a dataset.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    /// Shards.
    pub files: usize,
    /// Rows.
    pub rows: u64,
    /// Rows by number of characters.
    pub characters: BTreeMap<usize, u64>,
    /// Rows with a pose image.
    pub with_pose: u64,
    /// Widths, heights and caption lengths (in words), sorted, for quantiles.
    pub widths: Vec<u32>,
    /// Heights, sorted.
    pub heights: Vec<u32>,
    /// Caption lengths in words, sorted.
    pub caption_words: Vec<u32>,
    /// Rows by aspect ratio class (w/h rounded to 0.25).
    pub aspects: BTreeMap<String, u64>,
    /// Encoded bytes of images, masks and poses.
    pub encoded_bytes: u64,
}

/// Reads every row (no image decoding) and summarises. A row that cannot be read is an error.
pub fn stats(paths: &[PathBuf]) -> Result<Stats> {
    let mut st = Stats::default();
    for path in paths {
        let reader = ShardReader::open(path)?;
        st.files += 1;
        for g in 0..reader.num_row_groups() {
            for (_, sample) in reader.read_row_group(g)? {
                let s = sample?;
                st.rows += 1;
                *st.characters.entry(s.characters.len()).or_default() += 1;
                st.with_pose += s.pose.is_some() as u64;
                st.widths.push(s.width);
                st.heights.push(s.height);
                st.caption_words
                    .push(s.caption.split_whitespace().count() as u32);
                let aspect = (s.width as f64 / s.height.max(1) as f64 * 4.0).round() / 4.0;
                *st.aspects.entry(format!("{aspect:.2}")).or_default() += 1;
                st.encoded_bytes += (s.image.bytes.len()
                    + s.characters
                        .iter()
                        .map(|c| c.mask.bytes.len())
                        .sum::<usize>()
                    + s.pose.as_ref().map_or(0, |p| p.bytes.len()))
                    as u64;
            }
        }
    }
    st.widths.sort_unstable();
    st.heights.sort_unstable();
    st.caption_words.sort_unstable();
    Ok(st)
}

/// The q-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "shards: {}", self.files)?;
        writeln!(f, "rows: {}", self.rows)?;
        writeln!(
            f,
            "encoded image/mask/pose bytes: {:.1} MiB",
            self.encoded_bytes as f64 / (1 << 20) as f64
        )?;
        writeln!(f, "characters per image:")?;
        for (n, c) in &self.characters {
            let share = 100.0 * *c as f64 / self.rows.max(1) as f64;
            writeln!(
                f,
                "  {n}: {c:>8} ({share:5.1} %) {}",
                "#".repeat((share / 2.0).round() as usize)
            )?;
        }
        writeln!(
            f,
            "with pose image: {} ({:.1} %)",
            self.with_pose,
            100.0 * self.with_pose as f64 / self.rows.max(1) as f64
        )?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, v: &[u32]| {
            writeln!(
                f,
                "  {name:<14} min {:>6}  p10 {:>6}  p50 {:>6}  p90 {:>6}  max {:>6}",
                quantile(v, 0.0),
                quantile(v, 0.1),
                quantile(v, 0.5),
                quantile(v, 0.9),
                quantile(v, 1.0)
            )
        };
        writeln!(f, "distributions:")?;
        row(f, "width (px)", &self.widths)?;
        row(f, "height (px)", &self.heights)?;
        row(f, "caption words", &self.caption_words)?;
        writeln!(f, "aspect ratio (w/h, nearest 0.25):")?;
        for (a, c) in &self.aspects {
            writeln!(f, "  {a}: {c}")?;
        }
        Ok(())
    }
}
