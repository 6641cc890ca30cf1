//! The UNet FLOP count (MFU of `troupe debug bench-train`) equals PyTorch's `FlopCounterMode`
//! on diffusers' UNet, plain and with the StoryMaker processors, for the tiny config and the
//! real SDXL config at 1024². Fixtures: `scripts/make_flops_fixtures.py`.

use std::path::Path;

use troupe_models::flops::FlopShape;
use troupe_models::unet::UNet2DConditionConfig;

#[test]
fn unet_flops_equal_pytorchs_flop_counter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/flops");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("flops.json")).unwrap())
            .unwrap();
    let cases = want["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let config = match case["config"].as_str().unwrap() {
            "tiny" => root.join("../../configs/tiny-sdxl/unet/config.json"),
            _ => fixtures.join("sdxl_config.json"),
        };
        let config = UNet2DConditionConfig::from_file(&config).unwrap();
        let n = |k: &str| case[k].as_u64().unwrap() as usize;
        let got = config
            .forward_flops(FlopShape {
                batch: n("batch"),
                height: n("height"),
                width: n("width"),
                text_tokens: n("text_tokens"),
                image_tokens: n("image_tokens"),
                lora_rank: n("lora_rank"),
            })
            .unwrap();
        let expected = case["flops"].as_f64().unwrap();
        assert!(got.is_finite() && got == expected, "{case}: got {got}");
    }
}
