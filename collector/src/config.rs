//! The collector's configuration: one TOML file, then `AFFGATE_*`
//! environment overrides, then checks that turn raw values into typed ones.
//!
//! Every collector key of DESIGN.md's operator contract is here. An
//! environment variable names a key by its section and name in upper case:
//! `AFFGATE_INGEST_UDP_LISTEN` is `[ingest] udp_listen`, `AFFGATE_SECRET` is
//! the top-level `secret`. Values are read as TOML when they parse as TOML
//! (`42`, `true`, `["a", "b"]`) and as plain strings otherwise.
//!
//! The override machinery is shared with the edge: `affgate_config`.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use affgate_config::{EnvSource, ProcessEnv};
use affgate_config::{optional_text, socket_addr, text};
use affgate_schema::keys::Secret;
use anyhow::{Context, bail};
use serde::Deserialize;

/// Sections of the config file; an override `AFFGATE_<SECTION>_<KEY>` lands in one of these.
const SECTIONS: &[&str] = &[
    "ingest",
    "clickhouse",
    "postgres",
    "redis",
    "admin",
    "metrics",
];

/// The file as written, before checks. Field docs give unit and default.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Cluster secret, 64 hex characters (32 bytes), the same as the edges'. Required.
    #[serde(deserialize_with = "text")]
    pub secret: String,
    /// Previous cluster secrets whose datagrams are still accepted after a rotation.
    #[serde(default)]
    pub previous_secrets: Vec<PreviousSecret>,
    #[serde(default)]
    pub ingest: IngestSection,
    /// Required.
    pub clickhouse: ClickHouseSection,
    /// Required.
    pub postgres: PostgresSection,
    #[serde(default)]
    pub redis: RedisSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

// The `Debug` impls of the raw sections are written by hand so that
// secrets, passwords and tokens never reach a log.
impl fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawConfig")
            .field("secret", &"<redacted>")
            .field("previous_secrets", &self.previous_secrets)
            .field("ingest", &self.ingest)
            .field("clickhouse", &self.clickhouse)
            .field("postgres", &self.postgres)
            .field("redis", &self.redis)
            .field("admin", &self.admin)
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl fmt::Debug for PreviousSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreviousSecret")
            .field("secret", &"<redacted>")
            .field("accept_until", &self.accept_until)
            .finish()
    }
}

impl fmt::Debug for ClickHouseSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseSection")
            .field("url", &redact_url(&self.url))
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for PostgresSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSection")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSection")
            .field("url", &self.url.as_deref().map(redact_url))
            .finish()
    }
}

impl fmt::Debug for AdminSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSection")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    /// 64 hex characters.
    pub secret: String,
    /// Accepted until this Unix time in seconds.
    pub accept_until: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// UDP listener for edge batches. Default `0.0.0.0:7400`; empty string: none.
    pub udp_listen: String,
    /// QUIC listener for edge batches. Default: none.
    pub quic_listen: Option<String>,
    /// PEM certificate chain for `quic_listen`.
    pub quic_cert: Option<PathBuf>,
    /// PEM private key for `quic_listen`.
    pub quic_key: Option<PathBuf>,
    /// A write window closes after this long, milliseconds. Default 40: each
    /// window is one ClickHouse insert, and ClickHouse's CPU per row (its
    /// merges of small parts) halves from 10 to 40 (BENCHMARKS.md).
    pub window_ms: u64,
    /// ... or at this many events, whichever comes first. Default 50000.
    pub window_rows: usize,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            udp_listen: "0.0.0.0:7400".into(),
            quic_listen: None,
            quic_cert: None,
            quic_key: None,
            window_ms: 40,
            window_rows: 50_000,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSection {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`. Required.
    pub url: String,
    /// Database holding `clicks`, `conversions` and the rollups; `migrate`
    /// creates it. Default `affgate`.
    #[serde(default = "default_database", deserialize_with = "text")]
    pub database: String,
    /// Default `default`.
    #[serde(default = "default_ch_user", deserialize_with = "text")]
    pub user: String,
    /// Default: empty.
    #[serde(default, deserialize_with = "text")]
    pub password: String,
}

fn default_database() -> String {
    "affgate".into()
}

fn default_ch_user() -> String {
    "default".into()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// `postgres://user:password@host:port/database`. Required.
    pub url: String,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Where the control plane publishes links, offers and tokens for the
    /// edges, `redis://host:port`. Default: none; required with `[admin] listen`.
    pub url: Option<String>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Admin API listener. Default: none (no admin API).
    pub listen: Option<String>,
    /// Bearer token the admin API requires, at least 16 characters.
    /// Required with `listen`.
    #[serde(deserialize_with = "optional_text")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Prometheus listener (`/metrics`). Default: none.
    pub listen: Option<String>,
}

