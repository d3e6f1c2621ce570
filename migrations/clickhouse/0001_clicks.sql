-- One row per click id. The edge's ring and the collector deliver at least
-- once, so the same click may be inserted more than once; all copies are
-- identical but for received_ms, share the sorting key, and collapse when
-- parts merge. Count with FINAL (or uniqExact(click_id), or the rollups).
--
-- Portable to ClickHouse 18.16 and current releases: no LowCardinality,
-- no IPv6 type, no DateTime64, no TTL, no codecs.
CREATE TABLE IF NOT EXISTS {db}.clicks
(
    click_id     String,
    -- When the edge answered the click: ts_ms / 1000, UTC.
    ts           DateTime('UTC'),
    -- The same instant in Unix milliseconds.
    ts_ms        UInt64,
    edge_id      UInt16,
    link_id      UInt64,
    offer_id     UInt64,
    affiliate_id UInt64,
    slug         String,
    -- The visitor's address as 16 bytes, IPv4 mapped into IPv6
    -- (::ffff:a.b.c.d). Read it with IPv6NumToString(ip); 18.16 has no IPv6 type.
    ip           FixedString(16),
    user_agent   String,
    referer      String,
    sub1         String,
    sub2         String,
    sub3         String,
    sub4         String,
    sub5         String,
    -- 1: the link was shadow-banned; the visitor was redirected as usual.
    quarantined  UInt8,
    -- 1: the visitor got a fallback destination (paused link, capped offer, Redis down).
    fallback     UInt8,
    -- When the collector wrote the row, Unix milliseconds: received_ms - ts_ms
    -- is the delivery lag.
    received_ms  UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, ts, click_id);
