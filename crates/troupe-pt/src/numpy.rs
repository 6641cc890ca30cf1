//! Data-only support for numpy arrays and scalars inside a checkpoint.
//!
//! numpy pickles an array as `_reconstruct(ndarray, (0,), b'b')` followed by
//! `BUILD (version, shape, dtype, is_fortran, raw_bytes)`, a dtype as
//! `dtype('f4', False, True)` + `BUILD (3, '<', ...)`, a scalar as
//! `scalar(dtype, raw_bytes)` and, with protocol 5, an array as
//! `_frombuffer(buf, dtype, shape, order)`. We re-implement exactly these on
//! plain bytes; object arrays (which would need arbitrary pickled objects)
//! and structured dtypes are refused.

use crate::ErrorKind;
use crate::materialize::gather;
use crate::pickle::{Id, Obj, Vm};
use crate::tensor::{DType, Tensor, checked_numel, f16_to_f32};

/// An allow-listed numpy global.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NpGlobal {
    Reconstruct,
    Ndarray,
    Dtype,
    Scalar,
    Frombuffer,
}

impl NpGlobal {
    pub(crate) fn full_name(self) -> &'static str {
        match self {
            NpGlobal::Reconstruct => "numpy.core.multiarray._reconstruct",
            NpGlobal::Ndarray => "numpy.ndarray",
            NpGlobal::Dtype => "numpy.dtype",
            NpGlobal::Scalar => "numpy.core.multiarray.scalar",
            NpGlobal::Frombuffer => "numpy.core.numeric._frombuffer",
        }
    }
}

/// numpy 1.x uses `numpy.core`, numpy 2.x `numpy._core`.
pub(crate) fn lookup(module: &str, name: &str) -> Option<NpGlobal> {
    let g = match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
            NpGlobal::Reconstruct
        }
        ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => NpGlobal::Scalar,
        ("numpy.core.numeric" | "numpy._core.numeric", "_frombuffer") => NpGlobal::Frombuffer,
        ("numpy", "ndarray") => NpGlobal::Ndarray,
        ("numpy", "dtype") => NpGlobal::Dtype,
        _ => return None,
    };
    Some(g)
}

/// A numpy dtype restricted to the element types of [`DType`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NpDtype {
    pub(crate) dtype: DType,
    pub(crate) big_endian: bool,
}

/// Parses a numpy type string such as `"f4"`, `"<i8"` or `"|b1"`.
fn parse_code(code: &str) -> Result<NpDtype, ErrorKind> {
    let (big_endian, rest) = match code.as_bytes().first() {
        Some(b'>') => (true, &code[1..]),
        Some(b'<' | b'|' | b'=') => (false, &code[1..]),
        _ => (false, code),
    };
    let dtype = match rest {
        "f2" => DType::F16,
        "f4" => DType::F32,
        "f8" => DType::F64,
        "i1" => DType::I8,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u1" => DType::U8,
        "b1" => DType::Bool,
        _ => return Err(ErrorKind::Unsupported(format!("numpy dtype {code:?}"))),
    };
    Ok(NpDtype { dtype, big_endian })
}

/// Builds a C-order little-endian tensor from numpy's raw array bytes.
fn make_tensor(
    shape: Vec<usize>,
    dt: NpDtype,
    fortran: bool,
    mut data: Vec<u8>,
) -> Result<Tensor, String> {
    let numel = checked_numel(&shape).ok_or("array shape overflows")?;
    let is = dt.dtype.itemsize();
    if numel.checked_mul(is) != Some(data.len()) {
        return Err(format!(
            "array of shape {shape:?} and dtype {} has {} data bytes",
            dt.dtype,
            data.len()
        ));
    }
    if dt.big_endian && is > 1 {
        data.chunks_exact_mut(is).for_each(|c| c.reverse());
    }
    if fortran && shape.len() > 1 && numel > 0 {
        // Column-major: element (i0, i1, ...) lives at i0 + n0*i1 + ...
        let mut stride = Vec::with_capacity(shape.len());
        let mut s = 1;
        for &n in &shape {
            stride.push(s);
            s *= n;
        }
        data = gather(&data, is, 0, &shape, &stride);
    }
    Ok(Tensor {
        dtype: dt.dtype,
        shape,
        data,
    })
}

