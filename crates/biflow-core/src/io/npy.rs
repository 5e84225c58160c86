//! numpy `.npy` arrays and `.npz` archives (stored or deflate-compressed members).
//!
//! Arrays are read into an [`Array`]: a shape, a dtype and the raw little-endian data, converted on
//! request. Only C-order arrays of plain numeric dtypes are accepted; anything else is a clear error.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    I64,
    U64,
    F16,
    F32,
    F64,
    Bool,
}

impl DType {
    fn from_descr(d: &str) -> Result<DType> {
        // The first character is the byte order (a hostile header may hold none, or a multi-byte one).
        let mut chars = d.chars();
        let endian = chars.next();
        let code = chars.as_str();
        ensure!(endian.is_some(), "malformed numpy dtype (empty descr)");
        ensure!(matches!(endian, Some('<' | '|' | '=')), "big-endian numpy dtype '{d}' is not supported");
        Ok(match code {
            "u1" => DType::U8,
            "i1" => DType::I8,
            "b1" => DType::Bool,
            "u2" => DType::U16,
            "i2" => DType::I16,
            "u4" => DType::U32,
            "i4" => DType::I32,
            "i8" => DType::I64,
            "u8" => DType::U64,
            "f2" => DType::F16,
            "f4" => DType::F32,
            "f8" => DType::F64,
            _ => bail!("numpy dtype '{d}' is not supported"),
        })
    }

    fn descr(self) -> &'static str {
        match self {
            DType::U8 => "|u1",
            DType::I8 => "|i1",
            DType::Bool => "|b1",
            DType::U16 => "<u2",
            DType::I16 => "<i2",
            DType::U32 => "<u4",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::U64 => "<u8",
            DType::F16 => "<f2",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::U16 | DType::I16 | DType::F16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::Bool => "bool",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
}

/// A numpy array: shape, dtype and little-endian bytes in C order.
#[derive(Debug, Clone)]
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

macro_rules! converter {
    ($name:ident, $t:ty) => {
        /// The values converted (as numpy's `astype` would) to this type.
        pub fn $name(&self) -> Vec<$t> {
            let d = &self.data;
            let n = self.numel();
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let v: f64 = match self.dtype {
                    DType::U8 | DType::Bool => d[i] as f64,
                    DType::I8 => d[i] as i8 as f64,
                    DType::U16 => u16::from_le_bytes([d[2 * i], d[2 * i + 1]]) as f64,
                    DType::I16 => i16::from_le_bytes([d[2 * i], d[2 * i + 1]]) as f64,
                    DType::F16 => f16_to_f32(u16::from_le_bytes([d[2 * i], d[2 * i + 1]])) as f64,
                    DType::U32 => u32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap()) as f64,
                    DType::I32 => i32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap()) as f64,
                    DType::F32 => f32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap()) as f64,
                    DType::I64 => i64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap()) as f64,
                    DType::U64 => u64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap()) as f64,
                    DType::F64 => f64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap()),
                };
                out.push(v as $t);
            }
            out
        }
    };
}

