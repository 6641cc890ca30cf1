//! A safe pickle virtual machine.
//!
//! It interprets the opcodes that `torch.save` (protocol 2) and numpy emit,
//! plus the other data-only opcodes of protocols 0-5, into an arena of
//! [`Obj`]s. Nothing is ever imported or called: `GLOBAL`/`STACK_GLOBAL` only
//! accept names from the allow-list in [`crate::torch::lookup_global`] (the
//! error for anything else names the global), and `REDUCE`/`BUILD`/`NEWOBJ`
//! dispatch to Rust re-implementations of those few functions.
//!
//! Objects live in an arena and the stack and memo hold indices, because
//! pickle has reference semantics: a dict is memoized (`BINPUT`) *before* its
//! items are added (`SETITEMS`), and a later `BINGET` must see the filled dict.

use std::collections::HashMap;

use crate::ErrorKind;
use crate::numpy::{NpDtype, NpGlobal};
use crate::tensor::Tensor;
use crate::torch::{Global, StorageRef, TensorView, lookup_global};

/// Index of an object in the VM's arena.
pub(crate) type Id = usize;

/// An unpickled object.
#[derive(Debug, Clone)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    OrderedDict(Vec<(Id, Id)>),
    /// An allow-listed class or function (callable only via REDUCE/NEWOBJ).
    Global(Global),
    /// A persistent-id reference to a storage record.
    Storage(StorageRef),
    /// A tensor as a view of a storage record (materialized later).
    TensorView(TensorView),
    /// A tensor with its data already in hand (numpy arrays).
    Tensor(Tensor),
    /// A `numpy.dtype` object.
    NpDtype(NpDtype),
    /// A numpy array created by `_reconstruct`, waiting for its BUILD state.
    NpEmptyArray,
}

impl Obj {
    /// Python-ish type name for error messages.
    pub(crate) fn type_name(&self) -> String {
        match self {
            Obj::None => "None".into(),
            Obj::Bool(_) => "bool".into(),
            Obj::Int(_) => "int".into(),
            Obj::Float(_) => "float".into(),
            Obj::Str(_) => "str".into(),
            Obj::Bytes(_) => "bytes".into(),
            Obj::Tuple(_) => "tuple".into(),
            Obj::List(_) => "list".into(),
            Obj::Dict(_) => "dict".into(),
            Obj::OrderedDict(_) => "OrderedDict".into(),
            Obj::Global(g) => format!("`{}`", g.full_name()),
            Obj::Storage(_) => "storage".into(),
            Obj::TensorView(_) | Obj::Tensor(_) => "tensor".into(),
            Obj::NpDtype(_) => "numpy.dtype".into(),
            Obj::NpEmptyArray => "numpy.ndarray (without state)".into(),
        }
    }
}

/// The result of running a pickle: the arena and the id of the root object.
pub(crate) struct Unpickled {
    pub(crate) arena: Vec<Obj>,
    pub(crate) root: Id,
}

