//! `troupe debug bench-train`: one real adapter training step on a random-weight UNet, timed,
//! with the step's FLOPs from the UNet config (the count its own test checks against PyTorch).

mod common;

use common::{ok, root, troupe};
use troupe_models::flops::FlopShape;
use troupe_models::unet::UNet2DConditionConfig;

const TINY_UNET: &str = "configs/tiny-sdxl/unet/config.json";

/// `troupe debug bench-train` on the tiny UNet with tiny adapter sizes, one warm-up step,
/// JSON output, `shape` (batch, latent size, steps) and `extra` flags.
fn bench(shape: &[&str], extra: &[&str]) -> std::process::Output {
    let mut args = vec!["debug", "bench-train", "--unet-config", TINY_UNET];
    args.extend([
        "--lora-rank",
        "4",
        "--ppr-dim-head",
        "8",
        "--clip-dim",
        "24",
    ]);
    args.extend(["--warmup", "1", "--json"]);
    args.extend(shape);
    args.extend(extra);
    troupe(&args)
}

#[test]
fn bench_train_times_a_finite_step_and_counts_its_flops() {
    let config = TINY_UNET;
    let out = bench(
        &[
            "--batch", "2", "--height", "8", "--width", "8", "--steps", "2",
        ],
        &["--peak-tflops", "1"],
    );
    ok(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let losses = step_losses(&r);
    assert_eq!(losses.len(), 3);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // One character: background + character slots of 20 PPR tokens each.
    assert_eq!(r["image_tokens"], 40);
    let forward = UNet2DConditionConfig::from_file(&root().join(config))
        .unwrap()
        .forward_flops(FlopShape {
            batch: 2,
            height: 8,
            width: 8,
            text_tokens: 77,
            image_tokens: 40,
            lora_rank: 4,
        })
        .unwrap();
    assert_eq!(r["step_flops"].as_f64().unwrap(), 2.0 * forward);
    let median = r["median_s"].as_f64().unwrap();
    assert!(median > 0.0 && r["step_s"].as_array().unwrap().len() == 2);
    let tflops = r["tflops"].as_f64().unwrap();
    assert!((tflops - 2.0 * forward / median / 1e12).abs() <= 1e-9 * tflops.abs().max(1.0));
    assert!((r["samples_per_s"].as_f64().unwrap() - 2.0 / median).abs() < 1e-9 * (2.0 / median));
    assert_eq!(r["mfu"].as_f64().unwrap(), tflops);
    // The CPU backend reports no allocator pools: the process's peak RSS instead.
    assert!(r["device_memory_reserved"].is_null() && r["peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert!(r["trainable_tensors"].as_u64().unwrap() > 0);
}

/// The `losses` of a bench-train JSON report.
fn step_losses(r: &serde_json::Value) -> Vec<f64> {
    let all = r["losses"].as_array().expect("a losses array");
    all.iter().map(|v| v.as_f64().expect("a number")).collect()
}

/// Per-step losses of a few tiny training steps with one attention op.
fn tiny_losses(attention: &str) -> Vec<f64> {
    let out = bench(
        &[
            "--batch", "2", "--height", "16", "--width", "16", "--steps", "3",
        ],
        &["--attention", attention],
    );
    ok(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["attention"], attention);
    let losses = step_losses(&r);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    losses
}

#[test]
fn efficient_attention_trains_like_plain_attention() {
    // Four steps: later losses see the AdamW updates made from each op's gradients.
    let (plain, efficient) = (tiny_losses("plain"), tiny_losses("efficient"));
    assert_eq!(plain.len(), 4);
    for (i, (p, e)) in plain.iter().zip(&efficient).enumerate() {
        assert!(
            (p - e).abs() <= 1e-5 * p.abs().max(1.0),
            "step {i}: plain {p}, efficient {e}"
        );
    }
}
