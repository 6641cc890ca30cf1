//! `troupe inspect PATH`: what a model folder or adapter file holds, and whether it loads.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use troupe_models::component::inspect;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Component folder (e.g. `sdxl/unet`), pipeline folder, or adapter `.safetensors`.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<ExitCode> {
    let found = inspect(&args.path)?;
    let mut clean = true;
    for i in &found {
        clean &= i.missing.is_empty() && i.unexpected.is_empty() && i.mismatched.is_empty();
        if args.json {
            let dtypes: serde_json::Map<String, serde_json::Value> = i
                .dtypes
                .iter()
                .map(|(d, n)| (d.name().to_string(), (*n).into()))
                .collect();
            let config: serde_json::Map<String, serde_json::Value> = i
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "path": i.path, "component": i.component, "config": config,
                    "parameters": i.parameters, "dtypes": dtypes, "missing": i.missing,
                    "unexpected": i.unexpected, "mismatched": i.mismatched,
                })
            );
            continue;
        }
        println!("{}: {}", i.path, i.component);
        for (k, v) in &i.config {
            println!("  {k}: {v}");
        }
        println!(
            "  parameters: {} ({:.1} M)",
            i.parameters,
            i.parameters as f64 / 1e6
        );
        let dtypes: Vec<String> = i
            .dtypes
            .iter()
            .map(|(d, n)| format!("{} × {n}", d.name()))
            .collect();
        println!("  tensors: {}", dtypes.join(", "));
        for (title, list) in [
            ("missing keys", &i.missing),
            ("unexpected keys", &i.unexpected),
            ("shape mismatches", &i.mismatched),
        ] {
            if !list.is_empty() {
                println!("  {title} ({}):", list.len());
                for k in list {
                    println!("    {k}");
                }
            }
        }
    }
    // A model that would not load is a failure, so scripts can gate on the exit status.
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
