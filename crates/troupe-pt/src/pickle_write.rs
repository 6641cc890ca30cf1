//! Serialises a [`Value`] into the pickle `torch.save` writes (protocol 2),
//! using only opcodes and globals that `torch.load(..., weights_only=True)`
//! accepts: e.g. `bytes` go through `_codecs.encode(str, 'latin1')` as
//! Python's protocol-2 pickler does, because the weights-only unpickler has
//! no `BINBYTES`.

use crate::tensor::Tensor;
use crate::{ErrorKind, Value};

/// Same limit as the reader, so whatever we write we can read back.
const MAX_DEPTH: usize = 256;

/// Returns the pickle bytes and the tensors in storage-key order (tensor `i`
/// is stored as `data/<i>`).
/// With `check_data` off the tensors' `data` is not looked at (their bytes come later, when
/// streamed).
pub(crate) fn dump(value: &Value, check_data: bool) -> Result<(Vec<u8>, Vec<&Tensor>), ErrorKind> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        tensors: Vec::new(),
        check_data,
    };
    p.save(value, 0)?;
    p.out.push(b'.');
    Ok((p.out, p.tensors))
}

struct Pickler<'a> {
    out: Vec<u8>,
    tensors: Vec<&'a Tensor>,
    check_data: bool,
}

impl<'a> Pickler<'a> {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn int(&mut self, v: i64) {
        // Python's protocol-2 choice of opcode.
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1 with the shortest two's complement encoding.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (top, next) = (bytes[n - 1], bytes[n - 2]);
                let redundant = (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0);
                if !redundant {
                    break;
                }
                n -= 1;
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    fn str(&mut self, s: &str) -> Result<(), ErrorKind> {
        let n = u32::try_from(s.len())
            .map_err(|_| ErrorKind::Unsupported("string longer than 4 GiB".into()))?;
        self.out.push(b'X');
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn tuple_of_ints(&mut self, items: &[usize]) -> Result<(), ErrorKind> {
        let mark = items.len() > 3;
        if mark {
            self.out.push(b'(');
        }
        for &i in items {
            let i =
                i64::try_from(i).map_err(|_| ErrorKind::Tensor("dimension too large".into()))?;
            self.int(i);
        }
        self.end_tuple(items.len(), mark);
        Ok(())
    }

    /// Emits the tuple-building opcode for `n` items already written.
    fn end_tuple(&mut self, n: usize, marked: bool) {
        match (n, marked) {
            (_, true) => self.out.push(b't'),
            (0, _) => self.out.push(b')'),
            (n, _) => self.out.push(0x84 + n as u8), // TUPLE1..TUPLE3
        }
    }

    fn save(&mut self, v: &'a Value, depth: usize) -> Result<(), ErrorKind> {
        if depth > MAX_DEPTH {
            return Err(ErrorKind::Unsupported(format!(
                "values nested deeper than {MAX_DEPTH} levels"
            )));
        }
        match v {
            Value::None => self.out.push(b'N'),
            Value::Bool(true) => self.out.push(0x88),
            Value::Bool(false) => self.out.push(0x89),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s)?,
            Value::Bytes(b) => {
                self.global("_codecs", "encode");
                let latin1: String = b.iter().map(|&c| c as char).collect();
                self.str(&latin1)?;
                self.str("latin1")?;
                self.out.push(0x86);
                self.out.push(b'R');
            }
            Value::Tuple(items) => {
                let mark = items.len() > 3;
                if mark {
                    self.out.push(b'(');
                }
                for item in items {
                    self.save(item, depth + 1)?;
                }
                self.end_tuple(items.len(), mark);
            }
            Value::List(items) => {
                self.out.push(b']');
                for batch in items.chunks(1000) {
                    if batch.len() > 1 {
                        self.out.push(b'(');
                    }
                    for item in batch {
                        self.save(item, depth + 1)?;
                    }
                    self.out.push(if batch.len() > 1 { b'e' } else { b'a' });
                }
            }
            Value::Dict(pairs) => {
                self.out.push(b'}');
                self.items(pairs, depth)?;
            }
            Value::OrderedDict(pairs) => {
                self.global("collections", "OrderedDict");
                self.out.extend_from_slice(b")R");
                self.items(pairs, depth)?;
            }
            Value::Tensor(t) => self.tensor(t)?,
        }
        Ok(())
    }

