//! A job's options, declared once: each field with its help text, its default (a value, or the
//! words of a default that depends on context) and its choices. From that, [`options!`] makes the
//! serde struct a job reads (camelCase keys, unknown keys refused, absent keys at their default),
//! and [`settings!`] the all-optional struct of a training job, whose defaults a resumed run's
//! recorded settings take the place of. Both give the [`OptionSpec`]s the CLI builds its flags and
//! `--help` from (`optionSpecs`).

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::device::Placement;

/// How the CLI reads an option.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A whole number >= 0.
    Integer,
    /// A whole number >= 1.
    Count,
    /// Whole numbers, comma separated.
    Integers,
    /// A number (decimal or exponent notation).
    Number,
    Text,
    /// A switch (present: true).
    Flag,
    /// Two numbers, `lo,hi`.
    Pair,
}

/// The kind of an option's Rust type.
pub trait OptionKind {
    const KIND: Kind;
    /// The job can do without it (a value the CLI must be given otherwise, unless it has a default).
    const OPTIONAL: bool = false;
}
impl<T: OptionKind> OptionKind for Option<T> {
    const KIND: Kind = T::KIND;
    const OPTIONAL: bool = true;
}
impl OptionKind for i64 {
    const KIND: Kind = Kind::Integer;
}
impl OptionKind for std::num::NonZeroUsize {
    const KIND: Kind = Kind::Count;
}
impl OptionKind for std::num::NonZeroU64 {
    const KIND: Kind = Kind::Count;
}
impl OptionKind for Vec<i64> {
    const KIND: Kind = Kind::Integers;
    const OPTIONAL: bool = true;
}
impl OptionKind for usize {
    const KIND: Kind = Kind::Integer;
}
impl OptionKind for u64 {
    const KIND: Kind = Kind::Integer;
}
impl OptionKind for f64 {
    const KIND: Kind = Kind::Number;
}
impl OptionKind for String {
    const KIND: Kind = Kind::Text;
}
impl OptionKind for bool {
    const KIND: Kind = Kind::Flag;
    const OPTIONAL: bool = true;
}
impl OptionKind for [f64; 2] {
    const KIND: Kind = Kind::Pair;
}

/// One option as the CLI shows it.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct OptionSpec {
    /// The job's JSON key (camelCase); the flag is its kebab-case.
    pub key: String,
    pub kind: Kind,
    pub help: String,
    /// The default as `--help` shows it, when there is one.
    pub default: Option<String>,
    pub choices: Vec<&'static str>,
    /// The job fails without it (no default, and not optional by its type).
    pub required: bool,
}

/// A job's options as the CLI shows them.
pub trait Declared {
    fn specs() -> Vec<OptionSpec>;
}

/// `batch_size` -> `batchSize`.
pub fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for ch in snake.chars() {
        if ch == '_' {
            upper = true;
        } else if upper {
            out.extend(ch.to_uppercase());
            upper = false;
        } else {
            out.push(ch);
        }
    }
    out
}

/// The value of an option whose default was declared, after `settings.or(Settings::defaults())`.
pub fn given<T: Clone>(v: &Option<T>) -> T {
    v.clone().expect("an option with a declared default has a value once the defaults are applied")
}

/// One field's [`OptionSpec`] (the part [`options!`] and [`settings!`] share).
#[doc(hidden)]
#[macro_export]
macro_rules! __option_spec {
    ($field:ident, $ty:ty, [$($doc:literal)+], [$($text:literal)?], [$($($choice:literal),+)?], [$($default:expr)?]) => {
        $crate::jobs::options::OptionSpec {
            key: $crate::jobs::options::camel(stringify!($field)),
            kind: <$ty as $crate::jobs::options::OptionKind>::KIND,
            help: [$($doc),+].iter().map(|l: &&str| l.trim()).collect::<Vec<_>>().join(" "),
            default: None
                $(.or(Some($text.to_string())))?
                $(.or(Some(stringify!($default).trim_matches('"').to_string())))?,
            choices: vec![$($(stringify!($choice).trim_matches('"')),+)?],
            required: !<$ty as $crate::jobs::options::OptionKind>::OPTIONAL $(&& { let _ = stringify!($default); false })?,
        }
    };
}

