//! affgate-tests: the harness for end-to-end and fault tests.
//!
//! Everything here starts real processes: `redis-server` from Debian's
//! package (installed by `deploy/install.sh`), and the `affgate-edge`
//! binary built by `cargo build --bins` (deploy/test.sh does it). Each test
//! gets its own temporary directory, ports and ring file, so tests run in
//! parallel. Waiting is always polling a condition with a deadline.
//!
//! Delivery tests add the `affgate-collector` binary ([`CollectorProc`]),
//! the shared ClickHouse and PostgreSQL that `deploy/services.sh start`
//! runs, with a private database in each per test ([`Stack`]), a lossy UDP
//! [`Relay`], a bounded click and postback load ([`Traffic`]) and the
//! exactly-once check of what the stores hold ([`assert_exactly_once`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use affgate_schema::keys::{Keys, Secret, token_hash};

pub mod plane;

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

/// A port for a server a test starts (or restarts) later, free for both TCP
/// and UDP on 127.0.0.1 right now.
///
/// Ports come from below the kernel's ephemeral range (32768-60999 on
/// Linux), so no socket bound to port 0 (an edge's sender, a client
/// connection) can take one between reservation and use; each process walks
/// its own stretch of the range and never hands out a port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000; // 10000..32000
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // A different starting point per test binary run.
        let seed = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
        let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + n % SPAN).expect("ports below 32000 fit a u16");
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free port in 10000..32000 on 127.0.0.1");
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
    /// How long a read may block (10 s unless set).
    pub fn set_read_timeout(&mut self, d: Duration) {
        self.stream.get_ref().set_read_timeout(Some(d)).ok();
    }

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

// ---------------------------------------------------------------- Metrics

/// The value of one series in Prometheus text: `name` is the whole series
/// as printed, labels included (`affgate_collector_insert_errors_total{store="clickhouse"}`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Like [`wait_for`], polling every `every` (for conditions that cost a
/// query or a process each time).
pub fn wait_for_every<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

// ---------------------------------------------------------------- Stores

/// ClickHouse's HTTP interface as `deploy/services.sh start` leaves it
/// (user `default`, no password).
pub const CLICKHOUSE_HTTP: &str = "127.0.0.1:8123";
/// PostgreSQL as `deploy/services.sh start` leaves it: role `affgate`
/// (password `affgate`, CREATEDB) owning database `affgate`.
pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;
pub const PG_USER: &str = "affgate";
pub const PG_PASSWORD: &str = "affgate";
/// The database the role connects to for CREATE and DROP DATABASE.
pub const PG_ADMIN_DB: &str = "affgate";

