//! `troupe data bench`: recipe throughput at several thread counts, and the loader's.

use std::process::ExitCode;

use anyhow::Result;
use troupe_data::bench::{BenchSet, loader_throughput};
use troupe_data::loader::LoaderConfig;
use troupe_data::plan::SizeRule;
use troupe_data::recipe::RecipeConfig;
use troupe_data::shard::find_shards;

use crate::data::BenchArgs;

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let shards = find_shards(&args.paths)?;
    let rule = SizeRule::reference();
    let set = BenchSet::load(&shards, args.samples, &rule)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.threads.is_empty() {
        vec![1, cores]
    } else {
        args.threads.clone()
    };
    let cfg = RecipeConfig::default();
    let mut recipe = Vec::new();
    for &t in &threads {
        recipe.push((t, set.recipe_throughput(&cfg, t, args.repeats)?));
    }
    let loader_cfg = LoaderConfig {
        workers: cores,
        batch_size: 1,
        ..LoaderConfig::default()
    };
    let loader = loader_throughput(&shards, loader_cfg, set.len())?;
    if args.json {
        let recipe: Vec<_> = recipe
            .iter()
            .map(|(t, s)| serde_json::json!({"threads": t, "samples_per_s": s}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"samples": set.len(), "recipe": recipe, "loader": {"workers": cores, "samples_per_s": loader}})
        );
    } else {
        println!(
            "recipe on {} in-memory samples (best of {} passes):",
            set.len(),
            args.repeats
        );
        for (t, s) in &recipe {
            println!(
                "  {t:>3} thread(s): {s:8.2} samples/s  ({:.2} per thread)",
                s / *t as f64
            );
        }
        println!("loader end to end, {cores} workers: {loader:8.2} samples/s");
    }
    Ok(ExitCode::SUCCESS)
}
