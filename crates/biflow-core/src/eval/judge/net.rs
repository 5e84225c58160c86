//! The judge's network: three 3x3 convolutions (ReLU, 2x2 max-pool after the first two), a global
//! average pool, a fully connected feature layer (the penultimate features every metric reads) and a
//! linear classification head. About 0.1M parameters: minutes to train on two cores for MNIST.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::io::tensors::{read_safetensors, write_safetensors, HostTensor};

pub const JUDGE_FILE: &str = "judge.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
const FORMAT: &str = "biflow-judge";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JudgeConfig {
    pub in_channels: usize,
    pub img_size: usize,
    pub num_classes: usize,
    /// Output channels of the three convolutions.
    pub widths: [usize; 3],
    /// Size of the penultimate features.
    pub feature_dim: usize,
}

impl JudgeConfig {
    pub fn new(in_channels: usize, img_size: usize, num_classes: usize) -> JudgeConfig {
        JudgeConfig { in_channels, img_size, num_classes, widths: [32, 64, 128], feature_dim: 128 }
    }

    /// The one parameter list: names and shapes, for init, loading and checks.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut cin = self.in_channels;
        for (i, &w) in self.widths.iter().enumerate() {
            out.push((format!("conv{}.weight", i + 1), vec![w, cin, 3, 3]));
            out.push((format!("conv{}.bias", i + 1), vec![w]));
            cin = w;
        }
        out.push(("features.weight".into(), vec![self.feature_dim, cin]));
        out.push(("features.bias".into(), vec![self.feature_dim]));
        out.push(("head.weight".into(), vec![self.num_classes, self.feature_dim]));
        out.push(("head.bias".into(), vec![self.num_classes]));
        out
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.in_channels > 0 && self.img_size >= 8, "the judge needs images of at least 8x8 pixels");
        ensure!(self.num_classes >= 2, "the judge needs a dataset with at least 2 classes (it has {})", self.num_classes);
        Ok(())
    }

    /// Seeded He-normal weights and zero biases (host RNG: candle's CPU randn is not reproducible).
    pub fn init(&self, seed: u64) -> Vec<(String, HostTensor)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.parameters()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    let fan_in: usize = shape[1..].iter().product();
                    let std = (2.0 / fan_in as f32).sqrt();
                    (0..n).map(|_| std * Distribution::<f32>::sample(&StandardNormal, &mut rng)).collect()
                };
                (name, HostTensor { shape, data })
            })
            .collect()
    }
}

/// J/judge.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JudgeFile {
    pub format: String,
    pub version: u32,
    pub config: JudgeConfig,
    /// Accuracy on the held-out split of the dataset it was trained on.
    pub held_out_accuracy: f64,
    /// `eval-quality` refuses the judge when its held-out accuracy is below this.
    pub floor: f64,
    pub held_out_count: usize,
    /// The dataset (folder and content checksum) it was trained on.
    pub data: String,
    pub data_checksum: String,
    pub class_names: Vec<String>,
    pub steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    pub train_seconds: f64,
}

impl JudgeFile {
    pub fn new(config: JudgeConfig) -> JudgeFile {
        JudgeFile {
            format: FORMAT.into(),
            version: VERSION,
            config,
            held_out_accuracy: 0.0,
            floor: 0.0,
            held_out_count: 0,
            data: String::new(),
            data_checksum: String::new(),
            class_names: Vec::new(),
            steps: 0,
            batch_size: 0,
            seed: 0,
            train_seconds: 0.0,
        }
    }
}

pub struct Judge {
    config: JudgeConfig,
    convs: Vec<Conv2d>,
    features: Linear,
    head: Linear,
}

impl Judge {
    pub fn new(config: &JudgeConfig, vb: VarBuilder) -> Result<Judge> {
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let mut cin = config.in_channels;
        let mut convs = Vec::new();
        for (i, &w) in config.widths.iter().enumerate() {
            convs.push(candle_nn::conv2d(cin, w, 3, same, vb.pp(format!("conv{}", i + 1)))?);
            cin = w;
        }
        let features = candle_nn::linear(cin, config.feature_dim, vb.pp("features"))?;
        let head = candle_nn::linear(config.feature_dim, config.num_classes, vb.pp("head"))?;
        Ok(Judge { config: config.clone(), convs, features, head })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    /// Penultimate features (N, feature_dim) of images (N, C, H, W) in [-1, 1].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?.relu()?;
            if i + 1 < self.convs.len() {
                h = h.max_pool2d(2)?;
            }
        }
        let pooled = h.mean((2, 3))?;
        Ok(self.features.forward(&pooled)?.relu()?)
    }

    /// Class logits (N, K) from features.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(features)?)
    }

    /// Load J (judge.json + weights), refusing anything that is not a judge of this format.
    pub fn load(dir: &Path, device: &Device) -> Result<(JudgeFile, Judge)> {
        let path = dir.join(JUDGE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a judge: no readable {JUDGE_FILE} (make one with `biflow judge train`)", dir.display()))?;
        let file: JudgeFile = serde_json::from_str(&text).with_context(|| format!("{} is not a valid judge file", path.display()))?;
        ensure!(file.format == FORMAT, "{} is not a judge file (format '{}')", path.display(), file.format);
        ensure!(file.version <= VERSION, "{} was written by a newer biflow (judge version {})", path.display(), file.version);
        file.config.validate()?;
        let tensors = read_safetensors(&dir.join(WEIGHTS_FILE))?;
        let expected = file.config.parameters();
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in tensors {
            match expected.iter().find(|(n, _)| *n == name) {
                None => bail!("{}: unexpected tensor {name} in the judge's weights", dir.display()),
                Some((_, shape)) if *shape != t.shape => {
                    bail!("{}: tensor {name} has shape {:?}, the judge's configuration needs {shape:?}", dir.display(), t.shape)
                }
                Some(_) => {
                    ensure!(t.data.iter().all(|v| v.is_finite()), "{}: tensor {name} holds non-finite values", dir.display());
                    map.insert(name, Tensor::from_vec(t.data, t.shape, device)?);
                }
            }
        }
        if let Some((missing, _)) = expected.iter().find(|(n, _)| !map.contains_key(n)) {
            bail!("{}: the judge's weights lack {missing}", dir.display());
        }
        let judge = Judge::new(&file.config, VarBuilder::from_tensors(map, DType::F32, device))?;
        Ok((file, judge))
    }
}

/// Write J's weights (atomically).
pub fn save_weights(dir: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)
}
