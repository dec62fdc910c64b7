//! The subset of Python's pickle that torch.save writes (protocol 2, and the protocol 3-5
//! opcodes a newer pickler may emit), read into plain values without running anything.
//!
//! Owns: the opcode loop (a stack, a mark stack, a memo), torch's persistent ids
//! (`('storage', torch.HalfStorage, key, location, numel)`) and the few callables a state dict
//! needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`);
//! any other call becomes an opaque [`Value::Other`], an error only where a tensor is expected.
//! Malformed input is an error naming the opcode and its byte offset, never a panic.

use std::collections::HashMap;

/// Element types of torch storages (`torch.<Name>Storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDtype {
    pub fn from_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn storage_class(self) -> &'static str {
        match self {
            Self::F64 => "DoubleStorage",
            Self::F32 => "FloatStorage",
            Self::F16 => "HalfStorage",
            Self::BF16 => "BFloat16Storage",
            Self::I64 => "LongStorage",
            Self::I32 => "IntStorage",
            Self::I16 => "ShortStorage",
            Self::I8 => "CharStorage",
            Self::U8 => "ByteStorage",
            Self::Bool => "BoolStorage",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }
}

/// A tensor as the pickle describes it: a view into a storage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub dtype: TorchDtype,
    /// The storage's record name in the archive (`data/<key>`).
    pub key: String,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major with no gaps (sizes-1 dimensions may carry any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut want = 1;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != want {
                return false;
            }
            want *= d;
        }
        true
    }

    /// One past the largest storage element the view touches (0 when empty).
    pub fn extent(&self) -> Option<usize> {
        if self.numel() == 0 {
            return Some(0);
        }
        self.shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset + 1, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        dtype: TorchDtype,
        key: String,
    },
    Tensor(TensorRef),
    /// Something built by a call this reader does not interpret (described).
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    fn as_usizes(&self) -> Option<Vec<usize>> {
        match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::as_usize).collect(),
            _ => None,
        }
    }

    /// The entry `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(m, n) => format!("{m}.{n}"),
            Value::Storage { .. } => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Other(s) => s.clone(),
        }
    }
}

enum Item {
    Mark,
    V(Value),
}

/// Reads one pickle.
pub fn load(data: &[u8]) -> Result<Value, String> {
    let mut m = Machine { stack: Vec::new(), memo: HashMap::new(), pos: 0, data };
    m.run()
}

