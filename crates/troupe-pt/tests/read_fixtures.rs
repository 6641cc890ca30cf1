//! Reads the fixtures written by real torch (scripts/make_pt_fixtures.py) and
//! compares them exactly with what torch.load returned for them.

mod common;

use common::{fixture, load_json};
use troupe_pt::{DType, ErrorKind, Value, read_bytes, read_file};

fn check_fixture(bin: &str, json: &str) -> Value {
    let got = read_file(&fixture(bin)).unwrap_or_else(|e| panic!("{e}"));
    let expected = load_json(json);
    assert_eq!(got, expected, "{bin} differs from {json}");
    // The in-memory reader agrees with the file reader.
    let bytes = std::fs::read(fixture(bin)).unwrap();
    assert_eq!(read_bytes(&bytes, bin).unwrap(), expected);
    got
}

#[test]
fn faceid() {
    let v = check_fixture("faceid.bin", "faceid.json");
    assert!(matches!(v, Value::Dict(_)));
    let id = v.get_tensor("id").unwrap();
    assert_eq!((id.dtype, id.shape.as_slice()), (DType::F32, &[1, 512][..]));
    let norm: f32 = id
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    let kps = v.get_tensor("kps").unwrap();
    assert_eq!(kps.shape, vec![5, 2]);
    assert_eq!(kps.to_f32_vec().unwrap()[..2], [38.3, 51.7]);
}

#[test]
fn faceid_saved_as_numpy_arrays() {
    let v = check_fixture("faceid_numpy.bin", "faceid_numpy.json");
    let tensor_ckpt = read_file(&fixture("faceid.bin")).unwrap();
    // Same data as the tensor version, kps as float64.
    assert_eq!(v.get("id"), tensor_ckpt.get("id"));
    let kps = v.get_tensor("kps").unwrap();
    assert_eq!(kps.dtype, DType::F64);
    assert_eq!(
        kps.to_f32_vec().unwrap(),
        tensor_ckpt.get_tensor("kps").unwrap().to_f32_vec().unwrap()
    );
}

#[test]
fn ip_adapter_state_dicts() {
    for (bin, json) in [
        ("ip_adapter.bin", "ip_adapter.json"),
        ("ip_adapter_proto4.bin", "ip_adapter_proto4.json"),
    ] {
        let v = check_fixture(bin, json);
        let proj = v.get("image_proj").unwrap();
        assert!(matches!(proj, Value::OrderedDict(_)));
        let keys: Vec<&str> = proj.tensors().map(|(k, _)| k).collect();
        assert_eq!(keys, ["0.weight", "0.bias", "1.weight", "1.bias"]);
        let ip = v.get("ip_adapter").unwrap();
        let keys: Vec<&str> = ip.tensors().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "1.to_k_ip.weight",
                "1.to_v_ip.weight",
                "3.to_k_ip.weight",
                "3.to_v_ip.weight"
            ]
        );
        assert!(
            ip.tensors()
                .all(|(_, t)| t.dtype == DType::F16 && t.shape == [4, 6])
        );
    }
}

#[test]
fn views_offsets_strides_dtypes_and_python_values() {
    let v = check_fixture("views.bin", "views.json");
    let t = v.get_tensor("transposed").unwrap();
    assert_eq!(t.shape, vec![4, 3]);
    assert_eq!(t.to_f32_vec().unwrap()[..4], [-1.0, 1.0, 3.0, -0.5]);
    assert_eq!(
        v.get_tensor("slice").unwrap().to_f32_vec().unwrap(),
        [1.5, 2.0, 3.5, 4.0]
    );
    assert_eq!(v.get_tensor("scalar").unwrap().shape, Vec::<usize>::new());
    let py = v.get("python").unwrap();
    assert_eq!(py.get("big"), Some(&Value::Int(1 << 40)));
    assert_eq!(py.get("bytes"), Some(&Value::Bytes(vec![0, 255, 16])));
}

#[test]
fn big_endian_byteorder_record() {
    let got = read_file(&fixture("bigendian.bin")).unwrap();
    assert_eq!(got, load_json("views.json"));
}

#[test]
fn parameters() {
    let v = check_fixture("parameter.bin", "parameter.json");
    assert_eq!(v.get_tensor("w").unwrap().shape, vec![3, 2]);
    assert_eq!(v.get("linear").unwrap().tensors().count(), 2);
}

#[test]
fn numpy_fortran_big_endian_scalars() {
    let v = check_fixture("numpy_extras.bin", "numpy_extras.json");
    let f = v.get_tensor("fortran").unwrap();
    assert_eq!(f.to_f32_vec().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(
        v.get_tensor("big_endian").unwrap().to_i64_vec().unwrap(),
        [0, 1, 2, 3]
    );
    assert_eq!(v.get("scalar_f32"), Some(&Value::Float(1.5)));
    assert_eq!(v.get("scalar_i64"), Some(&Value::Int(-9)));
}

#[test]
fn malicious_global_is_refused_with_its_name() {
    let e = read_file(&fixture("malicious.bin")).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::ForbiddenGlobal(g) if g == "os.system"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("malicious.bin: pickle references global `os.system`"),
        "{msg}"
    );
    assert!(msg.contains("refusing to execute it"), "{msg}");

    let e = read_file(&fixture("malicious_stack_global.bin")).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::ForbiddenGlobal(g) if g == "builtins.eval"),
        "{e}"
    );
}

#[test]
fn legacy_format_is_refused_clearly() {
    let e = read_file(&fixture("legacy.bin")).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::LegacyFormat), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("legacy.bin: legacy (non-zip) torch.save format"),
        "{msg}"
    );
}

#[test]
fn not_checkpoints() {
    for (bytes, expect) in [
        (&b""[..], "empty"),
        (b"hello world", "zip header"),
        (
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
            "plain pickle",
        ),
        (b"\x93NUMPY\x01\x00", "numpy"),
    ] {
        let e = read_bytes(bytes, "x.bin").unwrap_err().to_string();
        assert!(
            e.starts_with("x.bin: not a torch.save checkpoint") && e.contains(expect),
            "{e}"
        );
    }
    let e = read_file(&fixture("does-not-exist.bin")).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Io(_)), "{e}");
}

#[test]
fn truncated_files_error_without_panicking() {
    let bytes = std::fs::read(fixture("ip_adapter.bin")).unwrap();
    for len in 0..bytes.len() {
        assert!(
            read_bytes(&bytes[..len], "cut.bin").is_err(),
            "prefix of {len} bytes accepted"
        );
    }
}

#[test]
fn corrupted_files_do_not_panic() {
    // Flip bytes all over the file (headers, pickle, data); any result but a
    // panic or a huge allocation is fine.
    let bytes = std::fs::read(fixture("views.bin")).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..bytes.len() * 4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = bytes.clone();
        let pos = i % bytes.len();
        b[pos] ^= (seed as u8) | 1;
        let _ = read_bytes(&b, "corrupt.bin");
    }
}

#[test]
fn half_rounding_matches_torch() {
    let v = check_fixture("rounding.bin", "rounding.json");
    let f32s = v.get_tensor("f32").unwrap();
    for (dtype, key) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let ours = f32s.to_float_dtype(dtype).unwrap();
        let torch = v.get_tensor(key).unwrap();
        for (i, (a, b)) in ours.data.chunks(2).zip(torch.data.chunks(2)).enumerate() {
            assert_eq!(a, b, "{key} element {i}: {}", f32s.to_f32_vec().unwrap()[i]);
        }
    }
}
