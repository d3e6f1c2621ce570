-- The postback inbox: every postback the collector received, once per
-- dedup key (affgate_schema::DedupKey::for_postback over network, click id,
-- txid, event and status). The collector inserts with
-- ON CONFLICT (dedup_key) DO NOTHING, so redelivered batches change nothing;
-- conversion processing reads the rows with processed_at IS NULL, in event
-- time order, and sets processed_at when it has recorded them.
CREATE TABLE IF NOT EXISTS postback_inbox (
    dedup_key    bytea        PRIMARY KEY CHECK (octet_length(dedup_key) = 32),
    -- When the collector committed the row (the transaction's start).
    received_at  timestamptz  NOT NULL DEFAULT now(),
    -- Where it came from: the edge and its ring sequence number.
    edge_id      integer      NOT NULL CHECK (edge_id BETWEEN 0 AND 65535),
    seq          bigint       NOT NULL,
    network_id   bigint       NOT NULL,
    click_id     text         NOT NULL,
    txid         text         NOT NULL,
    event        text         NOT NULL,
    status       text         NOT NULL
                 CHECK (status IN ('approved', 'pending', 'rejected', 'reversed')),
    -- NULL: the network sent no amount, the offer's payout applies.
    payout       numeric(18, 6) CHECK (payout >= 0),
    -- ISO 4217.
    currency     char(3)      NOT NULL,
    request_id   text         NOT NULL,
    -- When the edge received the postback.
    ts           timestamptz  NOT NULL,
    processed_at timestamptz
);

-- The work queue: unprocessed rows, oldest event first. Partial, so it holds
-- only the backlog, however large the table grows.
CREATE INDEX IF NOT EXISTS postback_inbox_unprocessed
    ON postback_inbox (ts)
    WHERE processed_at IS NULL;
