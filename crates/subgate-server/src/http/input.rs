//! Reading fields out of a JSON object, so that every missing, null or mistyped field gets a
//! 400 naming it (the messages follow the framework Adapty's API is built on).

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use subgate_core::service::Patch;
use subgate_core::time;
use subgate_core::ApiError;

pub const REQUIRED: &str = "This field is required.";
pub const NOT_NULL: &str = "This field may not be null.";

/// A JSON object and the path it sits at (for nested objects such as `price`).
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

/// What a key held.
enum Slot<'a> {
    Absent,
    Null,
    Value(&'a Value),
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
        }
    }

    pub fn source(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn slot(&self, name: &str) -> Slot<'a> {
        match self.map.get(name) {
            None => Slot::Absent,
            Some(Value::Null) => Slot::Null,
            Some(v) => Slot::Value(v),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn err(&self, name: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(self.source(name), message)
    }

    /// Reads a field with `parse`; `Ok(None)` when absent (or null and `nullable`).
    fn read<T>(
        &self,
        name: &str,
        nullable: bool,
        parse: impl Fn(&'a Value) -> Result<T, String>,
    ) -> Result<Option<T>, ApiError> {
        match self.slot(name) {
            Slot::Absent => Ok(None),
            Slot::Null if nullable => Ok(None),
            Slot::Null => Err(self.err(name, NOT_NULL)),
            Slot::Value(v) => parse(v).map(Some).map_err(|m| self.err(name, m)),
        }
    }

    fn require<T>(&self, name: &str, value: Option<T>) -> Result<T, ApiError> {
        value.ok_or_else(|| self.err(name, REQUIRED))
    }

    pub fn string(&self, name: &str, nullable: bool) -> Result<Option<String>, ApiError> {
        self.read(name, nullable, parse_string)
    }

    pub fn required_string(&self, name: &str) -> Result<String, ApiError> {
        let value = self.string(name, false)?;
        self.require(name, value)
    }

    pub fn bool(&self, name: &str, nullable: bool) -> Result<Option<bool>, ApiError> {
        self.read(name, nullable, |v| {
            v.as_bool()
                .ok_or_else(|| "Must be a valid boolean.".to_string())
        })
    }

    pub fn number(&self, name: &str, nullable: bool) -> Result<Option<f64>, ApiError> {
        self.read(name, nullable, |v| {
            v.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| "A valid number is required.".to_string())
        })
    }

    pub fn integer(&self, name: &str, nullable: bool) -> Result<Option<i64>, ApiError> {
        self.read(name, nullable, |v| {
            v.as_i64()
                .ok_or_else(|| "A valid integer is required.".to_string())
        })
    }

    pub fn datetime(&self, name: &str, nullable: bool) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.read(name, nullable, parse_datetime)
    }

    pub fn required_datetime(&self, name: &str) -> Result<DateTime<Utc>, ApiError> {
        let value = self.datetime(name, false)?;
        self.require(name, value)
    }

    pub fn date(&self, name: &str, nullable: bool) -> Result<Option<NaiveDate>, ApiError> {
        self.read(name, nullable, |v| {
            v.as_str().and_then(time::parse_date).ok_or_else(|| {
                "Date has wrong format. Use one of these formats instead: YYYY-MM-DD.".to_string()
            })
        })
    }

    pub fn object(&self, name: &str, nullable: bool) -> Result<Option<Fields<'a>>, ApiError> {
        let map = self.read(name, nullable, |v| {
            v.as_object().ok_or_else(|| {
                format!(
                    "Expected a dictionary of items but got type \"{}\".",
                    type_name(v)
                )
            })
        })?;
        Ok(map.map(|map| Fields {
            map,
            prefix: format!("{}{name}.", self.prefix),
        }))
    }

    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// A field of a partial update: absent keeps, null clears (where allowed), a value sets.
    pub fn patch<T>(
        &self,
        name: &str,
        nullable: bool,
        read: impl Fn(&Self, &str, bool) -> Result<Option<T>, ApiError>,
    ) -> Result<Patch<T>, ApiError> {
        if !self.has(name) {
            return Ok(Patch::Keep);
        }
        Ok(match read(self, name, nullable)? {
            Some(v) => Patch::Set(v),
            None => Patch::Clear,
        })
    }

    pub fn into_map(self) -> &'a Map<String, Value> {
        self.map
    }
}

fn parse_string(v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| "Not a valid string.".to_string())
}

fn parse_datetime(v: &Value) -> Result<DateTime<Utc>, String> {
    v.as_str().and_then(time::parse_datetime).ok_or_else(|| {
        "Datetime has wrong format. Use one of these formats instead: YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].".to_string()
    })
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}
