//! affgate-config: the part of configuration both binaries share. Each
//! binary keeps its own `Config` (its keys, defaults and checks); this
//! crate reads the file, applies `AFFGATE_*` environment overrides and
//! turns serde's errors into one line naming the key.
//!
//! An environment variable names a key by its section and name in upper
//! case: `AFFGATE_HTTP_LISTEN` is `[http] listen`, `AFFGATE_EDGE_ID` the
//! top-level `edge_id`. Values that parse as a TOML integer, boolean or
//! array are taken as such (`42`, `true`, `["a:1", "b:2"]`), a quoted TOML
//! string as its content (`'"1.50"'`); anything else, floats and dates
//! included, is the text as given. String keys whose values may look
//! like numbers (secrets, passwords) use [`text`] so `12345` still reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Variables with the `AFFGATE_` prefix that are not config keys.
pub const NOT_KEYS: &[&str] = &["AFFGATE_CONFIG", "AFFGATE_LOG"];

/// Where `AFFGATE_*` overrides come from: the process environment in the
/// binaries, a plain map in tests.
pub trait EnvSource {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Read a config file.
pub fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))
}

/// Parse TOML `text`, apply overrides from `env` (`sections` are the file's
/// tables), and deserialize into `T`; errors are one line naming the key.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    env: &dyn EnvSource,
    sections: &[&str],
) -> anyhow::Result<T> {
    let mut table: toml::Table = toml::from_str(text).context("parse TOML")?;
    apply_env(&mut table, env, sections)?;
    T::deserialize(toml::Value::Table(table)).map_err(|e| {
        // toml's message names the key; keep it on one line.
        anyhow::anyhow!("{}", e.to_string().trim().replace('\n', " "))
    })
}

/// Apply `AFFGATE_*` variables to the parsed table.
pub fn apply_env(
    table: &mut toml::Table,
    env: &dyn EnvSource,
    sections: &[&str],
) -> anyhow::Result<()> {
    let mut vars = env.vars();
    vars.sort();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("AFFGATE_") else {
            continue;
        };
        if NOT_KEYS.contains(&name.as_str()) || rest.is_empty() {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let parsed = parse_env_value(&value);
        match section_of(&rest, sections) {
            Some(section) => {
                let key = rest[section.len() + 1..].to_string();
                let entry = table
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let Some(sub) = entry.as_table_mut() else {
                    bail!("{name}: [{section}] in the file is not a table");
                };
                sub.insert(key, parsed);
            }
            None => {
                table.insert(rest, parsed);
            }
        }
    }
    Ok(())
}

/// The section a lower-cased `section_key` override belongs to, if any.
pub fn section_of<'s>(section_key: &str, sections: &[&'s str]) -> Option<&'s str> {
    sections.iter().copied().find(|s| {
        section_key.len() > s.len()
            && section_key.starts_with(s)
            && section_key.as_bytes()[s.len()] == b'_'
    })
}

/// `42` is an integer, `true` a bool, `["a"]` an array, `"1.50"` (quoted)
/// the string inside the quotes; anything else, floats and dates included,
/// the text as given.
fn parse_env_value(value: &str) -> toml::Value {
    let probe = format!("v = {value}");
    match toml::from_str::<toml::Table>(&probe)
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(
            v @ (toml::Value::Integer(_)
            | toml::Value::Boolean(_)
            | toml::Value::Array(_)
            | toml::Value::String(_)),
        ) => v,
        _ => toml::Value::String(value.to_string()),
    }
}

/// Serde helper for string keys that may arrive looking like a number or a
/// bool (`AFFGATE_SECRET=1234...`, `AFFGATE_CLICKHOUSE_PASSWORD=12345`):
/// take the text.
pub fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

/// [`text`] for an optional key.
pub fn optional_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    text(d).map(Some)
}

/// `host:port`, resolved now, or an error naming `key`.
pub fn socket_addr(key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .with_context(|| format!("{key}: `{value}` is not host:port"))?
        .next()
        .with_context(|| format!("{key}: `{value}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_land_in_sections_and_top_level() {
        let mut t: toml::Table = toml::from_str("a = 1\n[http]\nlisten = \"x\"\n").unwrap();
        apply_env(
            &mut t,
            &env(&[
                ("AFFGATE_A", "2"),
                ("AFFGATE_HTTP_LISTEN", "1.2.3.4:5"),
                ("AFFGATE_HTTP_TLS_LISTEN", "y"),
                ("AFFGATE_LIST", "[\"a\", \"b\"]"),
                ("AFFGATE_CONFIG", "ignored"),
                ("HOME", "/root"),
            ]),
            &["http"],
        )
        .unwrap();
        assert_eq!(t["a"].as_integer(), Some(2));
        assert_eq!(t["http"]["listen"].as_str(), Some("1.2.3.4:5"));
        assert_eq!(t["http"]["tls_listen"].as_str(), Some("y"));
        assert_eq!(t["list"].as_array().map(Vec::len), Some(2));
        assert!(!t.contains_key("config"), "AFFGATE_CONFIG is not a key");
    }

    #[test]
    fn floats_and_dates_stay_text() {
        assert_eq!(parse_env_value("1.50"), toml::Value::String("1.50".into()));
        assert_eq!(parse_env_value("1e5"), toml::Value::String("1e5".into()));
        assert_eq!(
            parse_env_value("1979-05-27"),
            toml::Value::String("1979-05-27".into())
        );
        assert_eq!(parse_env_value("12"), toml::Value::Integer(12));
        assert_eq!(parse_env_value("\"12\""), toml::Value::String("12".into()));
    }

    #[test]
    fn a_section_key_that_is_not_a_table_is_named() {
        let mut t: toml::Table = toml::from_str("http = 3\n").unwrap();
        let err = apply_env(&mut t, &env(&[("AFFGATE_HTTP_LISTEN", "x")]), &["http"]).unwrap_err();
        assert!(err.to_string().contains("AFFGATE_HTTP_LISTEN"), "{err}");
    }
}