struct Machine<'a> {
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
    pos: usize,
    data: &'a [u8],
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("pickle ends inside an operand at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "short read")?))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("pickle ends inside a text line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map(Value::Str).map_err(|_| "a pickled string is not UTF-8".to_string())
    }
    fn push(&mut self, v: Value) {
        self.stack.push(Item::V(v));
    }
    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => Err("a mark where a value was expected".into()),
            None => Err("the stack is empty".into()),
        }
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err("no value on the stack".into()),
        }
    }
    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.stack.iter().rposition(|i| matches!(i, Item::Mark)).ok_or("no mark on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items.into_iter().filter_map(|i| if let Item::V(v) = i { Some(v) } else { None }).collect())
    }
    fn memo_get(&self, k: u32) -> Result<Value, String> {
        self.memo.get(&k).cloned().ok_or_else(|| format!("memo entry {k} was never stored"))
    }
    fn memo_put(&mut self, k: u32) -> Result<(), String> {
        let v = match self.stack.last() {
            Some(Item::V(v)) => v.clone(),
            _ => return Err("nothing to memoize".into()),
        };
        self.memo.insert(k, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            self.step(op).map_err(|e| format!("pickle opcode 0x{op:02x} at byte {at}: {e}"))?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint
            }
            b'.' => {}
            b'(' => self.stack.push(Item::Mark),
            b'}' => self.push(Value::Dict(Vec::new())),
            b']' => self.push(Value::List(Vec::new())),
            b')' => self.push(Value::Tuple(Vec::new())),
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v as i64))
            }
            0x8a => {
                let n = self.u8()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return Err(format!("a {n}-byte integer is too large"));
                }
                // Little-endian two's complement.
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(buf)))
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().map_err(|_| "short float")?);
                self.push(Value::Float(v))
            }
            b'X' => {
                let n = self.u32()? as usize;
                let v = self.utf8(n)?;
                self.push(v)
            }
            0x8c => {
                let n = self.u8()? as usize;
                let v = self.utf8(n)?;
                self.push(v)
            }
            0x8d => {
                let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                let v = self.utf8(n)?;
                self.push(v)
            }
            b'T' | b'B' => {
                let n = self.u32()? as usize;
                let b = self.take(n)?.to_vec();
                self.push(if op == b'T' {
                    Value::Str(String::from_utf8_lossy(&b).into_owned())
                } else {
                    Value::Bytes(b)
                })
            }
            b'U' | b'C' => {
                let n = self.u8()? as usize;
                let b = self.take(n)?.to_vec();
                self.push(if op == b'U' {
                    Value::Str(String::from_utf8_lossy(&b).into_owned())
                } else {
                    Value::Bytes(b)
                })
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(module, name))
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'q' => {
                let k = self.u8()? as u32;
                self.memo_put(k)?
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k)?
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo_put(k)?
            }
            b'h' => {
                let k = self.u8()? as u32;
                let v = self.memo_get(k)?;
                self.push(v)
            }
            b'j' => {
                let k = self.u32()?;
                let v = self.memo_get(k)?;
                self.push(v)
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::Tuple(items))
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(items))
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.push(Value::Dict(d))
            }
            b'a' => {
                let v = self.pop()?;
                match self.top()? {
                    Value::List(l) => l.push(v),
                    other => return Err(format!("APPEND to {}", other.describe())),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.top()? {
                    Value::List(l) => l.extend(items),
                    other => return Err(format!("APPENDS to {}", other.describe())),
                }
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                match self.top()? {
                    Value::Dict(d) => d.push((k, v)),
                    other => return Err(format!("SETITEM on {}", other.describe())),
                }
            }
            b'u' => {
                let items = self.pop_mark()?;
                let new = pairs(items)?;
                match self.top()? {
                    Value::Dict(d) => d.extend(new),
                    other => return Err(format!("SETITEMS on {}", other.describe())),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent(pid)?;
                self.push(v)
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = call(func, args)?;
                self.push(v)
            }
            0x81 => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(Value::Other(format!("an instance of {}", cls.describe())))
            }
            b'b' => {
                // BUILD: set an object's state. A state dict's `_metadata` is not needed here.
                let _state = self.pop()?;
                self.top()?;
            }
            b'0' => {
                self.pop()?;
            }
            b'2' => {
                let v = self.pop()?;
                self.push(v.clone());
                self.push(v)
            }
            _ => return Err("unknown or unsupported opcode".into()),
        }
        Ok(())
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("an odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// torch's persistent id of a storage: `('storage', torch.<T>Storage, key, location, numel)`.
fn persistent(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err(format!("a persistent id that is {}, not a tuple", pid.describe()));
    };
    match t.as_slice() {
        [Value::Str(kind), Value::Global(_, class), Value::Str(key), ..] if kind == "storage" => {
            let dtype = TorchDtype::from_storage(class)
                .ok_or_else(|| format!("storage type torch.{class} is not supported"))?;
            Ok(Value::Storage { dtype, key: key.clone() })
        }
        _ => Err("a persistent id that is not a torch storage".into()),
    }
}

fn call(func: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &func else {
        return Ok(Value::Other(format!("a call of {}", func.describe())));
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => return Ok(Value::Other(format!("{module}.{name} called with {}", other.describe()))),
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => match args.into_iter().next() {
            None => Ok(Value::Dict(Vec::new())),
            Some(Value::List(items)) => Ok(Value::Dict(
                items
                    .into_iter()
                    .filter_map(|p| match p {
                        Value::Tuple(kv) if kv.len() == 2 => {
                            let mut kv = kv.into_iter();
                            Some((kv.next()?, kv.next()?))
                        }
                        _ => None,
                    })
                    .collect(),
            )),
            Some(other) => Ok(Value::Other(format!("OrderedDict of {}", other.describe()))),
        },
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let bad = || format!("torch._utils.{name} with unexpected arguments");
            let (Some(Value::Storage { dtype, key }), Some(off), Some(size), Some(stride)) =
                (args.first(), args.get(1), args.get(2), args.get(3))
            else {
                return Err(bad());
            };
            let offset = off.as_usize().ok_or_else(bad)?;
            let shape = size.as_usizes().ok_or_else(bad)?;
            let stride = stride.as_usizes().ok_or_else(bad)?;
            if shape.len() != stride.len() {
                return Err(bad());
            }
            Ok(Value::Tensor(TensorRef { dtype: *dtype, key: key.clone(), offset, shape, stride }))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(format!("torch._utils.{name} of something that is not a tensor")),
        },
        _ => Ok(Value::Other(format!("a {module}.{name} object"))),
    }
}