impl Vm<'_> {
    fn np_dtype(&self, id: Id) -> Result<NpDtype, ErrorKind> {
        match &self.arena[id] {
            Obj::NpDtype(d) => Ok(*d),
            other => Err(self.err(format!("expected a numpy dtype, got {}", other.type_name()))),
        }
    }

    /// Raw array bytes: `bytes`, or a Python 2 `str` holding Latin-1 bytes.
    fn raw_bytes(&self, id: Id) -> Result<Vec<u8>, ErrorKind> {
        match &self.arena[id] {
            Obj::Bytes(b) => Ok(b.clone()),
            Obj::Str(s) => s
                .chars()
                .map(|c| u8::try_from(c as u32).ok())
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| self.err("array data string is not Latin-1")),
            Obj::List(_) => Err(ErrorKind::Unsupported("numpy object arrays".into())),
            other => Err(self.err(format!("expected array bytes, got {}", other.type_name()))),
        }
    }

    pub(crate) fn numpy_reduce(&mut self, g: NpGlobal, argv: &[Id]) -> Result<Id, ErrorKind> {
        let obj = match g {
            NpGlobal::Reconstruct => {
                // _reconstruct(subtype, shape, dtype_char): only plain ndarray.
                let cls = *argv
                    .first()
                    .ok_or_else(|| self.err("_reconstruct needs arguments"))?;
                if self.np_global(cls) != Some(NpGlobal::Ndarray) {
                    let t = self.arena[cls].type_name();
                    return Err(ErrorKind::Unsupported(format!("numpy array subclass {t}")));
                }
                Obj::NpEmptyArray
            }
            NpGlobal::Dtype => {
                let code = *argv
                    .first()
                    .ok_or_else(|| self.err("numpy.dtype needs arguments"))?;
                Obj::NpDtype(parse_code(self.str(code, "numpy dtype")?)?)
            }
            NpGlobal::Scalar => {
                let [dt, data] = argv[..] else {
                    return Err(self.err("numpy scalar needs 2 arguments"));
                };
                let dt = self.np_dtype(dt)?;
                let data = self.raw_bytes(data)?;
                let t = make_tensor(Vec::new(), dt, false, data).map_err(|m| self.err(m))?;
                scalar_value(&t)
            }
            NpGlobal::Frombuffer => {
                let [buf, dt, shape, order] = argv[..] else {
                    return Err(self.err("_frombuffer needs 4 arguments"));
                };
                let dt = self.np_dtype(dt)?;
                let shape = self.usizes(shape, "array shape")?;
                let fortran = self.str(order, "array order")? == "F";
                let data = self.raw_bytes(buf)?;
                Obj::Tensor(make_tensor(shape, dt, fortran, data).map_err(|m| self.err(m))?)
            }
            NpGlobal::Ndarray => return Err(self.err("`numpy.ndarray` may not be called")),
        };
        Ok(self.alloc(obj))
    }

    pub(crate) fn numpy_build(&mut self, obj: Id, state: Id) -> Result<(), ErrorKind> {
        let st = self.tuple(state, "numpy state")?.to_vec();
        let new = match self.arena[obj] {
            Obj::NpDtype(mut d) => {
                // (version, byteorder, subarray, names, fields, elsize, alignment, flags)
                if st.len() < 2 {
                    return Err(self.err("numpy dtype state too short"));
                }
                d.big_endian = self.str(st[1], "dtype byteorder")? == ">";
                let structured = st
                    .iter()
                    .skip(2)
                    .take(3)
                    .any(|&i| !matches!(self.arena[i], Obj::None));
                if structured {
                    return Err(ErrorKind::Unsupported(
                        "structured or subarray numpy dtypes".into(),
                    ));
                }
                Obj::NpDtype(d)
            }
            Obj::NpEmptyArray => {
                // (version, shape, dtype, is_fortran, data), version optional.
                let st = match st.len() {
                    5 => &st[1..],
                    4 => &st[..],
                    n => return Err(self.err(format!("numpy array state has {n} items"))),
                };
                let shape = self.usizes(st[0], "array shape")?;
                let dt = self.np_dtype(st[1])?;
                let fortran = self.int(st[2], "is_fortran")? != 0;
                let data = self.raw_bytes(st[3])?;
                Obj::Tensor(make_tensor(shape, dt, fortran, data).map_err(|m| self.err(m))?)
            }
            _ => unreachable!("numpy_build is only called for numpy objects"),
        };
        self.arena[obj] = new;
        Ok(())
    }
}

/// A 0-d tensor as a Python number.
fn scalar_value(t: &Tensor) -> Obj {
    let d = &t.data;
    match t.dtype {
        DType::F64 => Obj::Float(f64::from_le_bytes(d[..8].try_into().unwrap())),
        DType::F32 => Obj::Float(f32::from_le_bytes(d[..4].try_into().unwrap()) as f64),
        DType::F16 => Obj::Float(f16_to_f32(u16::from_le_bytes([d[0], d[1]])) as f64),
        DType::BF16 => {
            Obj::Float(crate::tensor::bf16_to_f32(u16::from_le_bytes([d[0], d[1]])) as f64)
        }
        DType::I64 => Obj::Int(i64::from_le_bytes(d[..8].try_into().unwrap())),
        DType::I32 => Obj::Int(i32::from_le_bytes(d[..4].try_into().unwrap()) as i64),
        DType::I16 => Obj::Int(i16::from_le_bytes([d[0], d[1]]) as i64),
        DType::I8 => Obj::Int(d[0] as i8 as i64),
        DType::U8 => Obj::Int(d[0] as i64),
        DType::Bool => Obj::Bool(d[0] != 0),
    }
}
