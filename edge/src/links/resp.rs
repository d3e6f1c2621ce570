//! RESP2 replies read in place from a byte buffer, for the bulk link load
//! (`links::bulk`): no intermediate values, no allocation per reply.
//!
//! ```text
//! +OK\r\n                      simple string      Frame::Simple(b"OK")
//! -ERR unknown command\r\n     error              Frame::Error(b"ERR unknown command")
//! :42\r\n                      integer            Frame::Integer(42)
//! $5\r\nhello\r\n              bulk string        Frame::Bulk(Some(b"hello"))
//! $-1\r\n                      nil bulk string    Frame::Bulk(None)
//! *2\r\n<frame><frame>         array              Frame::Array(Some(..)), elements read lazily
//! *-1\r\n                      nil array          Frame::Array(None)
//! ```
//!
//! Invariants:
//! - [`parse`] returns a frame only once all of its bytes are in the buffer
//!   (arrays included, to the last element), so a caller can hand out
//!   `&str`s into the buffer and drop the frame before reading more;
//!   `Ok(None)` means "read more and call again from the same start".
//! - Nothing is allocated from a length on the wire: a bulk length or an
//!   array count only says how far to look. A frame that would be longer
//!   than [`MAX_FRAME`] bytes is an error as soon as its header says so
//!   (or the buffer outgrows it), so a hostile or corrupt length cannot
//!   make the reader buffer without bound. Arrays nest at most
//!   [`MAX_DEPTH`] deep (SCAN's reply is two), so parsing cannot overflow
//!   the stack.

/// Longest reply frame accepted, in bytes. A bulk load's largest frame is
/// one SCAN reply (a few thousand keys, well under 1 MiB).
pub const MAX_FRAME: usize = 64 << 20;

/// Deepest array nesting accepted (SCAN: an array holding an array).
pub const MAX_DEPTH: usize = 4;

/// Why a reply could not be read. None of these can be fixed by reading
/// more: the connection is out of step and must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    #[error("reply frame over {MAX_FRAME} bytes")]
    TooLarge,
    #[error("reply nested deeper than {MAX_DEPTH} arrays")]
    TooDeep,
}

/// One complete reply, borrowing the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Integer(i64),
    /// `None`: the nil bulk string (`$-1`), e.g. a hash field that is not set.
    Bulk(Option<&'a [u8]>),
    /// `None`: the nil array (`*-1`).
    Array(Option<Array<'a>>),
}

/// An array whose elements are all in the buffer, read one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Array<'a> {
    len: usize,
    depth: usize,
    /// The elements' bytes, exactly.
    body: &'a [u8],
}

impl<'a> Array<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> Elements<'a> {
        Elements {
            left: self.len,
            depth: self.depth,
            rest: self.body,
        }
    }
}

/// The elements of an [`Array`], in order.
#[derive(Debug, Clone)]
pub struct Elements<'a> {
    left: usize,
    depth: usize,
    rest: &'a [u8],
}

impl<'a> Iterator for Elements<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.left == 0 {
            return None;
        }
        // `parse` already read every element of this body once, so this
        // cannot fail; if it somehow did, the iterator ends early and the
        // caller's element count check reports the mismatch.
        let (frame, used) = parse_at(self.rest, self.depth).ok().flatten()?;
        self.rest = &self.rest[used..];
        self.left -= 1;
        Some(frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// The frame at the start of `buf` and its length in bytes, `Ok(None)` if
/// `buf` holds only part of it.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, RespError> {
    match parse_at(buf, 0)? {
        Some(done) => Ok(Some(done)),
        // Incomplete: it will only get longer, so a buffer already past
        // the limit is a frame past the limit.
        None if buf.len() > MAX_FRAME => Err(RespError::TooLarge),
        None => Ok(None),
    }
}

/// `parse` for a frame nested `depth` arrays deep.
fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Frame<'_>, usize)>, RespError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((line, after)) = line(&buf[1..])? else {
        return Ok(None);
    };
    let header = 1 + after;
    match kind {
        b'+' => Ok(Some((Frame::Simple(line), header))),
        b'-' => Ok(Some((Frame::Error(line), header))),
        b':' => Ok(Some((Frame::Integer(integer(line)?), header))),
        b'$' => {
            let n = integer(line)?;
            if n == -1 {
                return Ok(Some((Frame::Bulk(None), header)));
            }
            let n = length(n)?;
            let end = header + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Malformed("bulk string not followed by CRLF"));
            }
            Ok(Some((Frame::Bulk(Some(&buf[header..end])), end + 2)))
        }
        b'*' => {
            let n = integer(line)?;
            if n == -1 {
                return Ok(Some((Frame::Array(None), header)));
            }
            let n = length(n)?;
            // Every element takes at least 3 bytes (`+\r\n`): a count that
            // cannot fit in a frame of MAX_FRAME is refused before any wait.
            if n > MAX_FRAME / 3 {
                return Err(RespError::TooLarge);
            }
            if depth + 1 > MAX_DEPTH {
                return Err(RespError::TooDeep);
            }
            let mut at = header;
            for _ in 0..n {
                match parse_at(&buf[at..], depth + 1)? {
                    Some((_, used)) => at += used,
                    None => return Ok(None),
                }
            }
            let array = Array {
                len: n,
                depth: depth + 1,
                body: &buf[header..at],
            };
            Ok(Some((Frame::Array(Some(array)), at)))
        }
        _ => Err(RespError::Malformed("unknown reply type byte")),
    }
}

