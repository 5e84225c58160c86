//! F's exact inverse: causal decoding of the noise tokens, block by block with a KV cache, with
//! classifier-free guidance; on the CPU through the host decoder of [`crate::engines`].

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::{FlowBlock, TarFlow, HEAD_DIM};
use crate::models::layers::KvCache;
use crate::device::mode::Backend;
use crate::engines;

/// Progress and the guidance schedule of one causal decoding.
struct Steps<'a> {
    guided: bool,
    opts: &'a ReverseOptions,
    done: usize,
    total: usize,
}

impl Steps<'_> {
    /// The guidance scale at step `i` of a block of `t` tokens (annealed: rising linearly to w).
    fn guidance_at(&self, i: usize, t: usize) -> f64 {
        if self.opts.annealed {
            self.opts.guidance * (i + 1) as f64 / (t - 1) as f64
        } else {
            self.opts.guidance
        }
    }

    fn advance(&mut self, on_step: &mut impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
        self.done += 1;
        on_step(self.done, self.total)
    }
}

/// Settings of exact (causal-decoding) sampling.
#[derive(Clone, Debug)]
pub struct ReverseOptions {
    /// Classifier-free guidance weight w (0 = off).
    pub guidance: f64,
    /// Anneal the guidance weight as w (i+1)/(T-1).
    pub annealed: bool,
    /// Attention temperature of the guiding (unconditional) pass.
    pub attn_temp: f64,
}

impl Default for ReverseOptions {
    fn default() -> Self {
        ReverseOptions { guidance: 0.0, annealed: false, attn_temp: 1.0 }
    }
}