/// A declared default as the field's type (absent: the type's own default).
#[doc(hidden)]
#[macro_export]
macro_rules! __option_default {
    () => {
        Default::default()
    };
    ($default:expr) => {
        serde_json::from_value(serde_json::json!($default)).expect("a default of the declared type")
    };
}

/// Declare a job's options: the fields' types are what the job reads, `= default` (as JSON) fills
/// an absent key, `["words"]` shows a default that depends on context, `{choices}` limits a text.
/// A field that is neither optional by its type (`Option`, `bool`, a list) nor defaulted is
/// required.
///
/// ```ignore
/// options! {
///     pub struct SampleOptions {
///         /// the run folder
///         model: String,
///         /// images decoded at once
///         batch_size: NonZeroUsize = 64,
///         /// how to sample
///         method: Option<String> ["reverse for a distilled run, else exact"] {"reverse", "exact"},
///     }
/// }
/// ```
#[macro_export]
macro_rules! options {
    ($($declaration:tt)*) => {
        $crate::__declare!(options $($declaration)*);
    };
}

/// Declare a training job's settings, as [`options!`] does, but every field optional (`None`:
/// not given), so that a resumed run's recorded settings can fill what the command line leaves
/// out; the declared defaults come from `defaults()` and apply last (`settings.or(defaults)`).
///
/// ```ignore
/// settings! {
///     /// Every knob of the job.
///     pub struct JobSettings {
///         /// images per step
///         batch_size: usize = 64,
///         /// linear warmup steps
///         warmup: u64 ["min(100, steps/10)"],
///         /// the loss
///         loss: String {"align", "naive"} = "align",
///         /// a default shown in other words than its value
///         grad_clip: f64 ["1"] = 1.0,
///     }
/// }
/// ```
#[macro_export]
macro_rules! settings {
    ($($declaration:tt)*) => {
        $crate::__declare!(settings $($declaration)*);
    };
}

/// The field type a declaration gives: as declared for options, optional for settings.
#[doc(hidden)]
#[macro_export]
macro_rules! __field_type {
    (options $ty:ty) => { $ty };
    (settings $ty:ty) => { Option<$ty> };
}

/// What [`options!`] and [`settings!`] share: one reading of the declaration, the specs; the struct
/// is each one's own.
#[doc(hidden)]
#[macro_export]
macro_rules! __declare {
    (
        $mode:ident
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $field:ident : $ty:ty $([$text:literal])? $({$($choice:literal),+})? $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
        $crate::__declare!(@struct $mode [$($sdoc)*] $name [$({$field [$ty] [$($doc)+] [$($default)?]})*]);

        impl $crate::jobs::options::Declared for $name {
            fn specs() -> Vec<$crate::jobs::options::OptionSpec> {
                vec![$($crate::__option_spec!($field, $crate::__field_type!($mode $ty), [$($doc)+], [$($text)?], [$($($choice),+)?], [$($default)?])),*]
            }
        }
    };
    (@struct options [$($sdoc:literal)*] $name:ident [$({$field:ident [$ty:ty] [$($doc:literal)+] [$($default:expr)?]})*]) => {
        $(#[doc = $sdoc])*
        #[derive(Clone, Debug, serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[doc = $doc])+
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> $name {
                $name { $($field: $crate::__option_default!($($default)?)),* }
            }
        }
    };
    (@struct settings [$($sdoc:literal)*] $name:ident [$({$field:ident [$ty:ty] [$($doc:literal)+] [$($default:expr)?]})*]) => {
        $(#[doc = $sdoc])*
        #[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $doc])+
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// `self` where set, else `other`.
            pub fn or(self, other: $name) -> $name {
                $name { $($field: self.$field.or(other.$field)),* }
            }

            /// The declared default values (the others stay None: they depend on context).
            pub fn defaults() -> $name {
                #[allow(unused_mut)]
                let mut d = $name::default();
                $($( d.$field = Some($crate::__option_default!($default)); )?)*
                d
            }
        }
    };
}

