//! The full-size StoryMaker adapter's layout against the reference's own modules: the keys and
//! shapes of `mask.bin`'s two state dicts for SDXL (113 + 1,260), made by
//! `scripts/make_export_key_table.py` from `faceid_plus` and the LoRA / LoRA-IP processors on
//! PyTorch's meta device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use troupe_models::adapter::AdapterSpec;
use troupe_models::adapter_file::verify_shapes;
use troupe_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The reference table, keyed as troupe's files are (`image_proj_model.*`, `ip_adapter.*`).
fn reference_table() -> BTreeMap<String, Vec<usize>> {
    let path = fixtures().join("export/storymaker_sdxl_keys.json");
    let table: BTreeMap<String, BTreeMap<String, Vec<usize>>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(table["image_proj_model"].len(), 113);
    assert_eq!(table["ip_adapter"].len(), 1260);
    table
        .iter()
        .flat_map(|(group, keys)| {
            keys.iter()
                .map(move |(k, s)| (format!("{group}.{k}"), s.clone()))
        })
        .collect()
}

/// Troupe's default adapter (StoryMaker's sizes) on the SDXL UNet; built lazily, no weights.
fn sdxl_spec() -> AdapterSpec {
    let config =
        UNet2DConditionConfig::from_file(&fixtures().join("flops/sdxl_config.json")).unwrap();
    let unet = UNet2DConditionModel::new(&config, &Device::flex()).unwrap();
    AdapterSpec::default().for_unet(&unet).unwrap()
}

#[test]
fn the_sdxl_adapter_has_exactly_the_reference_keys_and_shapes() {
    let spec = sdxl_spec();
    assert_eq!((spec.processors, spec.lora_rank), (140, 128));
    let table = reference_table();
    // Exactly: a key troupe lacks, one it adds, or a shape that differs is an error.
    verify_shapes(Path::new("storymaker_sdxl_keys.json"), &spec, &table).unwrap();
    // And the check sees a difference.
    let mut short = table.clone();
    short.remove("ip_adapter.139.to_out_lora.up.weight");
    assert!(verify_shapes(Path::new("short"), &spec, &short).is_err());
    let mut wrong = table;
    wrong.insert("image_proj_model.pos_embed".into(), vec![1, 4, 2048]);
    assert!(verify_shapes(Path::new("wrong"), &spec, &wrong).is_err());
}
