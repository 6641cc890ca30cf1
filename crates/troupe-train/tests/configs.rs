//! The training configs shipped in `configs/` parse and validate (a key renamed in the code
//! must be renamed there too), and the reference recipe keeps the reference's precision.

use std::path::Path;

use troupe_diffusion::control::ControlContext;
use troupe_models::attention::AttentionKernel;
use troupe_models::weights::Precision;
use troupe_train::config::TrainConfig;

fn load(name: &str) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name);
    TrainConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_configs_parse() {
    let tiny = load("tiny.toml");
    assert_eq!(tiny.model.dtype, Precision::F32);
    let reference = load("storymaker-sdxl.toml");
    assert_eq!(reference.model.dtype, Precision::Bf16);
    assert_eq!(reference.objective.attention, AttentionKernel::Efficient);
    assert_eq!(reference.data.repeat_by_characters, [1, 2, 5]);
    let pose = load("tiny-pose.toml");
    assert!(pose.model.controlnet.is_some());
    assert_eq!(pose.model.controlnet_context, ControlContext::ImageTokens);
}

#[test]
fn gradient_clipping_can_be_turned_off_and_stays_off_in_the_saved_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let off = TrainConfig::load(&path, &["train.max_grad_norm=\"off\"".to_string()]).unwrap();
    assert_eq!(off.train.max_grad_norm, None);
    // The run's saved config says "off" (TOML has no null), and reads back as off.
    let saved = off.to_toml();
    assert!(saved.contains("max_grad_norm = \"off\""), "{saved}");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.toml");
    std::fs::write(&file, saved).unwrap();
    assert_eq!(
        TrainConfig::load(&file, &[]).unwrap().train.max_grad_norm,
        None
    );
    // A number clips; anything else is refused by name.
    let two = TrainConfig::load(&path, &["train.max_grad_norm=2".to_string()]).unwrap();
    assert_eq!(two.train.max_grad_norm, Some(2.0));
    let err = TrainConfig::load(&path, &["train.max_grad_norm=\"of\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_grad_norm") && err.contains("off"),
        "{err}"
    );
}
