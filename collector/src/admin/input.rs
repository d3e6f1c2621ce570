//! Reading the admin API's JSON bodies and query strings into checked
//! values. Every refusal names its field: 422 `{"error", "field"}`.
//!
//! Bodies are read as a generic JSON object first and then field by field,
//! rather than through `serde::Deserialize`, so that a wrong type, a missing
//! field and an unknown field each get their own message and the field's
//! name, and nothing but a well-formed value reaches SQL.

use affgate_schema::parse_micros;
use serde_json::{Map, Value};

use super::ApiError;

/// Longest name-like text field.
pub const MAX_NAME: usize = 200;

/// A JSON object body with the fields an endpoint allows.
#[derive(Debug)]
pub struct Body(Map<String, Value>);

impl Body {
    /// Refuses fields not in `allowed`.
    pub fn new(v: Value, allowed: &[&str]) -> Result<Body, ApiError> {
        let Value::Object(map) = v else {
            return Err(ApiError::bad_request("body must be a JSON object"));
        };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::invalid(k, "unknown field"));
        }
        Ok(Body(map))
    }

    /// The field, with JSON `null` taken as absent.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn str_req(&self, name: &str, max: usize) -> Result<String, ApiError> {
        self.str_opt(name, max)?
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// A non-empty string of at most `max` characters, without control characters.
    pub fn str_opt(&self, name: &str, max: usize) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                if s.is_empty() {
                    Err(ApiError::invalid(name, "must not be empty"))
                } else if s.chars().count() > max {
                    Err(ApiError::invalid(
                        name,
                        &format!("must be at most {max} characters"),
                    ))
                } else if s.chars().any(char::is_control) {
                    Err(ApiError::invalid(
                        name,
                        "must not contain control characters",
                    ))
                } else {
                    Ok(Some(s.clone()))
                }
            }
            Some(_) => Err(ApiError::invalid(name, "must be a string")),
        }
    }

    pub fn id_req(&self, name: &str) -> Result<i64, ApiError> {
        self.id_opt(name)?
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// A positive integer id.
    pub fn id_opt(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.int_opt(name, 1, i64::MAX)
    }

    /// An integer in `min..=max`.
    pub fn int_opt(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
                _ => Err(ApiError::invalid(
                    name,
                    &format!("must be an integer from {min} to {max}"),
                )),
            },
            Some(_) => Err(ApiError::invalid(name, "must be an integer")),
        }
    }

    /// A non-negative decimal with at most 6 fraction digits, as a JSON
    /// string (`"12.50"`) or number (`12.5`), in micro-units.
    pub fn decimal_req(&self, name: &str) -> Result<i64, ApiError> {
        match self.get(name) {
            None => Err(ApiError::invalid(name, "is required")),
            Some(v) => decimal(v).map_err(|why| ApiError::invalid(name, &why)),
        }
    }

    /// An array of decimals (each in micro-units).
    pub fn decimals_req(&self, name: &str, max_len: usize) -> Result<Vec<i64>, ApiError> {
        match self.get(name) {
            None => Err(ApiError::invalid(name, "is required")),
            Some(Value::Array(items)) => {
                if items.len() > max_len {
                    return Err(ApiError::invalid(
                        name,
                        &format!("must have at most {max_len} items"),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        decimal(v)
                            .map_err(|why| ApiError::invalid(name, &format!("item {i}: {why}")))
                    })
                    .collect()
            }
            Some(_) => Err(ApiError::invalid(name, "must be an array of decimals")),
        }
    }

    /// One of `choices`.
    pub fn choice_opt(&self, name: &str, choices: &[&str]) -> Result<Option<String>, ApiError> {
        match self.str_opt(name, 64)? {
            None => Ok(None),
            Some(s) if choices.contains(&s.as_str()) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                name,
                &format!("must be one of {}", choices.join(", ")),
            )),
        }
    }
}

/// A decimal from a JSON string or number (its shortest decimal form).
pub fn decimal(v: &Value) -> Result<i64, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            let t = n.to_string();
            if t.contains(['e', 'E']) {
                return Err("must be a plain decimal, without an exponent".into());
            }
            t
        }
        _ => return Err("must be a decimal as a string or number".into()),
    };
    parse_micros(&text).map_err(|e| format!("{e}"))
}

/// ISO 4217 code: three uppercase ASCII letters.
pub fn currency(name: &str, s: &str) -> Result<(), ApiError> {
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            name,
            "must be an ISO 4217 code (three uppercase letters)",
        ))
    }
}

