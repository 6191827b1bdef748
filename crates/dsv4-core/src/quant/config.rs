//! The `quantization` section of an MLX `config.json`: a default `{group_size, bits, mode}` plus
//! per-module overrides keyed by module path (`"model.layers.0.attn.wq_a": {...}`, or `false`
//! for a module left unquantized).

use super::QuantMode;
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What the config says about how modules are quantized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlxQuantConfig {
    pub default: QuantMode,
    /// Module path → its mode, or `None` where the config says the module is not quantized.
    pub overrides: BTreeMap<String, Option<QuantMode>>,
}

fn mode_of(obj: &Map<String, Value>, inherit: Option<QuantMode>, at: &str) -> Result<QuantMode> {
    let num = |k: &str| -> Result<Option<u64>> {
        match obj.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                Error::Config(format!(
                    "quantization{at}: `{k}` must be a positive integer, got {v}"
                ))
            }),
        }
    };
    let mode = match obj.get("mode") {
        None => inherit.map_or("affine", |m| m.mode_name()),
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(Error::Config(format!(
                "quantization{at}: `mode` must be a string, got {v}"
            )))
        }
    };
    // MLX defaults: affine 4 bits / 64; the microscaling modes imply their own bits and group.
    let (def_bits, def_group) = match mode {
        "mxfp4" => (4, 32),
        "mxfp8" => (8, 32),
        _ => inherit.map_or((4, 64), |m| (m.bits() as u64, m.group() as u64)),
    };
    let bits = num("bits")?.unwrap_or(def_bits);
    let group = num("group_size")?.unwrap_or(def_group);
    QuantMode::new(mode, bits as u32, group as usize)
        .map_err(|e| Error::Config(format!("quantization{at}: {}", strip(e))))
}

fn strip(e: Error) -> String {
    match e {
        Error::Config(m) => m.trim_start_matches("quantization: ").to_string(),
        e => e.to_string(),
    }
}

impl MlxQuantConfig {
    /// Parses the section; every value is validated (unsupported bits, groups or modes are errors
    /// naming the module).
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Config("`quantization` must be an object".into()))?;
        let default = mode_of(obj, None, "")?;
        let mut overrides = BTreeMap::new();
        for (k, v) in obj {
            if matches!(k.as_str(), "group_size" | "bits" | "mode" | "quant_method") {
                continue;
            }
            let at = format!("[{k}]");
            let m = match v {
                Value::Bool(false) => None,
                Value::Bool(true) => Some(default),
                Value::Object(o) => Some(mode_of(o, Some(default), &at)?),
                other => {
                    return Err(Error::Config(format!(
                        "quantization{at}: expected an object or false, got {other}"
                    )))
                }
            };
            overrides.insert(k.clone(), m);
        }
        Ok(MlxQuantConfig { default, overrides })
    }

    /// The mode the config assigns to a module path (`model.layers.0.attn.wq_a`).
    pub fn mode_for(&self, module: &str) -> Option<QuantMode> {
        match self.overrides.get(module) {
            Some(m) => *m,
            None => Some(self.default),
        }
    }

    /// Writes the section back (for the converter's `config.json`).
    pub fn to_json(&self) -> Value {
        let entry = |m: QuantMode| serde_json::json!({"group_size": m.group(), "bits": m.bits(), "mode": m.mode_name()});
        let mut out = match entry(self.default) {
            Value::Object(o) => o,
            _ => Map::new(),
        };
        for (k, m) in &self.overrides {
            out.insert(k.clone(), m.map_or(Value::Bool(false), entry));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_defaults_and_overrides() {
        let q = MlxQuantConfig::from_json(&json!({
            "group_size": 64, "bits": 4,
            "model.layers.0.attn.wq_a": {"group_size": 64, "bits": 8},
            "model.layers.1.ffn.switch_mlp.gate_proj": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
            "model.layers.1.ffn.gate": false
        }))
        .unwrap();
        assert_eq!(q.default, QuantMode::Affine { bits: 4, group: 64 });
        assert_eq!(
            q.mode_for("model.layers.0.attn.wq_a"),
            Some(QuantMode::Affine { bits: 8, group: 64 })
        );
        assert_eq!(
            q.mode_for("model.layers.1.ffn.switch_mlp.gate_proj"),
            Some(QuantMode::Mxfp4)
        );
        assert_eq!(q.mode_for("model.layers.1.ffn.gate"), None);
        assert_eq!(MlxQuantConfig::from_json(&q.to_json()).unwrap(), q);
    }

    #[test]
    fn rejects_unsupported_values_naming_the_module() {
        let e = MlxQuantConfig::from_json(&json!({"group_size": 64, "bits": 7}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bits 7"), "{e}");
        let e = MlxQuantConfig::from_json(&json!({
            "group_size": 64, "bits": 4, "model.layers.2.attn.wkv": {"group_size": 48, "bits": 4}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.layers.2.attn.wkv") && e.contains("48"),
            "{e}"
        );
        let e = MlxQuantConfig::from_json(&json!({"group_size": 64, "bits": 4, "mode": "nf4"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nf4"), "{e}");
    }
}
