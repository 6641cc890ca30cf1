//! Element types and the dense [`Tensor`] type, plus the half-precision
//! conversions needed to read and write f16/bf16 checkpoints without a `half`
//! dependency.

use crate::{Error, ErrorKind};

/// Element type of a tensor, covering the torch storage types this crate reads
/// and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `torch.float64` / `DoubleStorage`.
    F64,
    /// `torch.float32` / `FloatStorage`.
    F32,
    /// `torch.float16` / `HalfStorage`.
    F16,
    /// `torch.bfloat16` / `BFloat16Storage`.
    BF16,
    /// `torch.int64` / `LongStorage`.
    I64,
    /// `torch.int32` / `IntStorage`.
    I32,
    /// `torch.int16` / `ShortStorage`.
    I16,
    /// `torch.int8` / `CharStorage`.
    I8,
    /// `torch.uint8` / `ByteStorage`.
    U8,
    /// `torch.bool` / `BoolStorage` (one byte per element, 0 or 1).
    Bool,
}

impl DType {
    /// All supported element types.
    pub const ALL: [DType; 10] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Size of one element in bytes.
    pub fn itemsize(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Name of the legacy torch storage class (`torch.<name>`) used in the
    /// pickle's persistent ids, e.g. `"FloatStorage"`.
    pub fn storage_name(self) -> &'static str {
        match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    /// Inverse of [`DType::storage_name`].
    pub fn from_storage_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.storage_name() == name)
    }

    /// The torch dtype name without the `torch.` prefix, e.g. `"float32"`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Inverse of [`DType::torch_name`]; also accepts torch's aliases
    /// (`float`, `half`, `double`, `long`, `int`, `short`).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let alias = match name {
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            "half" => Some(DType::F16),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            "short" => Some(DType::I16),
            _ => None,
        };
        alias.or_else(|| DType::ALL.into_iter().find(|d| d.torch_name() == name))
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// A dense tensor: contiguous, row-major (C order), little-endian element bytes.
///
/// The fields are public for zero-cost access; [`Tensor::new`] checks that
/// `data.len() == numel * itemsize`, and every function of this crate that
/// consumes a tensor re-checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape; empty for a 0-dimensional (scalar) tensor.
    pub shape: Vec<usize>,
    /// `numel * itemsize` bytes, row-major, little-endian.
    pub data: Vec<u8>,
}

/// Context used in errors about tensors that do not come from a file.
const IN_MEMORY: &str = "<in-memory tensor>";

impl Tensor {
    /// Creates a tensor after checking that `data` has exactly
    /// `numel(shape) * dtype.itemsize()` bytes.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Tensor, Error> {
        let t = Tensor { dtype, shape, data };
        t.check().map_err(|k| Error::new(IN_MEMORY, k))?;
        Ok(t)
    }

    /// Creates an f32 tensor from values (row-major).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Tensor, Error> {
        Tensor::from_f32_as(DType::F32, shape, values)
    }

    /// Creates a floating-point tensor of type `dtype` (F32, F16, BF16 or F64)
    /// from f32 values, rounding to nearest-even for the half types.
    pub fn from_f32_as(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Result<Tensor, Error> {
        let data = encode_f32(dtype, values).map_err(|k| Error::new(IN_MEMORY, k))?;
        Tensor::new(dtype, shape, data)
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of data bytes this tensor's shape and dtype require.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.itemsize()
    }

    /// Checks the shape/data-length invariant without overflowing.
    pub(crate) fn check(&self) -> Result<(), ErrorKind> {
        let numel = checked_numel(&self.shape)
            .ok_or_else(|| ErrorKind::Tensor(format!("shape {:?} overflows", self.shape)))?;
        match numel.checked_mul(self.dtype.itemsize()) {
            Some(n) if n == self.data.len() => Ok(()),
            _ => Err(ErrorKind::Tensor(format!(
                "{} tensor of shape {:?} needs {} elements but has {} data bytes",
                self.dtype,
                self.shape,
                numel,
                self.data.len()
            ))),
        }
    }

    /// Converts every element to f32 (f16/bf16 exactly, f64 and integers by
    /// rounding, bool as 0/1).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, Error> {
        self.check().map_err(|k| Error::new(IN_MEMORY, k))?;
        let d = &self.data;
        Ok(match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            DType::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            DType::U8 => d.iter().map(|&b| b as f32).collect(),
            DType::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
        })
    }

    /// Converts every element to i64. Integer and bool types only: floats are
    /// refused rather than silently truncated.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, Error> {
        self.check().map_err(|k| Error::new(IN_MEMORY, k))?;
        let d = &self.data;
        Ok(match self.dtype {
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DType::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            DType::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
            DType::U8 => d.iter().map(|&b| b as i64).collect(),
            DType::Bool => d.iter().map(|&b| (b != 0) as i64).collect(),
            other => {
                return Err(Error::new(
                    IN_MEMORY,
                    ErrorKind::Tensor(format!("to_i64_vec needs an integer tensor, got {other}")),
                ));
            }
        })
    }

    /// Returns a copy converted to another floating-point type (F32, F16,
    /// BF16, F64), e.g. to export f32 weights as f16.
    pub fn to_float_dtype(&self, dtype: DType) -> Result<Tensor, Error> {
        if !self.dtype.is_float() {
            return Err(Error::new(
                IN_MEMORY,
                ErrorKind::Tensor(format!(
                    "to_float_dtype needs a float tensor, got {}",
                    self.dtype
                )),
            ));
        }
        if dtype == self.dtype {
            self.check().map_err(|k| Error::new(IN_MEMORY, k))?;
            return Ok(self.clone());
        }
        // f64 -> f32 -> half would double-round; acceptable for weight export,
        // and exact for every other source type.
        let values = self.to_f32_vec()?;
        Tensor::from_f32_as(dtype, self.shape.clone(), &values)
    }
}

