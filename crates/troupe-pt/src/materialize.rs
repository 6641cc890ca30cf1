//! Turns the unpickled object graph into a [`Value`] tree, loading storage
//! records and copying tensor views out into contiguous buffers.
//!
//! Two passes: the first walks the tree exactly as the second will (with the
//! same depth and size limits) and counts how often each storage and each
//! arena object is used; the second converts, loading each storage once and
//! freeing it after its last use. When the last use of a storage is a
//! contiguous view of all of it — the usual case for a `state_dict` — its
//! buffer is moved into the tensor instead of copied.

use std::collections::HashMap;

use crate::pickle::{Id, Obj, Unpickled};
use crate::tensor::{Tensor, checked_numel};
use crate::torch::TensorView;
use crate::{ErrorKind, Value};

/// Source of storage record bytes (`<stem>/data/<key>` in the archive).
pub(crate) trait StorageSource {
    /// Returns the whole record.
    fn load(&mut self, key: &str) -> Result<Vec<u8>, ErrorKind>;
}

/// Maximum nesting of containers; also what stops reference cycles.
const MAX_DEPTH: usize = 256;
/// Tensor bytes allowed beyond the size of the loaded storages (for expanded
/// stride-0 views and repeated references to one tensor).
const EXTRA_TENSOR_BYTES: u64 = 1 << 30;

pub(crate) fn materialize(
    u: Unpickled,
    src: &mut dyn StorageSource,
    big_endian: bool,
) -> Result<Value, ErrorKind> {
    let mut m = Materializer {
        arena: u.arena,
        obj_uses: Vec::new(),
        storage_uses: HashMap::new(),
        storages: HashMap::new(),
        node_budget: 0,
        byte_budget: EXTRA_TENSOR_BYTES,
        big_endian,
    };
    m.obj_uses = vec![0; m.arena.len()];
    // Generous for real pickles (each object is converted about once), but it
    // stops "billion laughs" pickles that reference one list from many places.
    m.node_budget = m.arena.len().saturating_mul(4).saturating_add(1_000_000);
    m.count(u.root, 0)?;
    m.node_budget = usize::MAX;
    m.convert(u.root, src)
}

struct Materializer {
    arena: Vec<Obj>,
    /// Remaining conversions of each arena object (last one may move it).
    obj_uses: Vec<u32>,
    /// Remaining uses of each storage key.
    storage_uses: HashMap<String, u32>,
    /// Loaded storages still needed.
    storages: HashMap<String, Vec<u8>>,
    node_budget: usize,
    byte_budget: u64,
    big_endian: bool,
}

