//! A safe reader of PyTorch checkpoints (`torch.save` of a state_dict), without PyTorch.
//!
//! Two container formats are read:
//! - the ZIP format (PyTorch >= 1.6): `<prefix>/data.pkl` holds the pickle, `<prefix>/data/<key>` the raw
//!   storages (little-endian);
//! - the LEGACY format (the format of the published FID weights `pt_inception-2015-12-05-6726825d.pth`):
//!   four pickles in a row (magic number, protocol version, sys info, the object), then a pickled list of
//!   storage keys, then for each key an int64 element count followed by the raw bytes.
//!
//! Safety: the pickle is interpreted by a small virtual machine that knows only the data opcodes and the
//! handful of globals a state_dict legitimately needs (see [`ALLOWED_GLOBALS`]). Any other global (e.g.
//! `os.system`, `builtins.eval`, `numpy...`) is refused with an error naming it, before anything is called.
//! Nothing is ever executed: the "calls" of allowed globals are interpreted by this module.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};

/// One tensor of a checkpoint, converted to f32, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl PthTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor may have more elements than its storage (zero strides: an expanded tensor) up to this many.
pub const MAX_EXPANDED_ELEMENTS: usize = 1 << 24;

/// The globals a state_dict pickle may name. Everything else is refused.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

/// Every tensor of a state_dict saved with `torch.save`, in file order. Works for the zip and the legacy
/// formats. A checkpoint whose top-level dict nests dicts (`{"model": state_dict, ...}`) yields the nested
/// tensors with dotted names (`model.layer.weight`); non-tensor leaves (ints, strings) are skipped.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, PthTensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_state_dict_bytes(&bytes).with_context(|| format!("cannot load PyTorch checkpoint {}", path.display()))
}

/// [`read_state_dict`] on the bytes of a file.
pub fn read_state_dict_bytes(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        read_zip(bytes)
    } else if bytes.first() == Some(&0x80) {
        read_legacy(bytes)
    } else if bytes.is_empty() {
        bail!("the file is empty")
    } else {
        bail!("not a PyTorch checkpoint (neither a zip archive nor a legacy pickle stream)")
    }
}

