//! write → read round trips, container layout, and the export used to check
//! compatibility with real torch.

mod common;

use troupe_pt::{
    DType, Tensor, Value, read_bytes, read_file, write_bytes, write_bytes_zip64, write_file,
};

fn ramp(n: usize, scale: f32, shift: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale + shift).collect()
}

/// The shape of an IP-Adapter export: two OrderedDicts of f32 and f16 tensors.
fn export_sample() -> Value {
    let t = |dtype, shape: Vec<usize>, scale, shift| {
        let n = shape.iter().product();
        Value::Tensor(Tensor::from_f32_as(dtype, shape, &ramp(n, scale, shift)).unwrap())
    };
    Value::Dict(vec![
        (
            "image_proj_model".into(),
            Value::OrderedDict(vec![
                ("proj.weight".into(), t(DType::F32, vec![6, 4], 0.25, -3.0)),
                ("proj.bias".into(), t(DType::F32, vec![6], -0.125, 0.5)),
                ("norm.weight".into(), t(DType::F16, vec![4], 0.1, 1.0)),
                ("norm.bias".into(), t(DType::F16, vec![4], -0.3, 0.0)),
            ]),
        ),
        (
            "ip_adapter".into(),
            Value::OrderedDict(vec![
                (
                    "1.to_k_ip.weight".into(),
                    t(DType::F16, vec![4, 6], 0.07, -0.8),
                ),
                (
                    "1.to_v_ip.weight".into(),
                    t(DType::F16, vec![4, 6], -0.03, 0.4),
                ),
            ]),
        ),
    ])
}

/// Everything the writer supports.
fn everything() -> Value {
    let mut v = export_sample();
    let Value::Dict(items) = &mut v else {
        unreachable!()
    };
    let tensors = DType::ALL.iter().map(|&d| {
        let itemsize = d.itemsize();
        let data: Vec<u8> = (0..3 * itemsize)
            .map(|i| {
                if d == DType::Bool {
                    (i % 2) as u8
                } else {
                    (i * 37 % 251) as u8
                }
            })
            .collect();
        (
            Value::Str(d.torch_name().into()),
            Value::Tensor(Tensor::new(d, vec![3], data).unwrap()),
        )
    });
    items.push(("dtypes".into(), Value::Dict(tensors.collect())));
    items.push((
        "scalar".into(),
        Value::Tensor(Tensor::from_f32(vec![], &[2.5]).unwrap()),
    ));
    items.push((
        "empty".into(),
        Value::Tensor(Tensor::from_f32(vec![0, 5], &[]).unwrap()),
    ));
    items.push((
        "python".into(),
        Value::Dict(vec![
            ("none".into(), Value::None),
            ("bools".into(), Value::List(vec![true.into(), false.into()])),
            (
                "ints".into(),
                Value::List(
                    [
                        0,
                        255,
                        256,
                        65535,
                        65536,
                        -1,
                        -(1 << 31),
                        1 << 31,
                        1 << 40,
                        i64::MIN,
                        i64::MAX,
                    ]
                    .map(Value::Int)
                    .to_vec(),
                ),
            ),
            (
                "floats".into(),
                Value::Tuple(vec![0.1.into(), (-1e300).into(), 0.0.into()]),
            ),
            ("text".into(), "héllo ✓ \n".into()),
            ("bytes".into(), Value::Bytes((0..=255).collect())),
            ("empty_bytes".into(), Value::Bytes(vec![])),
            (
                "long_list".into(),
                Value::List((0..2500).map(Value::Int).collect()),
            ),
            (
                "tuples".into(),
                Value::List(vec![
                    Value::Tuple(vec![]),
                    Value::Tuple(vec![1.into()]),
                    Value::Tuple((0..5).map(Value::Int).collect()),
                ]),
            ),
            (Value::Int(7), "int key".into()),
            (Value::Tuple(vec![1.into(), "a".into()]), "tuple key".into()),
        ]),
    ));
    v
}

#[test]
fn roundtrip_in_memory() {
    let v = everything();
    let bytes = write_bytes(&v, "archive").unwrap();
    assert_eq!(read_bytes(&bytes, "rt.bin").unwrap(), v);
}

#[test]
fn roundtrip_zip64_records() {
    let v = everything();
    let bytes = write_bytes_zip64(&v, "archive").unwrap();
    assert_eq!(read_bytes(&bytes, "rt64.bin").unwrap(), v);
}

