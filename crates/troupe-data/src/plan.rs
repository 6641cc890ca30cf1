//! The order of an epoch, computed from metadata alone (no image is read): which rows form which
//! batch, at which output size. Because the plan is a pure function of (seed, epoch, dataset),
//! a loader position is just (epoch, batch index) and resuming is exact.
//!
//! Order: shards are permuted per epoch, row groups are permuted inside each shard, and the
//! resulting row stream is cut into windows of `shuffle_window` rows, each permuted. A window is
//! the bounded in-memory shuffle buffer: the loader holds at most one window of encoded rows
//! (plus partly filled batches). Being bounded, it cannot undo a sorted dataset: `pack` and
//! `import-storymaker` write rows in a seeded random order ([`crate::pack::shuffle_rows`]). Rows are then grouped into batches of equal output size (the
//! reference resize rule or aspect buckets); a partly filled group is completed by later rows,
//! and at the end of the epoch every partial group is emitted as a smaller batch, so no row is
//! ever dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Location, Result};
use crate::rng::{KeyedRng, Purpose};
use crate::schema::col;
use crate::shard::ShardReader;

/// A row of the dataset: shard index (into [`DatasetIndex::shards`]) and row in that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowRef {
    /// Index of the shard.
    pub shard: u32,
    /// Row number inside the shard.
    pub row: u32,
    /// Which appearance of the row in its epoch (0 unless the row is oversampled).
    pub copy: u32,
}

/// What the loader knows about one shard before reading any image.
#[derive(Debug)]
pub struct ShardEntry {
    /// The shard file.
    pub path: PathBuf,
    /// (first row, rows) of each row group.
    pub row_groups: Vec<(u64, u64)>,
    /// (width, height) of every row.
    pub sizes: Vec<(u32, u32)>,
    /// Characters of every row.
    pub characters: Vec<usize>,
}

/// The dataset as the planner sees it.
#[derive(Debug)]
pub struct DatasetIndex {
    /// Shards in sorted path order.
    pub shards: Vec<ShardEntry>,
}

impl DatasetIndex {
    /// Opens every shard (footer and the width/height columns only).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        for path in paths {
            let reader = ShardReader::open(path)?;
            let row_groups = (0..reader.num_row_groups())
                .map(|g| reader.row_group_span(g))
                .collect();
            let sizes = reader.read_sizes()?;
            let characters = reader.read_character_counts()?;
            shards.push(ShardEntry {
                path: path.clone(),
                row_groups,
                sizes,
                characters,
            });
        }
        if shards.iter().all(|s| s.sizes.is_empty()) {
            let at = paths.first().map(Location::file).unwrap_or_default();
            return Err(DataError::new(at, "the dataset has no rows"));
        }
        Ok(Self { shards })
    }

    /// Total rows.
    pub fn num_rows(&self) -> u64 {
        self.shards.iter().map(|s| s.sizes.len() as u64).sum()
    }

    /// The largest character count of any row, with the first row that has it.
    pub fn most_characters(&self) -> (usize, Location) {
        let mut best = (0, Location::default());
        for s in &self.shards {
            for (row, &n) in s.characters.iter().enumerate() {
                if n > best.0 {
                    best = (n, Location::row(&s.path, row as u64).field(col::CHARACTERS));
                }
            }
        }
        best
    }

    /// (width, height) of a row.
    pub fn size(&self, r: RowRef) -> (u32, u32) {
        self.shards[r.shard as usize].sizes[r.row as usize]
    }

    /// Identifies the dataset for resume checks: shard file names, row-group layout and every
    /// image size. A resumed run refuses a dataset whose fingerprint differs.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over a canonical description; stable across platforms and releases.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for s in &self.shards {
            let name = s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            eat(name.as_bytes());
            for (a, b) in &s.row_groups {
                eat(&a.to_le_bytes());
                eat(&b.to_le_bytes());
            }
            for (w, hh) in &s.sizes {
                eat(&w.to_le_bytes());
                eat(&hh.to_le_bytes());
            }
        }
        format!("{:016x}-{}", h, self.num_rows())
    }

    /// Path of a shard.
    pub fn shard_path(&self, shard: u32) -> &Path {
        &self.shards[shard as usize].path
    }
}

