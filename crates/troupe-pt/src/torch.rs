//! The allow-list of pickle globals and the Rust re-implementations of what
//! they do when a checkpoint is loaded: torch tensor/parameter rebuilding,
//! storage persistent ids, `OrderedDict`, `torch.Size` and `_codecs.encode`
//! (how protocol 2 spells `bytes`). Numpy is in [`crate::numpy`].

use crate::ErrorKind;
use crate::numpy::{self, NpGlobal};
use crate::pickle::{Id, Obj, Vm};
use crate::tensor::{DType, checked_numel};

/// An allow-listed global.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` or `torch.nn.parameter.Parameter` (only as the
    /// `new_type` argument of `_rebuild_from_type_v2`).
    TensorClass(&'static str),
    /// `torch.<Name>Storage` / `torch.UntypedStorage` (persistent ids only);
    /// the name is kept so unsupported types get a clear error.
    StorageType(String),
    /// `torch.<dtype>` (argument of `_rebuild_tensor_v3`).
    TorchDtype(String),
    TorchSize,
    CodecsEncode,
    /// `bytes` or `bytearray` (protocol 2 pickles `b''` as `bytes()`).
    Bytes(&'static str),
    Numpy(NpGlobal),
}

impl Global {
    /// The dotted Python name, for messages.
    pub(crate) fn full_name(&self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2".into(),
            Global::TensorClass(n) => (*n).into(),
            Global::StorageType(n) | Global::TorchDtype(n) => format!("torch.{n}"),
            Global::TorchSize => "torch.Size".into(),
            Global::CodecsEncode => "_codecs.encode".into(),
            Global::Bytes(n) => format!("builtins.{n}"),
            Global::Numpy(g) => g.full_name().into(),
        }
    }
}

/// Torch dtypes that may appear as `torch.<name>` globals but that this crate
/// cannot represent; they are accepted by GLOBAL (naming a dtype executes
/// nothing) so the error can say "unsupported dtype" instead of "forbidden".
const OTHER_TORCH_DTYPES: &[&str] = &[
    "uint16",
    "uint32",
    "uint64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "quint8",
    "qint8",
    "qint32",
    "quint4x2",
    "quint2x4",
];

/// Maps `module.name` to an allowed global, or `None` if it is forbidden.
pub(crate) fn lookup_global(module: &str, name: &str) -> Option<Global> {
    // The pickles torch writes under Python 2 / old versions used these
    // module paths too; all of them name the same functions.
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") => Global::TensorClass("torch.Tensor"),
        ("torch.nn.parameter", "Parameter") => Global::TensorClass("torch.nn.parameter.Parameter"),
        ("torch", "Size") => Global::TorchSize,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("builtins" | "__builtin__", "bytearray") => Global::Bytes("bytearray"),
        ("builtins" | "__builtin__", "bytes") => Global::Bytes("bytes"),
        ("torch", n) if n.ends_with("Storage") && n.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            Global::StorageType(n.to_owned())
        }
        ("torch", n) if DType::from_torch_name(n).is_some() || OTHER_TORCH_DTYPES.contains(&n) => {
            Global::TorchDtype(n.to_owned())
        }
        _ => return numpy::lookup(module, name).map(Global::Numpy),
    };
    Some(g)
}

/// A persistent-id reference to the storage record `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    pub(crate) key: String,
    /// Element type of the storage as declared (U8 for `UntypedStorage`).
    pub(crate) dtype: DType,
    /// Declared length in bytes (`numel * itemsize`).
    pub(crate) nbytes: usize,
}

/// A tensor as a strided view of a storage; all quantities in elements of
/// `dtype`, and already checked to lie inside the declared storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorView {
    pub(crate) storage: StorageRef,
    pub(crate) dtype: DType,
    pub(crate) offset: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) stride: Vec<usize>,
}

