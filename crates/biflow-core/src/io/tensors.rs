//! Named f32 tensors on the host and their safetensors files (weights, EMA, optimizer moments,
//! converted FID weights).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A host-side f32 tensor, as checkpoints store them.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Encode named f32 tensors as a safetensors file image.
pub fn encode_safetensors(tensors: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Write named f32 tensors to `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    super::atomic::write(path, &encode_safetensors(tensors)?)
}

/// Read every tensor of a safetensors file as f32 (the file must hold only f32 tensors).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_safetensors(&bytes).with_context(|| format!("{} is not a readable safetensors file (truncated or corrupted?)", path.display()))
}

pub fn decode_safetensors(bytes: &[u8]) -> Result<Vec<(String, HostTensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            bail!("tensor {name} is {:?}, expected F32", view.dtype());
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.push((name, HostTensor { shape: view.shape().to_vec(), data }));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Named f32 tensors of a weights file: `.safetensors` (f32, f64, f16, bf16 or i64 values), or a
/// PyTorch `.pth` (zip or legacy format) through the pickle reader that accepts only tensor rebuilds.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if is_safetensors(&bytes) {
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid .safetensors file", path.display()))?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                safetensors::Dtype::F64 => {
                    view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
                }
                safetensors::Dtype::F16 => view.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                safetensors::Dtype::BF16 => {
                    view.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                safetensors::Dtype::I64 => view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
                d => bail!("tensor '{name}' in {} has dtype {d:?}, which is not supported", path.display()),
            };
            out.push((name, view.shape().to_vec(), data));
        }
        Ok(out)
    } else {
        let sd = crate::io::pickle::read_state_dict_bytes(&bytes)?;
        Ok(sd.into_iter().map(|(n, t)| (n, t.shape, t.data)).collect())
    }
}

fn is_safetensors(b: &[u8]) -> bool {
    b.len() > 9 && !b.starts_with(b"PK") && b[0] != 0x80 && b[8] == b'{'
}

/// [`read_weights`] as candle tensors on `device`, by name (what a VarBuilder is made from).
pub fn load_weights(path: &Path, device: &candle_core::Device) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    read_weights(path)?.into_iter().map(|(name, shape, data)| Ok((name, candle_core::Tensor::from_vec(data, shape, device)?))).collect()
}
