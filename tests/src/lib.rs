//! affgate-tests: the harness for end-to-end and fault tests.
//!
//! Everything here starts real processes: `redis-server` from Debian's
//! package (installed by `deploy/install.sh`), and the `affgate-edge`
//! binary built by `cargo build --bins` (deploy/test.sh does it). Each test
//! gets its own temporary directory, ports and ring file, so tests run in
//! parallel. Waiting is always polling a condition with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use affgate_schema::keys::{Keys, Secret, token_hash};

/// The cluster secret every test uses.
pub const SECRET_HEX: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";

pub fn keys() -> Keys {
    Keys::derive(&Secret::from_hex(SECRET_HEX).expect("SECRET_HEX is valid hex"))
}

/// Poll `f` until it returns Some, or panic with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Path of a workspace binary, next to the test executable's `deps/` dir.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Send a signal with `kill(1)`.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

// ---------------------------------------------------------------- Redis

/// A private redis-server on its own port, no persistence.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            // Fault tests stall the server with `DEBUG SLEEP`; Redis 7 refuses DEBUG by default.
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (deploy/install.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_for("redis to answer PING", Duration::from_secs(10), || {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .ok()?
                .get_connection()
                .ok()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        });
    }

    /// A port reserved for a Redis that is not running yet (an edge that
    /// starts with Redis down); `restart()` starts it.
    pub fn unstarted() -> Redis {
        Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }

    /// kill -9 the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Write a link hash and announce it, as the control plane does.
pub fn redis_put_link(
    c: &mut redis::Connection,
    slug: &str,
    fields: &[(&str, &str)],
    publish: bool,
) {
    let key = format!("affgate:link:{slug}");
    let mut cmd = redis::cmd("HSET");
    cmd.arg(&key);
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query::<i64>(c).expect("HSET link");
    if publish {
        redis::cmd("PUBLISH")
            .arg("affgate:changes")
            .arg(format!("link:{slug}"))
            .query::<i64>(c)
            .expect("PUBLISH");
    }
}

// ---------------------------------------------------------------- Edge

/// Options for a test edge; `links_csv`/`networks_csv` are written as files
/// unless `redis_url` is set.
#[derive(Debug, Clone)]
pub struct EdgeOpts {
    pub edge_id: u16,
    pub links_csv: String,
    pub networks_csv: String,
    pub redis_url: Option<String>,
    pub fallback_url: Option<String>,
    pub size_mb: u64,
    pub extra_toml: String,
    pub env: Vec<(String, String)>,
}