/// The checked configuration the collector runs with.
#[derive(Clone)]
pub struct Config {
    pub secret: Secret,
    /// (secret, accepted until unix milliseconds).
    pub previous_secrets: Vec<(Secret, u64)>,
    pub udp_listen: Option<SocketAddr>,
    pub quic: Option<QuicConfig>,
    /// How long a write window stays open.
    pub window: Duration,
    /// How many events close a write window early.
    pub window_rows: NonZeroUsize,
    pub clickhouse: ClickHouseConfig,
    pub postgres: PostgresConfig,
    pub redis_url: Option<String>,
    pub admin: Option<AdminConfig>,
    pub metrics_listen: Option<SocketAddr>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("secret", &self.secret)
            .field("previous_secrets", &self.previous_secrets.len())
            .field("udp_listen", &self.udp_listen)
            .field("quic", &self.quic)
            .field("window", &self.window)
            .field("window_rows", &self.window_rows)
            .field("clickhouse", &self.clickhouse)
            .field("postgres", &self.postgres)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("admin", &self.admin)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    /// Checked to be a plain identifier, so it can be written into DDL.
    pub database: String,
    pub user: String,
    pub password: String,
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &redact_url(&self.url))
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone)]
pub struct PostgresConfig {
    pub url: String,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// `scheme://user:password@host/...` with the password replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl Config {
    /// Read `path`, apply overrides from `env`, check every value.
    pub fn load(path: &Path, env: &dyn EnvSource) -> anyhow::Result<Config> {
        let text = affgate_config::read(path)?;
        Config::from_toml(&text, env).with_context(|| format!("config {}", path.display()))
    }

    /// Parse TOML text, apply overrides, check.
    pub fn from_toml(text: &str, env: &dyn EnvSource) -> anyhow::Result<Config> {
        affgate_config::parse::<RawConfig>(text, env, SECTIONS)?.check()
    }
}

fn check_url(key: &str, value: &str, schemes: &[&str]) -> anyhow::Result<()> {
    let ok = schemes.iter().any(|s| {
        value
            .strip_prefix(s)
            .and_then(|r| r.strip_prefix("://"))
            .is_some_and(|r| !r.is_empty())
    }) && !value.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if !ok {
        let list = schemes
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(" or ");
        bail!("{key}: `{}` is not a {list} URL", redact_url(value));
    }
    Ok(())
}

/// A ClickHouse database name that can be written into DDL unquoted.
pub fn is_plain_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 64
}