#[test]
fn roundtrip_file_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ip_adapter.bin");
    write_file(&path, &export_sample()).unwrap();
    assert_eq!(read_file(&path).unwrap(), export_sample());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ip_adapter.bin"]);
    // A failed write leaves neither a partial file nor a clobbered target.
    let bad = Value::Tensor(Tensor {
        dtype: DType::F32,
        shape: vec![4],
        data: vec![0; 3],
    });
    let e = write_file(&path, &bad).unwrap_err();
    assert!(e.to_string().contains("invalid tensor"), "{e}");
    assert_eq!(read_file(&path).unwrap(), export_sample());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn layout_matches_torch() {
    let bytes = write_bytes(&export_sample(), "exp").unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    assert_eq!(
        names,
        [
            "exp/data.pkl",
            "exp/.format_version",
            "exp/.storage_alignment",
            "exp/byteorder",
            "exp/data/0",
            "exp/data/1",
            "exp/data/2",
            "exp/data/3",
            "exp/data/4",
            "exp/data/5",
            "exp/version"
        ]
    );
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        assert_eq!(f.data_start().unwrap() % 64, 0, "{}", f.name().unwrap());
    }
    let mut version = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("exp/version").unwrap(), &mut version).unwrap();
    assert_eq!(version, "3\n");
}

#[test]
fn half_conversion_on_export() {
    let v = read_bytes(&write_bytes(&export_sample(), "a").unwrap(), "a").unwrap();
    let norm = v
        .get("image_proj_model")
        .unwrap()
        .get_tensor("norm.weight")
        .unwrap();
    assert_eq!(norm.dtype, DType::F16);
    // 1.0, 1.1, 1.2, 1.3 rounded to f16.
    assert_eq!(
        norm.to_f32_vec().unwrap(),
        [1.0, 1.099_609_4, 1.200_195_3, 1.299_804_7]
    );
}

/// Not a test: a tool. Writes `export.bin`, `export_zip64.bin` and `everything.bin` with
/// `.json` expectations to `TROUPE_PT_EXPORT_DIR`, for
/// `python scripts/make_pt_fixtures.py --check DIR/*.bin` to verify with torch:
/// `TROUPE_PT_EXPORT_DIR=/tmp/pt cargo test --release -p troupe-pt --test roundtrip -- --ignored`.
#[test]
#[ignore = "writes files for the torch check; run with TROUPE_PT_EXPORT_DIR and --ignored"]
fn export_for_torch_check() {
    let dir = std::env::var_os("TROUPE_PT_EXPORT_DIR")
        .expect("set TROUPE_PT_EXPORT_DIR to the folder to write the files to");
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = |name: &str, v: &Value| {
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(&common::encode(v)).unwrap(),
        )
        .unwrap();
    };
    write_file(&dir.join("export.bin"), &export_sample()).unwrap();
    json("export.bin", &export_sample());
    std::fs::write(
        dir.join("export_zip64.bin"),
        write_bytes_zip64(&export_sample(), "export_zip64").unwrap(),
    )
    .unwrap();
    json("export_zip64.bin", &export_sample());
    write_file(&dir.join("everything.bin"), &everything()).unwrap();
    json("everything.bin", &everything());
}

#[test]
fn streaming_writer_equals_the_in_memory_writer() {
    let t = |shape: Vec<usize>, seed: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| seed + i as f32 * 0.25).collect();
        troupe_pt::Tensor::from_f32(shape, &v).unwrap()
    };
    let tensors = [t(vec![3, 4], 1.0), t(vec![5], -2.0), t(vec![2, 2, 2], 7.0)];
    let value = |ts: &[troupe_pt::Tensor]| {
        troupe_pt::Value::Dict(vec![
            (
                troupe_pt::Value::Str("group".into()),
                troupe_pt::Value::OrderedDict(vec![
                    (
                        troupe_pt::Value::Str("a".into()),
                        troupe_pt::Value::Tensor(ts[0].clone()),
                    ),
                    (
                        troupe_pt::Value::Str("b".into()),
                        troupe_pt::Value::Tensor(ts[1].clone()),
                    ),
                ]),
            ),
            (
                troupe_pt::Value::Str("c".into()),
                troupe_pt::Value::Tensor(ts[2].clone()),
            ),
        ])
    };
    let dir = tempfile::tempdir().unwrap();
    // One file name (the archive's folder is named after it), two folders.
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let (whole, streamed) = (dir.path().join("a/mask.bin"), dir.path().join("b/mask.bin"));
    troupe_pt::write_file(&whole, &value(&tensors)).unwrap();
    // Placeholders carry dtype and shape; the bytes arrive when each entry is written.
    let empty: Vec<troupe_pt::Tensor> = tensors
        .iter()
        .map(|t| troupe_pt::Tensor {
            data: Vec::new(),
            ..t.clone()
        })
        .collect();
    let mut asked = Vec::new();
    troupe_pt::write_file_streaming(&streamed, &value(&empty), &mut |i, _| {
        asked.push(i);
        Ok(tensors[i].data.clone())
    })
    .unwrap();
    assert_eq!(asked, [0, 1, 2]);
    assert!(std::fs::read(&whole).unwrap() == std::fs::read(&streamed).unwrap());
    // Bytes of the wrong size are refused and nothing is left behind.
    let e = troupe_pt::write_file_streaming(
        &dir.path().join("bad.bin"),
        &value(&empty),
        &mut |_, _| Ok(vec![0; 3]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bytes given"), "{e}");
    assert!(!dir.path().join("bad.bin").exists() && !dir.path().join("bad.bin.partial").exists());
}