// ---------------------------------------------------------------------------------------------------------
// Storages and tensors

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn from_storage(name: &str) -> Option<Dtype> {
        Some(match name {
            "torch.FloatStorage" => Dtype::F32,
            "torch.DoubleStorage" => Dtype::F64,
            "torch.HalfStorage" => Dtype::F16,
            "torch.BFloat16Storage" => Dtype::BF16,
            "torch.LongStorage" => Dtype::I64,
            "torch.IntStorage" => Dtype::I32,
            "torch.ShortStorage" => Dtype::I16,
            "torch.CharStorage" => Dtype::I8,
            "torch.ByteStorage" => Dtype::U8,
            "torch.BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
    /// Element `i` of little-endian raw bytes, as f32.
    fn get(self, b: &[u8], i: usize) -> f32 {
        let s = self.size();
        let e = &b[i * s..(i + 1) * s];
        match self {
            Dtype::F32 => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            Dtype::F64 => f64::from_le_bytes(e.try_into().unwrap()) as f32,
            Dtype::F16 => half::f16::from_le_bytes([e[0], e[1]]).to_f32(),
            Dtype::BF16 => half::bf16::from_le_bytes([e[0], e[1]]).to_f32(),
            Dtype::I64 => i64::from_le_bytes(e.try_into().unwrap()) as f32,
            Dtype::I32 => i32::from_le_bytes([e[0], e[1], e[2], e[3]]) as f32,
            Dtype::I16 => i16::from_le_bytes([e[0], e[1]]) as f32,
            Dtype::I8 => e[0] as i8 as f32,
            Dtype::U8 => e[0] as f32,
            Dtype::Bool => (e[0] != 0) as u8 as f32,
        }
    }
}

/// A reference to a storage (by key), possibly a legacy view starting `offset` elements into it.
#[derive(Debug, Clone)]
struct StorageRef {
    key: Rc<str>,
    dtype: Dtype,
    /// Elements in the (root) storage, as the pickle declares.
    numel: usize,
    /// Legacy views: the element offset of the view into the root storage, and the view's length.
    view: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// Gather the tensor's elements (C order) from the raw bytes of its root storage.
    fn materialise(&self, raw: &[u8]) -> Result<PthTensor> {
        let st = &self.storage;
        let es = st.dtype.size();
        ensure!(
            st.numel.checked_mul(es).is_some_and(|n| raw.len() >= n),
            "storage '{}' holds {} bytes, fewer than the {} elements of {} bytes it declares (truncated file?)",
            st.key,
            raw.len(),
            st.numel,
            es
        );
        let (base, avail) = match st.view {
            Some((off, len)) => {
                ensure!(off.checked_add(len).is_some_and(|e| e <= st.numel), "storage view of '{}' runs past its end", st.key);
                (off, len)
            }
            None => (0, st.numel),
        };
        let too_big = || anyhow!("a tensor of shape {:?} and stride {:?} is too large", self.shape, self.stride);
        let numel = self.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)).ok_or_else(too_big)?;
        if numel > 0 {
            // Zero strides (expanded tensors) may repeat elements, but not without bound.
            ensure!(
                numel <= avail.max(MAX_EXPANDED_ELEMENTS),
                "a tensor of shape {:?} has {numel} elements but its storage '{}' only {avail}, and expanding past \
                 {MAX_EXPANDED_ELEMENTS} elements is refused",
                self.shape,
                st.key
            );
            let last = self
                .shape
                .iter()
                .zip(&self.stride)
                .try_fold(self.offset, |a, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| x.checked_add(a)))
                .ok_or_else(too_big)?;
            ensure!(
                last < avail,
                "a tensor of shape {:?}, stride {:?}, offset {} reads past the end of its storage '{}' ({} elements)",
                self.shape,
                self.stride,
                self.offset,
                st.key,
                avail
            );
        }
        let mut data = Vec::with_capacity(numel);
        let nd = self.shape.len();
        let contiguous = {
            let mut expect = 1usize;
            let mut ok = true;
            for d in (0..nd).rev() {
                if self.shape[d] != 1 && self.stride[d] != expect {
                    ok = false;
                }
                expect *= self.shape[d];
            }
            ok
        };
        let start = base + self.offset;
        if contiguous {
            for i in 0..numel {
                data.push(st.dtype.get(raw, start + i));
            }
        } else if numel > 0 {
            let mut idx = vec![0usize; nd];
            for _ in 0..numel {
                let pos: usize = idx.iter().zip(&self.stride).map(|(&i, &s)| i * s).sum();
                data.push(st.dtype.get(raw, start + pos));
                for d in (0..nd).rev() {
                    idx[d] += 1;
                    if idx[d] < self.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
        Ok(PthTensor { shape: self.shape.clone(), data })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The pickle machine

/// How deep containers may nest. A real state_dict nests a handful of levels (dicts of dicts, tuples of
/// sizes); a pickle nesting deeper is refused rather than risking the stack of whatever walks it.
pub const MAX_NESTING: usize = 1000;

/// The interpreter's work budget: operations plus elements copied, per byte of the file, plus a fixed
/// allowance. A real pickle spends about one unit per byte; a pickle bomb (e.g. one big tuple handed to a
/// call a million times over) runs out of budget instead of out of time or memory.
pub const WORK_PER_BYTE: u64 = 16;
const WORK_BASE: u64 = 1 << 20;

#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64, as little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    #[allow(dead_code)]
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Tuple>),
    List(Rc<List>),
    Dict(Rc<Dict>),
    Global(Rc<str>),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
}

/// Containers record how deeply they nest (1 + the deepest child), so that a too deep pickle is refused
/// when it is built. Values shared through the memo and mutated later can escape this count, so everything
/// that walks values (dropping them, collecting tensors) is iterative as well.
struct Tuple {
    depth: usize,
    items: Vec<Value>,
}

struct List {
    depth: Cell<usize>,
    items: RefCell<Vec<Value>>,
}

struct Dict {
    depth: Cell<usize>,
    items: RefCell<Vec<(Value, Value)>>,
    /// Position of each string key in `items` (SETITEMS stays linear however many keys).
    index: RefCell<HashMap<Rc<str>, usize>>,
}

// Dropping a deeply nested value must not recurse: each container hands its children to one explicit stack,
// and a child container whose last reference this is gives up its own children the same way.
fn drop_iteratively(mut stack: Vec<Value>) {
    while let Some(v) = stack.pop() {
        match v {
            Value::Tuple(t) => {
                if let Some(mut t) = Rc::into_inner(t) {
                    stack.append(&mut t.items);
                }
            }
            Value::List(l) => {
                if let Some(l) = Rc::into_inner(l) {
                    stack.append(&mut l.items.borrow_mut());
                }
            }
            Value::Dict(d) => {
                if let Some(d) = Rc::into_inner(d) {
                    for (k, v) in d.items.borrow_mut().drain(..) {
                        stack.push(k);
                        stack.push(v);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Drop for Tuple {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            drop_iteratively(std::mem::take(&mut self.items));
        }
    }
}

impl Drop for List {
    fn drop(&mut self) {
        let items = std::mem::take(self.items.get_mut());
        if !items.is_empty() {
            drop_iteratively(items);
        }
    }
}

impl Drop for Dict {
    fn drop(&mut self) {
        let items = std::mem::take(self.items.get_mut());
        if !items.is_empty() {
            drop_iteratively(items.into_iter().flat_map(|(k, v)| [k, v]).collect());
        }
    }
}

/// Every list and dict a machine made. Lists and dicts can be made to contain themselves (through the memo),
/// which reference counting alone would never free: dropping the arena empties each one still alive, which
/// breaks every cycle (a tuple cannot close one: it is built from values that already exist).
#[derive(Default)]
struct Arena {
    lists: Vec<std::rc::Weak<List>>,
    dicts: Vec<std::rc::Weak<Dict>>,
}

impl Arena {
    fn list(&mut self, items: Vec<Value>) -> Result<Value> {
        let l = Rc::new(List { depth: Cell::new(depth_over(&items)?), items: RefCell::new(items) });
        self.lists.push(Rc::downgrade(&l));
        Ok(Value::List(l))
    }
    fn dict(&mut self) -> Value {
        let d = Rc::new(Dict { depth: Cell::new(1), items: RefCell::new(Vec::new()), index: RefCell::new(HashMap::new()) });
        self.dicts.push(Rc::downgrade(&d));
        Value::Dict(d)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let mut orphans = Vec::new();
        for l in self.lists.drain(..).filter_map(|w| w.upgrade()) {
            orphans.append(&mut l.items.borrow_mut());
        }
        for d in self.dicts.drain(..).filter_map(|w| w.upgrade()) {
            d.index.borrow_mut().clear();
            orphans.extend(d.items.borrow_mut().drain(..).flat_map(|(k, v)| [k, v]));
        }
        drop_iteratively(orphans);
    }
}

/// Values print as their kind only: printing contents could recurse without bound (or forever, for a list
/// that contains itself).
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{}>", self.kind())
    }
}

/// At most 200 characters of `s`, for messages.
fn short(s: &str) -> String {
    if s.chars().count() > 200 {
        s.chars().take(200).chain("...".chars()).collect()
    } else {
        s.to_string()
    }
}

fn nesting_error() -> anyhow::Error {
    anyhow!("the pickle nests containers more than {MAX_NESTING} levels deep (the limit; a state_dict needs a few)")
}

/// The depth of a new container holding `items`, or an error past [`MAX_NESTING`].
fn depth_over<'v>(items: impl IntoIterator<Item = &'v Value>) -> Result<usize> {
    let d = 1 + items.into_iter().map(Value::depth).max().unwrap_or(0);
    if d > MAX_NESTING {
        return Err(nesting_error());
    }
    Ok(d)
}

/// Raise `depth` to hold a child of depth `child`, or an error past [`MAX_NESTING`].
fn deepen(depth: &Cell<usize>, child: usize) -> Result<()> {
    if child + 1 > MAX_NESTING {
        return Err(nesting_error());
    }
    depth.set(depth.get().max(child + 1));
    Ok(())
}

impl Value {
    fn tuple(items: Vec<Value>) -> Result<Value> {
        Ok(Value::Tuple(Rc::new(Tuple { depth: depth_over(&items)?, items })))
    }
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(l) => l.depth.get(),
            Value::Dict(d) => d.depth.get(),
            _ => 0,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
    fn as_usize(&self, what: &str) -> Result<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            Value::Bool(b) => Ok(*b as usize),
            v => bail!("{what}: expected a non-negative int, found {}", v.kind()),
        }
    }
    fn as_str(&self, what: &str) -> Result<Rc<str>> {
        match self {
            Value::Str(s) => Ok(s.clone()),
            Value::Bytes(b) => Ok(String::from_utf8_lossy(b).into()),
            v => bail!("{what}: expected a string, found {}", v.kind()),
        }
    }
    /// The items of a tuple or list (a shallow copy: containers inside are shared).
    fn as_seq(&self, what: &str) -> Result<Vec<Value>> {
        match self {
            Value::Tuple(t) => Ok(t.items.clone()),
            Value::List(l) => Ok(l.items.borrow().clone()),
            v => bail!("{what}: expected a tuple, found {}", v.kind()),
        }
    }
    /// The number of items of a tuple or list (what [`Value::as_seq`] would copy).
    fn seq_len(&self) -> usize {
        match self {
            Value::Tuple(t) => t.items.len(),
            Value::List(l) => l.items.borrow().len(),
            _ => 0,
        }
    }
    fn as_usizes(&self, what: &str) -> Result<Vec<usize>> {
        self.as_seq(what)?.iter().map(|v| v.as_usize(what)).collect()
    }
}

/// How persistent ids (`BINPERSID`) are resolved: zip and legacy files lay them out differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Zip,
    Legacy,
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    flavor: Flavor,
    /// Work left (see [`WORK_PER_BYTE`]).
    budget: u64,
    arena: Arena,
}