impl RawConfig {
    pub fn check(self) -> anyhow::Result<Config> {
        let secret = Secret::from_hex(&self.secret).map_err(|e| anyhow::anyhow!("secret: {e}"))?;
        let mut previous_secrets = Vec::new();
        for (i, p) in self.previous_secrets.iter().enumerate() {
            let s = Secret::from_hex(&p.secret)
                .map_err(|e| anyhow::anyhow!("previous_secrets[{i}].secret: {e}"))?;
            previous_secrets.push((s, p.accept_until.saturating_mul(1000)));
        }

        let ingest = &self.ingest;
        let udp_listen = match ingest.udp_listen.as_str() {
            "" => None,
            l => Some(socket_addr("[ingest] udp_listen", l)?),
        };
        let quic = match (&ingest.quic_listen, &ingest.quic_cert, &ingest.quic_key) {
            (None, _, _) => None,
            (Some(l), Some(c), Some(k)) => Some(QuicConfig {
                listen: socket_addr("[ingest] quic_listen", l)?,
                cert: c.clone(),
                key: k.clone(),
            }),
            (Some(_), None, _) => bail!("[ingest] quic_cert: required when quic_listen is set"),
            (Some(_), _, None) => bail!("[ingest] quic_key: required when quic_listen is set"),
        };
        if udp_listen.is_none() && quic.is_none() {
            bail!("[ingest] udp_listen or quic_listen: at least one is required");
        }
        if ingest.window_ms == 0 || ingest.window_ms > 10_000 {
            bail!("[ingest] window_ms: must be 1..=10000");
        }
        let window_rows = NonZeroUsize::new(ingest.window_rows)
            .filter(|n| n.get() <= 1_000_000)
            .context("[ingest] window_rows: must be 1..=1000000")?;

        let ch = self.clickhouse;
        check_url("[clickhouse] url", &ch.url, &["http", "https"])?;
        if !is_plain_identifier(&ch.database) {
            bail!(
                "[clickhouse] database: `{}` must be letters, digits and _ (not first), at most 64",
                ch.database
            );
        }
        if ch.user.is_empty() {
            bail!("[clickhouse] user: must not be empty");
        }
        check_url(
            "[postgres] url",
            &self.postgres.url,
            &["postgres", "postgresql"],
        )?;
        if let Some(url) = &self.redis.url {
            check_url("[redis] url", url, &["redis", "rediss", "unix"])?;
        }
        let admin = match (&self.admin.listen, &self.admin.token) {
            (None, _) => None,
            (Some(listen), Some(token)) => {
                if token.chars().count() < 16 {
                    bail!("[admin] token: must be at least 16 characters");
                }
                if self.redis.url.is_none() {
                    bail!("[redis] url: required when [admin] listen is set");
                }
                Some(AdminConfig {
                    listen: socket_addr("[admin] listen", listen)?,
                    token: token.clone(),
                })
            }
            (Some(_), None) => bail!("[admin] token: required when listen is set"),
        };
        let metrics_listen = match &self.metrics.listen {
            Some(m) => Some(socket_addr("[metrics] listen", m)?),
            None => None,
        };
        Ok(Config {
            secret,
            previous_secrets,
            udp_listen,
            quic,
            window: Duration::from_millis(ingest.window_ms),
            window_rows,
            clickhouse: ClickHouseConfig {
                url: ch.url,
                database: ch.database,
                user: ch.user,
                password: ch.password,
            },
            postgres: PostgresConfig {
                url: self.postgres.url,
            },
            redis_url: self.redis.url,
            admin,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn minimal() -> String {
        format!(
            "secret = \"{SECRET}\"\n\
             [clickhouse]\nurl = \"http://127.0.0.1:8123\"\n\
             [postgres]\nurl = \"postgres://affgate:pw@127.0.0.1/affgate\"\n"
        )
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_toml(&minimal(), &env(&[])).unwrap();
        assert_eq!(c.udp_listen, Some("0.0.0.0:7400".parse().unwrap()));
        assert!(c.quic.is_none());
        assert_eq!(
            c.window,
            Duration::from_millis(40),
            "window default is 40 ms"
        );
        assert_eq!(c.window_rows.get(), 50_000, "window rows default is 50000");
        assert_eq!(c.clickhouse.database, "affgate");
        assert_eq!(c.clickhouse.user, "default");
        assert_eq!(c.clickhouse.password, "");
        assert!(c.redis_url.is_none());
        assert!(c.admin.is_none());
        assert!(c.metrics_listen.is_none());
    }

    #[test]
    fn env_overrides_top_level_and_sections() {
        let c = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_INGEST_UDP_LISTEN", "127.0.0.1:9999"),
                ("AFFGATE_INGEST_WINDOW_MS", "25"),
                ("AFFGATE_INGEST_WINDOW_ROWS", "1000"),
                ("AFFGATE_CLICKHOUSE_DATABASE", "affgate_test_1"),
                ("AFFGATE_CLICKHOUSE_PASSWORD", "12345"),
                ("AFFGATE_POSTGRES_URL", "postgresql://u:p@db:5433/x"),
                ("AFFGATE_REDIS_URL", "redis://127.0.0.1:6379"),
                ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("AFFGATE_ADMIN_TOKEN", "0123456789abcdef"),
                ("AFFGATE_METRICS_LISTEN", "127.0.0.1:9101"),
                ("AFFGATE_CONFIG", "/ignored.toml"),
                ("AFFGATE_LOG", "debug"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.udp_listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(c.window, Duration::from_millis(25));
        assert_eq!(c.window_rows.get(), 1000);
        assert_eq!(c.clickhouse.database, "affgate_test_1");
        assert_eq!(
            c.clickhouse.password, "12345",
            "a numeric-looking password stays a string"
        );
        assert_eq!(c.postgres.url, "postgresql://u:p@db:5433/x");
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.admin.unwrap().token, "0123456789abcdef");
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
        let c = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_CLICKHOUSE_USER", "true"),
                ("AFFGATE_CLICKHOUSE_PASSWORD", "\"1.50\""),
                ("AFFGATE_REDIS_URL", "redis://127.0.0.1:6379"),
                ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("AFFGATE_ADMIN_TOKEN", "1234567890123456"),
            ]),
        )
        .unwrap();
        assert_eq!(c.clickhouse.user, "true");
        assert_eq!(
            c.clickhouse.password, "1.50",
            "a quoted value keeps its text"
        );
        assert_eq!(c.admin.unwrap().token, "1234567890123456");
    }

