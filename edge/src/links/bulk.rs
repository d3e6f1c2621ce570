//! The full load of every link over a plain connection of its own:
//! pipelined `SCAN`/`HMGET` written as RESP, replies read in place
//! (`links::resp`) and parsed straight into [`Link`]s, with no
//! intermediate values.
//!
//! Why not redis-rs here: at a million links its reply values
//! (`redis::Value`, a `String` per field) cost the edge more CPU than Redis
//! spent answering (BENCHMARKS.md "Memory and scale"). Everything else
//! (subscription, changes, misses, offers, tokens) stays on redis-rs.
//!
//! On the wire, in order (one connection, RESP2 whatever the URL asks for,
//! since nothing else shares it):
//!
//! ```text
//! → [AUTH [user] pass] [SELECT db] SCAN 0 MATCH affgate:link:* COUNT n
//! ← [+OK] [+OK] [cursor c1, keys k0]
//! → SCAN c1 ...  HMGET k0[0] <fields> ... HMGET k0[last] <fields>
//! ← [cursor c2, keys k1]          (the SCAN goes first, so the next batch
//! → SCAN c2 ...  HMGET k1[..]      is asked for while this one's replies
//! ← HMGET replies of k0            are still being read and parsed)
//!   ...until a SCAN answers cursor 0 and every HMGET has been answered.
//! ```
//!
//! Rules kept from the redis-rs path: a key gone between SCAN and HMGET
//! (every field nil) is skipped; a key SCAN returns twice is loaded twice
//! and the cache keeps one; a hash `parse_link` refuses is logged and
//! skipped. Also skipped with a warning, where redis-rs failed the whole
//! load: a key that is not a hash (HMGET answers WRONGTYPE) and a key or
//! field that is not UTF-8.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Link;
use super::redis::{Fields, LINK_FIELDS, LINK_PREFIX, parse_link};
use super::resp::{self, Frame};

/// Keys asked per SCAN call, so roughly the links per batch.
pub const SCAN_COUNT: usize = 2000;

/// Room kept free in the read buffer before each read.
const READ_CHUNK: usize = 256 << 10;

/// A link hash's fields as HMGET returned them, borrowed from the read buffer.
struct FieldSlices<'a>([Option<&'a str>; LINK_FIELDS.len()]);

impl Fields for FieldSlices<'_> {
    fn field(&self, name: &str) -> Option<&str> {
        let i = LINK_FIELDS.iter().position(|f| *f == name)?;
        self.0[i]
    }
}

/// The reply the load waits for next, in the order the commands were written.
#[derive(Debug)]
enum Expect {
    /// `+OK` to AUTH or SELECT (named for the error message).
    Ok(&'static str),
    Scan,
    /// The HMGET of this slug's link hash.
    Link(Box<str>),
}

/// The bulk load without a socket: fed reply frames, it says what to write
/// next and hands out the links. The shell ([`load_links`]) only moves bytes.
#[derive(Debug)]
pub struct BulkLoad {
    expect: VecDeque<Expect>,
    /// Commands not yet written; `out[written..]` is what is left.
    out: Vec<u8>,
    written: usize,
    /// `$7\r\nlink_id\r\n$11\r\ndestination\r\n...`: the tail of every HMGET.
    fields_tail: Vec<u8>,
    scan_count: Vec<u8>,
}

impl BulkLoad {
    /// A load that authenticates (`password` with an optional `username`),
    /// selects `db` unless it is 0, then scans links `scan_count` at a time.
    pub fn new(
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        scan_count: usize,
    ) -> BulkLoad {
        let mut fields_tail = Vec::new();
        for f in LINK_FIELDS {
            bulk(&mut fields_tail, f.as_bytes());
        }
        let mut load = BulkLoad {
            expect: VecDeque::new(),
            out: Vec::new(),
            written: 0,
            fields_tail,
            scan_count: scan_count.to_string().into_bytes(),
        };
        if let Some(pass) = password {
            match username {
                Some(user) => command(&mut load.out, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
                None => command(&mut load.out, &[b"AUTH", pass.as_bytes()]),
            }
            load.expect.push_back(Expect::Ok("AUTH"));
        }
        if db != 0 {
            command(&mut load.out, &[b"SELECT", db.to_string().as_bytes()]);
            load.expect.push_back(Expect::Ok("SELECT"));
        }
        load.scan(b"0");
        load
    }

    fn scan(&mut self, cursor: &[u8]) {
        let pattern = format!("{LINK_PREFIX}*");
        command(
            &mut self.out,
            &[
                b"SCAN",
                cursor,
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                &self.scan_count,
            ],
        );
        self.expect.push_back(Expect::Scan);
    }

    fn hmget(&mut self, key: &[u8]) {
        const HEAD: &[u8] = b"*11\r\n$5\r\nHMGET\r\n";
        const _: () = assert!(LINK_FIELDS.len() == 9, "HEAD counts 2 + 9 arguments");
        self.out.extend_from_slice(HEAD);
        bulk(&mut self.out, key);
        self.out.extend_from_slice(&self.fields_tail);
    }

    /// Bytes to write next (empty: nothing to write until more replies).
    pub fn output(&self) -> &[u8] {
        &self.out[self.written..]
    }

    /// `n` bytes of [`BulkLoad::output`] were written.
    pub fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.out.len() {
            self.out.clear();
            self.written = 0;
        }
    }

