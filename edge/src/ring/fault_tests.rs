//! Fault tests that do the real thing: `kill -9` a process mid-append,
//! corrupt bytes on disk, truncate the file.
//!
//! The kill tests run this very test binary as the child, selecting the
//! ignored test `kill_child_appender` by its path, which is the same in
//! the scratch crate and in `affgate_edge` (`ring::fault_tests::...`).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::layout::{HEADER_PAGE, REC_HDR};
use super::{Location, Record, Ring, RingConfig, RingError, inspect, test_cfg};

/// Set in the child: `<size_bytes>:<silent threads>:<dir>`.
const CHILD_ENV: &str = "AFFGATE_RING_KILL_CHILD";
/// Child threads that print each appended seq.
const CHILD_THREADS: u64 = 3;

fn payload(seq: u64) -> Vec<u8> {
    let len = 150 + (seq * 7919 % 551) as usize;
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(131).wrapping_add(i) as u8)
        .collect()
}

/// The libtest name of `kill_child_appender`: the module path without the
/// crate name.
fn child_test_name() -> String {
    let path = module_path!();
    let in_crate = path.split_once("::").map_or(path, |(_, rest)| rest);
    format!("{in_crate}::kill_child_appender")
}

/// Not a test on its own: the child process of the kill tests. Appends from
/// several threads as fast as it can and prints `SEQ n` once each append
/// has returned, until it is killed. "Silent" threads append without
/// printing, so that the kill lands mid-append rather than in a `write` to
/// the pipe.
#[test]
#[ignore = "child process of the kill -9 tests"]
fn kill_child_appender() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // run by hand with --ignored: nothing to do
    };
    let mut parts = spec.splitn(3, ':');
    let mut next = || parts.next().expect("size:silent:dir");
    let size = next().parse().expect("size");
    let silent: u64 = next().parse().expect("silent threads");
    let cfg = test_cfg(Path::new(next()), size);
    let ring = Arc::new(Ring::open(&cfg).expect("child opens the ring"));
    let threads: Vec<_> = (0..CHILD_THREADS + silent)
        .map(|i| {
            let ring = Arc::clone(&ring);
            let report = i < CHILD_THREADS;
            std::thread::spawn(move || {
                // Bounded, in case the parent died without killing us (then
                // printing fails on the closed pipe first anyway).
                let deadline = Instant::now() + Duration::from_secs(120);
                while Instant::now() < deadline {
                    let seq = ring.next_seq();
                    ring.append(seq, 1, seq, &payload(seq)).expect("append");
                    if report {
                        println!("SEQ {seq}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("appender thread");
    }
}

/// Parse `SEQ n` anywhere in a line (libtest may print its own text first).
fn seq_in(line: &str) -> Option<u64> {
    let rest = &line[line.find("SEQ ")? + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Run the child on a ring of `size` bytes, kill it after `lines` appends
/// were reported, reopen, and check every reported append survived.
fn kill_9_mid_append(size: u64, silent: u64, lines: usize) -> (tempfile::TempDir, Ring) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_cfg(dir.path(), size);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            &child_test_name(),
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{size}:{silent}:{}", dir.path().display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(seq) = seq_in(&line) {
                // The receiver may be gone after the kill; keep reading.
                let _ = tx.send(seq);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut printed = Vec::new();
    while printed.len() < lines {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(seq) => printed.push(seq),
            Err(e) => {
                let _ = child.kill();
                panic!("child reported {} appends before {e:?}", printed.len());
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
    reader.join().expect("reader thread");
    // Lines printed between our last read and the kill count too.
    printed.extend(rx.try_iter());

    let ring = Ring::open(&cfg).expect("reopen after kill -9");
    let rec = ring.recovery().clone();
    eprintln!(
        "recovery after kill -9 ({} appends reported): {rec:?}",
        printed.len()
    );
    assert_eq!(rec.discarded_corrupt, 0, "{rec:?}");
    assert!(
        rec.discarded_uncommitted <= CHILD_THREADS + silent,
        "at most one append in flight per thread: {rec:?}"
    );
    assert_eq!(
        rec.spill.discarded_corrupt + rec.spill.garbage_bytes,
        0,
        "{rec:?}"
    );
    let mut c = ring.consumer().expect("consumer");
    let mut out = Vec::new();
    while c.poll(1000, &mut out).expect("poll") > 0 {}
    drop(c);
    let mut stored: HashMap<u64, &Record> = HashMap::new();
    for r in &out {
        assert!(
            stored.insert(r.seq, r).is_none(),
            "seq {} stored twice",
            r.seq
        );
        assert_eq!(r.payload, payload(r.seq), "payload of stored seq {}", r.seq);
    }
    for seq in &printed {
        assert!(
            stored.contains_key(seq),
            "seq {seq} was acknowledged by append but is gone after kill -9"
        );
    }
    let max_printed = printed.iter().max().copied().unwrap_or(0);
    assert!(
        ring.stats().next_seq > max_printed,
        "sequence numbers keep growing"
    );
    let stats = ring.stats();
    assert_eq!(stats.unacked_records, out.len() as u64, "{stats:?}");
    drop(out);
    (dir, ring)
}

#[test]
fn kill_9_mid_ring_append_loses_no_acknowledged_record() {
    // Silent appenders keep the ring busy; 64 MiB does not fill in the time
    // it takes to report 3000 appends, so the kill lands mid ring append.
    let (_dir, ring) = kill_9_mid_append(64 << 20, 2, 3000);
    let rec = ring.recovery();
    assert!(rec.unacked_records >= 3000, "{rec:?}");
    assert_eq!(rec.spill.unacked_records, 0, "{rec:?}");
}

#[test]
fn kill_9_with_a_full_ring_loses_no_acknowledged_record() {
    // ~470-byte records fill 1 MiB after ~2200: the child is spilling with
    // a full ring when killed, and both are recovered.
    let (_dir, ring) = kill_9_mid_append(1 << 20, 0, 3000);
    let rec = ring.recovery();
    assert!(rec.unacked_records > 1000, "{rec:?}");
    assert!(rec.spill.unacked_records > 0, "{rec:?}");
}

#[test]
fn kill_9_while_spilling_loses_no_acknowledged_record() {
    let (_dir, ring) = kill_9_mid_append(4096, 0, 3000);
    let rec = ring.recovery();
    assert!(
        rec.spill.unacked_records > 2900,
        "the child was spilling when killed: {rec:?}"
    );
    assert!(ring.stats().spilled_records > 2900);
}

/// A ring with records 1..=n of `len` bytes each, closed again.
fn closed_ring(dir: &Path, n: u64, len: usize) -> RingConfig {
    let cfg = test_cfg(dir, 64 * 1024);
    let ring = Ring::open(&cfg).expect("open");
    for _ in 0..n {
        let seq = ring.next_seq();
        ring.append(seq, 2, seq, &vec![seq as u8; len])
            .expect("append");
    }
    cfg
}

fn ring_pos(cfg: &RingConfig, seq: u64) -> u64 {
    let ins = inspect(&cfg.path, &cfg.spill_dir).expect("inspect");
    let r = ins
        .records
        .iter()
        .find(|r| r.seq == seq)
        .expect("record present");
    let Location::Ring { pos } = r.loc else {
        panic!("seq {seq} is in the ring");
    };
    pos
}

fn flip_byte(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open ring file");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x5a], at).expect("write");
}

fn all_records(ring: &Ring) -> Vec<Record> {
    let mut c = ring.consumer().expect("consumer");
    let mut out = Vec::new();
    while c.poll(100, &mut out).expect("poll") > 0 {}
    out
}

#[test]
fn flipped_payload_byte_drops_that_record_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = closed_ring(dir.path(), 20, 300);
    let pos = ring_pos(&cfg, 7);
    flip_byte(&cfg.path, HEADER_PAGE + pos + REC_HDR + 10);

    let ring = Ring::open(&cfg).expect("reopen skips the damage");
    let rec = ring.recovery();
    assert_eq!(
        (rec.discarded_corrupt, rec.unacked_records),
        (1, 19),
        "{rec:?}"
    );
    let out = all_records(&ring);
    let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
    let want: Vec<u64> = (1..=20).filter(|&s| s != 7).collect();
    assert_eq!(seqs, want);
    assert!(out.iter().all(|r| r.payload == vec![r.seq as u8; 300]));
    drop(ring);
    let ring = Ring::open(&cfg).expect("reopen again");
    assert_eq!(
        ring.recovery().discarded_corrupt,
        0,
        "the damaged record was padded over for good"
    );
    assert_eq!(ring.recovery().unacked_records, 19);
}

#[test]
fn flipped_header_byte_is_scanned_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = closed_ring(dir.path(), 20, 300);
    let pos = ring_pos(&cfg, 12);
    flip_byte(&cfg.path, HEADER_PAGE + pos + 17); // inside `seq`

    let ring = Ring::open(&cfg).expect("reopen");
    let rec = ring.recovery();
    assert_eq!(
        (rec.unacked_records, rec.discarded_bytes),
        (19, 352),
        "{rec:?}"
    );
    let seqs: Vec<u64> = all_records(&ring).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=20).filter(|&s| s != 12).collect::<Vec<_>>());
}

#[test]
fn truncated_ring_file_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = closed_ring(dir.path(), 5, 100);
    let f = OpenOptions::new()
        .write(true)
        .open(&cfg.path)
        .expect("open");
    f.set_len(HEADER_PAGE + 1000).expect("truncate");
    drop(f);
    let e = Ring::open(&cfg).expect_err("truncated ring");
    assert!(matches!(e, RingError::Truncated { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "ring {} is truncated: 5096 bytes, expected {}",
            cfg.path.display(),
            HEADER_PAGE + 64 * 1024
        )
    );
    let e = inspect(&cfg.path, &cfg.spill_dir).expect_err("inspect refuses it too");
    assert!(matches!(e, RingError::Truncated { .. }), "{e}");

    // Cut inside the header page.
    let f = OpenOptions::new()
        .write(true)
        .open(&cfg.path)
        .expect("open");
    f.set_len(100).expect("truncate");
    drop(f);
    let e = Ring::open(&cfg).expect_err("truncated header");
    assert!(
        e.to_string().contains(&cfg.path.display().to_string()),
        "{e}"
    );
}

#[test]
fn foreign_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_cfg(dir.path(), 4096);
    std::fs::write(&cfg.path, vec![b'x'; 4096 + 4096]).expect("write");
    let e = Ring::open(&cfg).expect_err("not a ring");
    assert!(matches!(e, RingError::Format { .. }), "{e}");
    assert!(e.to_string().contains("bad magic"), "{e}");
}
