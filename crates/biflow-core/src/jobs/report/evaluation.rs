//! The report's evaluation section: what `demo` (or a user's `report --evaluation`) measured, in
//! words and units, with the two samplers of the same F side by side. Keys it does not know are
//! listed as they are at the end.

use std::fmt::Write as _;

use serde_json::Value;

use super::{esc, flatten, table};

/// Sections this renderer reads; anything else in the evaluation is listed under "other".
const KNOWN: &[&str] = &["bitsPerDim", "evalReverse", "sampling", "reverseSpeedupOverExact", "trainingSeconds", "quality"];

fn num(v: &Value, digits: usize) -> Option<String> {
    v.as_f64().map(|x| format!("{x:.digits$}"))
}

fn or_dash(s: Option<String>) -> String {
    s.unwrap_or_else(|| "&ndash;".into())
}

/// One row of the side-by-side table: a measure, then exact's and reverse's value.
fn row(h: &mut String, what: &str, exact: Option<String>, reverse: Option<String>) {
    if exact.is_some() || reverse.is_some() {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td><td>{}</td></tr>", esc(what), or_dash(exact), or_dash(reverse));
    }
}

/// " (N what)" where the count is known.
fn count(v: &Value, what: &str) -> String {
    v.as_u64().map(|n| format!(" ({n} {what})")).unwrap_or_default()
}

fn percent(v: &Value) -> Option<String> {
    v.as_f64().map(|x| format!("{:.1}%", 100.0 * x))
}

