//! StoryMaker's initialisation from the public IP-Adapter checkpoints (storymaker.md §5.1).

use std::collections::HashMap;

use burn::prelude::*;
use troupe_models::adapter::{Adapter, AdapterSpec};
use troupe_models::adapter_file::{AdapterFormat, ExportDType, write_adapter};
use troupe_models::ppr::FaceIdPlusConfig;
use troupe_models::unet::UNet2DConditionConfig;
use troupe_pt::{Tensor, Value};
use troupe_train::pretrained::init_from_pretrained;

fn tiny(seed: u64) -> Adapter {
    tiny_with_id(seed, 512)
}

/// The tiny adapter with identity embeddings `id` wide.
fn tiny_with_id(seed: u64, id: usize) -> Adapter {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/tiny-sdxl/unet/config.json"
    );
    let config = UNet2DConditionConfig::from_file(std::path::Path::new(path)).unwrap();
    let ppr = FaceIdPlusConfig::new()
        .with_id_embeddings_dim(id)
        .with_cross_attention_dim(32)
        .with_clip_embeddings_dim(24)
        .with_resampler_dim_head(8)
        .with_resampler_depth(1);
    let spec = AdapterSpec {
        lora_rank: 8,
        ppr,
        ..AdapterSpec::default()
    };
    Adapter::fresh(&config, spec, seed, &Device::flex()).unwrap()
}

fn get<'a>(t: &'a [(String, Tensor)], k: &str) -> &'a Tensor {
    &t.iter()
        .find(|(n, _)| n == k)
        .unwrap_or_else(|| panic!("no {k}"))
        .1
}

#[test]
fn faceid_plus_v2_and_ip_plus_checkpoints_map_as_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    // A "FaceID-PlusV2" file: IP-Adapter's `{'image_proj': …, 'ip_adapter': …}` torch zip.
    let donor = tiny(7).tensors();
    let group = |prefix: &str| {
        Value::OrderedDict(
            donor
                .iter()
                .filter_map(|(k, t)| {
                    Some((
                        Value::Str(k.strip_prefix(prefix)?.to_string()),
                        Value::Tensor(t.clone()),
                    ))
                })
                .collect(),
        )
    };
    let faceid = tmp.path().join("faceid.bin");
    let value = Value::Dict(vec![
        (Value::Str("image_proj".into()), group("image_proj_model.")),
        (Value::Str("ip_adapter".into()), group("ip_adapter.")),
    ]);
    troupe_pt::write_file(&faceid, &value).unwrap();
    // An "IP-Adapter-Plus" file in the public safetensors layout (h94/IP-Adapter's
    // `ip-adapter-plus_sdxl_vit-h.safetensors`: `image_proj.*` for its Resampler, written
    // here with the `safetensors` crate, not troupe's writer), plus processor keys that
    // StoryMaker does not take from it.
    let resample: Vec<(String, Vec<usize>, Vec<u8>)> = donor
        .iter()
        .filter_map(|(k, t)| {
            let name = k.strip_prefix("image_proj_model.resample.")?;
            let bytes = t
                .to_f32_vec()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            Some((format!("image_proj.{name}"), t.shape.clone(), bytes))
        })
        .collect();
    let n_resample = resample.len();
    let extra = vec![0u8; 4 * 32 * 32];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = resample
        .iter()
        .map(|(k, shape, b)| (k.as_str(), shape.clone(), b.as_slice()))
        .chain([(
            "ip_adapter.1.to_k_ip.weight",
            vec![32, 32],
            extra.as_slice(),
        )])
        .map(|(k, shape, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, b);
            (k.to_string(), view.unwrap())
        })
        .collect();
    let plus = tmp.path().join("plus.safetensors");
    safetensors::serialize_to_file(views, None, &plus).unwrap();

    let mut adapter = tiny(1);
    let before = adapter.tensors();
    let summary = init_from_pretrained(&mut adapter, Some(&faceid), Some(&plus)).unwrap();
    let after = adapter.tensors();
    // Counted per group: the Resampler really came from the public-layout file.
    assert!(
        summary.contains(&format!("PPR resample: {n_resample}")) && n_resample > 0,
        "{summary}"
    );
    for key in [
        "ip_adapter.1.to_k_ip.weight",
        "ip_adapter.0.to_q_lora.down.weight",
        "image_proj_model.proj.0.weight",
        "image_proj_model.perceiver_resampler.proj_in.weight",
        "image_proj_model.resample.latents",
    ] {
        assert_eq!(
            get(&after, key),
            get(&donor, key),
            "{key} not taken from the checkpoint"
        );
        assert_ne!(
            get(&before, key),
            get(&donor, key),
            "{key}: donor equals the fresh init"
        );
    }
    // New StoryMaker parameters keep their fresh (zero) initialisation.
    for key in [
        "image_proj_model.pos_embed",
        "image_proj_model.bg_embed",
        "image_proj_model.proj_out.weight",
    ] {
        assert_eq!(
            get(&after, key),
            get(&before, key),
            "{key} must keep its initialisation"
        );
    }
}

#[test]
fn a_checkpoint_missing_a_tensor_it_should_provide_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plus: Vec<(String, Tensor)> = tiny(7)
        .tensors()
        .into_iter()
        .filter_map(|(k, t)| {
            let name = k.strip_prefix("image_proj_model.resample.")?;
            Some((format!("image_proj_model.{name}"), t))
        })
        .collect();
    plus.retain(|(k, _)| k != "image_proj_model.latents");
    let path = tmp.path().join("plus.safetensors");
    write_adapter(
        &path,
        &plus,
        AdapterFormat::Safetensors,
        ExportDType::F32,
        HashMap::new(),
    )
    .unwrap();
    let mut adapter = tiny(1);
    let e = init_from_pretrained(&mut adapter, None, Some(&path))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("plus.safetensors") && e.contains("image_proj_model.resample.latents"),
        "{e}"
    );
}

#[test]
fn the_public_checkpoints_made_by_their_own_code_load_as_storymaker_loads_them() {
    // `scripts/make_public_adapter_fixtures.py`: IP-Adapter's own `ProjPlusModel`, `Resampler`
    // and processors saved in the published layouts (`.bin` and `.safetensors`, float16), and
    // what StoryMaker's training script takes from them (`expected.safetensors`).
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/public_adapters");
    let expected =
        troupe_models::weights::StateDict::from_file(dir.join("expected.safetensors")).unwrap();
    let keys = expected.keys();
    assert_eq!(keys.len(), 167);
    for (faceid, plus) in [
        ("faceid_plusv2.bin", "plus_vit_h.bin"),
        ("faceid_plusv2.safetensors", "plus_vit_h.safetensors"),
        ("faceid_plusv2.safetensors", "plus_vit_h.bin"),
    ] {
        let mut adapter = tiny_with_id(1, 64);
        let summary =
            init_from_pretrained(&mut adapter, Some(&dir.join(faceid)), Some(&dir.join(plus)))
                .unwrap_or_else(|e| panic!("{faceid} + {plus}: {e}"));
        assert!(summary.contains("initialised 167 tensors"), "{summary}");
        let after = adapter.tensors();
        for key in &keys {
            let want = expected.read_host(key).unwrap().to_f32_vec().unwrap();
            let got = get(&after, key).to_f32_vec().unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && got.len() == want.len(),
                "{faceid} + {plus}: `{key}` is not what StoryMaker loads"
            );
        }
    }
}
