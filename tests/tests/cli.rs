//! The operator contract of `affgate-edge` (DESIGN.md "Operator contract",
//! docs/edge.md "Command line", docs/config.md): help, config errors that
//! name their key, environment overrides, a links file refused with its
//! line number, a ring too large for its filesystem refused at start, and a
//! clean SIGTERM after which the ring keeps its records.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use affgate_tests::{
    EdgeOpts, EdgeProc, bin, click_id_in, free_port, signal, wait_for, write_config,
};

const TOKEN: &str = "cli-network-token";

fn opts() -> EdgeOpts {
    EdgeOpts {
        links_csv: "slug,link_id,destination\nk,5,https://m.example/k?cid={click_id}\n".into(),
        networks_csv: format!("network_id,name,postback_token\n3,Net,{TOKEN}\n"),
        ..EdgeOpts::default()
    }
}

/// Kills the child if the test panics before it exits.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `affgate-edge args…` with extra environment and wait (bounded) for it to exit.
fn run(args: &[&str], config: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("affgate-edge"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args)
        .env_remove("AFFGATE_CONFIG")
        .env("AFFGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut running = Running(Some(cmd.spawn().expect("start affgate-edge")));
    wait_for(
        &format!("affgate-edge {args:?} to exit"),
        Duration::from_secs(20),
        || running.0.as_mut()?.try_wait().ok().flatten(),
    );
    running
        .0
        .take()
        .expect("child")
        .wait_with_output()
        .expect("collect affgate-edge output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config dir with `edge.toml` written by the harness.
fn config_dir(o: &EdgeOpts) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), o);
    (dir, cfg)
}

/// A config error: status 1, one stderr line starting `affgate-edge: config` that names `key`.
fn assert_config_error(o: &Output, key: &str, what: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: exit status 1; stderr:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("affgate-edge: "))
        .unwrap_or_else(|| panic!("{what}: no `affgate-edge: …` error line in stderr:\n{err}"));
    assert!(
        line.contains("config"),
        "{what}: the error says it is the config: `{line}`"
    );
    assert!(
        line.contains(key),
        "{what}: the error names `{key}`: `{line}`"
    );
    assert!(
        stdout(o).is_empty(),
        "{what}: nothing on stdout (no listeners): {}",
        stdout(o)
    );
}

#[test]
fn help_describes_the_binary_and_its_commands() {
    let o = run(&["--help"], None, &[]);
    assert!(o.status.success(), "--help succeeds: {}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "click redirect",
        "postback",
        "--config",
        "check-config",
        "ring",
        "AFFGATE_",
    ] {
        assert!(text.contains(want), "--help mentions `{want}`:\n{text}");
    }

    let o = run(&["ring", "inspect", "--help"], None, &[]);
    assert!(
        o.status.success(),
        "ring inspect --help succeeds: {}",
        stderr(&o)
    );
    let text = stdout(&o);
    for want in ["ring", "unacknowledged", "--records"] {
        assert!(
            text.contains(want),
            "ring inspect --help mentions `{want}`:\n{text}"
        );
    }

    let o = run(&["check-config", "--help"], None, &[]);
    assert!(
        o.status.success(),
        "check-config --help succeeds: {}",
        stderr(&o)
    );
    let text = stdout(&o);
    assert!(
        text.contains("Check the config"),
        "check-config --help says what it does:\n{text}"
    );

    let o = run(&["--version"], None, &[]);
    assert!(o.status.success(), "--version succeeds");
    assert!(
        stdout(&o).contains("affgate-edge"),
        "--version names the binary"
    );
}

