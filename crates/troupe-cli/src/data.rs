//! `troupe data …` subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use troupe_data::DataError;
use troupe_data::check::{check_shards_with, stats};
use troupe_data::image_io::DecodeLimits;
use troupe_data::loader::{BadRowPolicy, Loader, LoaderConfig};
use troupe_data::ops::LibraryVersions;
use troupe_data::pack::{OnBadLine, PackReport, pack_manifest_with};
use troupe_data::plan::SizeRule;
use troupe_data::preview::Dumper;
use troupe_data::recipe::RecipeConfig;
use troupe_data::shard::{ShardWriterOptions, find_shards};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Pack a folder of images and a JSONL manifest into shards.
    Pack {
        /// The manifest: one JSON object per line (see datasets/README.md).
        manifest: PathBuf,
        #[command(flatten)]
        out: OutArgs,
        /// Face models: compute the identity of characters whose manifest entry has no
        /// `embedding`/`keypoints` (the largest face on the character's mask).
        #[command(flatten)]
        faces: crate::eval::OptionalFaceModels,
    },
    /// Import a dataset in StoryMaker's reference layout (JSON index keyed by person count).
    ///
    /// StoryMaker's own example (a checkout of RedAIGC/StoryMaker), whose index paths are relative
    /// to `examples/`:
    ///
    ///   troupe data import-storymaker examples/datasets/test.json --root examples --out shards/
    ImportStorymaker {
        /// The index JSON, e.g. examples/datasets/test.json.
        index: PathBuf,
        /// The folder the index's paths are relative to (the reference opens them from its
        /// working directory) [default: the index's folder].
        #[arg(long)]
        root: Option<PathBuf>,
        #[command(flatten)]
        out: OutArgs,
        #[command(flatten)]
        versions: VersionsArg,
    },
    /// Validate every row of shards; exits non-zero if any problem is found.
    Check {
        /// Shard files or folders of shards.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Threads decoding images (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print at most this many problems (all are counted).
        #[arg(long, default_value_t = 200)]
        max_problems: usize,
    },
    /// Row count, characters per image, resolutions and caption lengths.
    Stats {
        /// Shard files or folders of shards.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Write a synthetic dataset (tiny fixtures, benchmark shards).
    Synth {
        /// Output folder (must not hold shards yet).
        #[arg(long)]
        out: PathBuf,
        /// Rows to generate.
        #[arg(long, default_value_t = 48)]
        rows: usize,
        /// Smallest image side.
        #[arg(long, default_value_t = 192)]
        min_side: u32,
        /// Largest image side.
        #[arg(long, default_value_t = 320)]
        max_side: u32,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rows per shard.
        #[arg(long, default_value_t = 1 << 20)]
        rows_per_shard: usize,
        /// Rows per row group.
        #[arg(long, default_value_t = 64)]
        rows_per_row_group: usize,
        /// Share of rows with a pose image, 0 to 1.
        #[arg(long, default_value_t = troupe_data::synth::SynthOptions::default().pose_fraction)]
        pose_fraction: f64,
    },
    /// Stream batches through the training loader and print what each holds.
    Preview {
        /// Shard files or folders of shards.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Batches to print.
        #[arg(long, default_value_t = 8)]
        batches: usize,
        /// Samples per batch.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Run seed (shuffles, augmentations, dropout).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Aspect buckets of this area (e.g. 1048576 for 1024²) instead of the reference resize rule.
        #[arg(long)]
        bucket_area: Option<u32>,
        /// What to do with a row that cannot be used.
        #[arg(long, value_enum, default_value_t = BadRow::Fail)]
        on_bad_row: BadRow,
        /// Also write each sample as files under DIR/<sample id>/: gt.png, body_<i>.png and
        /// face_<i>.png (224², before CLIP normalisation), mask_<i>.png (the loss mask),
        /// pose.png, and sample.json (crop boxes, keypoints, dropout, rotation angles).
        #[arg(long, value_name = "DIR")]
        dump: Option<PathBuf>,
        /// No augmentation: body crops are not rotated and no conditioning is dropped (to
        /// compare with the reference's dataset code).
        #[arg(long)]
        no_augment: bool,
        #[command(flatten)]
        versions: VersionsArg,
    },
    /// Benchmark the per-sample recipe (samples/s at 1 thread and at all cores) and the loader.
    Bench(crate::data::BenchArgs),
}

