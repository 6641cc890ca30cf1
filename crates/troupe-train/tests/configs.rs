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