/// Writes the pickle torch.save writes for a dict of tensors, optionally nested under keys
/// (`{"module": {...}}` for SAT): protocol 2, each tensor through `_rebuild_tensor_v2` over its
/// own storage record `data/<i>` (contiguous, offset 0), in the order given.
pub fn dump_state_dict(wrap: &[&str], tensors: &[(String, TorchDtype, Vec<usize>)]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let unicode = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        if let Ok(v) = i32::try_from(v) {
            p.push(b'J');
            p.extend(v.to_le_bytes());
        } else {
            p.extend([0x8a, 8]);
            p.extend((v as i64).to_le_bytes());
        }
    };
    let ints = |p: &mut Vec<u8>, vs: &[usize]| {
        p.push(b'(');
        for &v in vs {
            int(p, v);
        }
        p.push(b't');
    };
    let ordered_dict = |p: &mut Vec<u8>| {
        p.extend(b"ccollections\nOrderedDict\n");
        p.push(b')');
        p.push(b'R');
    };
    for key in wrap {
        p.push(b'}');
        p.push(b'(');
        unicode(&mut p, key);
    }
    ordered_dict(&mut p);
    for chunk in tensors.iter().enumerate().collect::<Vec<_>>().chunks(1000) {
        p.push(b'(');
        for (i, (name, dtype, shape)) in chunk {
            unicode(&mut p, name);
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
            p.push(b'(');
            // The storage's persistent id.
            p.push(b'(');
            unicode(&mut p, "storage");
            p.extend(format!("ctorch\n{}\n", dtype.storage_class()).as_bytes());
            unicode(&mut p, &i.to_string());
            unicode(&mut p, "cpu");
            int(&mut p, shape.iter().product());
            p.push(b't');
            p.push(b'Q');
            int(&mut p, 0);
            ints(&mut p, shape);
            let mut stride = vec![1usize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * shape[d + 1];
            }
            ints(&mut p, &stride);
            p.push(0x89); // requires_grad = False
            ordered_dict(&mut p); // backward hooks
            p.push(b't');
            p.push(b'R');
        }
        p.push(b'u');
    }
    p.extend(std::iter::repeat_n(b'u', wrap.len()));
    p.push(b'.');
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dict_roundtrip() {
        let ts = vec![
            ("a.weight".to_string(), TorchDtype::F16, vec![3, 4]),
            ("a.weight_scale".to_string(), TorchDtype::I8, vec![3]),
            ("b".to_string(), TorchDtype::F32, vec![]),
        ];
        let v = load(&dump_state_dict(&["module"], &ts)).unwrap();
        let sd = v.get("module").unwrap();
        let Value::Dict(items) = sd else { panic!("not a dict") };
        assert_eq!(items.len(), 3);
        for ((k, t), (name, dtype, shape)) in items.iter().zip(&ts) {
            assert_eq!(k.as_str(), Some(name.as_str()));
            let Value::Tensor(t) = t else { panic!("not a tensor") };
            assert_eq!((&t.dtype, &t.shape, t.offset), (dtype, shape, 0));
            assert!(t.is_contiguous());
        }
        assert!(load(&dump_state_dict(&[], &ts)).unwrap().get("a.weight").is_some());
    }

    #[test]
    fn malformed_pickles_are_errors() {
        let good = dump_state_dict(&["module"], &[("w".into(), TorchDtype::F32, vec![2, 2])]);
        for cut in 0..good.len() {
            assert!(load(&good[..cut]).is_err(), "cut {cut}");
        }
        let e = load(&[0x80, 2, 0xff]).unwrap_err();
        assert!(e.contains("0xff") && e.contains("byte 2"), "{e}");
        assert!(load(b"s.").unwrap_err().contains("SETITEM") || load(b"s.").is_err());
        // A storage of a type torch has but we do not read.
        let mut p = vec![0x80, 2, b'(', b'X', 7, 0, 0, 0];
        p.extend(b"storage");
        p.extend(b"ctorch\nComplexFloatStorage\n");
        p.extend([b'X', 1, 0, 0, 0, b'0', b't', b'Q', b'.']);
        assert!(load(&p).unwrap_err().contains("ComplexFloatStorage"));
    }

    #[test]
    fn views_know_their_extent() {
        let t = TensorRef { dtype: TorchDtype::F16, key: "0".into(), offset: 4, shape: vec![2, 3], stride: vec![6, 1] };
        assert!(!t.is_contiguous());
        assert_eq!(t.extent(), Some(4 + 1 + 6 + 2));
        let t = TensorRef { shape: vec![2, 3], stride: vec![3, 1], ..t };
        assert!(t.is_contiguous());
    }
}
