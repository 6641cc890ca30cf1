//! The data model a checkpoint is read into and written from.

use crate::Tensor;

/// A Python value restricted to what plain-data checkpoints contain.
///
/// Dicts keep insertion order (as Python dicts do); a key that appears twice
/// in the pickle keeps its first position and its last value, like Python.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `bool`.
    Bool(bool),
    /// `int` (must fit in i64).
    Int(i64),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `bytes` / `bytearray`.
    Bytes(Vec<u8>),
    /// `tuple`.
    Tuple(Vec<Value>),
    /// `list`.
    List(Vec<Value>),
    /// `dict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// `collections.OrderedDict` (e.g. a `state_dict()`), in order.
    OrderedDict(Vec<(Value, Value)>),
    /// A tensor (`torch.Tensor`, `nn.Parameter`, or a numpy array).
    Tensor(Tensor),
}

impl Value {
    /// Looks up a string key in a `Dict` or `OrderedDict`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries()?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
    }

    /// Like [`Value::get`] but returns the tensor stored under `key`.
    pub fn get_tensor(&self, key: &str) -> Option<&Tensor> {
        self.get(key)?.as_tensor()
    }

    /// The key/value pairs of a `Dict` or `OrderedDict`.
    pub fn entries(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(e) | Value::OrderedDict(e) => Some(e),
            _ => None,
        }
    }

    /// Consumes a `Dict` or `OrderedDict` into its pairs (avoids copying
    /// large tensors out of a loaded checkpoint).
    pub fn into_entries(self) -> Result<Vec<(Value, Value)>, Value> {
        match self {
            Value::Dict(e) | Value::OrderedDict(e) => Ok(e),
            other => Err(other),
        }
    }

    /// Iterates the string keys and tensor values of a (Ordered)Dict, the shape
    /// of a `state_dict()`; entries with other key or value types are skipped.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries()
            .unwrap_or(&[])
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.as_str(), t)),
                _ => None,
            })
    }

    /// The items of a `List` or `Tuple`.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Consumes the value into its tensor, if it is one.
    pub fn into_tensor(self) -> Option<Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one (bools are not integers here).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as f64, for `Float` and `Int`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Short Python-like name of the variant, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::OrderedDict(_) => "OrderedDict",
            Value::Tensor(_) => "Tensor",
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Tensor(t)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Float(f)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}