/// The workspace root (for `deploy/services.sh`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `deploy/services.sh ACTION WHICH`; true when it exited 0.
pub fn services_sh(action: &str, which: &str) -> bool {
    let out = Command::new(workspace_root().join("deploy/services.sh"))
        .args([action, which])
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/services.sh");
    if !out.status.success() {
        eprintln!(
            "deploy/services.sh {action} {which}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// One statement through ClickHouse's HTTP interface (`POST /`, the SQL as
/// the body); the response body, or the status and error text.
pub fn clickhouse_query(sql: &str) -> Result<String, String> {
    clickhouse_query_within(sql, Duration::from_secs(30))
}

/// [`clickhouse_query`], giving up on the answer after `timeout` (the
/// server may still finish the statement).
pub fn clickhouse_query_within(sql: &str, timeout: Duration) -> Result<String, String> {
    let addr: SocketAddr = CLICKHOUSE_HTTP
        .parse()
        .expect("CLICKHOUSE_HTTP is an address");
    let mut c = Client::try_connect(addr).map_err(|e| format!("connect to clickhouse: {e}"))?;
    c.set_read_timeout(timeout);
    // Connection: close, so a body without Content-Length ends at EOF.
    let r = c
        .try_request("POST", "/", &[("Connection", "close")], sql.as_bytes())
        .map_err(|e| format!("clickhouse request: {e}"))?;
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(&r.body).ok_or_else(|| "clickhouse sent a malformed chunked body".to_string())?
    } else {
        r.body
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    if r.status == 200 {
        Ok(body)
    } else {
        Err(format!("clickhouse {}: {}", r.status, body.trim()))
    }
}

/// True when ClickHouse answers `SELECT 1`.
pub fn clickhouse_up() -> bool {
    clickhouse_query("SELECT 1").is_ok_and(|b| b.trim() == "1")
}

/// The payload of an HTTP/1.1 chunked body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// One statement with `psql` on `db` as the test role: rows as lines,
/// columns separated by tabs, or psql's error.
pub fn psql(db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-F", "\t"])
        .args(["-h", PG_HOST, "-p", &PG_PORT.to_string(), "-U", PG_USER])
        .args(["-d", db, "-c", sql])
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "psql {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A test's own ClickHouse database and PostgreSQL database, both named
/// `name` (random suffix), on the shared servers. ClickHouse's is created
/// by `affgate-collector migrate`; both are dropped on drop.
#[derive(Debug)]
pub struct Stack {
    /// Database name in both stores.
    pub name: String,
    /// `postgres://...` of this test's own PostgreSQL database.
    pub pg_url: String,
}

impl Stack {
    /// `tag`: a few letters naming the test, kept in the database name so a
    /// leftover database says whose it was.
    pub fn new(tag: &str) -> Stack {
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(20)
            .collect();
        let name = format!(
            "affgate_t_{tag}_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        psql(PG_ADMIN_DB, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create postgres database {name}: {e}"));
        let pg_url = format!("postgres://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{PG_PORT}/{name}");
        Stack { name, pg_url }
    }

    /// A ClickHouse statement; panics with the server's error.
    pub fn ch(&self, sql: &str) -> String {
        clickhouse_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A statement on this test's PostgreSQL database; panics with psql's error.
    pub fn pg(&self, sql: &str) -> String {
        psql(&self.name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every click id in `clicks`, as `FINAL` shows them (one per row).
    pub fn try_click_ids(&self) -> Result<Vec<String>, String> {
        let body = clickhouse_query(&format!(
            "SELECT click_id FROM {}.clicks FINAL FORMAT TabSeparated",
            self.name
        ))?;
        Ok(body.lines().map(str::to_string).collect())
    }

    /// `(click_id, txid, status)` of every inbox row.
    pub fn try_inbox_rows(&self) -> Result<Vec<(String, String, String)>, String> {
        let body = psql(
            &self.name,
            "SELECT click_id, txid, status FROM postback_inbox",
        )?;
        Ok(body
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut f = l.split('\t').map(str::to_string);
                let mut next = || f.next().unwrap_or_default();
                (next(), next(), next())
            })
            .collect())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Right after a ClickHouse restart, 18.16 has been seen to take a
        // minute or more over this DROP (at the materialized view); it
        // finishes on its own after the client gave up, so do not hold the
        // test for it.
        if let Err(e) = clickhouse_query_within(
            &format!("DROP DATABASE IF EXISTS {}", self.name),
            Duration::from_secs(10),
        ) {
            eprintln!(
                "drop clickhouse database {}: {e} (the server may still finish it)",
                self.name
            );
        }
        if let Err(e) = psql(
            PG_ADMIN_DB,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("drop postgres database {}: {e}", self.name);
        }
    }
}

// ---------------------------------------------------------------- Collector

/// Extra config for a test collector.
#[derive(Debug, Clone, Default)]
pub struct CollectorOpts {
    /// Lines inside `[ingest]` (after `udp_listen`), e.g. `window_ms = 20\n`.
    pub ingest_toml: String,
    /// `[redis] url`, and with it the admin API on a port of its own
    /// (token [`ADMIN_TOKEN`]).
    pub admin_redis: Option<String>,
    /// Appended after everything else (whole sections).
    pub extra_toml: String,
    pub env: Vec<(String, String)>,
}

/// An `affgate-collector` child process on a UDP port of its own that a
/// restart keeps, writing to a [`Stack`]'s databases.
#[derive(Debug)]
pub struct CollectorProc {
    child: Option<Child>,
    /// Where edges send batches: the same across restarts.
    pub udp: SocketAddr,
    /// `/metrics` of the running process (a new port each start).
    pub metrics: Option<SocketAddr>,
    /// The admin API of the running process, when configured.
    pub admin: Option<SocketAddr>,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    stderr_path: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The edge's `[delivery]` table for these collectors (for `EdgeOpts::extra_toml`).
pub fn delivery_toml(collectors: &[SocketAddr]) -> String {
    let list = collectors
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[delivery]\ncollectors = [{list}]\n")
}

impl CollectorProc {
    /// Configure, migrate and start a collector on `stack`.
    pub fn start(stack: &Stack) -> CollectorProc {
        CollectorProc::start_with(stack, &CollectorOpts::default())
    }

    pub fn start_with(stack: &Stack, opts: &CollectorOpts) -> CollectorProc {
        let mut c = CollectorProc::unstarted_with(stack, opts);
        c.spawn();
        c
    }

    /// Configure and migrate, but do not start: its UDP port is reserved in
    /// the config (edges may point at it already); `restart()` starts it.
    pub fn unstarted(stack: &Stack) -> CollectorProc {
        CollectorProc::unstarted_with(stack, &CollectorOpts::default())
    }

    pub fn unstarted_with(stack: &Stack, opts: &CollectorOpts) -> CollectorProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let udp: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("a socket address");
        let toml = format!(
            "secret = \"{SECRET_HEX}\"\n\
             [ingest]\nudp_listen = \"{udp}\"\n{}\
             [clickhouse]\nurl = \"http://{CLICKHOUSE_HTTP}\"\ndatabase = \"{}\"\n\
             [postgres]\nurl = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n{}{}",
            opts.ingest_toml,
            stack.name,
            stack.pg_url,
            opts.admin_redis
                .as_ref()
                .map(|url| format!(
                    "[redis]\nurl = \"{url}\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
                ))
                .unwrap_or_default(),
            opts.extra_toml
        );
        let config = tmp.path().join("collector.toml");
        std::fs::write(&config, toml).expect("write collector.toml");
        let c = CollectorProc {
            child: None,
            udp,
            metrics: None,
            admin: None,
            config,
            env: opts.env.clone(),
            stderr_path: tmp.path().join("collector.stderr"),
            _tmp: tmp,
        };
        let out = c.command().arg("migrate").output().expect("run migrate");
        assert!(
            out.status.success(),
            "affgate-collector migrate failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(bin("affgate-collector"));
        // Every AFFGATE_* variable is a config key to the collector.
        for (k, _) in std::env::vars() {
            if k.starts_with("AFFGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(&self.config)
            .env("AFFGATE_LOG", "info")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open collector stderr file");
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start affgate-collector");
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
                let _ = child.wait();
                panic!(
                    "collector did not report its listeners; stderr:\n{}",
                    self.stderr()
                );
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
        };
        let udp = field("udp").unwrap_or_else(|| panic!("no udp= in `{line}`"));
        assert_eq!(udp, self.udp, "the collector listens where it was told");
        self.metrics = Some(field("metrics").unwrap_or_else(|| panic!("no metrics= in `{line}`")));
        self.admin = field("admin");
        self.child = Some(child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the collector logged, every start.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// kill -9 (if running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.metrics = None;
        self.admin = None;
    }

    /// Start again (or for the first time) on the same UDP port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `/metrics` of the running collector.
    pub fn metrics_text(&self) -> String {
        let m = self.metrics.expect("the collector is running");
        Client::connect(m)
            .request("GET", "/metrics", &[], b"")
            .body_str()
    }

    /// One series of `/metrics` (labels included in `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics_text(), name)
    }
}

/// The admin token of test collectors.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// One admin API request with the test token: `(status, JSON body)`.
pub fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    api_as(addr, Some(ADMIN_TOKEN), method, path, body)
}

/// One admin API request with `token` (None: no Authorization header).
pub fn api_as(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let r = Client::connect(addr).request(method, path, &headers, body.unwrap_or("").as_bytes());
    let text = r.body_str();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: {} is not JSON ({e}): {text}", r.status));
    (r.status, v)
}

/// A created resource's id from a 201 answer; panics with the answer otherwise.
pub fn created(what: &str, (status, v): (u16, serde_json::Value)) -> serde_json::Value {
    assert_eq!(status, 201, "create {what}: {v}");
    v
}

impl Drop for CollectorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- Delivery transports

/// How a test edge delivers to its collector: `[delivery] transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Quic,
}

/// A self-signed end-entity certificate for `affgate-collector` and its
/// key, made with `openssl` into `dir` (as docs/delivery.md tells an
/// operator to): `(cert, key)`.
pub fn make_collector_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("collector.pem"), dir.join("collector.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=affgate-collector"])
        .args(["-addext", "subjectAltName=DNS:affgate-collector"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// One test's delivery wiring over one [`Transport`]. Over QUIC it holds a
/// collector certificate (in a temp dir that lives as long as it does): the
/// collectors it starts serve QUIC with it on a port of their own, kept
/// across restarts (and the harness's UDP port, unused then), and the edges
/// it configures trust it.
#[derive(Debug)]
pub struct DeliveryLink {
    pub transport: Transport,
    quic: Option<(PathBuf, PathBuf, tempfile::TempDir)>,
}

impl DeliveryLink {
    pub fn new(transport: Transport) -> DeliveryLink {
        let quic = (transport == Transport::Quic).then(|| {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (cert, key) = make_collector_cert(tmp.path());
            (cert, key, tmp)
        });
        DeliveryLink { transport, quic }
    }

    /// A started collector on `stack` and the address edges deliver to.
    pub fn start_collector(&self, stack: &Stack) -> (CollectorProc, SocketAddr) {
        let (mut c, at) = self.unstarted_collector(stack);
        c.restart();
        (c, at)
    }

    /// A configured, migrated collector not started yet (`restart()` starts
    /// it) and the address edges deliver to.
    pub fn unstarted_collector(&self, stack: &Stack) -> (CollectorProc, SocketAddr) {
        match &self.quic {
            None => {
                let c = CollectorProc::unstarted(stack);
                let at = c.udp;
                (c, at)
            }
            Some((cert, key, _)) => {
                let quic: SocketAddr = format!("127.0.0.1:{}", free_port())
                    .parse()
                    .expect("a socket address");
                let opts = CollectorOpts {
                    env: vec![
                        ("AFFGATE_INGEST_QUIC_LISTEN".into(), quic.to_string()),
                        (
                            "AFFGATE_INGEST_QUIC_CERT".into(),
                            cert.display().to_string(),
                        ),
                        ("AFFGATE_INGEST_QUIC_KEY".into(), key.display().to_string()),
                    ],
                    ..CollectorOpts::default()
                };
                (CollectorProc::unstarted_with(stack, &opts), quic)
            }
        }
    }

    /// `opts` delivering to `collectors` over this transport: UDP through
    /// the `[delivery]` table, QUIC through `AFFGATE_DELIVERY_*`.
    pub fn edge_opts(&self, collectors: &[SocketAddr], opts: EdgeOpts) -> EdgeOpts {
        match &self.quic {
            None => EdgeOpts {
                extra_toml: format!("{}{}", opts.extra_toml, delivery_toml(collectors)),
                ..opts
            },
            Some((cert, _, _)) => {
                let list = collectors
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut env = opts.env.clone();
                env.extend([
                    ("AFFGATE_DELIVERY_TRANSPORT".into(), "quic".into()),
                    (
                        "AFFGATE_DELIVERY_QUIC_CA".into(),
                        cert.display().to_string(),
                    ),
                    ("AFFGATE_DELIVERY_COLLECTORS".into(), format!("[{list}]")),
                ]);
                EdgeOpts { env, ..opts }
            }
        }
    }
}

// ---------------------------------------------------------------- Lossy relay

/// How a [`Relay`] mistreats datagrams; probabilities per datagram, each
/// direction alike.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    pub drop: f64,
    pub duplicate: f64,
    /// Held back 1..=`max_delay` before sending (later datagrams overtake it).
    pub delay: f64,
    pub max_delay: Duration,
    pub seed: u64,
}

impl Default for RelayOpts {
    fn default() -> Self {
        RelayOpts {
            drop: 0.2,
            duplicate: 0.1,
            delay: 0.1,
            max_delay: Duration::from_millis(50),
            seed: 0x5eed,
        }
    }
}

/// What a relay did so far. `_up`: edge → collector, `_down`: collector → edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounts {
    pub received_up: u64,
    pub received_down: u64,
    pub dropped_up: u64,
    pub dropped_down: u64,
    pub duplicated: u64,
    pub delayed: u64,
}

#[derive(Debug, Default)]
struct RelayShared {
    stop: std::sync::atomic::AtomicBool,
    /// f64 bits of the current drop probability.
    drop_bits: std::sync::atomic::AtomicU64,
    counts: std::sync::Mutex<RelayCounts>,
}

/// A lossy UDP relay on 127.0.0.1 between one edge and one collector: the
/// edge sends to `addr`; the relay forwards to the collector from a socket
/// of its own and sends the collector's answers back to the edge from
/// `addr`. Dropping, duplicating and delaying (so reordering) follow
/// [`RelayOpts`] with a fixed seed.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    shared: std::sync::Arc<RelayShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

impl Relay {
    pub fn start(collector: SocketAddr, opts: RelayOpts) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::Ordering;
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay front socket");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind relay back socket");
        front.set_nonblocking(true).expect("nonblocking");
        back.set_nonblocking(true).expect("nonblocking");
        let addr = front.local_addr().expect("relay address");
        let shared = std::sync::Arc::new(RelayShared::default());
        shared
            .drop_bits
            .store(opts.drop.to_bits(), Ordering::SeqCst);
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(opts.seed);
            let mut edge: Option<SocketAddr> = None;
            let mut held: Vec<(Instant, Dir, Vec<u8>)> = Vec::new();
            let mut buf = vec![0u8; 65_536];
            let max_delay_ms = (opts.max_delay.as_millis() as u64).max(1);
            while !sh.stop.load(Ordering::SeqCst) {
                let mut busy = false;
                for dir in [Dir::Up, Dir::Down] {
                    let sock = if dir == Dir::Up { &front } else { &back };
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    busy = true;
                    if dir == Dir::Up {
                        edge = Some(from);
                    }
                    let drop = f64::from_bits(sh.drop_bits.load(Ordering::SeqCst));
                    let mut c = sh.counts.lock().unwrap_or_else(|p| p.into_inner());
                    match dir {
                        Dir::Up => c.received_up += 1,
                        Dir::Down => c.received_down += 1,
                    }
                    if rng.f64() < drop {
                        match dir {
                            Dir::Up => c.dropped_up += 1,
                            Dir::Down => c.dropped_down += 1,
                        }
                        continue;
                    }
                    let copies = if rng.f64() < opts.duplicate {
                        c.duplicated += 1;
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let at = if rng.f64() < opts.delay {
                            c.delayed += 1;
                            Instant::now() + Duration::from_millis(rng.u64(1..=max_delay_ms))
                        } else {
                            Instant::now()
                        };
                        held.push((at, dir, buf[..n].to_vec()));
                    }
                }
                let now = Instant::now();
                let mut i = 0;
                while i < held.len() {
                    if held[i].0 > now {
                        i += 1;
                        continue;
                    }
                    let (_, dir, bytes) = held.remove(i);
                    // Send errors are loss too; the protocol copes.
                    match dir {
                        Dir::Up => {
                            let _ = back.send_to(&bytes, collector);
                        }
                        Dir::Down => {
                            if let Some(e) = edge {
                                let _ = front.send_to(&bytes, e);
                            }
                        }
                    }
                }
                if !busy {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
        });
        Relay {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn counts(&self) -> RelayCounts {
        *self.shared.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the drop probability (0.0: stop losing datagrams; duplication
    /// and delays go on).
    pub fn set_drop(&self, p: f64) {
        self.shared
            .drop_bits
            .store(p.to_bits(), std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- Delivery load and checks

/// A bounded click-and-postback load on an edge's `/c/{slug}` and `/postback`.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Keep-alive clients, one thread each.
    pub threads: usize,
    /// Slug of a link whose destination carries `cid={click_id}`.
    pub slug: String,
    /// Stop after this many responses in all ...
    pub max_requests: u64,
    /// ... or after this long, whichever comes first.
    pub max_time: Duration,
    /// Every n-th request of a thread is a postback for its last click (0: none).
    pub postback_every: u64,
    /// Every n-th postback of a thread is fired three times (0: never).
    pub repeat_every: u64,
    /// The network's postback token.
    pub token: String,
    /// Pause of each client after each response (None: as fast as it can).
    pub pace: Option<Duration>,
    /// Padding for each click (`sub1` and `User-Agent`): fills a small ring fast.
    pub sub1: String,
    pub user_agent: String,
}

impl Default for TrafficSpec {
    fn default() -> Self {
        TrafficSpec {
            threads: 4,
            slug: "load".into(),
            max_requests: 2_000,
            max_time: Duration::from_secs(30),
            postback_every: 10,
            repeat_every: 3,
            token: String::new(),
            pace: None,
            sub1: String::new(),
            user_agent: String::new(),
        }
    }
}

/// What clients were answered.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Every click id received in a 302 (once per response).
    pub clicks: Vec<String>,
    /// `(click_id, txid, status)` of every postback request answered 200,
    /// once per request (a postback fired three times is here three times).
    pub postbacks: Vec<(String, String, String)>,
    /// Answers other than a 302 with a click id, or a 200 to a postback.
    pub unexpected: Vec<String>,
    /// Clients that ended on an I/O error (a killed edge), each with at
    /// most one request unanswered.
    pub cut_off: usize,
    pub errors: Vec<String>,
}

impl Sent {
    pub fn extend(&mut self, other: Sent) {
        self.clicks.extend(other.clicks);
        self.postbacks.extend(other.postbacks);
        self.unexpected.extend(other.unexpected);
        self.cut_off += other.cut_off;
        self.errors.extend(other.errors);
    }

    pub fn click_set(&self) -> std::collections::HashSet<String> {
        self.clicks.iter().cloned().collect()
    }

    pub fn postback_set(&self) -> std::collections::HashSet<(String, String, String)> {
        self.postbacks.iter().cloned().collect()
    }
}

/// A running [`TrafficSpec`].
#[derive(Debug)]
pub struct Traffic {
    responses: std::sync::Arc<std::sync::atomic::AtomicU64>,
    alive: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Sent>>,
}

impl Traffic {
    pub fn start(addr: SocketAddr, spec: &TrafficSpec) -> Traffic {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        let responses = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicUsize::new(spec.threads));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = (0..spec.threads)
            .map(|i| {
                let (responses, alive, stop, spec) =
                    (responses.clone(), alive.clone(), stop.clone(), spec.clone());
                std::thread::spawn(move || {
                    let sent = traffic_client(i, addr, &spec, &responses, &stop, started);
                    alive.fetch_sub(1, Ordering::SeqCst);
                    sent
                })
            })
            .collect();
        Traffic {
            responses,
            alive,
            stop,
            threads,
        }
    }

    pub fn responses(&self) -> u64 {
        self.responses.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn alive(&self) -> usize {
        self.alive.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ask every client to stop after its current request.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait for every client (each ends by its bounds, `stop`, or an error).
    pub fn join(self) -> Sent {
        let mut all = Sent::default();
        for t in self.threads {
            all.extend(t.join().expect("traffic client panicked"));
        }
        all
    }
}

fn traffic_client(
    i: usize,
    addr: SocketAddr,
    spec: &TrafficSpec,
    responses: &std::sync::atomic::AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
    started: Instant,
) -> Sent {
    use std::sync::atomic::Ordering;
    let mut sent = Sent::default();
    let mut client = match Client::try_connect(addr) {
        Ok(c) => c,
        Err(e) => {
            sent.cut_off += 1;
            sent.errors.push(format!("connect: {e}"));
            return sent;
        }
    };
    let click_target = if spec.sub1.is_empty() {
        format!("/c/{}", spec.slug)
    } else {
        format!("/c/{}?sub1={}", spec.slug, enc(&spec.sub1))
    };
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if !spec.user_agent.is_empty() {
        headers.push(("User-Agent", &spec.user_agent));
    }
    // Fires still owed for the current postback (a repeated one goes 3 times).
    let mut pending: Option<(String, u32)> = None;
    let (mut n, mut postbacks) = (0u64, 0u64);
    let mut last_click: Option<String> = None;
    while !stop.load(Ordering::SeqCst)
        && responses.load(Ordering::SeqCst) < spec.max_requests
        && started.elapsed() < spec.max_time
    {
        n += 1;
        if pending.is_none()
            && spec.postback_every > 0
            && n.is_multiple_of(spec.postback_every)
            && let Some(cid) = &last_click
        {
            postbacks += 1;
            let status = if postbacks.is_multiple_of(2) {
                "pending"
            } else {
                "approved"
            };
            let fires = if spec.repeat_every > 0 && postbacks.is_multiple_of(spec.repeat_every) {
                3
            } else {
                1
            };
            let target = format!(
                "/postback?click_id={cid}&txid=t{i}-{postbacks}&status={status}&token={}",
                enc(&spec.token)
            );
            pending = Some((target, fires));
        }
        let result = match pending.take() {
            Some((target, fires)) => client.try_request("GET", &target, &[], b"").map(|r| {
                if r.status == 200 {
                    let q = |k: &str| {
                        target
                            .split(['?', '&'])
                            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                            .unwrap_or_default()
                            .to_string()
                    };
                    sent.postbacks.push((q("click_id"), q("txid"), q("status")));
                } else {
                    sent.unexpected
                        .push(format!("postback {}: {}", r.status, r.body_str()));
                }
                if fires > 1 {
                    pending = Some((target, fires - 1));
                }
            }),
            None => client
                .try_request("GET", &click_target, &headers, b"")
                .map(|r| {
                    let cid = (r.status == 302)
                        .then(|| r.header("location").and_then(click_id_in))
                        .flatten();
                    match cid {
                        Some(cid) => {
                            sent.clicks.push(cid.clone());
                            last_click = Some(cid);
                        }
                        None => sent.unexpected.push(format!(
                            "click {} {:?}",
                            r.status,
                            r.header("location")
                        )),
                    }
                }),
        };
        if let Err(e) = result {
            sent.cut_off += 1;
            sent.errors.push(e.to_string());
            break;
        }
        responses.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = spec.pace {
            std::thread::sleep(p);
        }
    }
    sent
}

/// One keep-alive client sending `n` clicks to slug `load` whose records
/// are as large as the edge makes them (five 256-byte subs, 512-byte
/// User-Agent, 1 KiB Referer): each is an oversize batch of its own (over
/// QUIC on a stream). A cut-off connection ends it (`cut_off` 1).
pub fn big_clicks(addr: SocketAddr, n: usize, pace: Duration) -> std::thread::JoinHandle<Sent> {
    std::thread::spawn(move || {
        let pad = |c: char, len: usize| std::iter::repeat_n(c, len).collect::<String>();
        let subs: String = (1..=5)
            .map(|i| format!("sub{i}={}", enc(&pad(char::from(b'a' + i), 256))))
            .collect::<Vec<_>>()
            .join("&");
        let ua = format!("Mozilla/5.0 {}", pad('u', 600));
        let referer = format!("https://ref.example/{}", pad('r', 1100));
        let mut sent = Sent::default();
        let mut client = Client::connect(addr);
        for i in 0..n {
            let target = format!("/c/load?{subs}&n={i}");
            let headers = [("User-Agent", ua.as_str()), ("Referer", referer.as_str())];
            match client.try_request("GET", &target, &headers, b"") {
                Ok(r) => match (r.status == 302)
                    .then(|| r.header("location").and_then(click_id_in))
                    .flatten()
                {
                    Some(cid) => sent.clicks.push(cid),
                    None => sent.unexpected.push(format!("big click {}", r.status)),
                },
                Err(e) => {
                    sent.cut_off += 1;
                    sent.errors.push(e.to_string());
                    return sent;
                }
            }
            std::thread::sleep(pace);
        }
        sent
    })
}

/// Wait until every click id in `sent` is in `clicks` and every postback
/// in the inbox, then check exactly once: `clicks FINAL` holds each click
/// id once and nothing else, the inbox one row per distinct
/// `(click_id, txid, status)` and nothing else, except at most `unanswered`
/// events in all that an edge recorded but could not answer before it was
/// killed (each such click id must verify). Returns the click ids found.
pub fn assert_exactly_once(
    stack: &Stack,
    sent: &Sent,
    unanswered: usize,
    deadline: Duration,
) -> Vec<String> {
    use std::collections::HashSet;
    let want_clicks = sent.click_set();
    assert_eq!(
        want_clicks.len(),
        sent.clicks.len(),
        "the edge handed out a click id twice"
    );
    assert!(!want_clicks.is_empty(), "the load got clicks answered");
    let want_postbacks = sent.postback_set();
    let start = Instant::now();
    let mut last: String;
    let (ids, rows) = loop {
        let got = stack
            .try_click_ids()
            .and_then(|ids| stack.try_inbox_rows().map(|rows| (ids, rows)));
        match got {
            Ok((ids, rows)) => {
                let have: HashSet<&str> = ids.iter().map(String::as_str).collect();
                let missing: Vec<&String> = want_clicks
                    .iter()
                    .filter(|c| !have.contains(c.as_str()))
                    .collect();
                let have_pb: HashSet<&(String, String, String)> = rows.iter().collect();
                let missing_pb: Vec<_> = want_postbacks
                    .iter()
                    .filter(|p| !have_pb.contains(p))
                    .collect();
                if missing.is_empty() && missing_pb.is_empty() {
                    break (ids, rows);
                }
                last = format!(
                    "{} of {} clicks missing (e.g. {:?}), {} of {} postbacks missing (e.g. {:?}); \
                     clickhouse holds {} rows, the inbox {}",
                    missing.len(),
                    want_clicks.len(),
                    missing.iter().take(3).collect::<Vec<_>>(),
                    missing_pb.len(),
                    want_postbacks.len(),
                    missing_pb.iter().take(3).collect::<Vec<_>>(),
                    ids.len(),
                    rows.len()
                );
            }
            Err(e) => last = e,
        }
        if start.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for every answered event in the stores: {last}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let distinct: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "clicks FINAL holds a click id more than once"
    );
    let extra: Vec<&str> = distinct
        .iter()
        .copied()
        .filter(|c| !want_clicks.contains(*c))
        .collect();
    let ring = affgate_schema::keys::KeyRing::new(keys());
    for cid in &extra {
        if let Err(e) =
            affgate_schema::click_id::ClickId::verify(cid, &ring, affgate_edge::http::now_ms())
        {
            panic!(
                "clickhouse holds click id `{cid}` that no client got and that does not verify: {e}"
            );
        }
    }
    let distinct_pb: HashSet<&(String, String, String)> = rows.iter().collect();
    assert_eq!(
        distinct_pb.len(),
        rows.len(),
        "the inbox holds a (click_id, txid, status) more than once: {rows:?}"
    );
    let extra_pb: Vec<_> = distinct_pb
        .iter()
        .filter(|p| !want_postbacks.contains(**p))
        .collect();
    assert!(
        extra.len() + extra_pb.len() <= unanswered,
        "the stores hold events no client was answered for (at most {unanswered} may be \
         unanswered by a killed edge): clicks {extra:?}, postbacks {extra_pb:?}"
    );
    eprintln!(
        "exactly once: {} clicks and {} postbacks ({} postback requests answered), {} unanswered extras",
        want_clicks.len(),
        want_postbacks.len(),
        sent.postbacks.len(),
        extra.len() + extra_pb.len()
    );
    ids
}

/// Wait until the edge's ring holds no unacknowledged and no spilled record.
pub fn wait_ring_drained(config: &Path, deadline: Duration) -> Inspect {
    let start = Instant::now();
    loop {
        let ins = inspect_config(config, false);
        let v = |k: &str| ins.value(k).and_then(|v| v.parse::<u64>().ok());
        if v("unacked_records") == Some(0) && v("spilled_records") == Some(0) {
            return ins;
        }
        if start.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for the ring to drain:\n{}",
                ins.text
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