impl TarFlow {
    /// The exact inverse: noise tokens z (N, T, D) -> tokens x (N, T, D), by causal decoding with a KV
    /// cache (B*(T-1) sequential steps), with optional classifier-free guidance. `on_step(done, total)`
    /// is called after each step and may return an error to stop (cancellation).
    pub fn reverse_tokens(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        opts: &ReverseOptions,
        on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, d) = z.dims3()?;
        ensure!(
            t == self.cfg.num_tokens() && d == self.cfg.token_dim(),
            "noise tokens must be N,{},{} for this model, got N,{t},{d}",
            self.cfg.num_tokens(),
            self.cfg.token_dim()
        );
        if let Some(y) = labels {
            ensure!(y.elem_count() == n, "got {} labels for {n} samples", y.elem_count());
        }
        ensure!(opts.attn_temp > 0.0, "attention temperature must be positive");
        let dtype = self.blocks[0].pos_embed.dtype();
        let z = z.to_dtype(DType::F32)?.to_device(&self.device)?;
        let z = match &self.var {
            Some(v) => z.broadcast_mul(&v.to_dtype(DType::F32)?.sqrt()?)?,
            None => z,
        };
        let labels = if self.cfg.num_classes == 0 { None } else { labels };
        let guided = opts.guidance != 0.0;
        // With guidance, the batch is doubled: [conditional | guiding (mean class, attn_temp)].
        let base_scale = 1.0 / (HEAD_DIM as f64).sqrt();
        let mut scales = vec![base_scale as f32; n];
        if guided {
            scales.extend(std::iter::repeat((base_scale / opts.attn_temp) as f32).take(n));
        }
        let steps = Steps { guided, opts, done: 0, total: self.blocks.len() * (t - 1) };
        // CPU f32: the host decoder; elsewhere candle ops with the KV caches and tokens on the device.
        if Backend::of(&self.device) == Backend::Fused && dtype == DType::F32 {
            self.decode_on_host(&z, labels, scales, steps, on_step)
        } else {
            self.decode_on_device(&z, labels, scales, steps, on_step)
        }
    }

    /// The class rows of a decoding batch: [conditional | mean class] when guided.
    fn decoding_class(&self, block: &FlowBlock, labels: Option<&Tensor>, n: usize, guided: bool) -> Result<Option<Tensor>> {
        let cond = block.class_embedding(labels, n)?;
        Ok(match (cond, guided) {
            (Some(c), true) => Some(Tensor::cat(&[&c, &block.class_embedding(None, n)?.unwrap()], 0)?),
            (c, _) => c,
        })
    }

    /// Causal decoding with the host decoder (ops/decode.rs), one token of every sample at a time.
    fn decode_on_host(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        scales: Vec<f32>,
        mut steps: Steps,
        mut on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, d) = z.dims3()?;
        let nb = scales.len();
        let mut x: Vec<f32> = z.flatten_all()?.to_vec1()?;
        for block in self.blocks.iter().rev() {
            let class = self.decoding_class(block, labels, n, steps.guided)?;
            let host_block = block.host_decoder(class.as_ref())?;
            let mut decoder = engines::BlockDecoder::new(&host_block, scales.clone())?;
            // Work in this block's token order.
            let perm = |i: usize| if block.flip { t - 1 - i } else { i };
            let (mut a, mut b) = (vec![0f32; nb * d], vec![0f32; nb * d]);
            let mut tok = vec![0f32; nb * d];
            for i in 0..t - 1 {
                for s in 0..n {
                    let off = (s * t + perm(i)) * d;
                    tok[s * d..(s + 1) * d].copy_from_slice(&x[off..off + d]);
                }
                if steps.guided {
                    tok.copy_within(0..n * d, n * d);
                }
                decoder.step(&tok, perm(i), &mut a, &mut b);
                if steps.guided {
                    // a += g (a - a_u), b += g (b - b_u): conditional rows first, guiding rows after.
                    let g = steps.guidance_at(i, t) as f32;
                    for v in [&mut a, &mut b] {
                        let (cond, uncond) = v.split_at_mut(n * d);
                        cond.iter_mut().zip(uncond.iter()).for_each(|(c, u)| *c += (*c - u) * g);
                    }
                }
                for s in 0..n {
                    let off = (s * t + perm(i + 1)) * d;
                    for j in 0..d {
                        let xv = &mut x[off + j];
                        *xv = *xv * a[s * d + j].exp() + b[s * d + j];
                    }
                }
                steps.advance(&mut on_step)?;
            }
        }
        Ok(Tensor::from_vec(x, (n, t, d), &self.device)?)
    }

    /// Causal decoding with candle ops: the KV caches, tokens and guidance stay on the model's device
    /// (no host round trip per step, which would stall a GPU B*(T-1) times).
    fn decode_on_device(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        scales: Vec<f32>,
        mut steps: Steps,
        mut on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (n, t, _) = z.dims3()?;
        let nb = scales.len();
        let dtype = self.blocks[0].pos_embed.dtype();
        let scale = Tensor::from_vec(scales, nb, &self.device)?.to_dtype(dtype)?;
        let heads = self.cfg.num_heads();
        let mut x = z.clone();
        for block in self.blocks.iter().rev() {
            let class = self.decoding_class(block, labels, n, steps.guided)?;
            let mut caches = (0..block.layers.len())
                .map(|_| -> Result<KvCache> {
                    Ok(KvCache {
                        k: Tensor::zeros((nb, heads, t, HEAD_DIM), dtype, &self.device)?,
                        v: Tensor::zeros((nb, heads, t, HEAD_DIM), dtype, &self.device)?,
                        len: 0,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // Tokens in this block's order, (N, 1, D) each, f32.
            let xp = block.permute(&x, 1)?;
            let mut tokens = (0..t).map(|i| xp.narrow(1, i, 1)).collect::<candle_core::Result<Vec<_>>>()?;
            for i in 0..t - 1 {
                let tok = if steps.guided { Tensor::cat(&[&tokens[i], &tokens[i]], 0)? } else { tokens[i].clone() };
                let (a, b) = block.step(&tok.to_dtype(dtype)?, i, class.as_ref(), &mut caches, &scale)?;
                let (mut a, mut b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                if steps.guided {
                    let g = steps.guidance_at(i, t);
                    let guide = |v: &Tensor| -> Result<Tensor> {
                        let (c, u) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
                        Ok((&c + ((&c - u)? * g)?)?)
                    };
                    (a, b) = (guide(&a)?, guide(&b)?);
                }
                tokens[i + 1] = tokens[i + 1].broadcast_mul(&a.exp()?.unsqueeze(1)?)?.broadcast_add(&b.unsqueeze(1)?)?;
                steps.advance(&mut on_step)?;
            }
            x = block.permute(&Tensor::cat(&tokens, 1)?, 1)?;
        }
        Ok(x)
    }

    /// The exact inverse to images: z tokens (N, T, D) -> (N, C, H, W).
    pub fn reverse(
        &self,
        z: &Tensor,
        labels: Option<&Tensor>,
        opts: &ReverseOptions,
        on_step: impl FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        self.unpatchify(&self.reverse_tokens(z, labels, opts, on_step)?)
    }
}