crate::options! {
    /// Where a job runs, `device` and `precision`: taken out of its options before the rest are
    /// read (by the job table and the training shell), declared once here for every such job.
    pub struct DeviceArgs {
        /// where the maths runs: auto (the first GPU on a CUDA build that sees one, else the CPU), cpu, cuda or cuda:N
        device: String = "auto",
        /// matrix products in f32, or bf16 with f32 weights, optimizer state and reductions (CUDA only)
        precision: String {"f32", "bf16"} = "f32",
    }
}

/// Refuse a job's options (`map`) that lack one that `T` requires.
pub fn check_required<T: Declared>(map: &Map<String, Value>, what: &str) -> Result<()> {
    match T::specs().into_iter().find(|s| s.required && map.get(&s.key).is_none_or(Value::is_null)) {
        Some(missing) => anyhow::bail!("invalid options for {what}: '{}' is required", missing.key),
        None => Ok(()),
    }
}

/// The options `T` declares, taken out of a job's options (null ones count as absent), for a job
/// whose options are several declarations side by side (where it runs, its session, its own).
pub fn take<T: Declared + serde::de::DeserializeOwned>(map: &mut Map<String, Value>, what: &str) -> Result<T> {
    let mine: Map<String, Value> = T::specs().into_iter().filter_map(|s| map.remove(&s.key).filter(|v| !v.is_null()).map(|v| (s.key, v))).collect();
    check_required::<T>(&mine, what)?;
    serde_json::from_value(Value::Object(mine)).with_context(|| format!("invalid options for {what}"))
}

impl DeviceArgs {
    /// Take `device` and `precision` out of a job's options.
    pub fn take(map: &mut Map<String, Value>) -> Result<DeviceArgs> {
        take(map, "the device")
    }