/// How an image's training size is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum SizeRule {
    /// StoryMaker's rule: scale = min(max_long / long side, max_short / short side), round, then
    /// floor each side to a multiple of `multiple`; the whole image is resized (no crop).
    Reference {
        max_long: u32,
        max_short: u32,
        multiple: u32,
    },
    /// Aspect buckets: each image goes to the bucket with the closest aspect ratio, is
    /// centre-cropped to that aspect and resized to the bucket size.
    Buckets(Vec<(u32, u32)>),
}

impl SizeRule {
    /// The reference rule with StoryMaker's constants (long ≤ 1286, short ≤ 960, multiples of 64).
    pub fn reference() -> Self {
        SizeRule::Reference {
            max_long: 1286,
            max_short: 960,
            multiple: 64,
        }
    }

    /// Buckets with sides multiple of `step`, area at most `area`, aspect ratio at most `max_aspect`
    /// (SDXL-style: for each width the tallest height that fits the area).
    pub fn buckets(area: u32, step: u32, max_aspect: f64) -> Self {
        let mut out = Vec::new();
        let mut w = step;
        while (w as u64) * (step as u64) <= area as u64 {
            let h = (area / w) / step * step;
            let aspect = w as f64 / h as f64;
            if h >= step && aspect <= max_aspect && aspect >= 1.0 / max_aspect {
                out.push((w, h));
            }
            w += step;
        }
        SizeRule::Buckets(out)
    }

    /// The output size and the crop of the original image (x, y, width, height) that is resized
    /// to it. `None` when the image is too small for the rule (a side would round to 0).
    pub fn target(&self, width: u32, height: u32) -> Option<Target> {
        match self {
            SizeRule::Reference {
                max_long,
                max_short,
                multiple,
            } => {
                let (long, short) = (width.max(height) as f64, width.min(height) as f64);
                let scale = (*max_long as f64 / long).min(*max_short as f64 / short);
                // Python's round() rounds half to even; the reference uses it.
                let side =
                    |v: u32| ((v as f64 * scale).round_ties_even() as u32) / multiple * multiple;
                let (w, h) = (side(width), side(height));
                (w > 0 && h > 0).then_some(Target {
                    width: w,
                    height: h,
                    crop: [0, 0, width, height],
                })
            }
            SizeRule::Buckets(buckets) => {
                let aspect = (width as f64 / height as f64).ln();
                let &(bw, bh) = buckets.iter().min_by(|a, b| {
                    let d = |s: &(u32, u32)| ((s.0 as f64 / s.1 as f64).ln() - aspect).abs();
                    d(a).total_cmp(&d(b))
                })?;
                // Centre crop of the original to the bucket's aspect ratio.
                let (cw, ch) = if width as u64 * bh as u64 > height as u64 * bw as u64 {
                    (
                        ((height as u64 * bw as u64) as f64 / bh as f64).round() as u32,
                        height,
                    )
                } else {
                    (
                        width,
                        ((width as u64 * bh as u64) as f64 / bw as f64).round() as u32,
                    )
                };
                let (cw, ch) = (cw.clamp(1, width), ch.clamp(1, height));
                Some(Target {
                    width: bw,
                    height: bh,
                    crop: [(width - cw) / 2, (height - ch) / 2, cw, ch],
                })
            }
        }
    }
}

/// Output size of one sample and the region of the original image it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Output width (a multiple of 8 so the latent mask is exact).
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// x, y, width, height of the original image region resized to the output.
    pub crop: [u32; 4],
}

/// One batch of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBatch {
    /// Rows in batch order, each with its position in the epoch's (shuffled) sample stream.
    pub rows: Vec<(RowRef, u64)>,
    /// Output width and height shared by the batch.
    pub size: (u32, u32),
}

/// The whole order of one epoch.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    /// Epoch number.
    pub epoch: u64,
    /// Row groups in the order they are read: (shard, row group index, copy); an oversampled
    /// epoch reads a group once per pass that needs it.
    pub read_order: Vec<(u32, usize, u32)>,
    /// Batches in the order they are yielded.
    pub batches: Vec<PlannedBatch>,
}

/// Character counts the repeat table can name (a shard holds 1 to 3 per row).
const MAX_CHARACTERS_PLANNED: usize = crate::schema::MAX_CHARACTERS;

