//! F's exact inverse: causal decoding of the noise tokens, block by block with a KV cache, with
//! classifier-free guidance; on the CPU through the host decoder of [`crate::engines`].

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::{FlowBlock, TarFlow, HEAD_DIM};
use crate::models::layers::KvCache;
use crate::device::mode::Backend;
use crate::engines;

/// One causal decoding: its rows (labels; the attention scale of each row, guiding rows after the
/// conditional ones when guided), the guidance schedule and the progress.
struct Steps<'a> {
    labels: Option<&'a Tensor>,
    scales: Vec<f32>,
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
        let steps = Steps { labels, scales, guided, opts, done: 0, total: self.blocks.len() * (t - 1) };
        // CPU f32: the host decoder; elsewhere candle ops with the KV caches and tokens on the device.
        if Backend::of(&self.device) == Backend::Fused && dtype == DType::F32 {
            self.decode_on_host(&z, steps, on_step)
        } else {
            self.decode_on_device(&z, steps, on_step)
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

    /// Causal decoding with the host decoder (engines/decode.rs), one token of every sample at a time.
    fn decode_on_host(&self, z: &Tensor, mut steps: Steps, mut on_step: impl FnMut(usize, usize) -> Result<()>) -> Result<Tensor> {
        let (n, t, d) = z.dims3()?;
        let rows = steps.scales.len();
        let mut x: Vec<f32> = z.flatten_all()?.to_vec1()?;
        for block in self.blocks.iter().rev() {
            let class = self.decoding_class(block, steps.labels, n, steps.guided)?;
            let host_block = block.host_decoder(class.as_ref())?;
            let mut dec = HostDecoding {
                decoder: engines::BlockDecoder::new(&host_block, steps.scales.clone())?,
                x: &mut x,
                tok: vec![0f32; rows * d],
                ab: (vec![0f32; rows * d], vec![0f32; rows * d]),
                n,
                t,
                d,
                flip: block.flip,
                guided: steps.guided,
            };
            decode_block(&mut dec, t, &mut steps, &mut on_step)?;
        }
        Ok(Tensor::from_vec(x, (n, t, d), &self.device)?)
    }

    /// Causal decoding with candle ops: the KV caches, tokens and guidance stay on the model's device
    /// (no host round trip per step, which would stall a GPU B*(T-1) times).
    fn decode_on_device(&self, z: &Tensor, mut steps: Steps, mut on_step: impl FnMut(usize, usize) -> Result<()>) -> Result<Tensor> {
        let (n, t, _) = z.dims3()?;
        let rows = steps.scales.len();
        let dtype = self.blocks[0].pos_embed.dtype();
        let scale = Tensor::from_vec(steps.scales.clone(), rows, &self.device)?.to_dtype(dtype)?;
        let heads = self.cfg.num_heads();
        let mut x = z.clone();
        for block in self.blocks.iter().rev() {
            let cache = || -> Result<KvCache> {
                let zeros = || Tensor::zeros((rows, heads, t, HEAD_DIM), dtype, &self.device);
                Ok(KvCache { k: zeros()?, v: zeros()?, len: 0 })
            };
            // Tokens in this block's order, (N, 1, D) each, f32.
            let xp = block.permute(&x, 1)?;
            let mut dec = DeviceDecoding {
                block,
                class: self.decoding_class(block, steps.labels, n, steps.guided)?,
                caches: (0..block.layers.len()).map(|_| cache()).collect::<Result<_>>()?,
                tokens: (0..t).map(|i| xp.narrow(1, i, 1)).collect::<candle_core::Result<_>>()?,
                scale: &scale,
                dtype,
                n,
                guided: steps.guided,
            };
            decode_block(&mut dec, t, &mut steps, &mut on_step)?;
            x = block.permute(&Tensor::cat(&dec.tokens, 1)?, 1)?;
        }
        Ok(x)
    }

    /// The exact inverse to images: z tokens (N, T, D) -> (N, C, H, W).
    pub fn reverse(&self, z: &Tensor, labels: Option<&Tensor>, opts: &ReverseOptions, on_step: impl FnMut(usize, usize) -> Result<()>) -> Result<Tensor> {
        self.unpatchify(&self.reverse_tokens(z, labels, opts, on_step)?)
    }
}

/// One block's causal decoding where its tokens live (host memory or the model's device): how a step
/// runs there. The loop over the tokens is [`decode_block`], written once for both.
trait BlockDecoding {
    /// The affine parameters a or b of one step, for every row: with guidance, the rows of the
    /// guiding pass follow the conditional ones.
    type Rows;
    /// a and b of token i+1, from the tokens up to i (in this block's order).
    fn step(&mut self, i: usize) -> Result<(Self::Rows, Self::Rows)>;
    /// Each conditional row c becomes [`guided`] by its guiding row u.
    fn guide(&self, v: Self::Rows, g: f64) -> Result<Self::Rows>;
    /// Token i+1 <- token i+1 * exp(a) + b: F's affine step undone.
    fn update(&mut self, i: usize, a: Self::Rows, b: Self::Rows) -> Result<()>;
}

/// Classifier-free guidance: the conditional prediction c pushed away from its guiding one u,
/// `c + g (c - u)`; written once for host values and for tensors.
fn guided<P: Prediction>(c: &P, u: &P, g: f64) -> Result<P> {
    c.add(&c.sub(u)?.scale(g)?)
}

