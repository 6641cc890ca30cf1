//! Prints the structure of a torch.save checkpoint and how long reading took.
//!
//! cargo run --release -p troupe-pt --example pt_info -- FILE [FILE...]

use std::time::Instant;

use troupe_pt::Value;

fn show(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Dict(e) | Value::OrderedDict(e) => {
            out.push_str(&format!("{}({} entries)\n", v.type_name(), e.len()));
            for (k, v) in e {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                out.push_str(&format!("{pad}  {key}: "));
                show(v, indent + 2, out);
            }
        }
        Value::List(items) | Value::Tuple(items) if items.len() > 8 => {
            out.push_str(&format!("{} of {} items\n", v.type_name(), items.len()));
        }
        Value::Tensor(t) => out.push_str(&format!("{} {:?}\n", t.dtype, t.shape)),
        other => out.push_str(&format!("{other:?}\n")),
    }
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: pt_info FILE [FILE...]");
        std::process::exit(2);
    }
    let mut failed = false;
    for p in paths {
        let start = Instant::now();
        match troupe_pt::read_file(std::path::Path::new(&p)) {
            Ok(v) => {
                let secs = start.elapsed().as_secs_f64();
                let mut out = String::new();
                show(&v, 0, &mut out);
                let bytes = count_bytes(&v);
                print!(
                    "{p}: read {:.1} MB of tensors in {secs:.3} s\n{out}",
                    bytes as f64 / 1e6
                );
            }
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    std::process::exit(failed as i32);
}

fn count_bytes(v: &Value) -> usize {
    match v {
        Value::Tensor(t) => t.data.len(),
        Value::Dict(e) | Value::OrderedDict(e) => {
            e.iter().map(|(k, v)| count_bytes(k) + count_bytes(v)).sum()
        }
        Value::List(i) | Value::Tuple(i) => i.iter().map(count_bytes).sum(),
        _ => 0,
    }
}