impl Materializer {
    fn children(&self, id: Id) -> Vec<Id> {
        match &self.arena[id] {
            Obj::Tuple(v) | Obj::List(v) => v.clone(),
            Obj::Dict(p) | Obj::OrderedDict(p) => p.iter().flat_map(|&(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        }
    }

    /// Pass 1: count uses, enforcing the depth and node limits.
    fn count(&mut self, id: Id, depth: usize) -> Result<(), ErrorKind> {
        if depth > MAX_DEPTH {
            return Err(ErrorKind::Unsupported(format!(
                "containers nested deeper than {MAX_DEPTH} levels (or a reference cycle)"
            )));
        }
        self.node_budget = self.node_budget.checked_sub(1).ok_or_else(|| {
            ErrorKind::Unsupported(
                "the pickle expands to too many objects (shared references)".into(),
            )
        })?;
        self.obj_uses[id] = self.obj_uses[id].saturating_add(1);
        if let Obj::TensorView(v) = &self.arena[id] {
            *self.storage_uses.entry(v.storage.key.clone()).or_default() += 1;
        }
        for child in self.children(id) {
            self.count(child, depth + 1)?;
        }
        Ok(())
    }

    /// Pass 2: convert.
    fn convert(&mut self, id: Id, src: &mut dyn StorageSource) -> Result<Value, ErrorKind> {
        self.obj_uses[id] -= 1;
        let last_use = self.obj_uses[id] == 0;
        let value = match &mut self.arena[id] {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(i) => Value::Int(*i),
            Obj::Float(f) => Value::Float(*f),
            Obj::Str(s) if last_use => Value::Str(std::mem::take(s)),
            Obj::Str(s) => Value::Str(s.clone()),
            Obj::Bytes(b) if last_use => Value::Bytes(std::mem::take(b)),
            Obj::Bytes(b) => Value::Bytes(b.clone()),
            Obj::Tensor(t) => {
                let t = if last_use {
                    std::mem::replace(
                        t,
                        Tensor {
                            dtype: t.dtype,
                            shape: Vec::new(),
                            data: Vec::new(),
                        },
                    )
                } else {
                    t.clone()
                };
                self.spend(t.data.len())?;
                Value::Tensor(t)
            }
            Obj::TensorView(v) => {
                let v = v.clone();
                Value::Tensor(self.tensor(&v, src)?)
            }
            Obj::Tuple(_) | Obj::List(_) => {
                let is_tuple = matches!(self.arena[id], Obj::Tuple(_));
                let items = self
                    .children(id)
                    .into_iter()
                    .map(|c| self.convert(c, src))
                    .collect::<Result<Vec<_>, _>>()?;
                if is_tuple {
                    Value::Tuple(items)
                } else {
                    Value::List(items)
                }
            }
            Obj::Dict(_) | Obj::OrderedDict(_) => {
                let ordered = matches!(self.arena[id], Obj::OrderedDict(_));
                let pairs = self.dict_pairs(id, src)?;
                if ordered {
                    Value::OrderedDict(pairs)
                } else {
                    Value::Dict(pairs)
                }
            }
            other => {
                return Err(ErrorKind::Unsupported(format!(
                    "the checkpoint contains a {} object, which is not plain data",
                    other.type_name()
                )));
            }
        };
        Ok(value)
    }

    /// Converts dict items with Python semantics for repeated keys: the key
    /// keeps its first position and takes its last value.
    fn dict_pairs(
        &mut self,
        id: Id,
        src: &mut dyn StorageSource,
    ) -> Result<Vec<(Value, Value)>, ErrorKind> {
        let ids = self.children(id);
        let mut pairs: Vec<(Value, Value)> = Vec::with_capacity(ids.len() / 2);
        let mut index: HashMap<KeyRepr, usize> = HashMap::with_capacity(ids.len() / 2);
        for kv in ids.chunks_exact(2) {
            let k = self.convert(kv[0], src)?;
            let v = self.convert(kv[1], src)?;
            let repr = KeyRepr::of(&k).ok_or_else(|| {
                ErrorKind::Unsupported(format!("unhashable dict key of type {}", k.type_name()))
            })?;
            match index.get(&repr) {
                Some(&i) => pairs[i].1 = v,
                None => {
                    index.insert(repr, pairs.len());
                    pairs.push((k, v));
                }
            }
        }
        Ok(pairs)
    }

    fn spend(&mut self, bytes: usize) -> Result<(), ErrorKind> {
        self.byte_budget = self.byte_budget.checked_sub(bytes as u64).ok_or_else(|| {
            ErrorKind::Unsupported(
                "tensor views expand to more than 1 GiB beyond the checkpoint's storage size"
                    .into(),
            )
        })?;
        Ok(())
    }

    fn tensor(&mut self, v: &TensorView, src: &mut dyn StorageSource) -> Result<Tensor, ErrorKind> {
        let key = &v.storage.key;
        if !self.storages.contains_key(key) {
            let buf = src.load(key)?;
            self.byte_budget = self.byte_budget.saturating_add(buf.len() as u64);
            self.storages.insert(key.clone(), buf);
        }
        let buf_len = self.storages[key].len();
        if buf_len < v.storage.nbytes {
            return Err(ErrorKind::Storage {
                key: key.clone(),
                msg: format!(
                    "record has {buf_len} bytes but the pickle declares {}",
                    v.storage.nbytes
                ),
            });
        }
        let uses = self.storage_uses.get_mut(key).expect("counted in pass 1");
        *uses -= 1;
        let last_use = *uses == 0;

        let is = v.dtype.itemsize();
        let numel = checked_numel(&v.shape).expect("checked when the view was built");
        let nbytes = numel * is;
        self.spend(nbytes)?;
        let whole = v.offset == 0 && nbytes == buf_len && is_contiguous(&v.shape, &v.stride);
        let mut data = if last_use {
            let buf = self.storages.remove(key).expect("loaded above");
            if whole { buf } else { view_bytes(&buf, v) }
        } else {
            view_bytes(&self.storages[key], v)
        };
        if self.big_endian && is > 1 {
            data.chunks_exact_mut(is).for_each(|c| c.reverse());
        }
        Ok(Tensor {
            dtype: v.dtype,
            shape: v.shape.clone(),
            data,
        })
    }
}

fn view_bytes(buf: &[u8], v: &TensorView) -> Vec<u8> {
    if checked_numel(&v.shape) == Some(0) {
        return Vec::new();
    }
    gather(buf, v.dtype.itemsize(), v.offset, &v.shape, &v.stride)
}

/// True if `stride` is the row-major stride of `shape` (ignoring size-1 dims,
/// whose stride never matters).
pub(crate) fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Copies the strided view (`offset`, `shape`, `stride` in elements of
/// `itemsize` bytes) of `src` into a new contiguous row-major buffer.
///
/// The caller guarantees the view is non-empty and inside `src`.
pub(crate) fn gather(
    src: &[u8],
    itemsize: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    if is_contiguous(shape, stride) {
        return src[offset * itemsize..(offset + numel) * itemsize].to_vec();
    }
    let mut out = Vec::with_capacity(numel * itemsize);
    let ndim = shape.len();
    let (inner, inner_stride) = (shape[ndim - 1], stride[ndim - 1]);
    // Odometer over all but the last dimension; `base` is the element index
    // of the start of the current innermost row.
    let mut idx = vec![0usize; ndim - 1];
    let mut base = offset;
    loop {
        if inner_stride == 1 {
            out.extend_from_slice(&src[base * itemsize..(base + inner) * itemsize]);
        } else {
            for j in 0..inner {
                let p = (base + j * inner_stride) * itemsize;
                out.extend_from_slice(&src[p..p + itemsize]);
            }
        }
        let mut d = ndim - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            base += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            base -= stride[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/// Hashable form of a dict key, with Python's equalities `True == 1` and
/// `1.0 == 1`.
#[derive(Hash, PartialEq, Eq)]
enum KeyRepr {
    None,
    Int(i64),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<KeyRepr>),
}

impl KeyRepr {
    fn of(v: &Value) -> Option<KeyRepr> {
        Some(match v {
            Value::None => KeyRepr::None,
            Value::Bool(b) => KeyRepr::Int(*b as i64),
            Value::Int(i) => KeyRepr::Int(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => KeyRepr::Int(*f as i64),
            Value::Float(f) => KeyRepr::Float(if *f == 0.0 { 0 } else { f.to_bits() }),
            Value::Str(s) => KeyRepr::Str(s.clone()),
            Value::Bytes(b) => KeyRepr::Bytes(b.clone()),
            Value::Tuple(items) => {
                KeyRepr::Tuple(items.iter().map(KeyRepr::of).collect::<Option<_>>()?)
            }
            Value::List(_) | Value::Dict(_) | Value::OrderedDict(_) | Value::Tensor(_) => {
                return None;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_transpose_and_slice() {
        // 2x3 row-major f32-sized "elements" 0..6 as single bytes (itemsize 1).
        let src: Vec<u8> = (0..6).collect();
        // Transpose: shape (3,2), stride (1,3).
        assert_eq!(gather(&src, 1, 0, &[3, 2], &[1, 3]), vec![0, 3, 1, 4, 2, 5]);
        // Column 1: offset 1, shape (2,), stride (3,).
        assert_eq!(gather(&src, 1, 1, &[2], &[3]), vec![1, 4]);
        // Rows 1.. of a (2,3): contiguous with offset.
        assert_eq!(gather(&src, 1, 3, &[1, 3], &[3, 1]), vec![3, 4, 5]);
        // Expanded: shape (2,3) stride (0,1).
        assert_eq!(gather(&src, 1, 0, &[2, 3], &[0, 1]), vec![0, 1, 2, 0, 1, 2]);
        // Scalar.
        assert_eq!(gather(&src, 2, 1, &[], &[]), vec![2, 3]);
    }

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }
}
