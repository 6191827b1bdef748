//! An order-preserving JSON value and Python-`json.dumps` rendering.
//!
//! The official encoder writes tool schemas and tool-call arguments with Python's
//! `json.dumps(value, ensure_ascii=False)`: object keys in their original order, `", "` and
//! `": "` separators, non-ASCII kept, Python float `repr`. `serde_json::Value` sorts keys (unless
//! the crate-wide `preserve_order` feature is on), so prompts need this small value type.

use std::fmt::Write as _;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A JSON value whose objects keep their key order.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderedJson {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<OrderedJson>),
    /// Entries in source order. A repeated key keeps its first position and its last value
    /// (as a Python `dict` built by `json.loads`).
    Object(Vec<(String, OrderedJson)>),
}

impl OrderedJson {
    /// Parses JSON text, keeping object key order.
    pub fn parse(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The value as Python's `json.dumps(value, ensure_ascii=False)` writes it.
    pub fn to_python_json(&self) -> String {
        let mut out = String::new();
        self.write_python_json(&mut out);
        out
    }

    fn write_python_json(&self, out: &mut String) {
        match self {
            OrderedJson::Null => out.push_str("null"),
            OrderedJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            OrderedJson::Number(n) => write_python_number(n, out),
            OrderedJson::String(s) => write_python_string(s, out),
            OrderedJson::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write_python_json(out);
                }
                out.push(']');
            }
            OrderedJson::Object(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_python_string(k, out);
                    out.push_str(": ");
                    v.write_python_json(out);
                }
                out.push('}');
            }
        }
    }

    /// Converts to a `serde_json::Value` (key order is lost unless `preserve_order` is on).
    pub fn to_value(&self) -> serde_json::Value {
        match self {
            OrderedJson::Null => serde_json::Value::Null,
            OrderedJson::Bool(b) => serde_json::Value::Bool(*b),
            OrderedJson::Number(n) => serde_json::Value::Number(n.clone()),
            OrderedJson::String(s) => serde_json::Value::String(s.clone()),
            OrderedJson::Array(a) => {
                serde_json::Value::Array(a.iter().map(Self::to_value).collect())
            }
            OrderedJson::Object(o) => serde_json::Value::Object(
                o.iter().map(|(k, v)| (k.clone(), v.to_value())).collect(),
            ),
        }
    }
}

impl From<serde_json::Value> for OrderedJson {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => OrderedJson::Null,
            serde_json::Value::Bool(b) => OrderedJson::Bool(b),
            serde_json::Value::Number(n) => OrderedJson::Number(n),
            serde_json::Value::String(s) => OrderedJson::String(s),
            serde_json::Value::Array(a) => {
                OrderedJson::Array(a.into_iter().map(Into::into).collect())
            }
            serde_json::Value::Object(o) => {
                OrderedJson::Object(o.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

/// Python `json` string escaping with `ensure_ascii=False`: only `"`, `\` and C0 controls.
fn write_python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_python_number(n: &serde_json::Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for decimal exponents in
/// `-4..16`, else `d.ddde±XX`.
pub(crate) fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

impl Serialize for OrderedJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OrderedJson::Null => s.serialize_unit(),
            OrderedJson::Bool(b) => s.serialize_bool(*b),
            OrderedJson::Number(n) => n.serialize(s),
            OrderedJson::String(v) => s.serialize_str(v),
            OrderedJson::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            OrderedJson::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for OrderedJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedJsonVisitor)
    }
}

struct OrderedJsonVisitor;

impl<'de> Visitor<'de> for OrderedJsonVisitor {
    type Value = OrderedJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Null)
    }
    fn visit_none<E>(self) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<OrderedJson, D::Error> {
        OrderedJson::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<OrderedJson, E> {
        Ok(OrderedJson::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<OrderedJson, E> {
        serde_json::Number::from_f64(v)
            .map(OrderedJson::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<OrderedJson, E> {
        Ok(OrderedJson::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OrderedJson, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(OrderedJson::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedJson, A::Error> {
        let mut entries: Vec<(String, OrderedJson)> = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, OrderedJson>()? {
            match entries.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = v,
                None => entries.push((k, v)),
            }
        }
        Ok(OrderedJson::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_dumps_style() {
        let v = OrderedJson::parse(
            r#"{"z": 1, "a": [true, null, -2, 1.5, "é\"\\\n\u0001"], "m": {"y": {}, "b": []}}"#,
        )
        .unwrap();
        assert_eq!(
            v.to_python_json(),
            r#"{"z": 1, "a": [true, null, -2, 1.5, "é\"\\\n\u0001"], "m": {"y": {}, "b": []}}"#
        );
        let dup = OrderedJson::parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(dup.to_python_json(), r#"{"a": 3, "b": 2}"#);
    }

    #[test]
    fn python_float_repr_matches_cpython() {
        // Expected strings are CPython 3.11 `repr(float(x))`.
        for (x, want) in [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789.125, "123456789.125"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (2.71, "2.71"),
            (-2.5e300, "-2.5e+300"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }
}
