//! Heap allocations on the redirect hot path, counted, not timed: after a
//! warm-up, the plain listener's fast path (`http::fast::answer_one`: parse
//! the request with httparse, decide, mint, encode, append, write the 302
//! into the connection's output buffer) may allocate only the segment table
//! inside capnp's message builder (capnp 0.21 keeps a `Vec` of segments in
//! every `message::Builder` and has no way to reuse one; the segment itself
//! is the thread's scratch space). `Location` and `X-Request-Id` come from a
//! per-thread chunk, so they cost an allocation only once per chunk. The
//! connection's read and output buffers are allocated once per connection
//! (see docs/edge.md).
//!
//! A counting global allocator is process-wide, so this file holds one test.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use affgate_edge::http::fast::{Step, answer_one};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only
// counts allocations.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_fast_path_redirect_allocates_only_capnps_segment_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = common::app(
        dir.path(),
        64 << 20,
        "slug,link_id,destination\nabc,7,https://m.example/p?c={click_id}&s={sub1}&a={affiliate_id}\n",
        None,
    );
    let peer: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
    // What wrk or a browser sends: a slug, a sub, a few headers.
    let request: &[u8] = b"GET /c/abc?sub1=s1 HTTP/1.1\r\nHost: edge.example\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nReferer: https://ref.example/\r\n\
        Accept: */*\r\n\r\n";
    // Sixteen pipelined requests per read, as one buffer, answered into one output buffer.
    let input = request.repeat(16);
    let mut out = Vec::with_capacity(16 * 1024);
    let serve_batch = |out: &mut Vec<u8>| {
        out.clear();
        let mut at = 0;
        while at < input.len() {
            match answer_one(&app, peer, &input[at..], out, false) {
                Step::Answered { used, close } => {
                    assert!(!close, "HTTP/1.1 keeps alive");
                    at += used;
                }
                other => panic!("the fast path answers a cached redirect: {other:?}"),
            }
        }
    };
    // Warm up: thread-local buffers grow to size once.
    for _ in 0..10 {
        serve_batch(&mut out);
        let text = std::str::from_utf8(&out).expect("ascii");
        assert_eq!(text.matches("HTTP/1.1 302 Found\r\n").count(), 16, "{text}");
        assert_eq!(
            text.matches("\r\nlocation: https://m.example/p?c=").count(),
            16
        );
        assert_eq!(text.matches("\r\nx-request-id: ").count(), 16);
    }
    let batches = 1_000u64;
    let n = batches * 16;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..batches {
        serve_batch(&mut out);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let per_redirect = allocations as f64 / n as f64;
    eprintln!("allocations per redirect: {per_redirect:.4}");
    // Exactly one per redirect (capnp's segment table), plus two per 64 KiB
    // header chunk (the chunk and its shared handle) every few hundred.
    assert!(
        allocations >= n,
        "{per_redirect:.4} allocations per redirect: fewer than capnp's segment table? (the count is broken)"
    );
    assert!(
        per_redirect <= 1.01,
        "{per_redirect:.4} allocations per redirect; expected capnp's segment table and an amortised header chunk"
    );
}