    /// True once every reply asked for has been read.
    pub fn is_done(&self) -> bool {
        self.expect.is_empty()
    }

    /// Take in the next reply; each link read goes to `sink`. Err: Redis
    /// refused a command or the connection is out of step; the load cannot
    /// go on.
    pub fn on_frame(
        &mut self,
        frame: Frame<'_>,
        sink: &mut impl FnMut(Box<str>, Link),
    ) -> anyhow::Result<()> {
        let Some(expect) = self.expect.pop_front() else {
            bail!("reply with no command waiting for it");
        };
        match expect {
            Expect::Ok(what) => match frame {
                Frame::Simple(_) => Ok(()),
                Frame::Error(e) => bail!("{what}: {}", String::from_utf8_lossy(e)),
                _ => bail!("{what}: unexpected reply {frame:?}"),
            },
            Expect::Scan => self.on_scan(frame),
            Expect::Link(slug) => on_link(slug, frame, sink),
        }
    }

    fn on_scan(&mut self, frame: Frame<'_>) -> anyhow::Result<()> {
        let (cursor, keys) = match frame {
            Frame::Array(Some(a)) if a.len() == 2 => {
                let mut it = a.iter();
                match (it.next(), it.next()) {
                    (Some(Frame::Bulk(Some(c))), Some(Frame::Array(Some(keys)))) => (c, keys),
                    _ => bail!("SCAN: unexpected reply {frame:?}"),
                }
            }
            Frame::Error(e) => bail!("SCAN: {}", String::from_utf8_lossy(e)),
            _ => bail!("SCAN: unexpected reply {frame:?}"),
        };
        if cursor.is_empty() || !cursor.iter().all(u8::is_ascii_digit) {
            bail!(
                "SCAN: cursor {:?} is not a number",
                String::from_utf8_lossy(cursor)
            );
        }
        // The next SCAN goes out before this batch's HMGETs, so its reply
        // (the next batch's keys) arrives while this batch is read.
        if cursor != b"0" {
            self.scan(cursor);
        }
        for key in keys.iter() {
            let Frame::Bulk(Some(key)) = key else {
                bail!("SCAN: a key is {key:?}, not a bulk string");
            };
            let Some(slug) = key.strip_prefix(LINK_PREFIX.as_bytes()) else {
                bail!(
                    "SCAN MATCH returned {:?}, outside {LINK_PREFIX}*",
                    String::from_utf8_lossy(key)
                );
            };
            let Ok(slug) = std::str::from_utf8(slug) else {
                tracing::warn!(
                    key = %String::from_utf8_lossy(key),
                    "skipping link key that is not UTF-8"
                );
                continue;
            };
            self.hmget(key);
            self.expect.push_back(Expect::Link(slug.into()));
        }
        Ok(())
    }
}

/// One HMGET reply: the link goes to `sink`, or is skipped with a reason.
fn on_link(
    slug: Box<str>,
    frame: Frame<'_>,
    sink: &mut impl FnMut(Box<str>, Link),
) -> anyhow::Result<()> {
    let values = match frame {
        Frame::Array(Some(a)) if a.len() == LINK_FIELDS.len() => a,
        Frame::Error(e) => {
            skip(&slug, &String::from_utf8_lossy(e));
            return Ok(());
        }
        _ => bail!("HMGET {LINK_PREFIX}{slug}: unexpected reply {frame:?}"),
    };
    let mut fields = [None; LINK_FIELDS.len()];
    let mut any = false;
    for (slot, v) in fields.iter_mut().zip(values.iter()) {
        match v {
            Frame::Bulk(None) => {}
            Frame::Bulk(Some(b)) => {
                any = true;
                let Ok(s) = std::str::from_utf8(b) else {
                    skip(&slug, &"a field is not UTF-8");
                    return Ok(());
                };
                *slot = Some(s);
            }
            _ => bail!("HMGET {LINK_PREFIX}{slug}: a field is {v:?}"),
        }
    }
    if !any {
        return Ok(()); // deleted between SCAN and HMGET
    }
    match parse_link(&FieldSlices(fields)) {
        Ok(link) => sink(slug, link),
        Err(reason) => skip(&slug, &reason),
    }
    Ok(())
}

/// Log a link hash a load skips, and why.
pub(super) fn skip(slug: &str, reason: &dyn std::fmt::Display) {
    tracing::warn!(
        key = %format_args!("{LINK_PREFIX}{slug}"),
        reason = %reason,
        "skipping unusable link hash"
    );
}

/// `*N\r\n` and each argument as a bulk string.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    decimal(out, args.len());
    out.extend_from_slice(b"\r\n");
    for a in args {
        bulk(out, a);
    }
}