/// Runs the pickle program in `data` and returns the object tree.
pub(crate) fn unpickle(data: &[u8]) -> Result<Unpickled, ErrorKind> {
    let mut vm = Vm {
        data,
        pos: 0,
        op_start: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    Ok(Unpickled {
        arena: vm.arena,
        root,
    })
}

pub(crate) struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_start: usize,
    pub(crate) arena: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack heights at each MARK (Python's "metastack").
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

impl<'a> Vm<'a> {
    /// A `Pickle` error at the current opcode.
    pub(crate) fn err(&self, msg: impl Into<String>) -> ErrorKind {
        ErrorKind::Pickle {
            offset: self.op_start,
            msg: msg.into(),
        }
    }

    pub(crate) fn alloc(&mut self, obj: Obj) -> Id {
        self.arena.push(obj);
        self.arena.len() - 1
    }

    fn push(&mut self, obj: Obj) {
        let id = self.alloc(obj);
        self.stack.push(id);
    }

    /// Pops one object; like Python, never below the most recent MARK.
    fn pop(&mut self) -> Result<Id, ErrorKind> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Id, ErrorKind> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    /// Pops everything above the most recent MARK, and the mark itself.
    fn pop_mark(&mut self) -> Result<Vec<Id>, ErrorKind> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(mark))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ErrorKind> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!("needs {n} more bytes but the pickle ends")));
        };
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, ErrorKind> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ErrorKind> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, ErrorKind> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, ErrorKind> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// Length prefix as usize; `take` then checks it against the remaining
    /// bytes, so a huge length cannot cause a huge allocation.
    fn len_u64(&mut self) -> Result<usize, ErrorKind> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }

    /// A newline-terminated line (text opcodes), without the newline.
    fn line(&mut self) -> Result<&str, ErrorKind> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err("unterminated line"));
        };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.err("line is not UTF-8"))
    }

    fn utf8(&self, bytes: &[u8]) -> Result<String, ErrorKind> {
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), ErrorKind> {
        let top = self.top()?;
        self.memo.insert(idx, top);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), ErrorKind> {
        let id = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo key {idx} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), ErrorKind> {
        match lookup_global(module, name) {
            Some(g) => {
                self.push(Obj::Global(g));
                Ok(())
            }
            None => Err(ErrorKind::ForbiddenGlobal(format!("{module}.{name}"))),
        }
    }

    fn run(&mut self) -> Result<Id, ErrorKind> {
        loop {
            self.op_start = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is newer than 5")));
                    }
                }
                0x95 => {
                    // FRAME: only a read-ahead hint; check it is plausible.
                    let n = self.u64()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(self.err("FRAME is longer than the pickle"));
                    }
                }
                b'.' => {
                    // STOP
                    let root = self.pop()?;
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Obj::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement.
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?;
                    let v = decode_long(bytes)
                        .ok_or_else(|| self.err("integer does not fit in 64 bits"))?;
                    self.push(Obj::Int(v));
                }
                b'I' => {
                    // INT (protocol 0); "01"/"00" are True/False.
                    let line = self.line()?.to_owned();
                    let obj = match line.as_str() {
                        "01" => Obj::Bool(true),
                        "00" => Obj::Bool(false),
                        s => Obj::Int(s.parse().map_err(|_| self.err(format!("bad INT {s:?}")))?),
                    };
                    self.push(obj);
                }
                b'L' => {
                    let line = self.line()?.to_owned();
                    let s = line.strip_suffix('L').unwrap_or(&line);
                    let v = s
                        .parse()
                        .map_err(|_| self.err(format!("bad or too large LONG {s:?}")))?;
                    self.push(Obj::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Obj::Float(v));
                }
                b'F' => {
                    let line = self.line()?.to_owned();
                    let v = line
                        .parse()
                        .map_err(|_| self.err(format!("bad FLOAT {line:?}")))?;
                    self.push(Obj::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE / SHORT_BINUNICODE / BINUNICODE8
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?;
                    let s = self.utf8(bytes)?;
                    self.push(Obj::Str(s));
                }
                b'U' | b'T' => {
                    // SHORT_BINSTRING / BINSTRING (Python 2 str): torch.load
                    // decodes them as UTF-8; fall back to Latin-1 like numpy's
                    // `encoding="latin1"` advice.
                    let n = if op == b'U' {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?.to_vec();
                    let s = String::from_utf8(bytes)
                        .unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
                    self.push(Obj::Str(s));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES / SHORT_BINBYTES / BINBYTES8 / BYTEARRAY8
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(bytes));
                }
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    // TUPLE1..TUPLE3
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                b']' => self.push(Obj::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items));
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Obj::Dict(pairs));
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.extend_list(list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend_list(list, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.extend_dict(dict, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let dict = self.top()?;
                    self.extend_dict(dict, pairs)?;
                }
                b'0' => {
                    // POP: Python pops the mark itself when the stack above it is empty.
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() > floor {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'p' => {
                    let line = self.line()?.to_owned();
                    let idx = line
                        .parse()
                        .map_err(|_| self.err(format!("bad PUT index {line:?}")))?;
                    self.memo_put(idx)?;
                }
                b'q' => {
                    let idx = self.u8()? as u64;
                    self.memo_put(idx)?;
                }
                b'r' => {
                    let idx = self.u32()? as u64;
                    self.memo_put(idx)?;
                }
                0x94 => {
                    let idx = self.memo.len() as u64;
                    self.memo_put(idx)?;
                }
                b'g' => {
                    let line = self.line()?.to_owned();
                    let idx = line
                        .parse()
                        .map_err(|_| self.err(format!("bad GET index {line:?}")))?;
                    self.memo_get(idx)?;
                }
                b'h' => {
                    let idx = self.u8()? as u64;
                    self.memo_get(idx)?;
                }
                b'j' => {
                    let idx = self.u32()? as u64;
                    self.memo_get(idx)?;
                }
                b'c' => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.global(&module, &name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) =
                        (&self.arena[module], &self.arena[name])
                    else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let (module, name) = (module.clone(), name.clone());
                    self.global(&module, &name)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let id = self.reduce(func, args)?;
                    self.stack.push(id);
                }
                0x81 => {
                    // NEWOBJ cls.__new__(cls, *args): only OrderedDict makes sense here.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    if !matches!(self.arena[cls], Obj::Global(Global::OrderedDict)) {
                        let t = self.arena[cls].type_name();
                        return Err(self.err(format!("NEWOBJ of {t} is not supported")));
                    }
                    let id = self.reduce(cls, args)?;
                    self.stack.push(id);
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    self.build(obj, state)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(storage);
                }
                _ => {
                    return Err(ErrorKind::UnsupportedOpcode {
                        opcode: op,
                        name: opcode_name(op),
                        offset: self.op_start,
                    });
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>, ErrorKind> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn extend_list(&mut self, list: Id, items: Vec<Id>) -> Result<(), ErrorKind> {
        match &mut self.arena[list] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => {
                let t = other.type_name();
                Err(self.err(format!("APPEND(S) to a {t}")))
            }
        }
    }

    fn extend_dict(&mut self, dict: Id, pairs: Vec<(Id, Id)>) -> Result<(), ErrorKind> {
        match &mut self.arena[dict] {
            // Duplicate keys are resolved when converting to `Value`.
            Obj::Dict(v) | Obj::OrderedDict(v) => {
                v.extend(pairs);
                Ok(())
            }
            other => {
                let t = other.type_name();
                Err(self.err(format!("SETITEM(S) on a {t}")))
            }
        }
    }

    // ---- typed accessors for the REDUCE/BUILD implementations ----

    pub(crate) fn tuple(&self, id: Id, what: &str) -> Result<&[Id], ErrorKind> {
        match &self.arena[id] {
            Obj::Tuple(v) | Obj::List(v) => Ok(v),
            other => Err(self.err(format!(
                "{what}: expected a tuple, got {}",
                other.type_name()
            ))),
        }
    }

    pub(crate) fn int(&self, id: Id, what: &str) -> Result<i64, ErrorKind> {
        match &self.arena[id] {
            Obj::Int(i) => Ok(*i),
            Obj::Bool(b) => Ok(*b as i64),
            other => Err(self.err(format!(
                "{what}: expected an int, got {}",
                other.type_name()
            ))),
        }
    }

    /// A non-negative int as usize.
    pub(crate) fn index(&self, id: Id, what: &str) -> Result<usize, ErrorKind> {
        let v = self.int(id, what)?;
        usize::try_from(v).map_err(|_| self.err(format!("{what}: {v} is negative or too large")))
    }

    /// A tuple of non-negative ints (a shape or strides).
    pub(crate) fn usizes(&self, id: Id, what: &str) -> Result<Vec<usize>, ErrorKind> {
        self.tuple(id, what)?
            .iter()
            .map(|&i| self.index(i, what))
            .collect()
    }

    pub(crate) fn str(&self, id: Id, what: &str) -> Result<&str, ErrorKind> {
        match &self.arena[id] {
            Obj::Str(s) => Ok(s),
            Obj::Bytes(b) => {
                std::str::from_utf8(b).map_err(|_| self.err(format!("{what}: not UTF-8")))
            }
            other => Err(self.err(format!("{what}: expected a str, got {}", other.type_name()))),
        }
    }

    pub(crate) fn np_global(&self, id: Id) -> Option<NpGlobal> {
        match &self.arena[id] {
            Obj::Global(Global::Numpy(g)) => Some(*g),
            _ => None,
        }
    }
}

/// Decodes a pickle LONG (little-endian two's complement) if it fits in i64.
fn decode_long(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    // Bytes beyond the 8th must be pure sign extension.
    if bytes.len() > 8
        && (bytes[8..].iter().any(|&b| b != fill) || (bytes[7] & 0x80 != 0) != negative)
    {
        return None;
    }
    let mut buf = [fill; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    Some(i64::from_le_bytes(buf))
}

/// Python `pickletools` name of an opcode, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs() {
        assert_eq!(decode_long(&[]), Some(0));
        assert_eq!(decode_long(&[0xff]), Some(-1));
        assert_eq!(decode_long(&[0x00, 0x80]), Some(32768 - 65536));
        assert_eq!(decode_long(&[0x00, 0x01]), Some(256));
        assert_eq!(
            decode_long(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Some(i64::MAX)
        );
        assert_eq!(
            decode_long(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]),
            None
        ); // 2^64-1
        assert_eq!(
            decode_long(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Some(-1)
        );
    }

    #[test]
    fn memo_refers_to_same_object() {
        // {'a': [1]} built as: EMPTY_DICT BINPUT0 'a' EMPTY_LIST BINPUT1 SETITEM, then BINGET1 K2 APPEND POP
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00a]q\x01sh\x01K\x02a0.";
        let u = unpickle(p).unwrap();
        let Obj::Dict(items) = &u.arena[u.root] else {
            panic!()
        };
        let Obj::List(l) = &u.arena[items[0].1] else {
            panic!()
        };
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn forbidden_global_names_it() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        let e = unpickle(p).err().unwrap().to_string();
        assert!(e.contains("`os.system`"), "{e}");
    }

    #[test]
    fn truncated_and_garbage_do_not_panic() {
        for p in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"(t",
            b"t",
            b"0",
            b"R",
            b"h\x05",
            b"\x95\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert!(unpickle(p).is_err());
        }
    }
}