    pub fn place(&self) -> Result<Placement> {
        crate::device::place(Some(&self.device), Some(&self.precision))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::jobs::{distill::DistillSettings, train::TrainSettings};

    /// A value of every declared option, of its kind, under its key.
    fn every_option(specs: &[OptionSpec]) -> Value {
        let mut all = Map::new();
        for s in specs {
            let v = match s.kind {
                Kind::Integer | Kind::Count => json!(5),
                Kind::Integers => json!([1, 2]),
                Kind::Number => json!(0.5),
                Kind::Text => json!(s.choices.first().copied().unwrap_or("x")),
                Kind::Flag => json!(true),
                Kind::Pair => json!([0.0, 1.0]),
            };
            all.insert(s.key.clone(), v);
        }
        Value::Object(all)
    }

    /// The job's struct must accept a value of each spec's kind under its key (the keys the CLI
    /// sends are the struct's own), and every declared default must have the field's type.
    #[test]
    fn specs_name_the_fields_and_defaults_have_their_types() {
        use crate::eval::{bpd::BpdOptions, fid::eval::EvalOptions, judge::quality::QualityOptions, judge::train::JudgeTrainOptions, reverse::EvalReverseOptions};
        use crate::jobs::{edit::EditOptions, report::ReportOptions, sample::SampleOptions};
        use crate::jobs::{demo::DemoOptions, import::ImportOptions, runs::RunsOptions};
        use crate::data::{inspect::InspectOptions, prepare::PrepareOptions};
        /// Options: every key accepted, and the declared defaults (`Default`) of the fields' types.
        fn accepts<T: serde::de::DeserializeOwned + Default>(v: Value) {
            serde_json::from_value::<T>(v).expect("every declared option is accepted");
            T::default();
        }
        /// Settings: every key accepted and kept (serialised back whole).
        fn keeps<T: serde::de::DeserializeOwned + Serialize>(v: Value) {
            let n = v.as_object().unwrap().len();
            let t: T = serde_json::from_value(v).unwrap();
            assert_eq!(serde_json::to_value(t).unwrap().as_object().unwrap().len(), n);
        }
        /// A training job's options: the session's, taken out first, then its settings.
        fn session(job: &str, v: Value) -> Value {
            let (args, mut rest) = crate::jobs::training::SessionArgs::split(job, v).unwrap();
            assert!(args.resume && args.debug_nan_at_step == Some(5) && args.command.is_some());
            rest.remove("config");
            Value::Object(rest)
        }
        let jobs: [(&str, fn(Value)); 24] = [
            ("lpips", accepts::<crate::eval::lpips::LpipsOptions>),
            ("vae.encode", accepts::<crate::jobs::vae::VaeEncodeOptions>),
            ("vae.decode", accepts::<crate::jobs::vae::VaeDecodeOptions>),
            ("train", |v| {
                keeps::<TrainSettings>(session("train", v));
                TrainSettings::defaults();
            }),
            ("distill", |v| {
                keeps::<DistillSettings>(session("distill", v));
                DistillSettings::defaults();
            }),
            ("device", accepts::<crate::jobs::DeviceArgs>),
            ("echo", accepts::<crate::jobs::EchoOptions>),
            ("fid.convertWeights", accepts::<crate::eval::fid::eval::ConvertOptions>),
            ("fid.formulaWeights", accepts::<crate::eval::fid::eval::FormulaOptions>),
            ("export", accepts::<crate::jobs::bundle::ExportOptions>),
            ("import-bundle", accepts::<crate::jobs::bundle::ImportBundleOptions>),
            ("sample", accepts::<SampleOptions>),
            ("edit", accepts::<EditOptions>),
            ("eval-reverse", accepts::<EvalReverseOptions>),
            ("fid.eval", accepts::<EvalOptions>),
            ("eval-quality", accepts::<QualityOptions>),
            ("judge.train", accepts::<JudgeTrainOptions>),
            ("report", accepts::<ReportOptions>),
            ("eval-bpd", accepts::<BpdOptions>),
            ("data.prepare", accepts::<PrepareOptions>),
            ("data.inspect", accepts::<InspectOptions>),
            ("import-tarflow", accepts::<ImportOptions>),
            ("runs", accepts::<RunsOptions>),
            ("demo", accepts::<DemoOptions>),
        ];
        for (job, check) in jobs {
            check(every_option(&crate::jobs::option_specs(job).unwrap()));
        }
        let lr = DistillSettings::specs().into_iter().find(|s| s.key == "lr").unwrap();
        assert_eq!((lr.kind, lr.default.as_deref()), (Kind::Number, Some("1e-3")));
        assert_eq!(DistillSettings::defaults().lr, Some(1e-3));
        assert_eq!(camel("layers_per_stage"), "layersPerStage");
    }

    /// Declared defaults fill absent keys; a field with neither a default nor an optional type is
    /// required, and the job refuses options without it.
    #[test]
    fn defaults_fill_in_and_required_options_are_enforced() {
        let o: crate::jobs::sample::SampleOptions = serde_json::from_value(json!({"model": "m", "out": "o"})).unwrap();
        assert_eq!((o.batch_size.get(), o.format.as_str(), o.temperature, o.num), (64, "png", 1.0, None));
        let specs = crate::jobs::option_specs("sample").unwrap();
        let required: Vec<&str> = specs.iter().filter(|s| s.required).map(|s| s.key.as_str()).collect();
        assert_eq!(required, ["model", "out"]);
        let batch = specs.iter().find(|s| s.key == "batchSize").unwrap();
        assert_eq!((batch.kind, batch.default.as_deref()), (Kind::Count, Some("64")));
        assert!(TrainSettings::specs().iter().all(|s| !s.required), "a training job's settings are all optional");
        let err = crate::jobs::run("sample", json!({"out": "o"}), &crate::job::JobCtx::silent()).unwrap_err();
        assert!(format!("{err:#}").contains("'model' is required"), "{err:#}");
        let err = serde_json::from_value::<crate::jobs::sample::SampleOptions>(json!({"model": "m", "out": "o", "batchSize": 0})).unwrap_err();
        assert!(err.to_string().contains("nonzero"), "{err}");
    }
}