/// The arithmetic [`guided`] needs, where a decoding keeps its predictions.
trait Prediction: Sized {
    fn add(&self, other: &Self) -> Result<Self>;
    fn sub(&self, other: &Self) -> Result<Self>;
    fn scale(&self, g: f64) -> Result<Self>;
}

impl Prediction for f32 {
    fn add(&self, other: &f32) -> Result<f32> {
        Ok(self + other)
    }
    fn sub(&self, other: &f32) -> Result<f32> {
        Ok(self - other)
    }
    fn scale(&self, g: f64) -> Result<f32> {
        Ok(self * g as f32)
    }
}

impl Prediction for Tensor {
    fn add(&self, other: &Tensor) -> Result<Tensor> {
        Ok((self + other)?)
    }
    fn sub(&self, other: &Tensor) -> Result<Tensor> {
        Ok((self - other)?)
    }
    fn scale(&self, g: f64) -> Result<Tensor> {
        Ok((self * g)?)
    }
}

/// Decode one block's T tokens: token 0 stays, each next one from those before it.
fn decode_block<D: BlockDecoding>(dec: &mut D, t: usize, steps: &mut Steps, on_step: &mut impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
    for i in 0..t - 1 {
        let (mut a, mut b) = dec.step(i)?;
        if steps.guided {
            let g = steps.guidance_at(i, t);
            (a, b) = (dec.guide(a, g)?, dec.guide(b, g)?);
        }
        dec.update(i, a, b)?;
        steps.advance(on_step)?;
    }
    Ok(())
}

/// Decoding over host memory: tokens (N, T, D) in `x`, the block's host decoder.
struct HostDecoding<'a, 'b> {
    decoder: engines::BlockDecoder<'b>,
    x: &'a mut [f32],
    /// The current token of every row.
    tok: Vec<f32>,
    /// a and b buffers, lent to each step and returned by `update`.
    ab: (Vec<f32>, Vec<f32>),
    n: usize,
    t: usize,
    d: usize,
    flip: bool,
    guided: bool,
}

impl HostDecoding<'_, '_> {
    /// The position in x of token i in this block's order.
    fn pos(&self, i: usize) -> usize {
        if self.flip { self.t - 1 - i } else { i }
    }
}

impl BlockDecoding for HostDecoding<'_, '_> {
    type Rows = Vec<f32>;

    fn step(&mut self, i: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (n, t, d, p) = (self.n, self.t, self.d, self.pos(i));
        for s in 0..n {
            let off = (s * t + p) * d;
            self.tok[s * d..(s + 1) * d].copy_from_slice(&self.x[off..off + d]);
        }
        if self.guided {
            self.tok.copy_within(0..n * d, n * d);
        }
        let (mut a, mut b) = std::mem::take(&mut self.ab);
        self.decoder.step(&self.tok, p, &mut a, &mut b);
        Ok((a, b))
    }

    fn guide(&self, mut v: Vec<f32>, g: f64) -> Result<Vec<f32>> {
        let (cond, uncond) = v.split_at_mut(self.n * self.d);
        for (c, u) in cond.iter_mut().zip(uncond.iter()) {
            *c = guided(c, u, g)?;
        }
        Ok(v)
    }

    fn update(&mut self, i: usize, a: Vec<f32>, b: Vec<f32>) -> Result<()> {
        let (t, d, p) = (self.t, self.d, self.pos(i + 1));
        for s in 0..self.n {
            let off = (s * t + p) * d;
            for j in 0..d {
                let xv = &mut self.x[off + j];
                *xv = *xv * a[s * d + j].exp() + b[s * d + j];
            }
        }
        self.ab = (a, b);
        Ok(())
    }
}

/// Decoding with candle ops on the model's device: tokens (N, 1, D) each, in the block's order.
struct DeviceDecoding<'a> {
    block: &'a FlowBlock,
    class: Option<Tensor>,
    caches: Vec<KvCache>,
    tokens: Vec<Tensor>,
    /// The attention scale of every row.
    scale: &'a Tensor,
    dtype: DType,
    n: usize,
    guided: bool,
}

impl BlockDecoding for DeviceDecoding<'_> {
    type Rows = Tensor;

    fn step(&mut self, i: usize) -> Result<(Tensor, Tensor)> {
        let tok = if self.guided { Tensor::cat(&[&self.tokens[i], &self.tokens[i]], 0)? } else { self.tokens[i].clone() };
        let (a, b) = self.block.step(&tok.to_dtype(self.dtype)?, i, self.class.as_ref(), &mut self.caches, self.scale)?;
        Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
    }

    fn guide(&self, v: Tensor, g: f64) -> Result<Tensor> {
        guided(&v.narrow(0, 0, self.n)?, &v.narrow(0, self.n, self.n)?, g)
    }

    fn update(&mut self, i: usize, a: Tensor, b: Tensor) -> Result<()> {
        self.tokens[i + 1] = self.tokens[i + 1].broadcast_mul(&a.exp()?.unsqueeze(1)?)?.broadcast_add(&b.unsqueeze(1)?)?;
        Ok(())
    }
}
