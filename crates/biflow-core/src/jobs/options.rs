//! A job's settings, declared once: each field with its help text, its default (a value, or the
//! words of a default that depends on context) and its choices. [`settings!`] makes from that the
//! serde struct the job reads (every field optional, camelCase keys, unknown keys refused), its
//! defaults, and the [`OptionSpec`]s the CLI builds its flags and `--help` from (`optionSpecs`).

use serde::Serialize;

/// How the CLI reads an option.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A whole number >= 0.
    Integer,
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

/// Declare a job's settings:
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
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $field:ident : $ty:ty $([$text:literal])? $({$($choice:literal),+})? $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
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
                $($( d.$field = Some(serde_json::from_value(serde_json::json!($default)).expect("a default of the declared type")); )?)*
                d
            }

            /// The options as the CLI shows them.
            pub fn specs() -> Vec<$crate::jobs::options::OptionSpec> {
                vec![$(
                    $crate::jobs::options::OptionSpec {
                        key: $crate::jobs::options::camel(stringify!($field)),
                        kind: <$ty as $crate::jobs::options::OptionKind>::KIND,
                        help: [$($doc),+].iter().map(|l: &&str| l.trim()).collect::<Vec<_>>().join(" "),
                        default: None
                            $(.or(Some($text.to_string())))?
                            $(.or(Some(stringify!($default).trim_matches('"').to_string())))?,
                        choices: vec![$($($choice),+)?],
                    }
                ),*]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::jobs::{distill::DistillSettings, train::TrainSettings};

    /// A value of each spec's kind under its key must be accepted by the job (the keys the CLI sends
    /// are the struct's own), and every declared default must have the field's type.
    #[test]
    fn specs_name_the_fields_and_defaults_have_their_types() {
        for job in ["train", "distill"] {
            let specs = crate::jobs::option_specs(job).unwrap();
            let mut all = Map::new();
            for s in &specs {
                let v = match s.kind {
                    Kind::Integer => json!(3),
                    Kind::Number => json!(0.5),
                    Kind::Text => json!(s.choices.first().copied().unwrap_or("x")),
                    Kind::Flag => json!(true),
                    Kind::Pair => json!([0.0, 1.0]),
                };
                all.insert(s.key.clone(), v);
            }
            let n = all.len();
            match job {
                "train" => {
                    let t: TrainSettings = serde_json::from_value(Value::Object(all)).unwrap();
                    assert_eq!(serde_json::to_value(t).unwrap().as_object().unwrap().len(), n);
                    TrainSettings::defaults();
                }
                _ => {
                    let d: DistillSettings = serde_json::from_value(Value::Object(all)).unwrap();
                    assert_eq!(serde_json::to_value(d).unwrap().as_object().unwrap().len(), n);
                    DistillSettings::defaults();
                }
            }
        }
        let lr = DistillSettings::specs().into_iter().find(|s| s.key == "lr").unwrap();
        assert_eq!((lr.kind, lr.default.as_deref()), (Kind::Number, Some("1e-3")));
        assert_eq!(DistillSettings::defaults().lr, Some(1e-3));
        assert_eq!(camel("layers_per_stage"), "layersPerStage");
    }
}
