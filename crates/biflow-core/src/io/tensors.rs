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

