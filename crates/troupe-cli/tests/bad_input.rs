//! The bad-input catalogue: each case is a command a user could type with a bad config value,
//! flag or file. Every one must end with exit status 1 or 2 (never a panic's 101 or an
//! abort's 134), a message naming the offending key, flag or field, and nothing half-written
//! in the working folder.

mod common;

use std::path::Path;

use burn::prelude::*;
use common::troupe;
use troupe_models::weights::{to_host, write_safetensors};

/// One bad input: the arguments (`{tmp}` is a fresh folder) and the words the message names.
struct Case {
    args: &'static [&'static str],
    names: &'static [&'static str],
}

const UNET_TINY: &str = "configs/tiny-sdxl/unet/config.json";

/// `troupe train --config configs/tiny.toml --set run.dir={tmp}/run --set …`.
macro_rules! train_with {
    ($($set:expr),*) => {
        &["train", "--config", "configs/tiny.toml", "--set", "run.dir={tmp}/run", $("--set", $set),*]
    };
}

const CASES: &[Case] = &[
    // Adapter architecture flags.
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--ppr-dim-head",
            "0",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["resampler_dim_head"],
    },
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--ppr-dim-head",
            "7",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["resampler_dim_head", "does not divide"],
    },
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--clip-dim",
            "0",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["clip_embeddings_dim"],
    },
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--rank",
            "0",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["lora_rank"],
    },
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--rank",
            "100000000",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["lora_rank"],
    },
    Case {
        args: &[
            "adapter",
            "init",
            "--unet-config",
            UNET_TINY,
            "--ppr-depth",
            "0",
            "--out",
            "{tmp}/a.safetensors",
        ],
        names: &["resampler_depth"],
    },
    // Data tools.
    Case {
        args: &[
            "data",
            "synth",
            "--out",
            "{tmp}/synth",
            "--rows",
            "2",
            "--min-side",
            "100000",
            "--max-side",
            "100001",
        ],
        names: &["--max-side", "decode limit"],
    },
    Case {
        args: &[
            "data",
            "preview",
            "datasets/tiny",
            "--bucket-area",
            "4294967295",
        ],
        names: &["--bucket-area"],
    },
    // Training config values.
    Case {
        args: train_with!("model.ppr_depth=0"),
        names: &["model.ppr_depth"],
    },
    Case {
        args: train_with!("model.ppr_num_tokens=0"),
        names: &["model.ppr_num_tokens"],
    },
    Case {
        args: train_with!("model.ppr_num_queries=0"),
        names: &["model.ppr_num_queries"],
    },
    Case {
        args: train_with!("model.ppr_dim_head=7"),
        names: &["resampler_dim_head", "does not divide"],
    },
    Case {
        args: train_with!("model.lora_rank=100000"),
        names: &["lora_rank", "100000"],
    },
    Case {
        args: train_with!("train.adamw.eps=inf"),
        names: &["train.adamw.eps"],
    },
    Case {
        args: train_with!("train.adamw.eps=0"),
        names: &["train.adamw.eps"],
    },
    Case {
        args: train_with!("data.resolution=8192"),
        names: &["data.resolution"],
    },
    Case {
        args: train_with!("data.workers=100000"),
        names: &["data.workers"],
    },
    Case {
        args: train_with!("model.max_characters=1"),
        names: &["model.max_characters", "characters"],
    },
    Case {
        args: train_with!("model.dtype=\"f8\""),
        names: &["dtype"],
    },
    Case {
        args: train_with!("objective.attention=\"fast\""),
        names: &["attention"],
    },
    Case {
        args: train_with!("train.batch_size=0"),
        names: &["train.batch_size"],
    },
    Case {
        args: train_with!("train.device=\"tpu\""),
        names: &["train.device", "tpu"],
    },
    // Debug commands on inputs of the wrong shape.
    Case {
        args: &[
            "debug",
            "forward",
            "--component",
            "unet",
            "--model",
            "crates/troupe-models/tests/fixtures/unet/sd15_tiny",
            "--inputs",
            "{tmp}/wrong_channels.safetensors",
            "--output",
            "{tmp}/o.safetensors",
        ],
        names: &["sample", "expected"],
    },
    Case {
        args: &[
            "debug",
            "forward",
            "--component",
            "unet",
            "--model",
            "crates/troupe-models/tests/fixtures/unet/sd15_tiny",
            "--inputs",
            "{tmp}/wrong_context.safetensors",
            "--output",
            "{tmp}/o.safetensors",
        ],
        names: &["encoder_hidden_states", "expected"],
    },
];

/// UNet inputs with `sample` of `channels` channels and a context `width` wide.
fn unet_inputs(path: &Path, channels: usize, width: usize) {
    let device = Device::flex();
    let tensors = vec![
        (
            "sample".to_string(),
            to_host(Tensor::<4>::zeros([1, channels, 8, 8], &device)),
        ),
        (
            "timestep".to_string(),
            to_host(Tensor::<1>::zeros([1], &device)),
        ),
        (
            "encoder_hidden_states".to_string(),
            to_host(Tensor::<3>::zeros([1, 77, width], &device)),
        ),
    ];
    write_safetensors(path, &tensors, None).unwrap();
}

/// Files left half-written under `dir` (`*.partial`, temporary folders).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") || name.starts_with(".tmp") {
            out.push(e.path().display().to_string());
        }
        if e.path().is_dir() {
            out.extend(leftovers(&e.path()));
        }
    }
    out
}

#[test]
fn every_bad_input_is_refused_by_name_without_a_panic() {
    let mut failures = Vec::new();
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().display().to_string();
        unet_inputs(&tmp.path().join("wrong_channels.safetensors"), 3, 32);
        unet_inputs(&tmp.path().join("wrong_context.safetensors"), 4, 31);
        let args: Vec<String> = case.args.iter().map(|a| a.replace("{tmp}", &dir)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = troupe(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        let named = case.names.iter().all(|w| stderr.contains(w));
        let left = leftovers(tmp.path());
        if !matches!(code, Some(1 | 2)) || !named || stderr.contains("panicked") || !left.is_empty()
        {
            failures.push(format!(
                "{:?}: exit {code:?}, leftovers {left:?}, expected the message to name {:?}:\n{stderr}",
                case.args, case.names
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}