#[test]
fn missing_config_and_unknown_command_fail() {
    let o = run(&["check-config"], None, &[]);
    assert!(!o.status.success(), "no --config: failure");
    assert!(
        stderr(&o).contains("--config"),
        "says --config is needed: {}",
        stderr(&o)
    );

    let (_dir, cfg) = config_dir(&opts());
    let o = run(&["frobnicate"], Some(&cfg), &[]);
    assert!(!o.status.success(), "an unknown command fails");
    assert!(
        stderr(&o).contains("frobnicate"),
        "names the unknown command: {}",
        stderr(&o)
    );

    let o = run(
        &["check-config"],
        Some(&cfg.with_file_name("missing.toml")),
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "a missing config file fails");
    assert!(
        stderr(&o).contains("missing.toml"),
        "names the file: {}",
        stderr(&o)
    );
}

#[test]
fn check_config_accepts_a_good_config() {
    let (_dir, cfg) = config_dir(&EdgeOpts {
        edge_id: 4242,
        ..opts()
    });
    let o = run(&["check-config"], Some(&cfg), &[]);
    assert!(
        o.status.success(),
        "check-config on a good file: {}",
        stderr(&o)
    );
    assert!(
        stdout(&o).contains("edge_id=4242"),
        "prints what it checked: {}",
        stdout(&o)
    );
    let o = run(&["check-config"], Some(&cfg), &[("AFFGATE_EDGE_ID", "17")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("edge_id=17"),
        "env overrides the file: {}",
        stdout(&o)
    );
}

#[test]
fn unknown_key_is_refused_and_named() {
    let o_file = EdgeOpts {
        extra_toml: "[delivery]\nflush_intervall_ms = 5\n".into(),
        ..opts()
    };
    let (_dir, cfg) = config_dir(&o_file);
    for cmd in [&["check-config"][..], &["run"][..], &[][..]] {
        let o = run(cmd, Some(&cfg), &[]);
        assert_config_error(
            &o,
            "flush_intervall_ms",
            &format!("typo in the file, {cmd:?}"),
        );
    }

    let o_top = EdgeOpts {
        extra_toml: "[buffer_]\nsize = 1\n".into(),
        ..opts()
    };
    let (_dir2, cfg2) = config_dir(&o_top);
    let o = run(&["check-config"], Some(&cfg2), &[]);
    assert_config_error(&o, "buffer_", "unknown section");

    let (_dir3, cfg3) = config_dir(&opts());
    let o = run(
        &["check-config"],
        Some(&cfg3),
        &[("AFFGATE_HTTP_LISEN", "127.0.0.1:0")],
    );
    assert_config_error(&o, "lisen", "typo in an environment override");
}

#[test]
fn bad_value_is_refused_and_named() {
    let (_dir, cfg) = config_dir(&opts());
    let o = run(&[], Some(&cfg), &[("AFFGATE_DELIVERY_TRANSPORT", "tcp")]);
    assert_config_error(&o, "[delivery] transport", "AFFGATE_DELIVERY_TRANSPORT=tcp");
    assert!(
        stderr(&o).contains("tcp"),
        "names the bad value: {}",
        stderr(&o)
    );

    for (k, v, key) in [
        ("AFFGATE_HTTP_LISTEN", "nowhere", "[http] listen"),
        (
            "AFFGATE_LINKS_FALLBACK_URL",
            "ftp://x.example/",
            "[links] fallback_url",
        ),
        ("AFFGATE_BUFFER_SIZE_MB", "0", "[buffer] size_mb"),
        ("AFFGATE_SECRET", "abc", "secret"),
        (
            "AFFGATE_DELIVERY_MAX_DATAGRAM_BYTES",
            "100",
            "[delivery] max_datagram_bytes",
        ),
        ("AFFGATE_HTTP_TLS_LISTEN", "127.0.0.1:0", "tls_cert"),
    ] {
        let o = run(&["check-config"], Some(&cfg), &[(k, v)]);
        assert_config_error(&o, key, &format!("{k}={v}"));
    }
}

#[test]
fn bad_value_type_is_refused_and_named() {
    let (_dir, cfg) = config_dir(&opts());
    for (k, v, key) in [
        ("AFFGATE_EDGE_ID", "70000", "edge_id"),
        ("AFFGATE_EDGE_ID", "seven", "edge_id"),
        ("AFFGATE_HTTP_MAX_BODY_BYTES", "lots", "max_body_bytes"),
        ("AFFGATE_BUFFER_SIZE_MB", "true", "size_mb"),
    ] {
        let o = run(&["check-config"], Some(&cfg), &[(k, v)]);
        assert_config_error(&o, key, &format!("{k}={v}"));
    }
}

#[test]
fn environment_overrides_the_listen_address() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let e = EdgeProc::start(&EdgeOpts {
        env: vec![("AFFGATE_HTTP_LISTEN".into(), addr.clone())],
        ..opts()
    });
    assert_eq!(
        e.http.to_string(),
        addr,
        "AFFGATE_HTTP_LISTEN beats the file's 127.0.0.1:0"
    );
    let r = e.get("/healthz");
    assert_eq!(r.status, 200, "serving on the overridden address");
    let r = e.get("/c/k");
    assert_eq!(r.status, 302, "and redirecting there: {r:?}");
}

