//! Hand-built hostile or malformed checkpoints: each must give an error (not a
//! panic, hang, stack overflow or huge allocation).

use std::io::{Cursor, Write};

use troupe_pt::{ErrorKind, Value, read_bytes};
use zip::write::SimpleFileOptions;

/// A torch-layout zip with `data.pkl` = `pkl` and the given storage records.
fn ckpt(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("a/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    for (key, data) in storages {
        z.start_file(format!("a/data/{key}"), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.start_file("a/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
}

fn s(text: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(text.len() as u32).to_le_bytes());
    v.extend_from_slice(text.as_bytes());
    v
}

fn int(i: i64) -> Vec<u8> {
    let mut v = vec![0x8a, 8];
    v.extend_from_slice(&i.to_le_bytes());
    v
}

fn tuple(items: &[i64]) -> Vec<u8> {
    let mut v = vec![b'('];
    items.iter().for_each(|&i| v.extend(int(i)));
    v.push(b't');
    v
}

/// `_rebuild_tensor_v2(pid, offset, size, stride, False, OrderedDict())`.
fn tensor(
    storage: &str,
    key: &str,
    numel: i64,
    offset: i64,
    size: &[i64],
    stride: &[i64],
) -> Vec<u8> {
    let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
    v.extend(s("storage"));
    v.extend(format!("ctorch\n{storage}\n").bytes());
    v.extend(s(key));
    v.extend(s("cpu"));
    v.extend(int(numel));
    v.extend(b"tQ");
    v.extend(int(offset));
    v.extend(tuple(size));
    v.extend(tuple(stride));
    v.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    v
}

fn pickle(body: &[u8]) -> Vec<u8> {
    let mut v = b"\x80\x02".to_vec();
    v.extend_from_slice(body);
    v.push(b'.');
    v
}

fn err(pkl: &[u8], storages: &[(&str, &[u8])]) -> troupe_pt::Error {
    read_bytes(&ckpt(pkl, storages), "h.bin").expect_err("hostile checkpoint was accepted")
}

#[test]
fn sanity_shared_storage_views() {
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let mut body = b"]q\x00(".to_vec();
    body.extend(tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]));
    body.extend(tensor("FloatStorage", "0", 6, 1, &[3], &[2]));
    body.push(b'e');
    let v = read_bytes(&ckpt(&pickle(&body), &[("0", &data)]), "ok.bin").unwrap();
    let items = v.items().unwrap();
    assert_eq!(
        items[0].as_tensor().unwrap().to_f32_vec().unwrap(),
        [0., 1., 2., 3., 4., 5.]
    );
    assert_eq!(
        items[1].as_tensor().unwrap().to_f32_vec().unwrap(),
        [1., 3., 5.]
    );
}

