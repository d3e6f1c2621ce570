-- The analysts' mirror of conversion events (PostgreSQL holds the money):
-- one row per postback dedup key, so a status change (pending -> approved
-- -> reversed) is a new row with the same conversion_key.
--
-- ReplacingMergeTree collapses redelivered copies only when they share the
-- partition and sorting key: the writer must use the event time recorded at
-- first receipt (the PostgreSQL inbox row's `ts`), never the time of a
-- redelivery, so every copy of an event is the same row.
CREATE TABLE IF NOT EXISTS {db}.conversions
(
    -- Raw 32-byte blake3 keys (affgate_schema::DedupKey); hex(dedup_key) to print.
    dedup_key      FixedString(32),
    conversion_key FixedString(32),
    click_id       String,
    -- When the edge received the postback, UTC.
    ts             DateTime('UTC'),
    ts_ms          UInt64,
    edge_id        UInt16,
    network_id     UInt64,
    txid           String,
    event          String,
    status         Enum8('approved' = 1, 'pending' = 2, 'rejected' = 3, 'reversed' = 4),
    -- NULL when the network sent no amount (the offer's payout applies).
    payout         Nullable(Decimal(18, 6)),
    -- ISO 4217.
    currency       FixedString(3),
    request_id     String,
    -- Attribution through the click id; 0 when the click is unknown.
    link_id        UInt64,
    offer_id       UInt64,
    affiliate_id   UInt64,
    -- When the collector wrote the row, Unix milliseconds.
    received_ms    UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY dedup_key;