/// Options of the planner.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Run seed.
    pub seed: u64,
    /// Samples per batch.
    pub batch_size: usize,
    /// Rows per shuffle window.
    pub shuffle_window: usize,
    /// Output size rule.
    pub size_rule: SizeRule,
    /// Times each row appears per epoch, by its character count: entry `i` for `i + 1`
    /// characters (the reference's `list1 + 2 × list2 + 5 × list3` is `[1, 2, 5]`). Counts
    /// past the end repeat like the last entry; empty means once each.
    pub repeats: Vec<u32>,
}

impl PlanOptions {
    /// How often a row with `characters` characters appears in an epoch.
    pub fn repeat(&self, characters: usize) -> u32 {
        match self.repeats.as_slice() {
            [] => 1,
            r => r[characters.clamp(1, r.len()) - 1],
        }
    }
}

/// Plans epoch `epoch`. Rows too small for the size rule are returned separately (the loader
/// reports them through its bad-row policy).
pub fn plan_epoch(
    index: &DatasetIndex,
    opts: &PlanOptions,
    epoch: u64,
) -> (EpochPlan, Vec<RowRef>) {
    // Oversampling: pass p holds the rows that appear more than p times, each pass in its own
    // shard and row-group order, so a row's copies are spread over the epoch rather than
    // shuffled into one window (and one batch). Pass 0 is every row, as without repeats.
    let passes = (0..=MAX_CHARACTERS_PLANNED)
        .map(|c| opts.repeat(c))
        .max()
        .unwrap_or(1);
    let mut read_order = Vec::new();
    let mut stream: Vec<RowRef> = Vec::with_capacity(index.num_rows() as usize);
    let mut pass_ends = Vec::new();
    for pass in 0..passes.max(1) as u64 {
        let mut shard_order: Vec<u32> = (0..index.shards.len() as u32).collect();
        KeyedRng::new(opts.seed, Purpose::ShardOrder, epoch, pass).shuffle(&mut shard_order);
        for &s in &shard_order {
            let shard = &index.shards[s as usize];
            let mut groups: Vec<usize> = (0..shard.row_groups.len()).collect();
            let key = s as u64 | pass << 32;
            KeyedRng::new(opts.seed, Purpose::RowGroupOrder, epoch, key).shuffle(&mut groups);
            for g in groups {
                let (start, len) = shard.row_groups[g];
                let rows = (start..start + len).filter(|&row| {
                    let characters = shard.characters.get(row as usize).copied().unwrap_or(1);
                    opts.repeat(characters) as u64 > pass
                });
                let before = stream.len();
                stream.extend(rows.map(|row| RowRef {
                    shard: s,
                    row: row as u32,
                    copy: pass as u32,
                }));
                if stream.len() > before {
                    read_order.push((s, g, pass as u32));
                }
            }
        }
        pass_ends.push(stream.len());
    }
    // Windows never straddle two passes, so a row's copies stay in different passes.
    let window = opts.shuffle_window.max(1);
    let (mut w, mut from) = (0u64, 0);
    for end in pass_ends {
        for chunk in stream[from..end].chunks_mut(window) {
            KeyedRng::new(opts.seed, Purpose::Window, epoch, w).shuffle(chunk);
            w += 1;
        }
        from = end;
    }

    let mut batches = Vec::new();
    let mut too_small = Vec::new();
    let mut open: HashMap<(u32, u32), usize> = HashMap::new(); // size -> index of its filling batch
    let mut open_order: Vec<(u32, u32)> = Vec::new();
    for (pos, &r) in stream.iter().enumerate() {
        let (w, h) = index.size(r);
        let Some(t) = opts.size_rule.target(w, h) else {
            too_small.push(r);
            continue;
        };
        let key = (t.width, t.height);
        let slot = *open.entry(key).or_insert_with(|| {
            open_order.push(key);
            batches.push(PlannedBatch {
                rows: Vec::new(),
                size: key,
            });
            batches.len() - 1
        });
        batches[slot].rows.push((r, pos as u64));
        if batches[slot].rows.len() == opts.batch_size {
            open.remove(&key);
        }
    }
    // Batches are yielded in the order they complete; partial ones at the end, in the order
    // their size first appeared.
    let mut complete_at: Vec<(u64, usize)> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let full = b.rows.len() == opts.batch_size;
            (
                if full {
                    b.rows.last().unwrap().1
                } else {
                    u64::MAX
                },
                i,
            )
        })
        .collect();
    complete_at.sort();
    let batches = complete_at
        .into_iter()
        .map(|(_, i)| batches[i].clone())
        .collect();
    (
        EpochPlan {
            epoch,
            read_order,
            batches,
        },
        too_small,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(shards: &[(usize, usize)]) -> DatasetIndex {
        // (rows, rows per group) per shard; sizes alternate between two aspect ratios.
        DatasetIndex {
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, &(rows, per))| ShardEntry {
                    path: PathBuf::from(format!("s{i}.parquet")),
                    row_groups: (0..rows)
                        .step_by(per)
                        .map(|s| (s as u64, per.min(rows - s) as u64))
                        .collect(),
                    sizes: (0..rows)
                        .map(|r| if r % 3 == 0 { (1024, 768) } else { (768, 1024) })
                        .collect(),
                    characters: (0..rows).map(|r| 1 + r % 3).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn every_row_appears_once_per_epoch_in_equal_size_batches() {
        let idx = index(&[(37, 8), (20, 5), (3, 3)]);
        let opts = PlanOptions {
            seed: 5,
            batch_size: 4,
            shuffle_window: 16,
            size_rule: SizeRule::reference(),
            repeats: Vec::new(),
        };
        for epoch in 0..3 {
            let (plan, small) = plan_epoch(&idx, &opts, epoch);
            assert!(small.is_empty());
            let mut rows: Vec<RowRef> = plan
                .batches
                .iter()
                .flat_map(|b| b.rows.iter().map(|r| r.0))
                .collect();
            assert_eq!(rows.len(), 60);
            rows.sort();
            rows.dedup();
            assert_eq!(rows.len(), 60, "a row repeated or dropped");
            for b in &plan.batches {
                assert!(!b.rows.is_empty() && b.rows.len() <= 4);
                for (r, _) in &b.rows {
                    let (w, h) = idx.size(*r);
                    let t = opts.size_rule.target(w, h).unwrap();
                    assert_eq!((t.width, t.height), b.size);
                }
            }
        }
        let a = plan_epoch(&idx, &opts, 0).0.batches;
        assert_eq!(
            a,
            plan_epoch(&idx, &opts, 0).0.batches,
            "same epoch, same plan"
        );
        assert_ne!(
            a,
            plan_epoch(&idx, &opts, 1).0.batches,
            "epochs are shuffled differently"
        );
    }

    #[test]
    fn oversampled_rows_appear_their_repeat_count_spread_over_the_epoch() {
        let idx = index(&[(37, 8), (20, 5), (3, 3)]);
        let once = PlanOptions {
            seed: 5,
            batch_size: 4,
            shuffle_window: 16,
            size_rule: SizeRule::reference(),
            repeats: Vec::new(),
        };
        let opts = PlanOptions {
            repeats: vec![1, 2, 5],
            ..once.clone()
        };
        let (plan, _) = plan_epoch(&idx, &opts, 0);
        let mut count: HashMap<(u32, u32), Vec<u64>> = HashMap::new();
        for b in &plan.batches {
            for (r, pos) in &b.rows {
                count.entry((r.shard, r.row)).or_default().push(*pos);
            }
        }
        // Copy k of a row comes after every row of passes 0..k: copies are spread over the
        // epoch, not shuffled next to each other. Pass k holds the rows repeated more than k
        // times.
        let chars: Vec<usize> = idx
            .shards
            .iter()
            .flat_map(|s| s.characters.clone())
            .collect();
        let len: Vec<u64> = (0..5)
            .map(|k| chars.iter().filter(|&&c| [1, 2, 5][c - 1] > k).count() as u64)
            .collect();
        let start: Vec<u64> = (0..5).map(|k| len[..k].iter().sum()).collect();
        for positions in count.values_mut() {
            positions.sort();
            for (k, &p) in positions.iter().enumerate() {
                assert!(p >= start[k] && p < start[k] + len[k], "copy {k} at {p}");
            }
        }
        for (s, shard) in idx.shards.iter().enumerate() {
            for (row, &c) in shard.characters.iter().enumerate() {
                let positions = &count[&(s as u32, row as u32)];
                assert_eq!(
                    positions.len() as u32,
                    [1, 2, 5][c - 1],
                    "row {s}/{row}, {c} chars"
                );
            }
        }
        // Every copy has its own stream position (its own augmentation key).
        let mut all: Vec<u64> = count.values().flatten().copied().collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
        // Without repeats the plan is exactly the one-pass plan.
        let plain = PlanOptions {
            repeats: vec![1, 1, 1],
            ..once.clone()
        };
        assert_eq!(
            plan_epoch(&idx, &plain, 0).0.batches,
            plan_epoch(&idx, &once, 0).0.batches
        );
    }

    /// The reference rule's (w, h), with (0, 0) where a side rounds to 0 (no target).
    /// Cases are hand-computed and from Python (`scripts/make_ops_expected.py`).
    fn reference_size(w: u32, h: u32) -> (u32, u32) {
        SizeRule::reference()
            .target(w, h)
            .map_or((0, 0), |t| (t.width, t.height))
    }

    #[test]
    fn reference_sizes_hand_computed() {
        // 1024x1024: scale = min(1286/1024, 960/1024) = 0.9375 -> 960 -> 960.
        assert_eq!(reference_size(1024, 1024), (960, 960));
        // 1280x960: min(1.0047, 1.0) = 1 -> (1280, 960) -> 1280 is a multiple of 64.
        assert_eq!(reference_size(1280, 960), (1280, 960));
        // 853x640: scale 1.5 (960/640 < 1286/853=1.5076) -> 1279.5 rounds to even 1280 -> 1280;
        // 960 -> 960.
        assert_eq!(reference_size(853, 640), (1280, 960));
        // 855x640: 1282.5 -> 1282 (half to even) -> 1280.
        assert_eq!(reference_size(855, 640), (1280, 960));
        // Portrait 768x1024: min(1286/1024=1.2559, 960/768=1.25) = 1.25 -> 960x1280.
        assert_eq!(reference_size(768, 1024), (960, 1280));
        // Very wide 2000x500: min(0.643, 1.92) = 0.643 -> 1286 -> 1280; 321.5 -> 322 -> 320.
        assert_eq!(reference_size(2000, 500), (1280, 320));
    }

    #[test]
    fn reference_sizes_match_python() {
        let t = crate::ops::testutil::load_table("reference_sizes.txt");
        assert!(t.len() > 20);
        for r in &t {
            let v: Vec<u32> = r.iter().map(|s| s.parse().unwrap()).collect();
            // A side that rounds to 0 makes the row unplaceable (reported as too small).
            let want = if v[2] == 0 || v[3] == 0 {
                (0, 0)
            } else {
                (v[2], v[3])
            };
            assert_eq!(reference_size(v[0], v[1]), want, "{v:?}");
        }
    }

    #[test]
    fn reference_rule_matches_storymaker_arithmetic() {
        let r = SizeRule::reference();
        // 1024x1024: scale = min(1286/1024, 960/1024) = 0.9375 -> 960 -> 960.
        assert_eq!(r.target(1024, 1024).unwrap().width, 960);
        // 1200x1600 portrait: scale = min(1286/1600, 960/1200) = 0.8 -> 960x1280 -> 960x1280.
        let t = r.target(1200, 1600).unwrap();
        assert_eq!((t.width, t.height), (960, 1280));
        // 517x301: scale = min(1286/517, 960/301) = 2.487 -> 1286x749 -> 1280x704.
        let t = r.target(517, 301).unwrap();
        assert_eq!((t.width, t.height), (1280, 704));
        assert_eq!(t.crop, [0, 0, 517, 301]);
    }

    #[test]
    fn buckets_crop_to_the_bucket_aspect() {
        let rule = SizeRule::buckets(1024 * 1024, 64, 2.0);
        let t = rule.target(2000, 1000).unwrap();
        assert!(t.width > t.height && t.width.is_multiple_of(64) && t.height.is_multiple_of(64));
        let [x, y, w, h] = t.crop;
        assert_eq!((y, h), (0, 1000));
        assert_eq!(x, (2000 - w) / 2);
        let crop_aspect = w as f64 / h as f64;
        assert!((crop_aspect - t.width as f64 / t.height as f64).abs() < 0.01);
    }
}
