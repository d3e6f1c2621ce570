//! The edge's configuration: one TOML file, then `AFFGATE_*` environment
//! overrides (`affgate_config`: `AFFGATE_HTTP_LISTEN` is `[http] listen`,
//! `AFFGATE_EDGE_ID` the top-level `edge_id`), then checks that turn raw
//! values into typed ones. Every key of DESIGN.md's operator contract is here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use affgate_config::{EnvSource, ProcessEnv};
use affgate_config::{socket_addr, text};
use affgate_schema::keys::Secret;
use anyhow::{Context, bail};
use serde::Deserialize;

/// Sections of the config file; an override `AFFGATE_<SECTION>_<KEY>` lands in one of these.
const SECTIONS: &[&str] = &["http", "links", "buffer", "delivery", "metrics"];

/// The file as written, before checks. Field docs give unit and default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This edge's id, 0..=65535, unique in the cluster. Required.
    pub edge_id: u16,
    /// Cluster secret, 64 hex characters (32 bytes). Required.
    #[serde(deserialize_with = "text")]
    pub secret: String,
    /// Previous cluster secrets still accepted for click ids minted before a rotation.
    #[serde(default)]
    pub previous_secrets: Vec<PreviousSecret>,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub links: LinksSection,
    #[serde(default)]
    pub buffer: BufferSection,
    #[serde(default)]
    pub delivery: DeliverySection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    /// 64 hex characters.
    #[serde(deserialize_with = "text")]
    pub secret: String,
    /// Accepted until this Unix time in seconds.
    pub accept_until: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Plain HTTP/1.1 listener. Default `0.0.0.0:8080`.
    pub listen: String,
    /// TLS listener (HTTP/2 and HTTP/1.1 by ALPN). Default: none.
    pub tls_listen: Option<String>,
    /// PEM certificate chain for `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_listen`.
    pub tls_key: Option<PathBuf>,
    /// Take the visitor's address from the first `X-Forwarded-For` entry
    /// (only behind a trusted proxy). Default false.
    pub trust_forwarded_for: bool,
    /// Largest accepted POST body, bytes. Default 16384.
    pub max_body_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "0.0.0.0:8080".into(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            trust_forwarded_for: false,
            max_body_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinksSection {
    /// Redis holding the control plane's links, offers and tokens. Either this or `file`.
    pub redis_url: Option<String>,
    /// Static links CSV (reloaded on SIGHUP). Either this or `redis_url`.
    pub file: Option<PathBuf>,
    /// Networks CSV beside the links file: `network_id,name,postback_token`.
    pub networks_file: Option<PathBuf>,
    /// Where to send a visitor when no destination can be had (Redis
    /// unreachable for an unknown slug, paused link without a fallback). Default: none (404).
    pub fallback_url: Option<String>,
    /// Longest wait for Redis on a cache miss, milliseconds. Default 3.
    pub miss_timeout_ms: u64,
}

impl Default for LinksSection {
    fn default() -> Self {
        LinksSection {
            redis_url: None,
            file: None,
            networks_file: None,
            fallback_url: None,
            miss_timeout_ms: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSection {
    /// The ring file; tmpfs so appends never touch a disk. Default `/dev/shm/affgate-edge.ring`.
    pub path: PathBuf,
    /// Ring capacity, MiB. Default 64.
    pub size_mb: u64,
    /// Directory for records that do not fit in a full ring. Default `/var/lib/affgate/spill`.
    pub spill_dir: PathBuf,
}

impl Default for BufferSection {
    fn default() -> Self {
        BufferSection {
            path: PathBuf::from("/dev/shm/affgate-edge.ring"),
            size_mb: 64,
            spill_dir: PathBuf::from("/var/lib/affgate/spill"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Collectors, `host:port`, tried in order. Default: none (events stay in the ring).
    pub collectors: Vec<String>,
    /// `udp` or `quic`. Default `udp`.
    pub transport: String,
    /// Batch flush period, milliseconds. Default 10.
    pub flush_interval_ms: u64,
    /// Largest datagram, bytes. Default 1200 (fits any path MTU of 1280 with IPv6 and UDP headers).
    /// With `quic`, batches are packed to at most 1100 bytes whatever this says, so that
    /// one fits a QUIC datagram on any path; a larger one goes on a stream.
    pub max_datagram_bytes: usize,
    /// PEM file of the certificate(s) trusted for collectors: their own
    /// (self-signed) certificates or the CA that issued them. Required when
    /// `transport = "quic"`. Default: none.
    pub quic_ca: Option<PathBuf>,
    /// TLS server name the collectors' certificates must carry (a DNS
    /// subjectAltName), whatever address `collectors` dials. Default `affgate-collector`.
    pub quic_server_name: String,
}

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            collectors: Vec::new(),
            transport: "udp".into(),
            flush_interval_ms: 10,
            max_datagram_bytes: 1200,
            quic_ca: None,
            quic_server_name: "affgate-collector".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Prometheus listener (`/metrics`). Default: none.
    pub listen: Option<String>,
}

/// Transport of the delivery path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Quic,
}

/// How the edge authenticates collectors over QUIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicClientConfig {
    /// `[delivery] quic_ca`
    pub ca: PathBuf,
    /// `[delivery] quic_server_name`, checked to be a valid DNS name.
    pub server_name: String,
}

/// Where links come from.
#[derive(Debug, Clone)]
pub enum LinkSource {
    Redis {
        url: String,
    },
    File {
        links: PathBuf,
        networks: Option<PathBuf>,
    },
}

/// The checked configuration the edge runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub edge_id: u16,
    pub secret: Secret,
    pub previous_secrets: Vec<(Secret, u64)>,
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub trust_forwarded_for: bool,
    pub max_body_bytes: usize,
    pub links: LinkSource,
    pub fallback_url: Option<String>,
    pub miss_timeout: Duration,
    pub ring_path: PathBuf,
    pub ring_bytes: u64,
    pub spill_dir: PathBuf,
    pub collectors: Vec<String>,
    pub transport: Transport,
    /// Set exactly when `transport` is [`Transport::Quic`].
    pub quic: Option<QuicClientConfig>,
    pub flush_interval: Duration,
    pub max_datagram_bytes: usize,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
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

fn check_url(key: &str, value: &str) -> anyhow::Result<()> {
    let ok = (value.starts_with("http://") || value.starts_with("https://"))
        && value.len() > "https://".len()
        && !value.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if !ok {
        bail!("{key}: `{value}` is not an absolute http(s) URL");
    }
    Ok(())
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
        let listen = socket_addr("[http] listen", &self.http.listen)?;
        let tls = match (
            &self.http.tls_listen,
            &self.http.tls_cert,
            &self.http.tls_key,
        ) {
            (None, _, _) => None,
            (Some(l), Some(c), Some(k)) => Some(TlsConfig {
                listen: socket_addr("[http] tls_listen", l)?,
                cert: c.clone(),
                key: k.clone(),
            }),
            (Some(_), None, _) => bail!("[http] tls_cert: required when tls_listen is set"),
            (Some(_), _, None) => bail!("[http] tls_key: required when tls_listen is set"),
        };
        if self.http.max_body_bytes == 0 {
            bail!("[http] max_body_bytes: must be at least 1");
        }
        let links = match (&self.links.redis_url, &self.links.file) {
            (Some(url), None) => {
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    bail!("[links] redis_url: `{url}` is not a redis:// URL");
                }
                if self.links.networks_file.is_some() {
                    bail!(
                        "[links] networks_file: only with `file`; with Redis, tokens come from Redis"
                    );
                }
                LinkSource::Redis { url: url.clone() }
            }
            (None, Some(file)) => LinkSource::File {
                links: file.clone(),
                networks: self.links.networks_file.clone(),
            },
            (Some(_), Some(_)) => bail!("[links] redis_url and file: set one, not both"),
            (None, None) => bail!("[links] redis_url or file: one is required"),
        };
        if let Some(f) = &self.links.fallback_url {
            check_url("[links] fallback_url", f)?;
        }
        if self.links.miss_timeout_ms == 0 || self.links.miss_timeout_ms > 1000 {
            bail!("[links] miss_timeout_ms: must be 1..=1000");
        }
        if self.buffer.size_mb == 0 || self.buffer.size_mb > 64 * 1024 {
            bail!("[buffer] size_mb: must be 1..=65536");
        }
        let transport = match self.delivery.transport.as_str() {
            "udp" => Transport::Udp,
            "quic" => Transport::Quic,
            other => bail!("[delivery] transport: `{other}` is not `udp` or `quic`"),
        };
        let quic = match (transport, &self.delivery.quic_ca) {
            (Transport::Quic, Some(ca)) => {
                let name = &self.delivery.quic_server_name;
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    bail!("[delivery] quic_server_name: `{name}` is not a DNS name");
                }
                Some(QuicClientConfig {
                    ca: ca.clone(),
                    server_name: name.clone(),
                })
            }
            (Transport::Quic, None) => {
                bail!("[delivery] quic_ca: required when transport = \"quic\"")
            }
            (Transport::Udp, _) => None,
        };
        for c in &self.delivery.collectors {
            if !c.contains(':') {
                bail!("[delivery] collectors: `{c}` is not host:port");
            }
        }
        if self.delivery.flush_interval_ms == 0 || self.delivery.flush_interval_ms > 10_000 {
            bail!("[delivery] flush_interval_ms: must be 1..=10000");
        }
        if !(512..=65_000).contains(&self.delivery.max_datagram_bytes) {
            bail!("[delivery] max_datagram_bytes: must be 512..=65000");
        }
        let metrics_listen = match &self.metrics.listen {
            Some(m) => Some(socket_addr("[metrics] listen", m)?),
            None => None,
        };
        Ok(Config {
            edge_id: self.edge_id,
            secret,
            previous_secrets,
            listen,
            tls,
            trust_forwarded_for: self.http.trust_forwarded_for,
            max_body_bytes: self.http.max_body_bytes,
            links,
            fallback_url: self.links.fallback_url,
            miss_timeout: Duration::from_millis(self.links.miss_timeout_ms),
            ring_path: self.buffer.path,
            ring_bytes: self.buffer.size_mb * 1024 * 1024,
            spill_dir: self.buffer.spill_dir,
            collectors: self.delivery.collectors,
            transport,
            quic,
            flush_interval: Duration::from_millis(self.delivery.flush_interval_ms),
            max_datagram_bytes: self.delivery.max_datagram_bytes,
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
        format!("edge_id = 7\nsecret = \"{SECRET}\"\n[links]\nfile = \"links.csv\"\n")
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
        assert_eq!(c.edge_id, 7);
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(
            c.flush_interval,
            Duration::from_millis(10),
            "flush default is 10 ms"
        );
        assert_eq!(
            c.miss_timeout,
            Duration::from_millis(3),
            "miss timeout default is 3 ms"
        );
        assert_eq!(c.transport, Transport::Udp);
        assert_eq!(c.ring_bytes, 64 << 20);
        assert!(c.metrics_listen.is_none());
    }

    #[test]
    fn env_overrides_top_level_and_sections() {
        let c = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_EDGE_ID", "9"),
                ("AFFGATE_HTTP_LISTEN", "127.0.0.1:9999"),
                ("AFFGATE_DELIVERY_COLLECTORS", "[\"a:1\", \"b:2\"]"),
                ("AFFGATE_DELIVERY_TRANSPORT", "quic"),
                ("AFFGATE_DELIVERY_QUIC_CA", "/etc/affgate/collector-ca.pem"),
                ("AFFGATE_BUFFER_SIZE_MB", "8"),
                ("AFFGATE_CONFIG", "/ignored.toml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.edge_id, 9);
        assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.collectors, vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(c.transport, Transport::Quic);
        assert_eq!(
            c.quic,
            Some(QuicClientConfig {
                ca: PathBuf::from("/etc/affgate/collector-ca.pem"),
                server_name: "affgate-collector".into(),
            }),
            "quic_server_name defaults to affgate-collector"
        );
        assert_eq!(c.ring_bytes, 8 << 20);
    }

    #[test]
    fn quic_needs_a_ca_and_a_dns_server_name() {
        let err = Config::from_toml(&minimal(), &env(&[("AFFGATE_DELIVERY_TRANSPORT", "quic")]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("quic_ca"), "{err:#}");
        let err = Config::from_toml(
            &minimal(),
            &env(&[
                ("AFFGATE_DELIVERY_TRANSPORT", "quic"),
                ("AFFGATE_DELIVERY_QUIC_CA", "/ca.pem"),
                ("AFFGATE_DELIVERY_QUIC_SERVER_NAME", "not a name"),
            ]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("quic_server_name"), "{err:#}");
        let c = Config::from_toml(&minimal(), &env(&[("AFFGATE_DELIVERY_QUIC_CA", "/ca.pem")]))
            .unwrap();
        assert!(c.quic.is_none(), "quic_ca is ignored with udp");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml(&format!("{}[http]\nlisen = \"x\"\n", minimal()), &env(&[]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        let err = Config::from_toml(&minimal(), &env(&[("AFFGATE_HTTP_LISEN", "x")])).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("AFFGATE_SECRET", "abc"),
            ("AFFGATE_HTTP_LISTEN", "nonsense"),
            ("AFFGATE_DELIVERY_TRANSPORT", "tcp"),
            ("AFFGATE_LINKS_FALLBACK_URL", "ftp://x"),
            ("AFFGATE_BUFFER_SIZE_MB", "0"),
            ("AFFGATE_LINKS_MISS_TIMEOUT_MS", "0"),
            ("AFFGATE_HTTP_TLS_LISTEN", "127.0.0.1:0"),
            ("AFFGATE_LINKS_REDIS_URL", "redis://127.0.0.1"),
        ];
        for (k, v) in cases {
            let err = Config::from_toml(&minimal(), &env(&[(k, v)])).unwrap_err();
            let msg = format!("{err:#}");
            let section_key = k.trim_start_matches("AFFGATE_").to_ascii_lowercase();
            let key = SECTIONS
                .iter()
                .find_map(|s| section_key.strip_prefix(&format!("{s}_")))
                .unwrap_or(&section_key)
                .to_string();
            let first = key.split('_').next().unwrap();
            assert!(
                msg.contains(first),
                "{k}={v}: message `{msg}` should name the key"
            );
        }
    }

    #[test]
    fn numeric_looking_strings_stay_strings() {
        // All digits: a TOML integer too large for i64, so read as text.
        let digits = "1".repeat(64);
        let c = Config::from_toml(&minimal(), &env(&[("AFFGATE_SECRET", &digits)])).unwrap();
        let want = affgate_schema::keys::Keys::derive(&Secret::from_hex(&digits).unwrap());
        let got = affgate_schema::keys::Keys::derive(&c.secret);
        assert_eq!(
            got.click_mac_key(),
            want.click_mac_key(),
            "the digits are the secret"
        );
        // Float-looking text never becomes a float.
        let err = Config::from_toml(&minimal(), &env(&[("AFFGATE_SECRET", "1e5")])).unwrap_err();
        assert!(format!("{err:#}").contains("secret"), "{err:#}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let err = Config::from_toml("secret = \"x\"", &env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("edge_id"), "{err:#}");
        let err = Config::from_toml(&format!("edge_id = 1\nsecret = \"{SECRET}\"\n"), &env(&[]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("redis_url or file"), "{err:#}");
    }
}