/// Product of `shape`, or `None` on overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Encodes f32 values as little-endian bytes of a float dtype.
fn encode_f32(dtype: DType, values: &[f32]) -> Result<Vec<u8>, ErrorKind> {
    let mut out = Vec::with_capacity(values.len() * dtype.itemsize());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f32_to_f16(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        other => {
            return Err(ErrorKind::Tensor(format!(
                "cannot build a {other} tensor from f32 values"
            )));
        }
    }
    Ok(out)
}

/// IEEE binary16 bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x03ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal half: normalise the mantissa into an f32 normal.
            let shift = man.leading_zeros() - 21; // bring the top set bit to bit 10
            let man = (man << shift) & 0x03ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (man << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE binary16 bits, rounding to nearest-even (what torch's
/// `.half()` does); overflow gives infinity, NaN stays NaN.
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x007f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x0200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exp <= 0 {
        // Result is subnormal (or zero): shift the full mantissa (with the
        // implicit bit) right and round to nearest-even.
        if half_exp < -10 {
            return sign;
        }
        let full = man | 0x0080_0000;
        let shift = (14 - half_exp) as u32;
        let mut half_man = full >> shift;
        let round_bit = 1u32 << (shift - 1);
        if full & round_bit != 0 && full & (3 * round_bit - 1) != 0 {
            half_man += 1;
        }
        return sign | half_man as u16;
    }
    let mut h = ((half_exp as u32) << 10) | (man >> 13);
    let round_bit = 0x1000u32;
    if man & round_bit != 0 && man & (3 * round_bit - 1) != 0 {
        h += 1; // may carry into the exponent, which is the correct result
    }
    sign | h as u16
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 to bfloat16 bits, rounding to nearest-even like torch.
pub fn f32_to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    if v.is_nan() {
        return ((x >> 16) as u16) | 0x0040;
    }
    let bias = 0x7fff + ((x >> 16) & 1);
    (x.wrapping_add(bias) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_all_bit_patterns() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
            } else {
                assert_eq!(f32_to_f16(f), h, "h={h:#06x} f={f}");
            }
        }
    }

    #[test]
    fn f16_known_values() {
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds to inf
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16(2.980_232_2e-8), 0x0000); // exactly half: ties to even (0)
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie -> even
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02); // tie -> even (up)
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x03ff), 6.097_555e-5);
    }

    #[test]
    fn bf16_values() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    }

    #[test]
    fn tensor_new_checks_length() {
        assert!(Tensor::new(DType::F32, vec![2, 3], vec![0; 24]).is_ok());
        assert!(Tensor::new(DType::F32, vec![2, 3], vec![0; 23]).is_err());
        assert!(Tensor::new(DType::F32, vec![usize::MAX, 3], vec![]).is_err());
        let t = Tensor::from_f32_as(DType::F16, vec![2], &[1.0, -2.0]).unwrap();
        assert_eq!(t.data, vec![0x00, 0x3c, 0x00, 0xc0]);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, -2.0]);
    }
}