/// The HTML of the evaluation `ev` (RUN/evaluation.json).
pub fn render(ev: &Value) -> String {
    let mut h = String::from("<h2>Evaluation</h2>");
    let (s, r, q) = (&ev["sampling"], &ev["evalReverse"], &ev["quality"]);

    // The two samplers, side by side.
    let mut t = String::from("<table><tr><th></th><th>exact: causal decoding of F</th><th>reverse: learned G</th></tr>");
    let side = |m: &str, key: &str| s[m][key].clone();
    row(&mut t, "sequential network steps per batch", num(&side("exact", "networkSteps"), 0), num(&side("reverse", "networkSteps"), 0));
    let n = s["reverse"]["num"].as_u64().or(s["exact"]["num"].as_u64());
    if let Some(n) = n {
        row(&mut t, &format!("time to sample {n} images"), num(&side("exact", "seconds"), 3).map(|x| x + " s"), num(&side("reverse", "seconds"), 3).map(|x| x + " s"));
    }
    row(&mut t, "images per second", num(&side("exact", "imagesPerSecond"), 1), num(&side("reverse", "imagesPerSecond"), 1));
    row(&mut t, "bits/dim of the samples under F", num(&r["bpdExactSamples"], 3), num(&r["bpdReverseSamples"], 3));
    let (qe, qr) = (&q["exact"], &q["reverse"]);
    if !qe.is_null() || !qr.is_null() {
        let setting = |x: &Value| format!("guidance {}, temperature {}", or_dash(num(&x["guidance"], 2)), or_dash(num(&x["temperature"], 2)));
        row(&mut t, "judged samples", (!qe.is_null()).then(|| format!("{}{}", setting(qe), count(&qe["num"], "samples"))), (!qr.is_null()).then(|| format!("{}{}", setting(qr), count(&qr["num"], "samples"))));
        row(&mut t, "Frechet distance in the judge's features (FD_J, lower is better)", num(&qe["fd"], 2), num(&qr["fd"], 2));
        row(&mut t, "label accuracy (the judge sees the requested class)", percent(&qe["labelAccuracy"]), percent(&qr["labelAccuracy"]));
        row(&mut t, "precision (samples on the data's manifold)", num(&qe["precision"], 3), num(&qr["precision"], 3));
        row(&mut t, "recall (data covered by the samples)", num(&qe["recall"], 3), num(&qr["recall"], 3));
        row(&mut t, "within-class diversity, relative to the data's", num(&qe["diversityRatio"], 3), num(&qr["diversityRatio"], 3));
    }
    t += "</table>";
    if t.contains("<td>") {
        h += "<h3>Sampling: the exact inverse against the learned one</h3>";
        h += &t;
        let mut notes = Vec::new();
        if let Some(x) = ev["reverseSpeedupOverExact"].as_f64() {
            notes.push(format!("G samples {x:.1}x faster than causal decoding."));
        }
        if let Some(b) = r["bpdData"].as_f64() {
            notes.push(format!("Held-out data scores {b:.3} bits/dim under F (lower: more typical of F)."));
        }
        if let Some(a) = q["judge"]["heldOutAccuracy"].as_f64() {
            notes.push(format!("The judge is a CNN classifier with {:.1}% held-out accuracy; it never trains F or G.", 100.0 * a));
        }
        if !notes.is_empty() {
            let _ = write!(h, "<p>{}</p>", esc(&notes.join(" ")));
        }
    }

    // F and G on held-out data.
    let mut rows = Vec::new();
    let b = &ev["bitsPerDim"];
    if let Some(v) = num(&b["value"], 4) {
        rows.push(("F: bits/dim on held-out images".to_string(), format!("{v}{}", count(&b["num"], &format!("{} images", b["split"].as_str().unwrap_or("held-out"))))));
    }
    if let (Some(m), Some(p)) = (num(&r["reconstructionMse"], 5), num(&r["reconstructionPsnr"], 2)) {
        rows.push(("G: reconstruction G(F(x + σε)) against x".into(), format!("MSE {m}, PSNR {p} dB{}", count(&r["num"], "images"))));
    }
    if let Some(m) = num(&r["reverseVsExactMse"], 5) {
        rows.push(("G(z) against the exact inverse of the same z".into(), format!("MSE {m}{}", count(&r["numExact"], "noise draws"))));
    }
    let z = &r["latent"];
    if let (Some(m), Some(sd)) = (num(&z["mean"], 3), num(&z["std"], 3)) {
        rows.push((
            "F(x + σε), the noise G learns from (N(0, I): mean 0, std 1)".into(),
            format!("mean {m}, std {sd}, per-token std {} to {}", or_dash(num(&z["tokenStdMin"], 3)), or_dash(num(&z["tokenStdMax"], 3))),
        ));
    }
    let ts = &ev["trainingSeconds"];
    for (key, what) in [("forward", "training F"), ("distill", "distilling G")] {
        if let Some(x) = ts[key].as_f64() {
            rows.push((format!("time {what}"), format!("{:.0} s ({:.1} min)", x, x / 60.0)));
        }
    }
    if !rows.is_empty() {
        h += "<h3>The models on held-out data</h3>";
        h += &table(&rows);
    }

    // Anything else, as it is.
    let mut other = Vec::new();
    if let Some(m) = ev.as_object() {
        for (k, v) in m.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
            flatten(k, v, &mut other);
        }
    } else {
        flatten("", ev, &mut other);
    }
    if !other.is_empty() {
        h += "<h3>Other results</h3>";
        h += &table(&other);
    }
    h
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn reads_in_words_with_both_samplers_side_by_side() {
        let ev = json!({
            "bitsPerDim": {"value": 1.2345, "num": 512, "split": "val"},
            "evalReverse": {"reconstructionMse": 0.01, "reconstructionPsnr": 26.0, "bpdExactSamples": 1.5, "bpdReverseSamples": 1.4, "bpdData": 1.3, "num": 512},
            "sampling": {"exact": {"seconds": 2.0, "networkSteps": 252, "num": 20, "imagesPerSecond": 10.0}, "reverse": {"seconds": 0.1, "networkSteps": 1, "num": 20, "imagesPerSecond": 200.0}},
            "reverseSpeedupOverExact": 20.0,
            "quality": {"judge": {"heldOutAccuracy": 0.99}, "exact": {"fd": 12.5, "labelAccuracy": 0.5, "num": 100}, "reverse": {"fd": 10.25, "labelAccuracy": 0.75, "num": 100}},
            "custom": {"thing": 3}
        });
        let h = super::render(&ev);
        assert!(h.contains("<th>exact: causal decoding of F</th><th>reverse: learned G</th>"), "{h}");
        assert!(h.contains("<td>12.50</td><td>10.25</td>"), "FD_J side by side: {h}");
        assert!(h.contains("<td>50.0%</td><td>75.0%</td>"), "{h}");
        assert!(h.contains("time to sample 20 images</th><td>2.000 s</td><td>0.100 s</td>"), "{h}");
        assert!(h.contains("G samples 20.0x faster"), "{h}");
        assert!(h.contains("custom.thing"), "unknown keys are still listed: {h}");
        assert!(!h.contains("evalReverse.bpdReverseSamples"), "no raw keys for what it knows: {h}");
    }
}