impl Array {
    pub fn new(shape: Vec<usize>, dtype: DType, data: Vec<u8>) -> Result<Array> {
        let expected = shape.iter().product::<usize>() * dtype.size();
        ensure!(data.len() == expected, "array data has {} bytes, shape {:?} needs {expected}", data.len(), shape);
        Ok(Array { shape, dtype, data })
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Array> {
        Array::new(shape, DType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_f64(shape: Vec<usize>, values: &[f64]) -> Result<Array> {
        Array::new(shape, DType::F64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_u8(shape: Vec<usize>, values: Vec<u8>) -> Result<Array> {
        Array::new(shape, DType::U8, values)
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Result<Array> {
        Array::new(shape, DType::I64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    converter!(to_f32, f32);
    converter!(to_f64, f64);
    converter!(to_i64, i64);

    /// Parse a `.npy` byte stream.
    pub fn read(r: &mut impl Read) -> Result<Array> {
        let (shape, dtype) = read_header(r)?;
        let nbytes = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .context(".npy shape is too large")?;
        let mut data = Vec::new();
        r.take(nbytes as u64).read_to_end(&mut data)?;
        ensure!(data.len() == nbytes, "truncated .npy data: expected {nbytes} bytes for shape {shape:?}, found {}", data.len());
        Ok(Array { shape, dtype, data })
    }

    /// Serialise as a version-1 `.npy`.
    pub fn write(&self, w: &mut impl Write) -> Result<()> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!("({})", self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", self.dtype.descr());
        // Pad so that the data starts on a 64-byte boundary, ending in '\n', as numpy does.
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        w.write_all(b"\x93NUMPY\x01\x00")?;
        w.write_all(&(header.len() as u16).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        w.write_all(&self.data)?;
        Ok(())
    }
}

/// Parse a `.npy` header, leaving `r` at the start of the data (for reading large arrays in pieces).
/// Returns the shape and dtype; the data is C-ordered little-endian.
pub fn read_header(r: &mut impl Read) -> Result<(Vec<usize>, DType)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("not a .npy array: file too short")?;
    ensure!(&magic[..6] == b"\x93NUMPY", "not a .npy array: bad magic bytes");
    let header_len = if magic[6] == 1 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        u16::from_le_bytes(b) as usize
    } else {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        u32::from_le_bytes(b) as usize
    };
    ensure!(header_len < 1 << 20, ".npy header is implausibly long ({header_len} bytes)");
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header).context("truncated .npy header")?;
    let header = String::from_utf8_lossy(&header);
    let descr = header_field(&header, "descr").context("malformed .npy header: no descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = DType::from_descr(descr)?;
    let fortran = header_field(&header, "fortran_order").context("malformed .npy header: no fortran_order")?;
    ensure!(fortran.trim() == "False", "Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray");
    let shape_src = header_field(&header, "shape").context("malformed .npy header: no shape")?;
    let shape = shape_src
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().with_context(|| format!("malformed .npy shape '{shape_src}'")))
        .collect::<Result<Vec<_>>>()?;
    Ok((shape, dtype))
}

/// The text after `'key':` in a numpy header dict, up to the next top-level comma.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => return f32::from_bits(sign) + (if sign != 0 { -1.0 } else { 1.0 }) * frac as f32 * 2f32.powi(-24),
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Read a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Array> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Array::read(&mut std::io::BufReader::new(f)).with_context(|| format!("cannot read {}", path.display()))
}

/// Write a `.npy` file atomically.
pub fn write_npy(path: &Path, array: &Array) -> Result<()> {
    super::atomic::write_with(path, |f| array.write(&mut std::io::BufWriter::new(f)))
}

/// An open `.npz` archive; members are read one at a time, so large archives need not fit in memory.
pub struct Npz<R: Read + Seek> {
    zip: zip::ZipArchive<R>,
    what: String,
}

impl Npz<std::io::BufReader<std::fs::File>> {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Npz::from_reader(std::io::BufReader::new(f), path.display().to_string())
    }
}

impl<R: Read + Seek> Npz<R> {
    pub fn from_reader(r: R, what: String) -> Result<Self> {
        let zip = zip::ZipArchive::new(r).with_context(|| format!("{what} is not a valid .npz (zip) archive"))?;
        Ok(Npz { zip, what })
    }

    /// Array names, without the `.npy` suffix.
    pub fn names(&self) -> Vec<String> {
        (0..self.zip.len())
            .filter_map(|i| self.zip.name_for_index(i)?.ok())
            .map(|n| n.strip_suffix(".npy").unwrap_or(&n).to_string())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.zip.index_for_name(&format!("{name}.npy")).is_some()
    }

    /// A member opened as a stream: the header is parsed (shape, dtype) and the data is left to read.
    pub fn open_member(&mut self, name: &str) -> Result<(Vec<usize>, DType, impl Read + '_)> {
        let what = self.what.clone();
        if !self.contains(name) {
            bail!("{what} has no array '{name}' (it has: {})", self.names().join(", "));
        }
        let member = self.zip.by_name(&format!("{name}.npy")).with_context(|| format!("cannot read '{name}' in {what}"))?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, member);
        let (shape, dtype) = read_header(&mut r).with_context(|| format!("cannot read '{name}' in {what}"))?;
        Ok((shape, dtype, r))
    }

    /// Read a whole member.
    pub fn read(&mut self, name: &str) -> Result<Array> {
        let what = self.what.clone();
        if !self.contains(name) {
            bail!("{what} has no array '{name}' (it has: {})", self.names().join(", "));
        }
        let member = self.zip.by_name(&format!("{name}.npy")).with_context(|| format!("cannot read '{name}' in {what}"))?;
        Array::read(&mut std::io::BufReader::new(member)).with_context(|| format!("cannot read '{name}' in {what}"))
    }
}

/// Read every member of an `.npz`.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, Array>> {
    let mut npz = Npz::open(path)?;
    let mut out = BTreeMap::new();
    for name in npz.names() {
        let a = npz.read(&name)?;
        out.insert(name, a);
    }
    Ok(out)
}

/// Write an `.npz` atomically (stored members, as `np.savez`).
pub fn write_npz(path: &Path, arrays: &[(&str, &Array)]) -> Result<()> {
    super::atomic::write_with(path, |f| {
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(f));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, a) in arrays {
            zip.start_file(format!("{name}.npy"), opts)?;
            a.write(&mut zip)?;
        }
        zip.finish()?.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_conversion() {
        let a = Array::from_f32(vec![2, 3], &[1.0, -2.5, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let mut buf = Vec::new();
        a.write(&mut buf).unwrap();
        assert_eq!((buf.len() - 6 * 4) % 64, 0, "numpy pads the header so that the data starts at a multiple of 64");
        let b = Array::read(&mut buf.as_slice()).unwrap();
        assert_eq!(b.shape, vec![2, 3]);
        assert_eq!(b.to_f64(), vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.5]);
    }

    #[test]
    fn truncated_npy_is_an_error() {
        let a = Array::from_u8(vec![10, 10], vec![7; 100]).unwrap();
        let mut buf = Vec::new();
        a.write(&mut buf).unwrap();
        buf.truncate(buf.len() - 5);
        let err = Array::read(&mut buf.as_slice()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn npz_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npz");
        let x = Array::from_u8(vec![2, 2], vec![1, 2, 3, 4]).unwrap();
        let y = Array::from_i64(vec![2], &[5, -6]).unwrap();
        write_npz(&p, &[("x", &x), ("y", &y)]).unwrap();
        let m = read_npz(&p).unwrap();
        assert_eq!(m["x"].data, vec![1, 2, 3, 4]);
        assert_eq!(m["y"].to_i64(), vec![5, -6]);
    }
}