impl Vm<'_> {
    /// `REDUCE`: calls the allow-listed `func` with the tuple `args`.
    pub(crate) fn reduce(&mut self, func: Id, args: Id) -> Result<Id, ErrorKind> {
        let Obj::Global(g) = &self.arena[func] else {
            let t = self.arena[func].type_name();
            return Err(self.err(format!("REDUCE needs a callable global, got {t}")));
        };
        let g = g.clone();
        let argv = self.tuple(args, &g.full_name())?.to_vec();
        let obj = match g {
            Global::OrderedDict => self.ordered_dict(&argv)?,
            Global::RebuildTensor => self.rebuild_tensor(&argv, 4, 4, None)?,
            Global::RebuildTensorV2 => self.rebuild_tensor(&argv, 6, 7, None)?,
            Global::RebuildTensorV3 => {
                // (storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])
                if argv.len() < 7 {
                    return Err(self.err("_rebuild_tensor_v3 needs 7 or 8 arguments"));
                }
                let dtype = self.torch_dtype(argv[6])?;
                self.rebuild_tensor(&argv, 7, 8, Some(dtype))?
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                // (data, requires_grad, backward_hooks[, state]): a parameter
                // is just its tensor for us; requires_grad is dropped.
                let data = *argv
                    .first()
                    .ok_or_else(|| self.err("_rebuild_parameter needs arguments"))?;
                self.expect_tensor(data, "_rebuild_parameter data")?;
                return Ok(data);
            }
            Global::RebuildFromTypeV2 => {
                // (func, new_type, args, state): tensors with a subclass or
                // Python attributes. Only plain Tensor/Parameter are accepted,
                // and their attribute state is dropped.
                let [f, new_type, inner_args, _state] = argv[..] else {
                    return Err(self.err("_rebuild_from_type_v2 needs 4 arguments"));
                };
                if !matches!(self.arena[new_type], Obj::Global(Global::TensorClass(_))) {
                    let t = self.arena[new_type].type_name();
                    return Err(ErrorKind::Unsupported(format!("tensor subclass {t}")));
                }
                let id = self.reduce(f, inner_args)?;
                self.expect_tensor(id, "_rebuild_from_type_v2 result")?;
                return Ok(id);
            }
            Global::TorchSize => {
                let [dims] = argv[..] else {
                    return Err(self.err("torch.Size needs 1 argument"));
                };
                Obj::Tuple(self.tuple(dims, "torch.Size")?.to_vec())
            }
            Global::CodecsEncode => self.codecs_encode(&argv)?,
            Global::Bytes(n) => match argv[..] {
                [] => Obj::Bytes(Vec::new()),
                [b] => match &self.arena[b] {
                    Obj::Bytes(b) => Obj::Bytes(b.clone()),
                    _ => return Err(self.err(format!("{n}() of a non-bytes value"))),
                },
                _ => return Err(self.err(format!("{n}() with more than 1 argument"))),
            },
            Global::Numpy(g) => return self.numpy_reduce(g, &argv),
            Global::TensorClass(_) | Global::StorageType(_) | Global::TorchDtype(_) => {
                return Err(self.err(format!("`{}` may not be called", g.full_name())));
            }
        };
        Ok(self.alloc(obj))
    }

    /// `BUILD`: applies `state` to `obj` (sets attributes in Python).
    pub(crate) fn build(&mut self, obj: Id, state: Id) -> Result<(), ErrorKind> {
        match &self.arena[obj] {
            // A state_dict's `_metadata` attribute: not needed, dropped.
            Obj::OrderedDict(_) => Ok(()),
            Obj::NpDtype(_) | Obj::NpEmptyArray => self.numpy_build(obj, state),
            other => {
                let t = other.type_name();
                Err(self.err(format!("BUILD on a {t} is not supported")))
            }
        }
    }

    /// `BINPERSID` with `('storage', torch.XStorage, key, location, numel)`.
    pub(crate) fn persistent_load(&mut self, pid: Id) -> Result<Obj, ErrorKind> {
        let items = self.tuple(pid, "persistent id")?.to_vec();
        let [kind, storage_type, key, _location, numel] = items[..] else {
            return Err(self.err(format!(
                "persistent id must have 5 items, has {}",
                items.len()
            )));
        };
        if self.str(kind, "persistent id type")? != "storage" {
            return Err(self.err("persistent id is not a storage reference"));
        }
        let Obj::Global(Global::StorageType(type_name)) = &self.arena[storage_type] else {
            let t = self.arena[storage_type].type_name();
            return Err(self.err(format!(
                "persistent id storage type must be a torch storage class, got {t}"
            )));
        };
        let dtype = if type_name == "UntypedStorage" {
            DType::U8
        } else {
            DType::from_storage_name(type_name)
                .ok_or_else(|| ErrorKind::Unsupported(format!("storage type torch.{type_name}")))?
        };
        let key = self.str(key, "storage key")?.to_owned();
        let numel = self.index(numel, "storage numel")?;
        let nbytes = numel
            .checked_mul(dtype.itemsize())
            .ok_or_else(|| self.err(format!("storage `{key}` size overflows")))?;
        Ok(Obj::Storage(StorageRef { key, dtype, nbytes }))
    }

    fn expect_tensor(&self, id: Id, what: &str) -> Result<(), ErrorKind> {
        match &self.arena[id] {
            Obj::TensorView(_) | Obj::Tensor(_) => Ok(()),
            other => Err(self.err(format!(
                "{what}: expected a tensor, got {}",
                other.type_name()
            ))),
        }
    }

    fn torch_dtype(&self, id: Id) -> Result<DType, ErrorKind> {
        match &self.arena[id] {
            Obj::Global(Global::TorchDtype(n)) => DType::from_torch_name(n)
                .ok_or_else(|| ErrorKind::Unsupported(format!("dtype torch.{n}"))),
            other => Err(self.err(format!("expected a torch dtype, got {}", other.type_name()))),
        }
    }

    fn ordered_dict(&self, argv: &[Id]) -> Result<Obj, ErrorKind> {
        match argv {
            [] => Ok(Obj::OrderedDict(Vec::new())),
            // OrderedDict([(k, v), ...]) as older protocols reduce it.
            [items] => {
                let mut pairs = Vec::new();
                for &pair in self.tuple(*items, "OrderedDict items")? {
                    match self.tuple(pair, "OrderedDict item")? {
                        [k, v] => pairs.push((*k, *v)),
                        _ => return Err(self.err("OrderedDict item is not a pair")),
                    }
                }
                Ok(Obj::OrderedDict(pairs))
            }
            _ => Err(self.err("OrderedDict() takes at most 1 argument")),
        }
    }

    /// `_rebuild_tensor{,_v2,_v3}(storage, offset, size, stride, ...)`; the
    /// trailing requires_grad / hooks / metadata are ignored.
    fn rebuild_tensor(
        &self,
        argv: &[Id],
        min: usize,
        max: usize,
        dtype: Option<DType>,
    ) -> Result<Obj, ErrorKind> {
        if argv.len() < min || argv.len() > max {
            return Err(self.err(format!(
                "tensor rebuild expects {min}..={max} arguments, got {}",
                argv.len()
            )));
        }
        let Obj::Storage(storage) = &self.arena[argv[0]] else {
            let t = self.arena[argv[0]].type_name();
            return Err(self.err(format!("tensor rebuild: expected a storage, got {t}")));
        };
        let dtype = dtype.unwrap_or(storage.dtype);
        let offset = self.index(argv[1], "storage_offset")?;
        let shape = self.usizes(argv[2], "size")?;
        let stride = self.usizes(argv[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "size {shape:?} and stride {stride:?} differ in length"
            )));
        }
        let view = TensorView {
            storage: storage.clone(),
            dtype,
            offset,
            shape,
            stride,
        };
        check_view_bounds(&view).map_err(|m| self.err(m))?;
        Ok(Obj::TensorView(view))
    }

    fn codecs_encode(&self, argv: &[Id]) -> Result<Obj, ErrorKind> {
        let (text, encoding) = match argv {
            [t] => (*t, "utf-8"),
            [t, e] => (*t, self.str(*e, "encoding")?),
            _ => return Err(self.err("_codecs.encode takes 1 or 2 arguments")),
        };
        let Obj::Str(text) = &self.arena[text] else {
            return Err(self.err("_codecs.encode of a non-str"));
        };
        match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
            "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" => {
                let bytes: Option<Vec<u8>> =
                    text.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                bytes
                    .map(Obj::Bytes)
                    .ok_or_else(|| self.err("latin-1 string has characters above U+00FF"))
            }
            "utf-8" | "utf8" => Ok(Obj::Bytes(text.as_bytes().to_vec())),
            other => Err(self.err(format!(
                "_codecs.encode with encoding {other:?} is not supported"
            ))),
        }
    }
}

/// Checks that every element of the view lies inside the declared storage,
/// without overflow, so materializing it later can index without checks.
fn check_view_bounds(v: &TensorView) -> Result<(), String> {
    let numel = checked_numel(&v.shape).ok_or_else(|| format!("size {:?} overflows", v.shape))?;
    if numel == 0 {
        return Ok(());
    }
    let mut last = v.offset;
    for (&n, &s) in v.shape.iter().zip(&v.stride) {
        last = (n - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("strides overflow")?;
    }
    let end_bytes = last
        .checked_add(1)
        .and_then(|e| e.checked_mul(v.dtype.itemsize()))
        .ok_or("strides overflow")?;
    if end_bytes > v.storage.nbytes {
        return Err(format!(
            "tensor of size {:?}, stride {:?}, offset {} reaches byte {} of storage `{}` which has {} bytes",
            v.shape, v.stride, v.offset, end_bytes, v.storage.key, v.storage.nbytes
        ));
    }
    Ok(())
}