impl Drop for Machine<'_> {
    fn drop(&mut self) {
        // The stack and memo may hold the only references to deeply nested values.
        let mut all = std::mem::take(&mut self.stack);
        all.extend(std::mem::take(&mut self.memo).into_values());
        drop_iteratively(all);
    }
}

impl<'a> Machine<'a> {
    fn new(b: &'a [u8], pos: usize, flavor: Flavor) -> Self {
        let budget = WORK_BASE.saturating_add(WORK_PER_BYTE.saturating_mul(b.len() as u64));
        Machine { b, pos, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), flavor, budget, arena: Arena::default() }
    }

    /// Spend `units` of the work budget.
    fn spend(&mut self, units: usize) -> Result<()> {
        match self.budget.checked_sub(units as u64 + 1) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => bail!(
                "the pickle needs more work than {WORK_PER_BYTE} operations per byte of the file allows (the limit; a \
                 pickle bomb?)"
            ),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            anyhow!("the pickle stream ends early at byte {} (wanted {} more bytes): the file is truncated", self.pos, n)
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.b[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or_else(|| anyhow!("the pickle stream ends early: the file is truncated"))?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value> {
        if let Some(&m) = self.marks.last() {
            ensure!(self.stack.len() > m, "malformed pickle: pop across a mark");
        }
        self.stack.pop().ok_or_else(|| anyhow!("malformed pickle: stack underflow at byte {}", self.pos))
    }
    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| anyhow!("malformed pickle: empty stack at byte {}", self.pos))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| anyhow!("malformed pickle: no mark at byte {}", self.pos))?;
        ensure!(m <= self.stack.len(), "malformed pickle: mark beyond the stack");
        self.spend(self.stack.len() - m)?;
        Ok(self.stack.split_off(m))
    }
    /// `what`'s items, paid for from the budget.
    fn seq(&mut self, v: &Value, what: &str) -> Result<Vec<Value>> {
        self.spend(v.seq_len())?;
        v.as_seq(what)
    }
    fn global(&mut self, module: &str, name: &str) -> Result<Value> {
        let full = format!("{module}.{name}");
        if !ALLOWED_GLOBALS.contains(&full.as_str()) {
            let full = short(&full);
            bail!(
                "refusing the pickle global '{full}': a state_dict needs only tensor-rebuild globals, and loading \
                 this one could run arbitrary code"
            );
        }
        Ok(Value::Global(full.into()))
    }
    fn long(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() <= 8 {
            let neg = bytes[bytes.len() - 1] & 0x80 != 0;
            let mut a = if neg { [0xffu8; 8] } else { [0u8; 8] };
            a[..bytes.len()].copy_from_slice(bytes);
            Value::Int(i64::from_le_bytes(a))
        } else {
            Value::BigInt(bytes.into())
        }
    }

    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let t = self.seq(&pid, "persistent id")?;
        ensure!(!t.is_empty(), "malformed persistent id");
        let tag = t[0].as_str("persistent id tag")?;
        ensure!(&*tag == "storage", "refusing a persistent id of type '{}' (only storages are allowed)", short(&tag));
        let (ty, key, numel, view) = match self.flavor {
            // ('storage', storage_type, key, location, numel)
            Flavor::Zip => {
                ensure!(t.len() >= 5, "malformed storage persistent id ({} fields)", t.len());
                (&t[1], t[2].as_str("storage key")?, t[4].as_usize("storage size")?, None)
            }
            // ('storage', storage_type, root_key, location, numel, view_metadata)
            Flavor::Legacy => {
                ensure!(t.len() >= 5, "malformed storage persistent id ({} fields)", t.len());
                let view = match t.get(5) {
                    None | Some(Value::None) => None,
                    Some(v) => {
                        let vm = self.seq(v, "storage view")?;
                        ensure!(vm.len() == 3, "malformed storage view metadata");
                        Some((vm[1].as_usize("view offset")?, vm[2].as_usize("view size")?))
                    }
                };
                (&t[1], t[2].as_str("storage key")?, t[4].as_usize("storage size")?, view)
            }
        };
        let dtype = match ty {
            Value::Global(g) => Dtype::from_storage(g).ok_or_else(|| anyhow!("'{g}' is not a storage type"))?,
            v => bail!("storage type: expected a storage class, found {}", v.kind()),
        };
        Ok(Value::Storage(StorageRef { key, dtype, numel, view }))
    }

    fn reduce(&mut self, f: Value, args: Value) -> Result<Value> {
        let name = match f {
            Value::Global(g) => g,
            v => bail!("malformed pickle: calling a {}", v.kind()),
        };
        let a = self.seq(&args, "call arguments")?;
        match &*name {
            "collections.OrderedDict" => {
                // OrderedDict() or, as older torch.save wrote it, OrderedDict([[key, value], ...]).
                ensure!(a.len() <= 1, "OrderedDict takes at most one argument, got {}", a.len());
                let d = self.arena.dict();
                if let Some(pairs) = a.first() {
                    let pairs = self.seq(pairs, "OrderedDict items")?;
                    let mut items = Vec::with_capacity(2 * pairs.len());
                    for pair in &pairs {
                        let kv = self.seq(pair, "an OrderedDict item")?;
                        ensure!(kv.len() == 2, "an OrderedDict item must be a (key, value) pair, got {} values", kv.len());
                        items.extend(kv);
                    }
                    if let Value::Dict(dict) = &d {
                        dict_set_all(dict, items)?;
                    }
                }
                Ok(d)
            }
            "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v2" => {
                ensure!(a.len() >= 4, "{name} takes at least 4 arguments, got {}", a.len());
                let storage = match &a[0] {
                    Value::Storage(s) => s.clone(),
                    v => bail!("{name}: expected a storage, found {}", v.kind()),
                };
                let offset = a[1].as_usize("storage offset")?;
                self.spend(a[2].seq_len() + a[3].seq_len())?;
                let shape = a[2].as_usizes("tensor size")?;
                let stride = a[3].as_usizes("tensor stride")?;
                ensure!(shape.len() == stride.len(), "tensor size and stride differ in length");
                Ok(Value::Tensor(Rc::new(TensorRef { storage, offset, shape, stride })))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => match a.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => bail!("{name}: expected a tensor argument"),
            },
            other => bail!("the global '{other}' cannot be called"),
        }
    }

    /// Run until STOP; return the unpickled object, the position after STOP, and the arena that must outlive
    /// every use of the object (dropping it empties the object's lists and dicts).
    fn run(mut self) -> Result<(Value, usize, Arena)> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            self.spend(0)?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    ensure!(p <= 5, "unsupported pickle protocol {p}");
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos, std::mem::take(&mut self.arena)));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v))
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = Self::long(self.take(n)?);
                    self.stack.push(v)
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let v = Self::long(self.take(n)?);
                    self.stack.push(v)
                }
                b'I' | b'L' => {
                    let s = String::from_utf8_lossy(self.line()?).trim_end_matches('L').to_string();
                    let v = match s.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().map_err(|_| anyhow!("malformed pickle integer '{s}'"))?),
                    };
                    self.stack.push(v)
                }
                b'F' => {
                    let s = String::from_utf8_lossy(self.line()?).to_string();
                    self.stack.push(Value::Float(s.trim().parse().map_err(|_| anyhow!("malformed pickle float"))?))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                b'V' => {
                    let s = String::from_utf8_lossy(self.line()?).into();
                    self.stack.push(Value::Str(s))
                }
                // Python 2 strings (BINSTRING, SHORT_BINSTRING), as older torch.save wrote a state_dict's
                // keys: str, as torch.load reads them (utf-8).
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into();
                    self.stack.push(Value::Str(s))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.into();
                    self.stack.push(Value::Bytes(v))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.into();
                    self.stack.push(Value::Bytes(v))
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let v = self.take(n)?.into();
                    self.stack.push(Value::Bytes(v))
                }
                b')' => self.stack.push(Value::tuple(Vec::new())?),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::tuple(items)?)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(self.stack.len() >= n, "malformed pickle: stack underflow");
                    if let Some(&m) = self.marks.last() {
                        ensure!(self.stack.len() - n >= m, "malformed pickle: pop across a mark");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::tuple(items)?)
                }
                b']' => {
                    let l = self.arena.list(Vec::new())?;
                    self.stack.push(l)
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let l = self.arena.list(items)?;
                    self.stack.push(l)
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => {
                            deepen(&l.depth, v.depth())?;
                            l.items.borrow_mut().push(v)
                        }
                        t => bail!("malformed pickle: APPEND to a {}", t.kind()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => {
                            deepen(&l.depth, items.iter().map(Value::depth).max().unwrap_or(0))?;
                            l.items.borrow_mut().extend(items)
                        }
                        t => bail!("malformed pickle: APPENDS to a {}", t.kind()),
                    }
                }
                b'}' => {
                    let d = self.arena.dict();
                    self.stack.push(d)
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    ensure!(items.len() % 2 == 0, "malformed pickle: odd DICT");
                    let d = self.arena.dict();
                    if let Value::Dict(d) = &d {
                        dict_set_all(d, items)?;
                    }
                    self.stack.push(d)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => dict_set_all(d, vec![k, v])?,
                        t => bail!("malformed pickle: SETITEM on a {}", t.kind()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    ensure!(items.len() % 2 == 0, "malformed pickle: odd SETITEMS");
                    match self.top()? {
                        Value::Dict(d) => dict_set_all(d, items)?,
                        t => bail!("malformed pickle: SETITEMS on a {}", t.kind()),
                    }
                }
                b'c' => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    self.spend(name.len() + module.len())?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g)
                }
                0x93 => {
                    let name = self.pop()?.as_str("global name")?;
                    let module = self.pop()?.as_str("global module")?;
                    self.spend(name.len() + module.len())?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict can get here (other globals are refused).
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    // BUILD: set an object's state. A state_dict's OrderedDict carries `_metadata` (module versions)
                    // and a parameter may carry hooks: neither matters here, so the state is dropped.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        t => bail!("malformed pickle: BUILD on a {}", t.kind()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v)
                }
                b'P' => {
                    bail!("unsupported text persistent id in the pickle")
                }
                b'p' => {
                    let idx: u32 = String::from_utf8_lossy(self.line()?).trim().parse().map_err(|_| anyhow!("malformed PUT"))?;
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'q' => {
                    let idx = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'r' => {
                    let idx = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                0x94 => {
                    let idx = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'g' | b'h' | b'j' => {
                    let idx = match op {
                        b'g' => String::from_utf8_lossy(self.line()?).trim().parse().map_err(|_| anyhow!("malformed GET"))?,
                        b'h' => self.u8()? as u32,
                        _ => self.u32()?,
                    };
                    let v = self.memo.get(&idx).cloned().ok_or_else(|| anyhow!("malformed pickle: memo {idx} is not set"))?;
                    self.stack.push(v)
                }
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}"),
            }
        }
    }
}