/// The line at the start of `buf` (without its CRLF) and the offset just
/// past the CRLF, `Ok(None)` if the CRLF has not arrived yet.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, RespError> {
    let Some(cr) = buf.iter().position(|&b| b == b'\r') else {
        return if buf.len() > MAX_FRAME {
            Err(RespError::TooLarge)
        } else {
            Ok(None)
        };
    };
    match buf.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((&buf[..cr], cr + 2))),
        Some(_) => Err(RespError::Malformed("CR not followed by LF")),
    }
}

/// A decimal integer line: optional `-`, then 1 to 19 digits.
fn integer(line: &[u8]) -> Result<i64, RespError> {
    let (negative, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(RespError::Malformed("bad integer"));
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(RespError::Malformed("bad integer"));
        }
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(d - b'0')))
            .ok_or(RespError::Malformed("integer out of range"))?;
    }
    Ok(if negative { -v } else { v })
}

/// A bulk length or array count: 0 up to [`MAX_FRAME`].
fn length(n: i64) -> Result<usize, RespError> {
    if n < 0 {
        return Err(RespError::Malformed("negative length"));
    }
    match usize::try_from(n) {
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(RespError::TooLarge),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reply as an owned tree, to compare and to encode in tests.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Simple(Vec<u8>),
        Error(Vec<u8>),
        Integer(i64),
        Bulk(Option<Vec<u8>>),
        Array(Option<Vec<Owned>>),
    }

    fn own(f: Frame<'_>) -> Owned {
        match f {
            Frame::Simple(s) => Owned::Simple(s.to_vec()),
            Frame::Error(s) => Owned::Error(s.to_vec()),
            Frame::Integer(i) => Owned::Integer(i),
            Frame::Bulk(b) => Owned::Bulk(b.map(<[u8]>::to_vec)),
            Frame::Array(a) => Owned::Array(a.map(|a| {
                let v: Vec<Owned> = a.iter().map(own).collect();
                assert_eq!(v.len(), a.len(), "iterator yields every element");
                v
            })),
        }
    }

    fn encode(o: &Owned, out: &mut Vec<u8>) {
        match o {
            Owned::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Owned::Error(s) => {
                out.push(b'-');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Owned::Integer(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Owned::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Owned::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Owned::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Owned::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    fn parse_all(mut buf: &[u8]) -> Vec<Owned> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (f, used) = parse(buf)
                .expect("well-formed")
                .expect("complete in the test buffer");
            out.push(own(f));
            buf = &buf[used..];
        }
        out
    }

    /// SCAN's reply: the next cursor, then the keys.
    const SCAN: &[u8] =
        b"*2\r\n$4\r\n1792\r\n*3\r\n$14\r\naffgate:link:a\r\n$14\r\naffgate:link:b\r\n$0\r\n\r\n";
    /// HMGET of three fields, the second not set.
    const HMGET: &[u8] = b"*3\r\n$1\r\n7\r\n$-1\r\n$19\r\nhttps://m.example/x\r\n";

    #[test]
    fn reads_each_kind() {
        let got = parse_all(b"+OK\r\n-ERR unknown command 'X'\r\n:-42\r\n$-1\r\n*-1\r\n*0\r\n");
        assert_eq!(
            got,
            vec![
                Owned::Simple(b"OK".to_vec()),
                Owned::Error(b"ERR unknown command 'X'".to_vec()),
                Owned::Integer(-42),
                Owned::Bulk(None),
                Owned::Array(None),
                Owned::Array(Some(vec![])),
            ]
        );
    }

    #[test]
    fn reads_scan_and_hmget_replies() {
        let mut buf = SCAN.to_vec();
        buf.extend_from_slice(HMGET);
        let got = parse_all(&buf);
        let b = |s: &str| Owned::Bulk(Some(s.as_bytes().to_vec()));
        assert_eq!(
            got,
            vec![
                Owned::Array(Some(vec![
                    b("1792"),
                    Owned::Array(Some(vec![b("affgate:link:a"), b("affgate:link:b"), b("")])),
                ])),
                Owned::Array(Some(vec![
                    b("7"),
                    Owned::Bulk(None),
                    b("https://m.example/x")
                ])),
            ]
        );
    }

    #[test]
    fn bulk_strings_may_hold_crlf() {
        let got = parse_all(b"$4\r\n\r\n\r\n\r\n");
        assert_eq!(got, vec![Owned::Bulk(Some(b"\r\n\r\n".to_vec()))]);
    }

    #[test]
    fn every_split_point_waits_then_reads_the_same() {
        for whole in [
            SCAN,
            HMGET,
            b"-ERR wrong\r\n".as_slice(),
            b":12\r\n",
            b"$-1\r\n",
        ] {
            let (frame, used) = parse(whole).expect("ok").expect("complete");
            assert_eq!(used, whole.len(), "one frame spans the input");
            let want = own(frame);
            for cut in 0..whole.len() {
                assert_eq!(
                    parse(&whole[..cut]),
                    Ok(None),
                    "{} bytes of {:?} are incomplete",
                    cut,
                    String::from_utf8_lossy(whole)
                );
                // The read buffer then grows to the whole frame (and more).
                let mut grown = whole[..cut].to_vec();
                grown.extend_from_slice(&whole[cut..]);
                grown.extend_from_slice(b"+NEXT\r\n");
                let (f, used) = parse(&grown).expect("ok").expect("complete");
                assert_eq!((own(f), used), (want.clone(), whole.len()));
            }
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_wait() {
        for bad in [
            b"?x\r\n".as_slice(),
            b"+OK\rX",
            b":12a\r\n",
            b":\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"*-5\r\n",
            b":99999999999999999999\r\n",
            b"$1\r\nx\n\r",
        ] {
            assert!(
                matches!(parse(bad), Err(RespError::Malformed(_))),
                "{:?} must be refused: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_any_wait() {
        // Each header alone claims more than MAX_FRAME: refused at once,
        // so the caller never buffers towards it.
        for bad in [
            format!("${}\r\n", MAX_FRAME + 1),
            format!("*{}\r\n", MAX_FRAME),
            format!("${}\r\n", i64::MAX),
            format!("*{}\r\n", i64::MAX),
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(RespError::TooLarge), "{bad}");
        }
        // Legal headers whose bodies never come: the buffer may not grow
        // past MAX_FRAME waiting.
        let mut big = format!("${MAX_FRAME}\r\n").into_bytes();
        big.resize(MAX_FRAME + 1, b'x');
        assert_eq!(parse(&big), Err(RespError::TooLarge));
        let mut line = b"+".to_vec();
        line.resize(MAX_FRAME + 2, b'x');
        assert_eq!(parse(&line), Err(RespError::TooLarge));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let ok = "*1\r\n".repeat(MAX_DEPTH) + ":1\r\n";
        assert!(parse(ok.as_bytes()).expect("ok").is_some());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(parse(deep.as_bytes()), Err(RespError::TooDeep));
        // A million levels would overflow the stack if depth were unchecked.
        let hostile = "*1\r\n".repeat(1_000_000);
        assert_eq!(parse(hostile.as_bytes()), Err(RespError::TooDeep));
    }

    fn owned_strategy() -> impl Strategy<Value = Owned> {
        let bytes = prop::collection::vec(any::<u8>(), 0..40);
        let line = prop::collection::vec(any::<u8>().prop_filter("no CR", |b| *b != b'\r'), 0..20);
        let leaf = prop_oneof![
            line.clone().prop_map(Owned::Simple),
            line.prop_map(Owned::Error),
            any::<i64>()
                .prop_filter("i64::MIN has no positive", |i| *i != i64::MIN)
                .prop_map(Owned::Integer),
            prop::option::of(bytes).prop_map(Owned::Bulk),
            Just(Owned::Array(None)),
        ];
        leaf.prop_recursive(MAX_DEPTH as u32 - 1, 48, 6, |inner| {
            prop::collection::vec(inner, 0..6).prop_map(|v| Owned::Array(Some(v)))
        })
    }

    proptest! {
        #[test]
        fn round_trips_and_waits_at_every_cut(frames in prop::collection::vec(owned_strategy(), 1..4)) {
            let mut buf = Vec::new();
            for f in &frames {
                encode(f, &mut buf);
            }
            prop_assert_eq!(parse_all(&buf), frames.clone());
            let mut first = Vec::new();
            encode(&frames[0], &mut first);
            for cut in 0..first.len() {
                prop_assert_eq!(parse(&buf[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some((f, used))) = parse(&buf) {
                prop_assert!(used <= buf.len());
                let _ = own(f);
            }
        }
    }
}