#[derive(Args)]
pub struct OutArgs {
    /// Output folder for the shards (created; must not hold shards yet).
    #[arg(long)]
    out: PathBuf,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 512)]
    shard_mib: u64,
    /// Rows per row group (the loader's read unit).
    #[arg(long, default_value_t = 64)]
    rows_per_row_group: usize,
    /// What to do with an input row that fails validation.
    #[arg(long, value_enum, default_value_t = BadRow::Fail)]
    on_bad_row: BadRow,
    /// Seed of the row order: rows are written in a seeded random order, so that the loader's
    /// bounded shuffle still gives batches that mix person counts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Whose image-library arithmetic the crops and resizes reproduce.
#[derive(Args)]
pub struct VersionsArg {
    /// `storymaker`: OpenCV 4 and Pillow ≤ 12, what the reference was trained with (the
    /// training default); `current`: OpenCV 5 and Pillow 13 (today's releases).
    #[arg(long, value_enum, default_value_t = Versions::Storymaker)]
    library_versions: Versions,
}

#[derive(Clone, Copy, ValueEnum)]
enum Versions {
    Storymaker,
    Current,
}

impl VersionsArg {
    fn get(&self) -> LibraryVersions {
        match self.library_versions {
            Versions::Storymaker => LibraryVersions::default(),
            Versions::Current => LibraryVersions::current(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BadRow {
    /// Stop at the first bad row; remove the shards written by this run.
    Fail,
    /// Leave bad rows out; report each one.
    Skip,
}

impl OutArgs {
    fn options(&self) -> ShardWriterOptions {
        ShardWriterOptions {
            rows_per_row_group: self.rows_per_row_group.max(1),
            shard_bytes: self.shard_mib.max(1) << 20,
            ..ShardWriterOptions::default()
        }
    }

    fn policy(&self) -> OnBadLine {
        match self.on_bad_row {
            BadRow::Fail => OnBadLine::Fail,
            BadRow::Skip => OnBadLine::Skip,
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Shard files or folders of shards.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Rows to load into memory and transform.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Thread counts to measure (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Passes over the samples per measurement (the best pass is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn print_problems(problems: &[DataError], max: usize) {
    for p in problems.iter().take(max) {
        eprintln!("{p}");
    }
    if problems.len() > max {
        eprintln!("… and {} more problems", problems.len() - max);
    }
}

fn report_pack(result: std::result::Result<PackReport, Vec<DataError>>) -> Result<ExitCode> {
    match result {
        Ok(report) => {
            for n in &report.notes {
                eprintln!("note: {n}");
            }
            for s in &report.skipped {
                eprintln!("skipped: {s}");
            }
            for s in &report.shards {
                println!(
                    "wrote {} ({} rows, {:.1} MiB)",
                    s.path.display(),
                    s.rows,
                    s.bytes as f64 / (1 << 20) as f64
                );
            }
            println!(
                "{} rows in {} shards; {} problems in skipped rows",
                report.rows,
                report.shards.len(),
                report.skipped.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            print_problems(&errors, usize::MAX);
            // Only row-level problems can be skipped; a file-level one (unreadable index,
            // unwritable output) stops the import whatever the policy.
            if errors.iter().any(|e| e.at.row.is_some()) {
                bail!(
                    "nothing was packed: fix the rows above, or pass --on-bad-row skip to leave them out"
                )
            }
            bail!("nothing was packed")
        }
    }
}

pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    let limits = DecodeLimits::default();
    match cmd {
        DataCommand::Pack {
            manifest,
            out,
            faces,
        } => {
            let faces = faces.load(troupe_data::ops::geometry::WarpImpl::OpenCv4)?;
            let identity = faces
                .as_ref()
                .map(|f| f as &dyn troupe_data::pack::IdentityProvider);
            report_pack(pack_manifest_with(
                &manifest,
                &out.out,
                &troupe_data::pack::PackOptions {
                    shards: out.options(),
                    on_bad: out.policy(),
                    limits,
                    seed: out.seed,
                },
                identity,
                &mut crate::progress("lines"),
            ))
        }
        DataCommand::ImportStorymaker {
            index,
            root,
            out,
            versions,
        } => {
            let options = troupe_data::import::ImportOptions {
                root,
                shards: out.options(),
                on_bad: out.policy(),
                limits,
                versions: versions.get(),
                seed: out.seed,
            };
            report_pack(troupe_data::import::import_storymaker_with(
                &index,
                &out.out,
                &options,
                &mut crate::progress("entries"),
            ))
        }
        DataCommand::Check {
            paths,
            threads,
            max_problems,
        } => {
            let shards = find_shards(&paths)?;
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let report = check_shards_with(&shards, limits, threads, &mut crate::progress("rows"));
            print_problems(&report.problems, max_problems);
            println!(
                "checked {} shard(s), {} rows: {} problem(s) in {} row(s)",
                report.files,
                report.rows,
                report.problems.len(),
                report.bad_rows
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DataCommand::Stats { paths } => {
            let shards = find_shards(&paths)?;
            print!("{}", stats(&shards)?);
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Synth {
            out,
            rows,
            min_side,
            max_side,
            seed,
            rows_per_shard,
            rows_per_row_group,
            pose_fraction,
        } => {
            if !(0.0..=1.0).contains(&pose_fraction) {
                bail!("--pose-fraction must be between 0 and 1");
            }
            if min_side == 0 || min_side > max_side {
                bail!("--min-side must be at least 1 and at most --max-side");
            }
            // Larger images could not be decoded by the loader anyway.
            let limit = DecodeLimits::default().max_side;
            if max_side > limit {
                bail!("--max-side {max_side} is over the decode limit of {limit} px a side");
            }
            let opts = troupe_data::synth::SynthOptions {
                rows,
                min_side,
                max_side,
                seed,
                pose_fraction,
                ..Default::default()
            };
            let writer = ShardWriterOptions {
                rows_per_row_group: rows_per_row_group.max(1),
                shard_rows: rows_per_shard.max(1) as u64,
                ..ShardWriterOptions::default()
            };
            let shards = troupe_data::synth::write_dataset(&out, &opts, writer)
                .with_context(|| format!("writing {}", out.display()))?;
            for s in &shards {
                println!(
                    "wrote {} ({} rows, {:.2} MiB)",
                    s.path.display(),
                    s.rows,
                    s.bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Preview {
            paths,
            batches,
            batch_size,
            seed,
            bucket_area,
            on_bad_row,
            dump,
            no_augment,
            versions,
        } => {
            if let Some(a) = bucket_area {
                let max = DecodeLimits::default().max_pixels;
                if !(64 * 64..=max).contains(&(a as u64)) {
                    bail!(
                        "--bucket-area {a}: expected 4096 to {max} pixels (64² to the decode limit)"
                    );
                }
            }
            let shards = find_shards(&paths)?;
            let mut config = LoaderConfig {
                batch_size,
                seed,
                size_rule: bucket_area
                    .map_or_else(SizeRule::reference, |a| SizeRule::buckets(a, 64, 2.0)),
                on_bad_row: match on_bad_row {
                    BadRow::Fail => BadRowPolicy::Fail,
                    BadRow::Skip => BadRowPolicy::Skip,
                },
                recipe: RecipeConfig {
                    versions: versions.get(),
                    ..RecipeConfig::default()
                },
                ..LoaderConfig::default()
            };
            if no_augment {
                config.recipe = config.recipe.without_augmentation();
            }
            let recipe = config.recipe.clone();
            let mut loader = Loader::new(&shards, config)?;
            let mut dumper = dump.as_ref().map(Dumper::new);
            let mut dumped = 0;
            println!("{} rows in {} shard(s)", loader.num_rows(), shards.len());
            for _ in 0..batches {
                let b = loader.next_batch()?;
                for e in loader.take_skipped() {
                    eprintln!("skipped: {e}");
                }
                let dropped = b.drop_image.iter().filter(|d| **d).count();
                let no_text = b.drop_text.iter().filter(|d| **d).count();
                println!(
                    "epoch {} batch {:>3}: {} x {}x{}  characters {:?}  image/text dropped {dropped}/{no_text}  ids {}",
                    b.epoch,
                    b.index,
                    b.len(),
                    b.width,
                    b.height,
                    b.num_characters,
                    b.ids.join(",")
                );
                if let Some(d) = dumper.as_mut() {
                    dumped += d.write_batch(&b, &recipe)?.len();
                }
            }
            if let Some(dir) = &dump {
                println!("wrote {dumped} sample(s) under {}", dir.display());
            }
            println!("position: {}", serde_json::to_string(loader.state())?);
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Bench(args) => crate::bench::run(args),
    }
}