#[test]
fn deep_nesting_and_cycles() {
    let mut body = vec![b']'; 5000];
    body.extend(vec![b'a'; 4999]);
    let e = err(&pickle(&body), &[]);
    assert!(e.to_string().contains("nested deeper"), "{e}");
    // A list that contains itself.
    let e = err(&pickle(b"]q\x00h\x00a"), &[]);
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

#[test]
fn billion_laughs() {
    // l0 = [1]; l(i+1) = [l(i)] * 10, 40 levels deep: 10^40 nodes if expanded.
    let mut body = b"]q\x00K\x01a".to_vec();
    for i in 1..40u8 {
        body.extend([b']', b'q', i, b'(']);
        body.extend([b'h', i - 1].repeat(10));
        body.push(b'e');
    }
    let e = err(&pickle(&body), &[]);
    assert!(e.to_string().contains("too many objects"), "{e}");
}

#[test]
fn storage_size_lies() {
    // Declares 2^40 floats but the record has 8 bytes.
    let pkl = pickle(&tensor("FloatStorage", "0", 1 << 40, 0, &[1 << 40], &[1]));
    let e = err(&pkl, &[("0", &[0; 8])]);
    assert!(
        matches!(&e.kind, ErrorKind::Storage { key, .. } if key == "0"),
        "{e}"
    );
    // View outside its storage.
    let pkl = pickle(&tensor("FloatStorage", "0", 2, 1, &[2], &[1]));
    let e = err(&pkl, &[("0", &[0; 8])]);
    assert!(
        e.to_string()
            .contains("reaches byte 12 of storage `0` which has 8 bytes"),
        "{e}"
    );
    // Overflowing strides.
    let pkl = pickle(&tensor(
        "FloatStorage",
        "0",
        2,
        0,
        &[3, 3],
        &[i64::MAX / 2, 1],
    ));
    assert!(matches!(
        err(&pkl, &[("0", &[0; 8])]).kind,
        ErrorKind::Pickle { .. }
    ));
    // A stride-0 view expanding 4 bytes to 4 TiB.
    let pkl = pickle(&tensor("FloatStorage", "0", 1, 0, &[1 << 40], &[0]));
    let e = err(&pkl, &[("0", &[0; 4])]);
    assert!(e.to_string().contains("expand"), "{e}");
    // Negative sizes.
    let pkl = pickle(&tensor("FloatStorage", "0", 2, 0, &[-1], &[1]));
    assert!(matches!(
        err(&pkl, &[("0", &[0; 8])]).kind,
        ErrorKind::Pickle { .. }
    ));
    // Missing record.
    let pkl = pickle(&tensor("FloatStorage", "7", 2, 0, &[2], &[1]));
    let e = err(&pkl, &[]);
    assert!(
        e.to_string()
            .contains("h.bin: storage `7`: record a/data/7 is missing"),
        "{e}"
    );
}

#[test]
fn huge_length_prefixes() {
    let mut body = vec![0x8d];
    body.extend((1u64 << 62).to_le_bytes());
    assert!(matches!(
        err(&pickle(&body), &[]).kind,
        ErrorKind::Pickle { .. }
    ));
    let body = [b'X', 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        err(&pickle(&body), &[]).kind,
        ErrorKind::Pickle { .. }
    ));
}

#[test]
fn refused_globals_and_opcodes() {
    for (module, name) in [
        ("torch", "load"),
        ("builtins", "getattr"),
        ("torch._C", "_load"),
        ("numpy", "load"),
        ("collections", "defaultdict"),
    ] {
        let pkl = pickle(format!("c{module}\n{name}\n)R").as_bytes());
        let e = err(&pkl, &[]);
        assert!(
            matches!(&e.kind, ErrorKind::ForbiddenGlobal(g) if *g == format!("{module}.{name}")),
            "{e}"
        );
    }
    // Allowed names that are not callable.
    let e = err(&pickle(b"ctorch\nFloatStorage\n)R"), &[]);
    assert!(
        e.to_string()
            .contains("`torch.FloatStorage` may not be called"),
        "{e}"
    );
    // INST (protocol 0 class instantiation) is not implemented at all.
    let e = err(&pickle(b"(ios\nsystem\n"), &[]);
    assert!(
        matches!(e.kind, ErrorKind::UnsupportedOpcode { name: "INST", .. }),
        "{e}"
    );
    // A bare storage type left in the result.
    let e = err(&pickle(b"ctorch\nFloatStorage\n"), &[]);
    assert!(e.to_string().contains("not plain data"), "{e}");
}

#[test]
fn numpy_object_arrays_are_refused() {
    let body = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85X\x01\x00\x00\x00b\x87R(K\x01K\x01\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R";
    let e = err(&pickle(body), &[]);
    assert!(e.to_string().contains("numpy dtype \"O8\""), "{e}");
}

#[test]
fn duplicate_dict_keys_behave_like_python() {
    // {'a': 1, 'b': 2, 'a': 3} -> {'a': 3, 'b': 2}
    let mut body = b"}(".to_vec();
    for (k, v) in [("a", 1), ("b", 2), ("a", 3)] {
        body.extend(s(k));
        body.extend(int(v));
    }
    body.push(b'u');
    let v = read_bytes(&ckpt(&pickle(&body), &[]), "d.bin").unwrap();
    assert_eq!(
        v,
        Value::Dict(vec![
            ("a".into(), Value::Int(3)),
            ("b".into(), Value::Int(2))
        ])
    );
}
