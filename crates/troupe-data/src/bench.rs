//! Throughput measurement of the per-sample recipe and of the loader, for `troupe data bench`
//! (and the Python comparison in `scripts/bench_recipe.py`, which runs the same shards).

use std::path::PathBuf;
use std::time::Instant;

use crate::error::{DataError, Location, Result};
use crate::image_io::DecodeLimits;
use crate::loader::{Loader, LoaderConfig};
use crate::plan::{SizeRule, Target};
use crate::recipe::{RecipeConfig, Scratch, process};
use crate::rng::{KeyedRng, Purpose};
use crate::schema::Sample;
use crate::shard::ShardReader;

/// Rows held in memory for a benchmark, with their targets.
pub struct BenchSet {
    rows: Vec<(Location, Sample, Target)>,
}

impl BenchSet {
    /// Reads up to `limit` rows from the shards (in file order) and plans their output size.
    pub fn load(shards: &[PathBuf], limit: usize, rule: &SizeRule) -> Result<Self> {
        let mut rows = Vec::new();
        'outer: for path in shards {
            let reader = ShardReader::open(path)?;
            for g in 0..reader.num_row_groups() {
                for (row, sample) in reader.read_row_group(g)? {
                    let sample = sample?;
                    let at = Location::row(path, row);
                    let target = rule.target(sample.width, sample.height).ok_or_else(|| {
                        DataError::new(at.clone(), "image too small for the size rule")
                    })?;
                    rows.push((at, sample, target));
                    if rows.len() == limit {
                        break 'outer;
                    }
                }
            }
        }
        Ok(Self { rows })
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Samples per second of the recipe on `threads` threads: the best of `repeats` passes over
    /// all rows, each thread taking every `threads`-th row.
    pub fn recipe_throughput(
        &self,
        cfg: &RecipeConfig,
        threads: usize,
        repeats: usize,
    ) -> Result<f64> {
        let threads = threads.max(1);
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        s.spawn(move || -> Result<()> {
                            let mut scratch = Scratch::default();
                            for (i, (at, sample, target)) in
                                self.rows.iter().enumerate().skip(t).step_by(threads)
                            {
                                let mut rng = KeyedRng::new(0, Purpose::Sample, 0, i as u64);
                                let out = process(
                                    sample,
                                    target,
                                    cfg,
                                    DecodeLimits::default(),
                                    &mut rng,
                                    at,
                                    &mut scratch,
                                )?;
                                std::hint::black_box(out);
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().expect("bench thread panicked"))
            })?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(self.rows.len() as f64 / best)
    }
}

/// Samples per second of the whole loader (reading, decoding, recipe, batching) over `samples`
/// samples with the given config.
pub fn loader_throughput(shards: &[PathBuf], config: LoaderConfig, samples: usize) -> Result<f64> {
    let mut loader = Loader::new(shards, config)?;
    let start = Instant::now();
    let mut n = 0;
    while n < samples {
        n += loader.next_batch()?.len();
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
