//! The streaming safetensors writer gives the bytes the whole-buffer path gave before it
//! (`safetensors::serialize`, then `__metadata__` added with sorted keys): exports stay
//! byte-for-byte what they were.

use std::collections::HashMap;

use safetensors::{Dtype, View};
use troupe_models::weights::write_safetensors;
use troupe_pt::{DType, Tensor};

struct V<'a>(&'a Tensor);

impl View for V<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
            other => panic!("{other:?} not in this test"),
        }
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// The previous implementation: serialise everything, then rewrite the header with the
/// metadata's keys sorted.
fn whole_buffer(tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Vec<u8> {
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), V(t))), None).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut meta: Vec<(String, String)> = metadata.into_iter().collect();
    meta.sort();
    let meta = meta
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn streaming_writer_equals_the_whole_buffer_writer() {
    let t = |dtype: DType, shape: Vec<usize>, seed: u8| {
        let n = shape.iter().product::<usize>() * dtype.itemsize();
        let data = (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        Tensor::new(dtype, shape, data).unwrap()
    };
    let tensors = vec![
        (
            "ip_adapter.10.to_q_lora.up.weight".to_string(),
            t(DType::F32, vec![8, 4], 1),
        ),
        (
            "ip_adapter.2.to_q_lora.up.weight".to_string(),
            t(DType::F32, vec![3, 5], 2),
        ),
        (
            "image_proj_model.pos_embed".to_string(),
            t(DType::F16, vec![3, 7], 3),
        ),
        ("b".to_string(), t(DType::BF16, vec![5], 4)),
        ("count".to_string(), t(DType::I64, vec![2], 5)),
        ("a".to_string(), t(DType::F32, vec![], 6)),
    ];
    let metadata: HashMap<String, String> = [("z", "1"), ("step", "40"), ("storymaker.spec", "{}")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    write_safetensors(&path, &tensors, Some(metadata.clone())).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        whole_buffer(&tensors, metadata)
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no temporary file left");
}