#[test]
fn links_file_error_refuses_start_and_names_the_line() {
    let o = EdgeOpts {
        links_csv: "slug,link_id,destination\n\
                    good,1,https://m.example/a\n\
                    bad,2,https://m.example/b,extra\n\
                    fine,3,https://m.example/c\n"
            .into(),
        ..opts()
    };
    let (_dir, cfg) = config_dir(&o);
    let out = run(&[], Some(&cfg), &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a bad links file stops the start");
    assert!(err.contains("line 3"), "names line 3:\n{err}");
    assert!(err.contains("links.csv"), "names the file:\n{err}");
    assert!(
        !stdout(&out).contains("listening"),
        "never reported listeners"
    );

    for (csv, what) in [
        (
            "slug,link_id,destination\nok,1,https://m.example/a\nok,2,https://m.example/b\n",
            "duplicate slug",
        ),
        (
            "slug,link_id,destination,redirect_code\nok,1,https://m.example/a,\nx,2,https://m.example/b,303\n",
            "bad redirect code",
        ),
        (
            "slug,link_id,destination\nok,1,https://m.example/a\nx y,2,https://m.example/b\n",
            "bad slug",
        ),
        (
            "slug,link_id,destination\nok,1,https://m.example/a\nx,2,https://m.example/{nope}\n",
            "unknown macro",
        ),
    ] {
        let (_d, cfg) = config_dir(&EdgeOpts {
            links_csv: csv.into(),
            ..opts()
        });
        let out = run(&[], Some(&cfg), &[]);
        assert!(!out.status.success(), "{what}: refused");
        assert!(
            stderr(&out).contains("line 3"),
            "{what}: names line 3:\n{}",
            stderr(&out)
        );
    }

    let (_d, cfg) = config_dir(&EdgeOpts {
        networks_csv: "network_id,name,postback_token\n1,A,long-enough-token\n2,B,short\n".into(),
        ..opts()
    });
    let out = run(&[], Some(&cfg), &[]);
    assert!(!out.status.success(), "a bad networks file stops the start");
    assert!(
        stderr(&out).contains("networks.csv"),
        "names the file:\n{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("line 3"),
        "names line 3:\n{}",
        stderr(&out)
    );
}

#[test]
fn sigterm_exits_cleanly_and_the_ring_survives_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = opts();
    let mut e = EdgeProc::start_in(tmp.path(), &o);
    let mut clicks = Vec::new();
    for _ in 0..3 {
        let r = e.get("/c/k");
        assert_eq!(r.status, 302, "{r:?}");
        clicks.push(click_id_in(r.header("location").unwrap_or_default()).expect("click id"));
    }
    let r = e.get(&format!(
        "/postback?click_id={}&txid=before-term&token={TOKEN}",
        clicks[0]
    ));
    assert_eq!(r.status, 200, "{r:?}");
    let before = wait_for("4 records in the ring", Duration::from_secs(10), || {
        let i = e.inspect(true);
        (i.records.len() == 4).then_some(i)
    });

    let status = e.terminate();
    assert!(
        status.success(),
        "SIGTERM exits 0, got {status:?}; stderr:\n{}",
        e.stderr()
    );

    let mut e = EdgeProc::start_in(tmp.path(), &o);
    let after = e.inspect(true);
    assert_eq!(
        after.click_ids(),
        before.click_ids(),
        "every click is still in the ring after the restart"
    );
    assert!(
        after
            .records
            .iter()
            .any(|r| r.kind == "postback" && r.txid == "before-term"),
        "the postback too:\n{}",
        after.text
    );
    let r = e.get("/c/k");
    assert_eq!(r.status, 302, "serving after the restart: {r:?}");
    let fresh = click_id_in(r.header("location").unwrap_or_default()).expect("click id");
    assert!(
        !clicks.contains(&fresh),
        "click ids are unique across restarts"
    );
    let max_before = before.records.iter().map(|r| r.seq).max().expect("records");
    let rec = wait_for("the new click in the ring", Duration::from_secs(10), || {
        e.inspect(true)
            .records
            .into_iter()
            .find(|r| r.click_id == fresh)
    });
    assert!(
        rec.seq > max_before,
        "sequence numbers keep counting across restarts"
    );
    assert_eq!(
        e.inspect(false).value("clicks").as_deref(),
        Some("4"),
        "3 old clicks + 1 new"
    );

    // SIGINT stops it cleanly as well.
    signal(e.pid(), "INT");
    let status = wait_for("edge to exit after SIGINT", Duration::from_secs(15), || {
        e.child.try_wait().ok().flatten()
    });
    assert!(status.success(), "SIGINT exits 0, got {status:?}");
}

