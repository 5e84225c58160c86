//! Parity with the reference PyTorch TARFlow (fixtures/tarflow-reference, see its README for the
//! tolerances): forward tokens, every block output, logdets, bpd, the inverse, dropped labels, and
//! the guided exact sample.

use std::collections::HashMap;
use std::path::PathBuf;

use biflow_core::models::flow::{bits_per_dim, nll_loss, FlowConfig, ReverseOptions, TarFlow, Values};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tarflow-reference")
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("tiny-cond.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers: {v}"),
    }
}

fn array(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap() as usize).collect();
    Tensor::from_vec(floats(&v["data"]), shape, &Device::Cpu).unwrap()
}

fn labels(v: &Value) -> Tensor {
    let y: Vec<i64> = v.as_array().unwrap().iter().map(|l| l.as_i64().unwrap()).collect();
    let n = y.len();
    Tensor::from_vec(y, n, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn config(f: &Value) -> FlowConfig {
    FlowConfig::from_reference_args(&f["config"]).unwrap()
}

fn model(cfg: &FlowConfig) -> TarFlow {
    let state = biflow_core::jobs::import::read_reference_state(&fixture_dir().join("tiny-cond.pth")).unwrap();
    let tensors: HashMap<String, Tensor> = state.into_iter().collect();
    TarFlow::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), cfg).unwrap()
}

#[test]
fn forward_matches_reference() {
    let f = fixture();
    let cfg = config(&f);
    let m = model(&cfg);
    let x = array(&f["x"]);
    let y = labels(&f["y"]);
    let out = m.forward(&x, Some(&y)).unwrap();
    let e = max_abs(&out.z, &array(&f["z_tokens"]));
    assert!(e <= 1e-4, "z tokens differ by {e}");
    let blocks = f["block_outputs_tokens"].as_array().unwrap();
    assert_eq!(blocks.len(), out.trajectory.len());
    for (i, (b, r)) in out.trajectory.iter().zip(blocks).enumerate() {
        let e = max_abs(b, &array(r));
        assert!(e <= 1e-4, "block {i} output differs by {e}");
    }
    let e = max_abs(&out.logdets, &Tensor::new(floats(&f["logdets"]), &Device::Cpu).unwrap());
    assert!(e <= 1e-4, "logdets differ by {e}");
    let bpd = bits_per_dim(&out, &cfg, Values::Pixels).unwrap();
    let e = max_abs(&bpd, &Tensor::new(floats(&f["bpd"]), &Device::Cpu).unwrap());
    assert!(e <= 1e-4, "bpd differs by {e}");
    let loss = nll_loss(&out).unwrap().to_scalar::<f32>().unwrap();
    assert!((loss - f["loss"].as_f64().unwrap() as f32).abs() <= 1e-4, "loss {loss} vs {}", f["loss"]);
    // The flow is far from the identity (otherwise this test would prove little).
    assert!(max_abs(&out.z, &m.patchify(&x).unwrap()) > 0.1);
}

#[test]
fn dropped_label_matches_reference() {
    let f = fixture();
    let cfg = config(&f);
    let m = model(&cfg);
    let out = m.forward(&array(&f["x"]), Some(&labels(&f["y_dropped_first"]))).unwrap();
    let e = max_abs(&out.z, &array(&f["z_tokens_dropped_first"]));
    assert!(e <= 1e-4, "z tokens with a dropped label differ by {e}");
    let e = max_abs(&out.logdets, &Tensor::new(floats(&f["logdets_dropped_first"]), &Device::Cpu).unwrap());
    assert!(e <= 1e-4, "logdets with a dropped label differ by {e}");
    // And the dropped label really changed the first sample.
    assert!(max_abs(&out.z.narrow(0, 0, 1).unwrap(), &array(&f["z_tokens"]).narrow(0, 0, 1).unwrap()) > 1e-3);
}

#[test]
fn inverse_of_z_recovers_x() {
    let f = fixture();
    let cfg = config(&f);
    let m = model(&cfg);
    let x = m.reverse(&array(&f["z_tokens"]), Some(&labels(&f["y"])), &ReverseOptions::default(), |_, _| Ok(())).unwrap();
    let e = max_abs(&x, &array(&f["x"]));
    assert!(e <= 1e-4, "inverse of z differs from x by {e}");
}

#[test]
fn guided_exact_sample_matches_reference() {
    let f = fixture();
    let cfg = config(&f);
    let m = model(&cfg);
    let opts = ReverseOptions {
        guidance: f["config"]["guidance"].as_f64().unwrap(),
        annealed: f["config"]["annealed"].as_bool().unwrap(),
        attn_temp: f["config"]["attn_temp"].as_f64().unwrap(),
    };
    let x = m.reverse(&array(&f["noise_tokens"]), Some(&labels(&f["y"])), &opts, |_, _| Ok(())).unwrap();
    let e = max_abs(&x, &array(&f["sample"]));
    assert!(e <= 1e-3, "guided sample differs by {e}");
}