    #[test]
    fn quic_needs_cert_and_key() {
        let c = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_INGEST_UDP_LISTEN", ""),
                ("AFFGATE_INGEST_QUIC_LISTEN", "127.0.0.1:7401"),
                ("AFFGATE_INGEST_QUIC_CERT", "/c.pem"),
                ("AFFGATE_INGEST_QUIC_KEY", "/k.pem"),
            ]),
        )
        .unwrap();
        assert!(c.udp_listen.is_none(), "empty udp_listen turns UDP off");
        assert_eq!(c.quic.unwrap().cert, PathBuf::from("/c.pem"));
        let err = Config::from_toml(
            &minimal(),
            &env(&[("AFFGATE_INGEST_QUIC_LISTEN", "127.0.0.1:7401")]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("quic_cert"), "{err:#}");
        let err =
            Config::from_toml(&minimal(), &env(&[("AFFGATE_INGEST_UDP_LISTEN", "")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("udp_listen or quic_listen"),
            "{err:#}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml(
            &format!("{}[ingest]\nwindow_msec = 5\n", minimal()),
            &env(&[]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("window_msec"), "{err:#}");
        let err =
            Config::from_toml(&minimal(), &env(&[("AFFGATE_CLICKHOUSE_DB", "x")])).unwrap_err();
        assert!(format!("{err:#}").contains("db"), "{err:#}");
        let err = Config::from_toml(&minimal(), &env(&[("AFFGATE_WINDOW_MS", "5")])).unwrap_err();
        assert!(format!("{err:#}").contains("window_ms"), "{err:#}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("AFFGATE_SECRET", "abc", "secret"),
            ("AFFGATE_INGEST_UDP_LISTEN", "nonsense", "udp_listen"),
            ("AFFGATE_INGEST_WINDOW_MS", "0", "window_ms"),
            ("AFFGATE_INGEST_WINDOW_ROWS", "0", "window_rows"),
            ("AFFGATE_INGEST_WINDOW_ROWS", "-1", "window_rows"),
            (
                "AFFGATE_CLICKHOUSE_URL",
                "127.0.0.1:8123",
                "[clickhouse] url",
            ),
            ("AFFGATE_CLICKHOUSE_DATABASE", "a-b", "database"),
            ("AFFGATE_CLICKHOUSE_DATABASE", "x; DROP", "database"),
            ("AFFGATE_CLICKHOUSE_DATABASE", "1abc", "database"),
            ("AFFGATE_CLICKHOUSE_USER", "", "user"),
            ("AFFGATE_POSTGRES_URL", "mysql://x", "[postgres] url"),
            ("AFFGATE_REDIS_URL", "http://x", "[redis] url"),
            ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0", "token"),
            ("AFFGATE_METRICS_LISTEN", "x", "[metrics] listen"),
        ];
        for (k, v, key) in cases {
            let err = Config::from_toml(&minimal(), &env(&[(k, v)])).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(key),
                "{k}={v}: message `{msg}` should name `{key}`"
            );
        }
    }

    #[test]
    fn admin_needs_a_long_token_and_redis() {
        let err = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("AFFGATE_ADMIN_TOKEN", "short"),
                ("AFFGATE_REDIS_URL", "redis://127.0.0.1"),
            ]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("[admin] token"), "{err:#}");
        let err = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("AFFGATE_ADMIN_TOKEN", "0123456789abcdef"),
            ]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("[redis] url"), "{err:#}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let err = Config::from_toml("", &env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("secret"), "{err:#}");
        let err = Config::from_toml(&format!("secret = \"{SECRET}\"\n"), &env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("clickhouse"), "{err:#}");
        let err = Config::from_toml(
            &format!("secret = \"{SECRET}\"\n[clickhouse]\nurl = \"http://x\"\n"),
            &env(&[]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("postgres"), "{err:#}");
        // A section given only through the environment is enough.
        Config::from_toml(
            &format!("secret = \"{SECRET}\"\n"),
            &env(&[
                ("AFFGATE_CLICKHOUSE_URL", "http://ch:8123"),
                ("AFFGATE_POSTGRES_URL", "postgres://pg/affgate"),
            ]),
        )
        .unwrap();
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_CLICKHOUSE_PASSWORD", "chpass-sekrit"),
                ("AFFGATE_POSTGRES_URL", "postgres://u:pgpass-sekrit@h/db"),
                ("AFFGATE_REDIS_URL", "redis://:redispass-sekrit@127.0.0.1"),
                ("AFFGATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("AFFGATE_ADMIN_TOKEN", "token-sekrit-0123456789"),
            ]),
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sekrit"), "{dbg}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(dbg.contains("postgres://u:<redacted>@h/db"), "{dbg}");
    }

    #[test]
    fn plain_identifiers() {
        for ok in ["affgate", "_x", "a1_b2", "AffGate"] {
            assert!(is_plain_identifier(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "a.b", "a`b", &"x".repeat(65)] {
            assert!(!is_plain_identifier(bad), "{bad}");
        }
    }
}
