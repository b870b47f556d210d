//! Custom attributes: parsing the two accepted input shapes and applying the documented limits.

use crate::error::ApiError;
use crate::model::AttributeValue;
use serde_json::Value;
use std::collections::BTreeMap;

pub const MAX_ATTRIBUTES: usize = 30;
pub const MAX_KEY_CHARS: usize = 30;
pub const MAX_VALUE_CHARS: usize = 30;

/// One requested change: a new value, or `None` to delete the key.
pub type AttributeChange = (String, Option<AttributeValue>);

/// Accepts the documented array of `{key, value}` and an object map.
pub fn parse_changes(input: &Value, source: &str) -> Result<Vec<AttributeChange>, ApiError> {
    let pairs: Vec<(String, &Value)> = match input {
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let obj = item.as_object().ok_or_else(|| {
                    ApiError::invalid(
                        source,
                        "Each custom attribute must be an object with `key` and `value`.",
                    )
                })?;
                let key = obj.get("key").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(source, "Each custom attribute needs a string `key`.")
                })?;
                let value = obj.get("value").ok_or_else(|| {
                    ApiError::invalid(
                        source,
                        format!("Custom attribute `{key}` needs a `value` (null deletes it)."),
                    )
                })?;
                Ok((key.to_string(), value))
            })
            .collect::<Result<_, ApiError>>()?,
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        _ => {
            return Err(ApiError::invalid(
                source,
                "Expected a list of {key, value} objects or an object.",
            ))
        }
    };
    if pairs.is_empty() {
        return Err(ApiError::invalid(
            source,
            "At least one attribute key is required.",
        ));
    }
    pairs
        .into_iter()
        .map(|(key, value)| {
            validate_key(&key, source)?;
            Ok((key.clone(), parse_value(&key, value, source)?))
        })
        .collect()
}

fn validate_key(key: &str, source: &str) -> Result<(), ApiError> {
    let valid_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if key.is_empty() || key.chars().count() > MAX_KEY_CHARS || !valid_chars {
        return Err(ApiError::invalid(
            source,
            format!(
                "Invalid key `{key}`: 1 to {MAX_KEY_CHARS} characters of letters, digits, `-`, `.` and `_`."
            ),
        ));
    }
    Ok(())
}

fn parse_value(key: &str, value: &Value, source: &str) -> Result<Option<AttributeValue>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) if s.chars().count() > MAX_VALUE_CHARS => Err(ApiError::invalid(
            source,
            format!("Value of `{key}` is longer than {MAX_VALUE_CHARS} characters."),
        )),
        Value::String(s) => Ok(Some(AttributeValue::Text(s.clone()))),
        Value::Bool(b) => Ok(Some(AttributeValue::Number(if *b { 1.0 } else { 0.0 }))),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(AttributeValue::Number(f))),
            _ => Err(ApiError::invalid(
                source,
                format!("Value of `{key}` is not a finite number."),
            )),
        },
        Value::Array(_) | Value::Object(_) => Err(ApiError::invalid(
            source,
            format!("Value of `{key}` must be a string or a number."),
        )),
    }
}

/// Applies changes to a copy and refuses the whole set if the result breaks the limit.
pub fn apply(
    current: &BTreeMap<String, AttributeValue>,
    changes: &[AttributeChange],
    source: &str,
) -> Result<BTreeMap<String, AttributeValue>, ApiError> {
    let mut next = current.clone();
    for (key, value) in changes {
        match value {
            Some(v) => {
                next.insert(key.clone(), v.clone());
            }
            None => {
                next.remove(key);
            }
        }
    }
    if next.len() > MAX_ATTRIBUTES {
        return Err(ApiError::invalid(
            source,
            format!(
                "A profile can have at most {MAX_ATTRIBUTES} custom attributes; this request would leave {}.",
                next.len()
            ),
        ));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_shapes_parse_the_same() {
        let a = parse_changes(
            &json!([{"key": "sport", "value": "yoga"}, {"key": "n", "value": 3}]),
            "c",
        )
        .unwrap();
        let b = parse_changes(&json!({"sport": "yoga", "n": 3}), "c").unwrap();
        let sort = |mut v: Vec<AttributeChange>| {
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        assert_eq!(sort(a), sort(b));
    }

    #[test]
    fn booleans_become_numbers_and_empty_deletes() {
        let changes = parse_changes(
            &json!({"t": true, "f": false, "gone": "", "null": null}),
            "c",
        )
        .unwrap();
        let map: BTreeMap<_, _> = changes.into_iter().collect();
        assert_eq!(map["t"], Some(AttributeValue::Number(1.0)));
        assert_eq!(map["f"], Some(AttributeValue::Number(0.0)));
        assert_eq!(map["gone"], None);
        assert_eq!(map["null"], None);
    }

    #[test]
    fn limits_are_enforced() {
        assert!(parse_changes(&json!({"bad key": 1}), "c").is_err());
        assert!(parse_changes(&json!({"k".repeat(31): 1}), "c").is_err());
        assert!(parse_changes(&json!({"k": "v".repeat(31)}), "c").is_err());
        assert!(parse_changes(&json!({"k": [1]}), "c").is_err());
        assert!(parse_changes(&json!([]), "c").is_err());
        let full: BTreeMap<_, _> = (0..30)
            .map(|i| (format!("k{i}"), AttributeValue::Number(1.0)))
            .collect();
        let add = vec![("another".to_string(), Some(AttributeValue::Number(1.0)))];
        assert!(apply(&full, &add, "c").is_err());
        let swap = vec![
            ("k0".to_string(), None),
            ("another".to_string(), Some(AttributeValue::Number(1.0))),
        ];
        assert_eq!(apply(&full, &swap, "c").unwrap().len(), 30);
    }
}