/// `d[k] = v` for each pair of `items` (k0, v0, k1, v1, ...): a string key set twice keeps its place.
fn dict_set_all(d: &Dict, items: Vec<Value>) -> Result<()> {
    let mut kv = d.items.borrow_mut();
    let mut index = d.index.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        deepen(&d.depth, k.depth().max(v.depth()))?;
        if let Value::Str(ks) = &k {
            if let Some(&i) = index.get(ks) {
                let old = std::mem::replace(&mut kv[i].1, v);
                drop_iteratively(vec![old]);
                continue;
            }
            index.insert(ks.clone(), kv.len());
        }
        kv.push((k, v));
    }
    Ok(())
}

/// The tensors of an unpickled object, in order, flattening nested dicts with dotted names. Iterative, with
/// the nesting limit and a guard against a dict that contains itself.
fn top_tensors(v: &Value) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(top) = v else { bail!("the checkpoint holds a {}, not a state_dict", v.kind()) };
    let mut out = Vec::new();
    // (dict, its dotted name, the next item to visit); the path of dicts being walked, for cycles.
    let mut path: Vec<(Rc<Dict>, String, usize)> = vec![(top.clone(), String::new(), 0)];
    while let Some((d, prefix, i)) = path.last_mut() {
        let item = d.items.borrow().get(*i).map(|(k, v)| (k.clone(), v.clone()));
        *i += 1;
        let Some((k, v)) = item else {
            path.pop();
            continue;
        };
        let key = match &k {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => continue,
        };
        let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
        match v {
            Value::Dict(child) => {
                ensure!(path.len() < MAX_NESTING, "the state_dict nests dicts more than {MAX_NESTING} levels deep (the limit)");
                ensure!(!path.iter().any(|(p, _, _)| Rc::ptr_eq(p, &child)), "the state_dict contains itself (at '{name}')");
                path.push((child, name, 0));
            }
            Value::Tensor(t) => out.push((name, t)),
            _ => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------
// Containers

fn read_zip(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .context("the file looks like a zip-format checkpoint but is not a readable zip archive (truncated?)")?;
    let names: Vec<String> = zip.file_names().filter_map(|s| s.ok().map(|s| s.to_string())).collect();
    let pkl = names
        .iter()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .min_by_key(|n| n.len())
        .ok_or_else(|| anyhow!("the zip archive has no data.pkl: not a PyTorch checkpoint"))?
        .clone();
    let prefix = pkl.strip_suffix("data.pkl").unwrap().to_string();
    if let Some(order) = read_member(&mut zip, &format!("{prefix}byteorder")).ok() {
        ensure!(order.trim_ascii() == b"little", "big-endian checkpoints are not supported");
    }
    let data = read_member(&mut zip, &pkl)?;
    let (obj, _, _arena) = Machine::new(&data, 0, Flavor::Zip).run().context("cannot unpickle data.pkl")?;
    let tensors = top_tensors(&obj)?;
    let mut cache: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    let mut budget = OutputBudget::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let key = t.storage.key.clone();
        if !cache.contains_key(&key) {
            let raw = read_member(&mut zip, &format!("{prefix}data/{key}"))?;
            budget.storage(raw.len());
            cache.insert(key.clone(), raw);
        }
        let pt = t.materialise(&cache[&key]).with_context(|| format!("tensor '{name}'"))?;
        budget.tensor(&name, &t)?;
        out.push((name, pt));
    }
    Ok(out)
}

/// Bounds the elements all tensors together may hold: twice the bytes of the storages read (tensors may share
/// a storage, as tied weights do) plus [`MAX_EXPANDED_ELEMENTS`], so that a small file whose tensors all view
/// one storage cannot make the reader produce gigabytes.
struct OutputBudget {
    left: usize,
}

impl OutputBudget {
    fn new() -> Self {
        OutputBudget { left: MAX_EXPANDED_ELEMENTS }
    }
    fn storage(&mut self, bytes: usize) {
        self.left = self.left.saturating_add(bytes.saturating_mul(2));
    }
    fn tensor(&mut self, name: &str, t: &TensorRef) -> Result<()> {
        let numel = t.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)).unwrap_or(usize::MAX);
        self.left = self.left.checked_sub(numel).ok_or_else(|| {
            anyhow!(
                "tensor '{name}': the tensors of this checkpoint hold far more elements than its storages (shared or \
                 expanded storages past {MAX_EXPANDED_ELEMENTS} elements are refused)"
            )
        })?;
        Ok(())
    }
}