impl Default for EdgeOpts {
    fn default() -> Self {
        EdgeOpts {
            edge_id: 1,
            links_csv: "slug,link_id,destination\n".into(),
            networks_csv: "network_id,name,postback_token\n".into(),
            redis_url: None,
            fallback_url: Some("https://fallback.example/".into()),
            size_mb: 4,
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running `affgate-edge` child process with its own directory.
#[derive(Debug)]
pub struct EdgeProc {
    pub child: Child,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub config: PathBuf,
    pub dir: PathBuf,
    stderr_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl EdgeProc {
    /// Write config and files into a fresh temp dir and start the edge.
    pub fn start(opts: &EdgeOpts) -> EdgeProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut e = EdgeProc::start_in(&dir, opts);
        e._tmp = Some(tmp);
        e
    }

    /// Start in `dir`, reusing its ring and files if present (restart after a crash).
    pub fn start_in(dir: &Path, opts: &EdgeOpts) -> EdgeProc {
        let config = write_config(dir, opts);
        let stderr_path = dir.join("edge.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
        let mut cmd = Command::new(bin("affgate-edge"));
        // The edge reads every AFFGATE_* variable as a config key: the test
        // runner's own environment must not leak into it.
        for (k, _) in std::env::vars() {
            if k.starts_with("AFFGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(&config)
            .env_remove("AFFGATE_CONFIG")
            .env("AFFGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start affgate-edge");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("edge did not report its listeners; stderr:\n{err}");
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
        };
        let http = field("http").unwrap_or_else(|| panic!("no http= in `{line}`"));
        let metrics = field("metrics").unwrap_or_else(|| panic!("no metrics= in `{line}`"));
        EdgeProc {
            child,
            http,
            metrics,
            tls: field("tls"),
            config,
            dir: dir.to_path_buf(),
            stderr_path,
            _tmp: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), "TERM");
        wait_for(
            "edge to exit after SIGTERM",
            Duration::from_secs(15),
            || self.child.try_wait().ok().flatten(),
        )
    }

    /// `affgate-edge ring inspect [--records]` on this edge's config.
    pub fn inspect(&self, records: bool) -> Inspect {
        inspect_config(&self.config, records)
    }

    pub fn get(&self, target: &str) -> Resp {
        Client::connect(self.http).request("GET", target, &[], b"")
    }

    pub fn metrics_text(&self) -> String {
        Client::connect(self.metrics)
            .request("GET", "/metrics", &[], b"")
            .body_str()
    }
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `edge.toml` (and links/networks files) into `dir`.
pub fn write_config(dir: &Path, o: &EdgeOpts) -> PathBuf {
    let links = dir.join("links.csv");
    let networks = dir.join("networks.csv");
    let mut toml = format!(
        "edge_id = {}\nsecret = \"{SECRET_HEX}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        o.edge_id
    );
    toml.push_str("[links]\n");
    match &o.redis_url {
        Some(url) => toml.push_str(&format!("redis_url = \"{url}\"\n")),
        None => {
            if !links.exists() {
                std::fs::write(&links, &o.links_csv).expect("write links.csv");
                std::fs::write(&networks, &o.networks_csv).expect("write networks.csv");
            }
            toml.push_str(&format!(
                "file = \"{}\"\nnetworks_file = \"{}\"\n",
                links.display(),
                networks.display()
            ));
        }
    }
    if let Some(f) = &o.fallback_url {
        toml.push_str(&format!("fallback_url = \"{f}\"\n"));
    }
    toml.push_str(&format!(
        "[buffer]\npath = \"{}\"\nsize_mb = {}\nspill_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        dir.join("edge.ring").display(),
        o.size_mb,
        dir.join("spill").display()
    ));
    toml.push_str(&o.extra_toml);
    let p = dir.join("edge.toml");
    std::fs::write(&p, toml).expect("write edge.toml");
    p
}

/// Parsed `ring inspect --records` output.
#[derive(Debug, Clone)]
pub struct Inspect {
    pub text: String,
    /// (seq, kind, where, click_id, status)
    pub records: Vec<InspectRecord>,
}

#[derive(Debug, Clone)]
pub struct InspectRecord {
    pub seq: u64,
    pub kind: String,
    pub place: String,
    pub click_id: String,
    pub link_id: String,
    pub slug: String,
    pub status: String,
    pub txid: String,
}

impl Inspect {
    pub fn value(&self, key: &str) -> Option<String> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
    }

    pub fn click_ids(&self) -> std::collections::HashSet<String> {
        self.records
            .iter()
            .filter(|r| r.kind == "click")
            .map(|r| r.click_id.clone())
            .collect()
    }
}

pub fn inspect_config(config: &Path, records: bool) -> Inspect {
    let mut cmd = Command::new(bin("affgate-edge"));
    cmd.arg("--config").arg(config).arg("ring").arg("inspect");
    if records {
        cmd.arg("--records");
    }
    let out = cmd
        .env_remove("AFFGATE_CONFIG")
        .output()
        .expect("run ring inspect");
    assert!(
        out.status.success(),
        "ring inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("inspect prints UTF-8");
    let mut recs = Vec::new();
    let mut in_records = false;
    for line in text.lines() {
        if line.starts_with("seq\tkind\t") {
            in_records = true;
            continue;
        }
        if !in_records {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 9, "record line `{line}`");
        recs.push(InspectRecord {
            seq: f[0].parse().expect("seq"),
            kind: f[1].into(),
            place: f[3].into(),
            click_id: f[4].into(),
            link_id: f[5].into(),
            slug: f[6].into(),
            status: f[7].into(),
            txid: f[8].into(),
        });
    }
    Inspect {
        text,
        records: recs,
    }
}

// ---------------------------------------------------------------- HTTP

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal blocking HTTP/1.1 keep-alive client: enough to drive the edge
/// and to send it bytes no real client would.
#[derive(Debug)]
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect to edge");
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Client {
            stream: BufReader::new(s),
        }
    }

    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Ok(Client {
            stream: BufReader::new(s),
        })
    }

    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        self.try_request(method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    pub fn try_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: edge\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes)?;
        self.read_response(method == "HEAD")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(bytes)
    }

    /// Read one response (Content-Length framed, or to EOF).
    pub fn read_response(&mut self, head: bool) -> std::io::Result<Resp> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line `{line}`")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let mut body = Vec::new();
        if !head {
            match len {
                Some(n) => {
                    body.resize(n, 0);
                    self.stream.read_exact(&mut body)?;
                }
                None => {
                    self.stream.read_to_end(&mut body)?;
                }
            }
        }
        Ok(Resp {
            status,
            headers,
            body,
        })
    }
}

/// Query-string helper: percent-encode a value.
pub fn enc(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Click id from a `Location` whose template put it after `cid=`.
pub fn click_id_in(location: &str) -> Option<String> {
    let after = location.split("cid=").nth(1)?;
    Some(after.split('&').next().unwrap_or(after).to_string())
}
