//! The exact JSON encoding of checkpoint values shared with
//! `scripts/make_pt_fixtures.py` (see its docstring).

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::{Value as Json, json};
use troupe_pt::{DType, Tensor, Value};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    decode(&serde_json::from_str(&text).unwrap())
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn pairs(j: &Json) -> Vec<(Value, Value)> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|p| (decode(&p[0]), decode(&p[1])))
        .collect()
}

pub fn decode(j: &Json) -> Value {
    match j {
        Json::Null => Value::None,
        Json::Bool(b) => Value::Bool(*b),
        Json::Object(m) => {
            let (tag, v) = m.iter().next().unwrap();
            match tag.as_str() {
                "int" => Value::Int(v.as_i64().unwrap()),
                "float" => Value::Float(v.as_str().unwrap().parse().unwrap()),
                "str" => Value::Str(v.as_str().unwrap().to_owned()),
                "bytes" => Value::Bytes(hex(v.as_str().unwrap())),
                "tuple" => Value::Tuple(v.as_array().unwrap().iter().map(decode).collect()),
                "list" => Value::List(v.as_array().unwrap().iter().map(decode).collect()),
                "dict" => Value::Dict(pairs(v)),
                "odict" => Value::OrderedDict(pairs(v)),
                "tensor" => {
                    let dtype = DType::from_torch_name(v["dtype"].as_str().unwrap()).unwrap();
                    let shape = v["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect();
                    Value::Tensor(
                        Tensor::new(dtype, shape, hex(v["hex"].as_str().unwrap())).unwrap(),
                    )
                }
                other => panic!("unknown tag {other}"),
            }
        }
        other => panic!("unexpected JSON {other}"),
    }
}

pub fn encode(v: &Value) -> Json {
    let pairs = |p: &[(Value, Value)]| {
        Json::Array(
            p.iter()
                .map(|(k, v)| json!([encode(k), encode(v)]))
                .collect(),
        )
    };
    match v {
        Value::None => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!({ "int": i }),
        // Rust's shortest round-trip formatting, parsed back exactly by Python.
        Value::Float(f) => json!({ "float": format!("{f:?}") }),
        Value::Str(s) => json!({ "str": s }),
        Value::Bytes(b) => {
            json!({ "bytes": b.iter().map(|x| format!("{x:02x}")).collect::<String>() })
        }
        Value::Tuple(items) => json!({ "tuple": items.iter().map(encode).collect::<Vec<_>>() }),
        Value::List(items) => json!({ "list": items.iter().map(encode).collect::<Vec<_>>() }),
        Value::Dict(p) => json!({ "dict": pairs(p) }),
        Value::OrderedDict(p) => json!({ "odict": pairs(p) }),
        Value::Tensor(t) => json!({ "tensor": {
            "dtype": t.dtype.torch_name(),
            "shape": t.shape,
            "hex": t.data.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        }}),
    }
}