/// A tmpfs of `size`, mounted for the test and unmounted after it.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(at: &Path, size: &str) -> SmallTmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a {size} tmpfs at {}", at.display());
        SmallTmpfs(at.to_owned())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_ring_larger_than_its_filesystem_refuses_start_and_takes_no_space() {
    use std::os::unix::fs::MetadataExt;
    // Mounting needs root, which CI and the project's machines have; a
    // developer running the suite as another user skips this one check.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        eprintln!("skipped: not root, cannot mount a small tmpfs");
        return;
    }
    let (dir, cfg) = config_dir(&EdgeOpts {
        size_mb: 16,
        ..opts()
    });
    let small = dir.path().join("small");
    let _fs = SmallTmpfs::mount(&small, "8m");
    let ring = small.join("edge.ring");
    let ring_env = ring.display().to_string();
    let out = run(&[], Some(&cfg), &[("AFFGATE_BUFFER_PATH", &ring_env)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "refused at start:\n{err}");
    assert!(
        err.contains("has no room for its") && err.contains("size_mb"),
        "says why and which key:\n{err}"
    );
    assert!(
        !stdout(&out).contains("listening"),
        "never reported listeners"
    );
    let blocks = std::fs::metadata(&ring).map_or(0, |m| m.blocks());
    assert_eq!(
        blocks, 0,
        "the refused ring holds no space on the filesystem"
    );

    // The same filesystem takes a ring that fits, allocated whole.
    let _ = std::fs::remove_file(&ring);
    let edge = EdgeProc::start(&EdgeOpts {
        size_mb: 4,
        env: vec![("AFFGATE_BUFFER_PATH".into(), ring_env)],
        ..opts()
    });
    let m = std::fs::metadata(&ring).expect("the ring on the small tmpfs");
    assert!(
        m.blocks() * 512 >= m.len(),
        "a ring that fits is allocated whole: {} of {} bytes",
        m.blocks() * 512,
        m.len()
    );
    drop(edge);
}