    fn items(&mut self, pairs: &'a [(Value, Value)], depth: usize) -> Result<(), ErrorKind> {
        for batch in pairs.chunks(1000) {
            if batch.len() > 1 {
                self.out.push(b'(');
            }
            for (k, v) in batch {
                if !hashable(k) {
                    return Err(ErrorKind::Unsupported(format!(
                        "dict key of type {} is not hashable",
                        k.type_name()
                    )));
                }
                self.save(k, depth + 1)?;
                self.save(v, depth + 1)?;
            }
            self.out.push(if batch.len() > 1 { b'u' } else { b's' });
        }
        Ok(())
    }

    /// `_rebuild_tensor_v2(pid('storage', torch.XStorage, '<i>', 'cpu', numel),
    /// 0, size, stride, False, OrderedDict())`, as torch writes it.
    fn tensor(&mut self, t: &'a Tensor) -> Result<(), ErrorKind> {
        if self.check_data {
            t.check()?;
        } else if crate::tensor::checked_numel(&t.shape).is_none() {
            return Err(ErrorKind::Tensor(format!("shape {:?} overflows", t.shape)));
        }
        let key = self.tensors.len();
        self.tensors.push(t);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // The persistent id tuple.
        self.out.push(b'(');
        self.str("storage")?;
        self.global("torch", t.dtype.storage_name());
        self.str(&key.to_string())?;
        self.str("cpu")?;
        self.int(t.numel() as i64);
        self.out.extend_from_slice(b"tQ");
        // storage_offset, size, stride, requires_grad, backward_hooks
        self.int(0);
        self.tuple_of_ints(&t.shape)?;
        self.tuple_of_ints(&contiguous_strides(&t.shape))?;
        self.out.push(0x89);
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R");
        self.out.extend_from_slice(b"tR");
        Ok(())
    }
}

/// Row-major strides as torch computes them (size-0 dims count as 1).
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1usize;
    for (i, &n) in shape.iter().enumerate().rev() {
        strides[i] = s;
        s = s.saturating_mul(n.max(1));
    }
    strides
}

fn hashable(v: &Value) -> bool {
    match v {
        Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::Float(_)
        | Value::Str(_)
        | Value::Bytes(_) => true,
        Value::Tuple(items) => items.iter().all(hashable),
        Value::List(_) | Value::Dict(_) | Value::OrderedDict(_) | Value::Tensor(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_bytes(v: i64) -> Vec<u8> {
        let mut p = Pickler {
            out: Vec::new(),
            tensors: Vec::new(),
            check_data: true,
        };
        p.int(v);
        p.out
    }

    #[test]
    fn ints_like_python() {
        assert_eq!(int_bytes(5), b"K\x05");
        assert_eq!(int_bytes(512), b"M\x00\x02");
        assert_eq!(int_bytes(-1), b"J\xff\xff\xff\xff");
        assert_eq!(int_bytes(1 << 40), b"\x8a\x06\x00\x00\x00\x00\x00\x01");
        assert_eq!(int_bytes(-(1 << 40)), b"\x8a\x06\x00\x00\x00\x00\x00\xff");
        assert_eq!(
            int_bytes(i64::MIN),
            b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"
        );
        assert_eq!(int_bytes(0x8000_0000), b"\x8a\x05\x00\x00\x00\x80\x00");
    }

    #[test]
    fn strides() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[2, 0, 4]), vec![4, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }
}