fn bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    decimal(out, arg.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, without `format!` (one per link on a bulk load).
fn decimal(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Every link, read over a connection of its own to the server `info`
/// names and handed to `sink` as it is parsed. `Ok(false)`: this address
/// needs what the plain connection does not do (TLS), nothing was read,
/// and the caller uses redis-rs instead.
pub async fn load_links(
    info: &ConnectionInfo,
    timeout: Duration,
    mut sink: impl FnMut(Box<str>, Link),
) -> anyhow::Result<bool> {
    let settings = info.redis_settings();
    let load = BulkLoad::new(
        settings.username(),
        settings.password(),
        settings.db(),
        SCAN_COUNT,
    );
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
            let stream = within(timeout, connect, &format!("{host}:{port}")).await?;
            stream.set_nodelay(true).context("set TCP_NODELAY")?;
            drive(stream, load, timeout, &mut sink).await?;
        }
        ConnectionAddr::Unix(path) => {
            let connect = tokio::net::UnixStream::connect(path);
            let stream = within(timeout, connect, &path.display().to_string()).await?;
            drive(stream, load, timeout, &mut sink).await?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// `connect`, given up after `timeout`; errors name `to`.
async fn within<S>(
    timeout: Duration,
    connect: impl Future<Output = std::io::Result<S>>,
    to: &str,
) -> anyhow::Result<S> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no connection to {to} within {timeout:?}"))?
        .with_context(|| format!("connect to {to}"))
}

/// Move bytes between `stream` and `load` until it is done. Writing and
/// reading go on together, so neither side's buffers can fill while the
/// other waits; `timeout` bounds each wait for progress.
async fn drive<S>(
    stream: S,
    mut load: BulkLoad,
    timeout: Duration,
    sink: &mut impl FnMut(Box<str>, Link),
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    enum Io {
        Read(std::io::Result<usize>),
        Wrote(std::io::Result<usize>),
        Stalled,
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        while let Some((frame, used)) = resp::parse(&buf).context("read reply")? {
            load.on_frame(frame, sink)?;
            buf.advance(used);
        }
        if load.is_done() {
            return Ok(());
        }
        buf.reserve(READ_CHUNK);
        let out = load.output();
        let io = tokio::select! {
            r = rd.read_buf(&mut buf) => Io::Read(r),
            w = wr.write(out), if !out.is_empty() => Io::Wrote(w),
            () = tokio::time::sleep(timeout) => Io::Stalled,
        };
        match io {
            Io::Read(r) => {
                if r.context("read from redis")? == 0 {
                    bail!("redis closed the connection mid-load");
                }
            }
            Io::Wrote(w) => {
                let n = w.context("write to redis")?;
                if n == 0 {
                    bail!("redis closed the connection mid-load");
                }
                load.wrote(n);
            }
            Io::Stalled => bail!("redis made no progress within {timeout:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS_TAIL: &str = "$7\r\nlink_id\r\n$11\r\ndestination\r\n$6\r\nstatus\r\n$13\r\nredirect_code\r\n$8\r\noffer_id\r\n$12\r\naffiliate_id\r\n$10\r\nnetwork_id\r\n$12\r\nfallback_url\r\n$7\r\nversion\r\n";

    fn scan_cmd(cursor: &str, count: usize) -> String {
        let count = count.to_string();
        format!(
            "*6\r\n$4\r\nSCAN\r\n${}\r\n{cursor}\r\n$5\r\nMATCH\r\n$14\r\naffgate:link:*\r\n$5\r\nCOUNT\r\n${}\r\n{count}\r\n",
            cursor.len(),
            count.len()
        )
    }

    fn hmget_cmd(slug: &str) -> String {
        let key = format!("{LINK_PREFIX}{slug}");
        format!(
            "*11\r\n$5\r\nHMGET\r\n${}\r\n{key}\r\n{FIELDS_TAIL}",
            key.len()
        )
    }

    fn scan_reply(cursor: &str, keys: &[&str]) -> String {
        let mut s = format!("*2\r\n${}\r\n{cursor}\r\n*{}\r\n", cursor.len(), keys.len());
        for k in keys {
            let k = format!("{LINK_PREFIX}{k}");
            s.push_str(&format!("${}\r\n{k}\r\n", k.len()));
        }
        s
    }

    /// HMGET reply with link_id and destination set (the others nil).
    fn link_reply(id: &str, dest: &str) -> String {
        format!(
            "*9\r\n${}\r\n{id}\r\n${}\r\n{dest}\r\n{}",
            id.len(),
            dest.len(),
            "$-1\r\n".repeat(7)
        )
    }

    /// A load and the links it handed out.
    struct Fed {
        load: BulkLoad,
        links: Vec<(Box<str>, Link)>,
    }

    impl Fed {
        fn new(load: BulkLoad) -> Fed {
            Fed {
                load,
                links: Vec::new(),
            }
        }

        /// Feed complete replies; each must be accepted.
        fn feed(&mut self, bytes: impl AsRef<[u8]>) {
            let mut buf = bytes.as_ref();
            while !buf.is_empty() {
                let (f, used) = resp::parse(buf).expect("ok").expect("complete");
                let links = &mut self.links;
                self.load
                    .on_frame(f, &mut |s, l| links.push((s, l)))
                    .expect("accepted");
                buf = &buf[used..];
            }
        }

        /// Feed one complete reply that must be refused; the error text.
        fn refuse(&mut self, bytes: &[u8]) -> String {
            let (f, _) = resp::parse(bytes).expect("ok").expect("complete");
            let err = self
                .load
                .on_frame(f, &mut |_, _| panic!("no link from a refused reply"))
                .expect_err("refused");
            format!("{err:#}")
        }

        fn take_output(&mut self) -> String {
            let s = String::from_utf8(self.load.output().to_vec()).expect("ascii commands");
            self.load.wrote(s.len());
            s
        }

        fn ids(&self) -> Vec<(String, u64)> {
            self.links
                .iter()
                .map(|(s, l)| (s.to_string(), l.link_id))
                .collect()
        }
    }

    #[test]
    fn handshake_then_scan_then_hmget_in_order() {
        let mut f = Fed::new(BulkLoad::new(Some("edge"), Some("p@ss"), 3, 10));
        assert_eq!(
            f.take_output(),
            format!(
                "*3\r\n$4\r\nAUTH\r\n$4\r\nedge\r\n$4\r\np@ss\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n{}",
                scan_cmd("0", 10)
            )
        );
        f.feed("+OK\r\n+OK\r\n");
        f.feed(scan_reply("17", &["a", "b"]));
        assert_eq!(
            f.take_output(),
            scan_cmd("17", 10) + &hmget_cmd("a") + &hmget_cmd("b"),
            "the next SCAN goes out before this batch's HMGETs"
        );
        f.feed(scan_reply("0", &["c", "a"]));
        assert_eq!(f.take_output(), hmget_cmd("c") + &hmget_cmd("a"));
        assert!(!f.load.is_done());
        f.feed(link_reply("1", "https://m.example/a"));
        // b: deleted between SCAN and HMGET.
        f.feed("*9\r\n".to_string() + &"$-1\r\n".repeat(9));
        f.feed(link_reply("3", "https://m.example/c"));
        // a again (SCAN may repeat a key): handed out again, the cache keeps one.
        f.feed(link_reply("1", "https://m.example/a"));
        assert!(f.load.is_done());
        assert!(f.load.output().is_empty());
        assert_eq!(
            f.ids(),
            vec![("a".into(), 1), ("c".into(), 3), ("a".into(), 1)]
        );
    }

    #[test]
    fn no_auth_no_select_for_db_0() {
        let mut f = Fed::new(BulkLoad::new(None, None, 0, 2000));
        assert_eq!(f.take_output(), scan_cmd("0", 2000));
        let mut f = Fed::new(BulkLoad::new(None, Some("secret"), 0, 5));
        assert_eq!(
            f.take_output(),
            "*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n".to_string() + &scan_cmd("0", 5)
        );
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
        let whole = f.load.output().to_vec();
        f.load.wrote(3);
        assert_eq!(f.load.output(), &whole[3..]);
        f.load.wrote(whole.len() - 3);
        assert!(f.load.output().is_empty());
    }

    #[test]
    fn refused_auth_and_bad_scan_replies_end_the_load() {
        let mut f = Fed::new(BulkLoad::new(None, Some("wrong"), 0, 5));
        let err = f.refuse(b"-WRONGPASS invalid username-password pair\r\n");
        assert!(err.contains("AUTH: WRONGPASS"), "{err}");

        let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
        let err = f.refuse(b"-ERR invalid cursor\r\n");
        assert!(err.contains("SCAN: ERR invalid cursor"), "{err}");

        for bad in [
            b":1\r\n".as_slice(),
            b"*2\r\n$2\r\n1x\r\n*0\r\n",
            b"*2\r\n$1\r\n0\r\n*1\r\n$5\r\nother\r\n",
            b"*2\r\n$1\r\n0\r\n*1\r\n:5\r\n",
            b"*1\r\n$1\r\n0\r\n",
        ] {
            let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
            f.refuse(bad);
        }
    }

    #[test]
    fn unusable_hashes_are_skipped_and_the_load_goes_on() {
        let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
        f.feed(scan_reply("0", &["bad", "wrongtype", "notutf8", "good"]));
        // destination not a URL: parse_link refuses it.
        f.feed(link_reply("1", "nope"));
        f.feed("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        let mut not_utf8 = b"*9\r\n$1\r\n\xff\r\n".to_vec();
        not_utf8.extend_from_slice("$-1\r\n".repeat(8).as_bytes());
        f.feed(not_utf8);
        f.feed(link_reply("4", "https://m.example/?c={click_id}"));
        assert!(f.load.is_done());
        assert_eq!(f.ids(), vec![("good".into(), 4)], "only the good link");
    }

    #[test]
    fn a_key_that_is_not_utf8_is_skipped_before_its_hmget() {
        let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
        f.take_output();
        let mut reply = b"*2\r\n$1\r\n0\r\n*2\r\n$14\r\naffgate:link:\xff\r\n".to_vec();
        reply.extend_from_slice(b"$14\r\naffgate:link:z\r\n");
        f.feed(reply);
        assert_eq!(f.take_output(), hmget_cmd("z"), "no HMGET for the bad key");
        f.feed(link_reply("9", "https://m.example/z"));
        assert!(f.load.is_done());
        assert_eq!(f.ids(), vec![("z".into(), 9)]);
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error() {
        let mut f = Fed::new(BulkLoad::new(None, None, 0, 5));
        f.feed(scan_reply("0", &["x", "y"]));
        f.refuse(b"*2\r\n$1\r\n1\r\n$-1\r\n");
        f.refuse(b"*9\r\n:1\r\n:1\r\n:1\r\n:1\r\n:1\r\n:1\r\n:1\r\n:1\r\n:1\r\n");
        let err = f.refuse(b"+OK\r\n");
        assert!(err.contains("no command waiting"), "{err}");
    }

    #[test]
    fn decimal_writes_every_width() {
        for n in [0usize, 7, 10, 99, 100, 65_535, usize::MAX] {
            let mut out = Vec::new();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    /// The shell against a fake server on an in-memory pipe of 64 bytes:
    /// it must write the commands and read replies arriving a few bytes at
    /// a time.
    #[tokio::test]
    async fn drive_moves_bytes_both_ways_in_small_pieces() {
        let (client, mut server) = tokio::io::duplex(64);
        let load = BulkLoad::new(None, None, 0, 3);
        let task = tokio::spawn(async move {
            let mut links = Vec::new();
            drive(client, load, Duration::from_secs(5), &mut |s, l: Link| {
                links.push((s, l.link_id))
            })
            .await
            .map(|()| links)
        });
        let want = scan_cmd("0", 3);
        let mut got = vec![0u8; want.len()];
        server.read_exact(&mut got).await.expect("first SCAN");
        assert_eq!(String::from_utf8_lossy(&got), want);
        for chunk in scan_reply("0", &["a", "b"]).as_bytes().chunks(3) {
            server.write_all(chunk).await.expect("write");
        }
        let want = hmget_cmd("a") + &hmget_cmd("b");
        let mut got = vec![0u8; want.len()];
        server.read_exact(&mut got).await.expect("HMGETs");
        assert_eq!(String::from_utf8_lossy(&got), want);
        let replies =
            link_reply("1", "https://m.example/a") + &link_reply("2", "https://m.example/b");
        for chunk in replies.as_bytes().chunks(5) {
            server.write_all(chunk).await.expect("write");
        }
        let links = task.await.expect("task").expect("load");
        assert_eq!(links, vec![("a".into(), 1), ("b".into(), 2)]);
    }

    #[tokio::test]
    async fn drive_fails_on_a_closed_connection_and_on_a_stall() {
        let (client, server) = tokio::io::duplex(1 << 16);
        drop(server);
        let load = BulkLoad::new(None, None, 0, 3);
        let err = drive(client, load, Duration::from_secs(5), &mut |_, _| {})
            .await
            .expect_err("closed");
        assert!(format!("{err:#}").contains("redis"), "{err:#}");

        let (client, _server) = tokio::io::duplex(1 << 16);
        let load = BulkLoad::new(None, None, 0, 3);
        let err = drive(client, load, Duration::from_millis(50), &mut |_, _| {})
            .await
            .expect_err("stalled");
        assert!(format!("{err:#}").contains("no progress"), "{err:#}");
    }
}