fn read_member<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, name: &str) -> Result<Vec<u8>> {
    let mut f = zip.by_name(name).with_context(|| format!("the checkpoint has no member '{name}'"))?;
    // The size in the archive's directory is a claim: reserve no more than the file could hold uncompressed.
    let mut v = Vec::with_capacity((f.size() as usize).min(64 << 20));
    f.read_to_end(&mut v).with_context(|| format!("cannot read member '{name}' (truncated or corrupt archive)"))?;
    Ok(v)
}

/// The magic number that starts a legacy checkpoint, 0x1950a86a20f9469cfc6c, as little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    let (magic, pos, _) = Machine::new(bytes, 0, Flavor::Legacy).run().context("cannot read the magic number")?;
    match magic {
        Value::BigInt(b) if *b == LEGACY_MAGIC => {}
        _ => bail!("not a PyTorch checkpoint: the legacy magic number is missing"),
    }
    let (proto, pos, _) = Machine::new(bytes, pos, Flavor::Legacy).run().context("cannot read the protocol version")?;
    match proto {
        Value::Int(1001) => {}
        Value::Int(v) => bail!("unsupported legacy protocol version ({v})"),
        v => bail!("unsupported legacy protocol version (a {})", v.kind()),
    }
    let (_sys_info, pos, _) = Machine::new(bytes, pos, Flavor::Legacy).run().context("cannot read the system info")?;
    let (obj, pos, _obj_arena) = Machine::new(bytes, pos, Flavor::Legacy).run().context("cannot unpickle the state_dict")?;
    let (keys, mut pos, _keys_arena) = Machine::new(bytes, pos, Flavor::Legacy).run().context("cannot read the storage list")?;
    let keys: Vec<Rc<str>> = keys.as_seq("storage keys")?.iter().map(|k| k.as_str("storage key")).collect::<Result<_>>()?;
    let tensors = top_tensors(&obj)?;

    // Element size and count of each storage, as the pickle declared them.
    let mut declared: HashMap<Rc<str>, (Dtype, usize)> = HashMap::new();
    for (_, t) in &tensors {
        declared.insert(t.storage.key.clone(), (t.storage.dtype, t.storage.numel));
    }
    let mut raw: HashMap<Rc<str>, &[u8]> = HashMap::new();
    for key in &keys {
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| anyhow!("the file ends before storage '{key}': it is truncated"))?;
        let n = u64::from_le_bytes(head.try_into().unwrap()) as usize;
        pos += 8;
        let es = match declared.get(key) {
            Some(&(dt, numel)) => {
                ensure!(n == numel, "storage '{key}' holds {n} elements but the pickle declares {numel}");
                dt.size()
            }
            None => bail!("storage '{key}' is listed but no tensor uses it; its element size is unknown"),
        };
        let len = n.checked_mul(es).ok_or_else(|| anyhow!("storage '{key}' is too large"))?;
        let data = pos.checked_add(len).and_then(|end| bytes.get(pos..end)).ok_or_else(|| {
            anyhow!("the file ends inside storage '{key}' ({} of {len} bytes present): it is truncated", bytes.len() - pos)
        })?;
        raw.insert(key.clone(), data);
        pos += len;
    }
    let mut budget = OutputBudget::new();
    budget.storage(raw.values().map(|d| d.len()).sum());
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data = raw
            .get(&t.storage.key)
            .ok_or_else(|| anyhow!("tensor '{name}' uses storage '{}', which the file does not hold", t.storage.key))?;
        let pt = t.materialise(data).with_context(|| format!("tensor '{name}'"))?;
        budget.tensor(&name, &t)?;
        out.push((name, pt));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FID_SUBSET: &str = "../../../shared/fixtures/fid-reference/fid-inception-formula-subset.pth";
    const TARFLOW: &str = "../../../shared/fixtures/tarflow-reference/tiny-cond.pth";

    fn fixture(rel: &str) -> std::path::PathBuf {
        // Prefer the project's copy in fixtures/, fall back to the shared fixtures.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let name = Path::new(rel).file_name().unwrap();
        let local = root.join("fixtures").join(Path::new(rel).parent().unwrap().file_name().unwrap()).join(name);
        if local.exists() {
            local
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
        }
    }

    #[test]
    fn legacy_fid_subset_loads() {
        let sd = read_state_dict(&fixture(FID_SUBSET)).unwrap();
        let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "Conv2d_1a_3x3.conv.weight");
        assert_eq!(names.len(), 10);
        let w = &sd[0].1;
        assert_eq!(w.shape, vec![32, 3, 3, 3]);
        assert_eq!(&w.data[..3], &[-0.26782575f32, -0.15434067, -0.34734887]);
        let var = sd.iter().find(|(n, _)| n == "Conv2d_1a_3x3.bn.running_var").unwrap();
        assert_eq!(&var.1.data[..3], &[1.4537280f32, 1.4479444, 1.0484260]);
        let m = sd.iter().find(|(n, _)| n == "Mixed_5b.branch1x1.conv.weight").unwrap();
        assert_eq!(m.1.shape, vec![64, 192, 1, 1]);
    }

    #[test]
    fn zip_tarflow_loads() {
        let sd = read_state_dict(&fixture(TARFLOW)).unwrap();
        let get = |n: &str| &sd.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("no {n}")).1;
        assert_eq!(sd[0].0, "var");
        assert_eq!(get("var").shape, vec![16, 12]);
        assert_eq!(get("blocks.0.proj_in.weight").shape, vec![128, 12]);
        assert!(get("blocks.0.proj_in.weight").data.iter().any(|&x| x != 0.0));
        assert!(sd.iter().all(|(_, t)| t.data.len() == t.numel()));
    }

    #[test]
    fn truncated_files_fail_clearly() {
        for path in [fixture(FID_SUBSET), fixture(TARFLOW)] {
            let bytes = std::fs::read(&path).unwrap();
            for cut in [bytes.len() - 100, bytes.len() / 2, 500, 10] {
                let err = read_state_dict_bytes(&bytes[..cut]).unwrap_err();
                let msg = format!("{err:#}");
                assert!(msg.contains("truncated") || msg.contains("not a"), "cut {cut}: {msg}");
            }
        }
        assert!(format!("{:#}", read_state_dict_bytes(&[]).unwrap_err()).contains("empty"));
    }

    /// A protocol-2 pickle: {'x': os.system('echo pwned')} as a zip-format checkpoint.
    fn evil_pickle() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(b"X\x01\x00\x00\x00x");
        p.extend(b"cos\nsystem\n");
        p.extend(b"X\x0a\x00\x00\x00echo pwned\x85R");
        p.extend(b"u.");
        p
    }

    #[test]
    fn foreign_global_is_refused() {
        // As a legacy stream (after a valid magic/protocol/sysinfo header) ...
        let mut legacy = vec![0x80, 2, 0x8a, 10];
        legacy.extend(LEGACY_MAGIC);
        legacy.push(b'.');
        legacy.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
        legacy.extend([0x80, 2, b'}', b'.']);
        legacy.extend(evil_pickle());
        let msg = format!("{:#}", read_state_dict_bytes(&legacy).unwrap_err());
        assert!(msg.contains("os.system"), "{msg}");
        assert!(msg.contains("refusing"), "{msg}");
        // ... and inside a zip archive.
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            z.start_file("evil/data.pkl", o).unwrap();
            std::io::Write::write_all(&mut z, &evil_pickle()).unwrap();
            z.finish().unwrap();
        }
        let msg = format!("{:#}", read_state_dict_bytes(buf.get_ref()).unwrap_err());
        assert!(msg.contains("refusing the pickle global 'os.system'"), "{msg}");
        // STACK_GLOBAL (protocol 4) is checked the same way.
        let p4 = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.".to_vec();
        let msg = format!("{:#}", Machine::new(&p4, 0, Flavor::Zip).run().err().unwrap());
        assert!(msg.contains("builtins.eval"), "{msg}");
    }

    /// Strided and offset views: a transposed tensor and a slice sharing one storage, as a zip checkpoint.
    #[test]
    fn strided_views_are_gathered() {
        // storage: 0..12 as f32; 'a' = (3,4) C order; 't' = a.T (4,3) stride (1,4); 's' = a[1:, 1:3] offset 5
        // shape (2,2) stride (4,1).
        let mut p = vec![0x80, 2, b'}', b'('];
        let tensor = |p: &mut Vec<u8>, name: &str, off: u8, shape: &[u8], stride: &[u8], first: bool| {
            p.push(b'X');
            p.extend((name.len() as u32).to_le_bytes());
            p.extend(name.as_bytes());
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.extend(b"(X\x07\x00\x00\x00storage");
            if first {
                p.extend(b"ctorch\nFloatStorage\nq\x01");
            } else {
                p.extend(b"h\x01");
            }
            p.extend(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x0ctQ");
            p.extend([b'K', off, b'(']);
            for &s in shape {
                p.extend([b'K', s]);
            }
            p.extend(b"t(");
            for &s in stride {
                p.extend([b'K', s]);
            }
            p.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
        };
        tensor(&mut p, "a", 0, &[3, 4], &[4, 1], true);
        tensor(&mut p, "t", 0, &[4, 3], &[1, 4], false);
        tensor(&mut p, "s", 5, &[2, 2], &[4, 1], false);
        p.extend(b"u.");
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            z.start_file("m/data.pkl", o).unwrap();
            std::io::Write::write_all(&mut z, &p).unwrap();
            z.start_file("m/data/0", o).unwrap();
            let raw: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
            std::io::Write::write_all(&mut z, &raw).unwrap();
            z.finish().unwrap();
        }
        let sd = read_state_dict_bytes(buf.get_ref()).unwrap();
        assert_eq!(sd[0].1.data, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(sd[1].1.shape, vec![4, 3]);
        assert_eq!(sd[1].1.data, vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        assert_eq!(sd[2].1.data, vec![5., 6., 9., 10.]);
    }

    // ---- hostile pickles: nesting, self-reference, bombs ----------------------------------------------

    fn legacy_with(object: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80, 2, 0x8a, 10];
        f.extend(LEGACY_MAGIC);
        f.push(b'.');
        f.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']);
        f.extend([0x80, 2, b'}', b'.']);
        f.extend(object);
        f.extend([0x80, 2, b']', b'.']); // the storage keys
        f
    }

    fn zip_with(pickle: &[u8]) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            z.start_file("archive/data.pkl", o).unwrap();
            std::io::Write::write_all(&mut z, pickle).unwrap();
            z.finish().unwrap();
        }
        buf.into_inner()
    }

    /// Both containers, read from a file so that the message must name it.
    fn load_both(pickle: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        [("hostile-zip.pth", zip_with(pickle)), ("hostile-legacy.pth", legacy_with(pickle))]
            .into_iter()
            .map(|(name, bytes)| {
                let p = dir.path().join(name);
                std::fs::write(&p, bytes).unwrap();
                let msg = format!("{:#}", read_state_dict(&p).unwrap_err());
                assert!(msg.contains(name), "{msg}");
                msg
            })
            .collect()
    }

    /// A million nested EMPTY_LIST/APPEND: about 2 MB, as in issue 11 (it used to overflow the stack).
    #[test]
    fn million_nested_lists_are_refused_cleanly() {
        let n = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        for msg in load_both(&p) {
            assert!(msg.contains("more than 1000 levels deep"), "{msg}");
        }
    }

    /// The same with MARK ... TUPLE and MARK ... LIST and nested dicts.
    #[test]
    fn million_nested_marks_are_refused_cleanly() {
        let n = 1_000_000;
        for (open, close) in [(&b"("[..], &b"t"[..]), (b"(", b"l"), (b"}(X\x01\x00\x00\x00k", b"u")] {
            let mut p = vec![0x80, 2];
            for _ in 0..n {
                p.extend(open);
            }
            p.push(b'N');
            for _ in 0..n {
                p.extend(close);
            }
            p.push(b'.');
            for msg in load_both(&p) {
                assert!(msg.contains("more than 1000 levels deep"), "{msg}");
            }
        }
    }

    /// Lists linked through the memo after they were nested escape the depth count when built; dropping
    /// the million-deep chain must still not recurse.
    /// `n` empty containers (`make`), memoized, then each linked into the one before it (`j i`, `key`,
    /// `j i+1`, `link`): nested `n` deep, though each looked empty when it was put in its parent.
    fn memo_chain(n: u32, make: u8, key: &[u8], link: u8) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        for i in 0..n {
            p.push(make);
            p.push(b'r');
            p.extend(i.to_le_bytes());
            p.push(b'0');
        }
        for i in 0..n - 1 {
            p.push(b'j');
            p.extend(i.to_le_bytes());
            p.extend(key);
            p.push(b'j');
            p.extend((i + 1).to_le_bytes());
            p.extend([link, b'0']);
        }
        p.extend(b"j\x00\x00\x00\x00.");
        p
    }

    /// Lists linked through the memo after they were nested escape the depth count when built; dropping
    /// the deep chain must still not recurse.
    #[test]
    fn deep_chain_built_through_the_memo_drops_without_recursion() {
        for msg in load_both(&memo_chain(300_000, b']', b"", b'a')) {
            assert!(msg.contains("holds a list, not a state_dict"), "{msg}");
        }
        // The same chain of dicts is walked for tensors: the walk stops at the nesting limit.
        for msg in load_both(&memo_chain(300_000, b'}', b"X\x01\x00\x00\x00k", b's')) {
            assert!(msg.contains("nests dicts more than 1000 levels deep"), "{msg}");
        }
    }

    #[test]
    fn a_dict_that_contains_itself_is_refused() {
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.";
        for msg in load_both(p) {
            assert!(msg.contains("contains itself"), "{msg}");
        }
        // A list that contains itself (and is printed nowhere) is merely not a state_dict.
        let p = b"\x80\x02]q\x00h\x00a.";
        for msg in load_both(p) {
            assert!(msg.contains("not a state_dict"), "{msg}");
        }
    }

    /// A list and a dict that contain themselves are freed once the arena goes (no leak per hostile file).
    #[test]
    fn self_containing_values_are_freed() {
        for p in [&b"\x80\x02]q\x00h\x00a."[..], b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.", b"\x80\x02]2a."] {
            let (v, _, arena) = Machine::new(p, 0, Flavor::Zip).run().unwrap();
            let weak: Box<dyn Fn() -> bool> = match &v {
                Value::List(l) => {
                    let w = Rc::downgrade(l);
                    Box::new(move || w.upgrade().is_some())
                }
                Value::Dict(d) => {
                    let w = Rc::downgrade(d);
                    Box::new(move || w.upgrade().is_some())
                }
                v => panic!("{v:?}"),
            };
            drop(v);
            assert!(weak(), "the cycle keeps it alive until the arena goes");
            drop(arena);
            assert!(!weak(), "freed");
        }
    }

    /// One big tuple handed to a call again and again: the work budget stops it.
    #[test]
    fn call_bomb_runs_out_of_budget() {
        let mut p = vec![0x80, 2, b'('];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ");
        p.extend(b"K\x00(K\x01t(K\x01ttR");
        p.extend(std::iter::repeat_n(b'N', 200_000));
        p.extend(b"tq\x000ctorch._utils\n_rebuild_parameter\nq\x010");
        for _ in 0..1000 {
            p.extend(b"h\x01h\x00R0");
        }
        p.extend(b"}.");
        for msg in load_both(&p) {
            assert!(msg.contains("operations per byte"), "{msg}");
        }
    }

    /// Tensors that lie about their size: overflowing shapes and a huge expansion of one element.
    #[test]
    fn overflowing_and_expanded_tensors_are_refused() {
        let tensor = |shape: &[u64], stride: &[u64], numel: u8| {
            let mut p = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
            p.extend([numel, b't', b'Q', b'K', 0, b'(']);
            for &d in shape {
                p.extend([0x8a, 8]);
                p.extend(d.to_le_bytes());
            }
            p.extend(b"t(");
            for &d in stride {
                p.extend([0x8a, 8]);
                p.extend(d.to_le_bytes());
            }
            p.extend(b"ttRs.");
            let mut buf = std::io::Cursor::new(Vec::new());
            {
                let mut z = zip::ZipWriter::new(&mut buf);
                let o = zip::write::SimpleFileOptions::default();
                z.start_file("a/data.pkl", o).unwrap();
                std::io::Write::write_all(&mut z, &p).unwrap();
                z.start_file("a/data/0", o).unwrap();
                std::io::Write::write_all(&mut z, &vec![0u8; 4 * numel as usize]).unwrap();
                z.finish().unwrap();
            }
            format!("{:#}", read_state_dict_bytes(buf.get_ref()).unwrap_err())
        };
        let big = 1u64 << 62;
        let msg = tensor(&[big, 4], &[0, 0], 1);
        assert!(msg.contains("too large"), "{msg}");
        let msg = tensor(&[(1 << 32) + 1, 1 << 32], &[1, 1], 1);
        assert!(msg.contains("too large"), "{msg}");
        let msg = tensor(&[1 << 30], &[0], 1);
        assert!(msg.contains("expanding past"), "{msg}");
        let msg = tensor(&[2, 3], &[big, big], 4);
        assert!(msg.contains("reads past the end"), "{msg}");
        let msg = tensor(&[3, 3], &[3 << 61, 3 << 61], 4);
        assert!(msg.contains("too large"), "{msg}");
    }
}