/// Query string parameters, with each parameter allowed once.
#[derive(Debug)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(q: Option<&str>, allowed: &[&str]) -> Result<Query, ApiError> {
        let pairs: Vec<(String, String)> = form_urlencoded_pairs(q.unwrap_or(""));
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::invalid(k, "unknown query parameter"));
            }
            if pairs[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(ApiError::invalid(k, "given more than once"));
            }
        }
        Ok(Query(pairs))
    }

    pub fn str(&self, name: &str, max: usize) -> Result<Option<&str>, ApiError> {
        match self.0.iter().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) if v.is_empty() => Err(ApiError::invalid(name, "must not be empty")),
            Some((_, v)) if v.len() > max => Err(ApiError::invalid(
                name,
                &format!("must be at most {max} characters"),
            )),
            // As in bodies: a NUL would otherwise reach PostgreSQL, which
            // refuses it without naming the parameter.
            Some((_, v)) if v.chars().any(char::is_control) => Err(ApiError::invalid(
                name,
                "must not contain control characters",
            )),
            Some((_, v)) => Ok(Some(v)),
        }
    }

    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.str(name, 20)? {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(i) if (min..=max).contains(&i) => Ok(Some(i)),
                _ => Err(ApiError::invalid(
                    name,
                    &format!("must be an integer from {min} to {max}"),
                )),
            },
        }
    }
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    // Invalid UTF-8 after percent-decoding becomes U+FFFD: the parameter's
    // name can still be reported.
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Body {
        Body::new(v, &["a", "b", "n", "d", "l"]).expect("object with known fields")
    }

    #[test]
    fn unknown_fields_and_non_objects_are_refused() {
        let e = Body::new(json!({"zzz": 1}), &["a"]).unwrap_err();
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some("zzz")));
        assert_eq!(
            Body::new(json!([1]), &["a"]).unwrap_err().status.as_u16(),
            400
        );
    }

    #[test]
    fn strings() {
        let b = body(json!({"a": "x", "b": 5, "n": ""}));
        assert_eq!(b.str_req("a", 10).unwrap(), "x");
        assert_eq!(b.str_req("b", 10).unwrap_err().field.as_deref(), Some("b"));
        assert_eq!(b.str_req("n", 10).unwrap_err().field.as_deref(), Some("n"));
        assert_eq!(b.str_req("d", 10).unwrap_err().error, "is required");
        let long = body(json!({"a": "x".repeat(11)}));
        assert!(long.str_req("a", 10).is_err());
    }

    #[test]
    fn decimals_from_strings_and_numbers() {
        let b = body(json!({"a": "12.5", "b": 0.7, "n": -1, "d": "1.0000001", "l": [0.7, "0.1"]}));
        assert_eq!(b.decimal_req("a").unwrap(), 12_500_000);
        assert_eq!(b.decimal_req("b").unwrap(), 700_000);
        assert!(b.decimal_req("n").is_err());
        assert!(b.decimal_req("d").is_err());
        assert_eq!(b.decimals_req("l", 10).unwrap(), vec![700_000, 100_000]);
        assert!(b.decimals_req("l", 1).is_err());
        let big = body(json!({"a": 1e30}));
        assert!(big.decimal_req("a").is_err());
    }

    #[test]
    fn integers() {
        let b = body(json!({"a": 3, "b": 1.5, "n": "3", "d": 0}));
        assert_eq!(b.id_req("a").unwrap(), 3);
        assert!(b.id_req("b").is_err());
        assert!(b.id_req("n").is_err());
        assert!(b.id_req("d").is_err());
    }

    #[test]
    fn queries() {
        let q = Query::parse(Some("limit=5&after=2"), &["limit", "after"]).unwrap();
        assert_eq!(q.int("limit", 1, 10).unwrap(), Some(5));
        assert!(Query::parse(Some("x=1"), &["limit"]).is_err());
        assert!(Query::parse(Some("limit=1&limit=2"), &["limit"]).is_err());
        let q = Query::parse(Some("limit=abc"), &["limit"]).unwrap();
        assert_eq!(
            q.int("limit", 1, 10).unwrap_err().field.as_deref(),
            Some("limit")
        );
        let q = Query::parse(Some("click_id=a%00b"), &["click_id"]).unwrap();
        assert_eq!(
            q.str("click_id", 64).unwrap_err().field.as_deref(),
            Some("click_id")
        );
    }
}
