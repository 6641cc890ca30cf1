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

/// Files every case finds in `{tmp}` (name, contents).
const FILES: &[(&str, &str)] = &[
    ("garbage.parquet", "PAR1 this is not a parquet file PAR1"),
    ("empty.parquet", ""),
    ("bad_json.jsonl", "{\"image\": \"a.png\", \"caption\": \n"),
    (
        "missing_image.jsonl",
        "{\"image\": \"nope.png\", \"caption\": \"c\", \"characters\": []}\n",
    ),
    (
        "caption_number.jsonl",
        "{\"image\": \"nope.png\", \"caption\": 5, \"characters\": []}\n",
    ),
    (
        "no_mask.jsonl",
        "{\"image\": \"nope.png\", \"caption\": \"c\", \"characters\": [{\"embedding\": \"e.npy\"}]}\n",
    ),
    (
        "unknown_field.jsonl",
        "{\"image\": \"nope.png\", \"caption\": \"c\", \"characters\": [], \"colour\": 1}\n",
    ),
    ("not_json.json", "{{{"),
    ("array.json", "[1, 2]"),
    ("key_x.json", "{\"x\": []}"),
    (
        "five_values.json",
        "{\"1\": [[\"a.png\", \"\", \"m.png\", \"c\", 1]]}",
    ),
    (
        "persons_text.json",
        "{\"1\": [[\"a.png\", \"\", \"m.png\", \"c\", \"two\", \"f\"]]}",
    ),
    ("not_toml.toml", "[run\ndir = "),
    ("model_empty/config.json", "{}"),
    ("model_bad_json/config.json", "{\"_class_name\": "),
    (
        "model_null/config.json",
        "{\"_class_name\": \"UNet2DConditionModel\", \"in_channels\": null}",
    ),
    ("garbage.bin", "PK\u{3}\u{4} not a zip at all"),
    (
        "garbage.safetensors",
        "\u{ff}\u{ff}\u{ff}\u{ff}\u{ff}\u{ff}\u{ff}\u{7f}{}",
    ),
    ("no_metrics/placeholder", ""),
    (
        "bad_metrics/metrics.jsonl",
        "{\"step\": 1, \"loss\": 1.0}\nnot json\n{\"step\": 2, \"loss\": 0.5}\n",
    ),
    // A run folder whose `checkpoints` cannot be a folder: found before any step is taken.
    (
        "blocked_run/checkpoints",
        "a file where the checkpoints folder should be",
    ),
];

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
    // Adapter files that do not match their architecture (inspect, export, sample).
    Case {
        args: &["inspect", "{tmp}/extra.safetensors"],
        names: &["extra.safetensors", "ip_adapter.0.surplus"],
    },
    Case {
        args: &["inspect", "{tmp}/missing.safetensors"],
        names: &["missing.safetensors", "ip_adapter.1.to_v_lora.up.weight"],
    },
    Case {
        args: &["inspect", "{tmp}/shape.safetensors"],
        names: &["shape.safetensors", "ip_adapter.2.to_out_lora.down.weight"],
    },
    Case {
        args: &["inspect", "{tmp}/nan.safetensors"],
        names: &[
            "nan.safetensors",
            "image_proj_model.pos_embed",
            "non-finite",
        ],
    },
    Case {
        args: &["inspect", "{tmp}/int.safetensors"],
        names: &["int.safetensors", "integer"],
    },
    Case {
        args: &[
            "export",
            "{tmp}/missing.safetensors",
            "--out",
            "{tmp}/out.bin",
            "--format",
            "storymaker-bin",
        ],
        names: &["ip_adapter.1.to_v_lora.up.weight"],
    },
    Case {
        args: &[
            "export",
            "{tmp}/nan.safetensors",
            "--out",
            "{tmp}/out.safetensors",
        ],
        names: &["non-finite"],
    },
    Case {
        args: &[
            "export",
            "{tmp}/shape.safetensors",
            "--out",
            "{tmp}/out.safetensors",
        ],
        names: &["to_out_lora.down.weight"],
    },
    // Shards.
    Case {
        args: &["data", "check", "{tmp}/garbage.parquet"],
        names: &["garbage.parquet", "Parquet"],
    },
    Case {
        args: &["data", "check", "{tmp}/empty.parquet"],
        names: &["empty.parquet"],
    },
    Case {
        args: &["data", "check", "{tmp}/absent.parquet"],
        names: &["absent.parquet"],
    },
    Case {
        args: &["data", "preview", "{tmp}/garbage.parquet"],
        names: &["garbage.parquet", "Parquet"],
    },
    Case {
        args: &["data", "stats", "{tmp}/garbage.parquet"],
        names: &["garbage.parquet"],
    },
    Case {
        args: &["data", "preview", "datasets/tiny", "--batch-size", "0"],
        names: &["batch"],
    },
    // Manifests.
    Case {
        args: &["data", "pack", "{tmp}/bad_json.jsonl", "--out", "{tmp}/out"],
        names: &["bad_json.jsonl: line 1"],
    },
    Case {
        args: &[
            "data",
            "pack",
            "{tmp}/missing_image.jsonl",
            "--out",
            "{tmp}/out",
        ],
        names: &["line 1", "image", "nope.png"],
    },
    Case {
        args: &[
            "data",
            "pack",
            "{tmp}/caption_number.jsonl",
            "--out",
            "{tmp}/out",
        ],
        names: &["line 1", "caption"],
    },
    Case {
        args: &["data", "pack", "{tmp}/no_mask.jsonl", "--out", "{tmp}/out"],
        names: &["line 1", "mask"],
    },
    Case {
        args: &[
            "data",
            "pack",
            "{tmp}/unknown_field.jsonl",
            "--out",
            "{tmp}/out",
        ],
        names: &["line 1", "colour"],
    },
    Case {
        args: &["data", "pack", "{tmp}/absent.jsonl", "--out", "{tmp}/out"],
        names: &["absent.jsonl"],
    },
    // StoryMaker indexes.
    Case {
        args: &[
            "data",
            "import-storymaker",
            "{tmp}/not_json.json",
            "--out",
            "{tmp}/out",
        ],
        names: &["not_json.json", "JSON"],
    },
    Case {
        args: &[
            "data",
            "import-storymaker",
            "{tmp}/array.json",
            "--out",
            "{tmp}/out",
        ],
        names: &["array.json", "keyed by person count"],
    },
    Case {
        args: &[
            "data",
            "import-storymaker",
            "{tmp}/key_x.json",
            "--out",
            "{tmp}/out",
        ],
        names: &["key_x.json", "person counts"],
    },
    Case {
        args: &[
            "data",
            "import-storymaker",
            "{tmp}/five_values.json",
            "--out",
            "{tmp}/out",
        ],
        names: &["five_values.json", "expected 6 values"],
    },
    Case {
        args: &[
            "data",
            "import-storymaker",
            "{tmp}/persons_text.json",
            "--out",
            "{tmp}/out",
        ],
        names: &["persons_text.json", "num_persons"],
    },
    // More training config values and files.
    Case {
        args: train_with!("train.foo=1"),
        names: &["foo"],
    },
    Case {
        args: train_with!("train.max_steps=\"many\""),
        names: &["max_steps"],
    },
    Case {
        args: train_with!("train.lr=-1"),
        names: &["train.lr"],
    },
    Case {
        args: train_with!("objective.drop_text=1.5"),
        names: &["drop_text", "≤ 1"],
    },
    Case {
        args: train_with!("checkpoint.every_steps=0"),
        names: &["checkpoint.every_steps"],
    },
    Case {
        args: train_with!("data.shards=[]"),
        names: &["data.shards"],
    },
    Case {
        args: train_with!("data.on_bad_row=\"maybe\""),
        names: &["data.on_bad_row"],
    },
    Case {
        args: train_with!("data.shuffle_window=0"),
        names: &["data.shuffle_window"],
    },
    Case {
        args: train_with!("data.repeat_by_characters=[1, 0]"),
        names: &["data.repeat_by_characters"],
    },
    Case {
        args: train_with!("train.max_grad_norm=0"),
        names: &["train.max_grad_norm"],
    },
    Case {
        args: train_with!("train.adamw.beta1=1.0"),
        names: &["train.adamw.beta1"],
    },
    Case {
        args: train_with!("objective.attn_latent_downscale=3"),
        names: &["objective.attn_latent_downscale"],
    },
    Case {
        args: train_with!("model.base=\"{tmp}/no-model\""),
        names: &["model.base", "no-model"],
    },
    Case {
        args: train_with!("train.max_steps"),
        names: &["key=value"],
    },
    Case {
        args: &["train", "--config", "{tmp}/absent.toml"],
        names: &["absent.toml"],
    },
    Case {
        args: &["train", "--config", "{tmp}/not_toml.toml"],
        names: &["not_toml.toml"],
    },
    Case {
        args: &["train", "--resume", "{tmp}/no-run"],
        names: &["no-run", "config.toml"],
    },
    // Model folders and weight files.
    Case {
        args: &["inspect", "{tmp}/absent"],
        names: &["absent"],
    },
    Case {
        args: &["inspect", "{tmp}/model_empty"],
        names: &["model_empty", "config.json"],
    },
    Case {
        args: &["inspect", "{tmp}/model_bad_json"],
        names: &["model_bad_json", "config.json"],
    },
    Case {
        args: &["inspect", "{tmp}/garbage.bin"],
        names: &["garbage.bin"],
    },
    Case {
        args: &["inspect", "{tmp}/garbage.safetensors"],
        names: &["garbage.safetensors"],
    },
    Case {
        args: &[
            "export",
            "{tmp}/absent.safetensors",
            "--out",
            "{tmp}/o.safetensors",
        ],
        names: &["absent.safetensors"],
    },
    // Other commands' arguments.
    Case {
        args: &["debug", "bench-train", "--unet-config", "{tmp}/absent.json"],
        names: &["absent.json"],
    },
    Case {
        args: &[
            "debug",
            "bench-train",
            "--unet-config",
            UNET_TINY,
            "--device",
            "tpu",
        ],
        names: &["--device", "tpu"],
    },
    Case {
        args: &[
            "debug",
            "bench-train",
            "--unet-config",
            UNET_TINY,
            "--dtype",
            "f8",
        ],
        names: &["--dtype", "f8"],
    },
    Case {
        args: &["plot", "{tmp}/no_metrics"],
        names: &["metrics.jsonl"],
    },
    Case {
        args: &["plot", "{tmp}/bad_metrics"],
        names: &["metrics.jsonl", "line 2"],
    },
    Case {
        args: &["plot", "{tmp}/bad_metrics", "--smoothing", "1"],
        names: &["--smoothing"],
    },
    Case {
        args: &["plot", "{tmp}/bad_metrics", "{tmp}/no_metrics"],
        names: &["--out"],
    },
    Case {
        args: &[
            "eval",
            "run",
            "--protocol",
            "{tmp}/absent.toml",
            "--adapter",
            "{tmp}/a.safetensors",
            "--out",
            "{tmp}/e",
        ],
        names: &["absent.toml"],
    },
    // A pose ControlNet that cannot condition this UNet, or is not there; rows without a pose
    // when poses are required.
    Case {
        args: train_with!(
            "model.controlnet=\"crates/troupe-models/tests/fixtures/controlnet/sd15_bgr\""
        ),
        names: &["sd15_bgr", "residual channels"],
    },
    Case {
        args: train_with!("model.controlnet=\"{tmp}/absent\""),
        names: &["model.controlnet", "absent"],
    },
    Case {
        args: train_with!(
            "model.controlnet=\"configs/tiny-sdxl/controlnet\"",
            "data.require_pose=true"
        ),
        names: &["pose", "require_pose"],
    },
    Case {
        args: train_with!("model.controlnet_context=\"both\""),
        names: &["controlnet_context", "both"],
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
    Case {
        args: &[
            "debug",
            "forward",
            "--component",
            "controlnet",
            "--model",
            "crates/troupe-models/tests/fixtures/controlnet/sdxl_tiny",
            "--inputs",
            "{tmp}/wrong_channels.safetensors",
            "--output",
            "{tmp}/o.safetensors",
        ],
        names: &["sample", "expected"],
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

/// A stored tensor: key, dtype, shape, bytes.
type Raw = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// A fresh tiny adapter and damaged copies of it in `dir`: an extra tensor, a missing one, a
/// wrong shape, a NaN and an integer tensor.
fn damaged_adapters(dir: &Path) {
    let fresh = dir.join("fresh.safetensors");
    common::adapter_for(&common::root().join(UNET_TINY), &fresh);
    let bytes = std::fs::read(&fresh).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta.metadata().clone();
    let tensors: Vec<Raw> = file
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let write = |name: &str, edit: &dyn Fn(&mut Vec<Raw>)| {
        let mut t = tensors.clone();
        edit(&mut t);
        let views: Vec<(String, safetensors::tensor::TensorView)> = t
            .iter()
            .map(|(k, d, s, b)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, metadata.clone(), &dir.join(name)).unwrap();
    };
    use safetensors::Dtype::{F32, I64};
    write("extra.safetensors", &|t| {
        t.push(("ip_adapter.0.surplus".into(), F32, vec![1], vec![0; 4]))
    });
    write("missing.safetensors", &|t| {
        t.retain(|(k, ..)| k != "ip_adapter.1.to_v_lora.up.weight")
    });
    write("shape.safetensors", &|t| {
        let e = t
            .iter_mut()
            .find(|(k, ..)| k == "ip_adapter.2.to_out_lora.down.weight")
            .unwrap();
        let n = e.2.iter().product::<usize>();
        e.2 = vec![n];
    });
    write("nan.safetensors", &|t| {
        let e = t
            .iter_mut()
            .find(|(k, ..)| k == "image_proj_model.pos_embed")
            .unwrap();
        e.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    write("int.safetensors", &|t| {
        let e = t
            .iter_mut()
            .find(|(k, ..)| k == "image_proj_model.pos_embed")
            .unwrap();
        e.1 = I64;
        let n = e.2.iter().product::<usize>();
        e.3 = vec![0; n * 8];
    });
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
        damaged_adapters(tmp.path());
        for (name, contents) in FILES {
            let path = tmp.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
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
