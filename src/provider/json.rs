//! JSON parsing that refuses duplicate object keys (serde_json keeps the last one silently,
//! which lets a forged member shadow a signed one in a downstream parser).

use super::{Outcome, RejectReason, Rejection};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

/// Marker in the error text that tells a duplicate from other syntax errors.
const DUPLICATE: &str = "duplicate key ";

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE}{key:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses `bytes` as one JSON value, refusing duplicate keys at any depth.
pub(crate) fn parse(bytes: &[u8], what: &str) -> Outcome<Value> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(v)) => Ok(v),
        Err(e) if e.to_string().starts_with(DUPLICATE) => Err(Rejection::new(
            RejectReason::DuplicateField,
            format!("{what}: {e}"),
        )),
        Err(e) if std::str::from_utf8(bytes).is_err() => Err(Rejection::new(
            RejectReason::InvalidUtf8,
            format!("{what}: {e}"),
        )),
        Err(e) => Err(Rejection::new(
            RejectReason::Malformed,
            format!("{what}: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_values_and_refuses_duplicates_anywhere() {
        let v = parse(br#"{"a":1,"b":[{"c":"d"}],"e":null,"f":1.5,"g":true}"#, "t").unwrap();
        assert_eq!(v["b"][0]["c"], "d");
        assert_eq!(
            parse(br#"{"a":1,"a":2}"#, "t").unwrap_err().reason,
            RejectReason::DuplicateField
        );
        assert_eq!(
            parse(br#"{"x":{"a":1,"a":2}}"#, "t").unwrap_err().reason,
            RejectReason::DuplicateField
        );
        assert_eq!(
            parse(br#"{"a":1"#, "t").unwrap_err().reason,
            RejectReason::Malformed
        );
        assert_eq!(
            parse(b"{\"a\":\"\xff\"}", "t").unwrap_err().reason,
            RejectReason::InvalidUtf8
        );
    }
}
