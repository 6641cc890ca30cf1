//! `troupe adapter init` and `troupe export`: the reference key layout, both containers, f16.

use std::path::{Path, PathBuf};

use troupe_pt::{DType, Value};

mod common;

use common::{adapter_seeded, ok, troupe};

fn unet_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../troupe-models/tests/fixtures/unet/sdxl_tiny/config.json")
}

fn safetensors(path: &Path) -> Vec<(String, troupe_pt::Tensor)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let dtype = match v.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                d => panic!("{k}: {d:?}"),
            };
            (
                k,
                troupe_pt::Tensor::new(dtype, v.shape().to_vec(), v.data().to_vec()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn init_writes_the_reference_layout_with_zero_inits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.safetensors");
    let cfg = unet_config();
    let o = troupe(&[
        "adapter",
        "init",
        "--unet-config",
        cfg.to_str().unwrap(),
        "--rank",
        "4",
        "--clip-dim",
        "24",
        "--ppr-dim-head",
        "8",
        "--ppr-depth",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("34 attention processors"));
    let t = safetensors(&out);
    let get = |k: &str| {
        t.iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("no {k}"))
            .1
            .clone()
    };
    // 34 processors: even ones 8 tensors, odd ones 10.
    for i in 0..34 {
        let n = t
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("ip_adapter.{i}.")))
            .count();
        assert_eq!(n, if i % 2 == 0 { 8 } else { 10 }, "processor {i}");
    }
    assert_eq!(get("ip_adapter.1.to_k_lora.down.weight").shape, vec![4, 16]); // (r, cross)
    assert_eq!(get("ip_adapter.1.to_k_ip.weight").shape, vec![16, 16]); // (h, cross)
    for zero in [
        "ip_adapter.0.to_q_lora.up.weight",
        "image_proj_model.pos_embed",
        "image_proj_model.bg_embed",
        "image_proj_model.proj_out.weight",
    ] {
        assert!(
            get(zero).to_f32_vec().unwrap().iter().all(|&x| x == 0.0),
            "{zero} is not zero-initialised"
        );
    }
    assert!(
        get("ip_adapter.0.to_q_lora.down.weight")
            .to_f32_vec()
            .unwrap()
            .iter()
            .any(|&x| x != 0.0)
    );
}

#[test]
fn export_bin_and_f16_agree_with_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a.safetensors");
    let cfg = unet_config();
    adapter_seeded(&cfg, &src, 3);
    let bin = tmp.path().join("mask.bin");
    ok(&troupe(&[
        "export",
        src.to_str().unwrap(),
        "--out",
        bin.to_str().unwrap(),
        "--format",
        "storymaker-bin",
    ]));
    let half = tmp.path().join("half.safetensors");
    ok(&troupe(&[
        "export",
        src.to_str().unwrap(),
        "--out",
        half.to_str().unwrap(),
        "--dtype",
        "f16",
    ]));

    let source = safetensors(&src);
    let value = troupe_pt::read_file(&bin).unwrap();
    let groups: Vec<&str> = value
        .entries()
        .unwrap()
        .iter()
        .map(|(k, _)| match k {
            Value::Str(s) => s.as_str(),
            _ => "?",
        })
        .collect();
    // The reference loader takes the two groups by name; troupe's metadata rides along.
    assert_eq!(groups, ["image_proj_model", "ip_adapter", "troupe"]);
    let spec = value
        .get("troupe")
        .and_then(|m| m.get(troupe_models::adapter::SPEC_METADATA))
        .and_then(Value::as_str)
        .expect("the .bin states the adapter's architecture");
    assert!(spec.contains("\"lora_rank\""), "{spec}");
    let mut n = 0;
    for (key, t) in &source {
        let (group, name) = key.split_once('.').unwrap();
        let got = value
            .get(group)
            .unwrap()
            .get(name)
            .and_then(Value::as_tensor)
            .unwrap_or_else(|| panic!("{key} missing in the .bin"));
        assert_eq!(got, t, "{key}");
        n += 1;
    }
    assert_eq!(
        value.get("ip_adapter").unwrap().entries().unwrap().len()
            + value
                .get("image_proj_model")
                .unwrap()
                .entries()
                .unwrap()
                .len(),
        n
    );

    for ((k, a), (_, b)) in source.iter().zip(safetensors(&half)) {
        assert_eq!(b.dtype, DType::F16, "{k}");
        assert_eq!(
            a.to_float_dtype(DType::F16).unwrap(),
            b,
            "{k}: not rounded to nearest f16"
        );
    }
}

#[test]
fn export_names_a_missing_source() {
    let o = troupe(&["export", "no/such/run", "--out", "/tmp/x.safetensors"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/run"));
}
