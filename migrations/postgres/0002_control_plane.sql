-- The control plane and the ledger: networks, offers, the affiliate tree,
-- links, and the conversions with their events and commissions.
--
-- Money is numeric(18, 6) everywhere (the edge and the wire carry i64
-- micro-units, so six decimals hold every amount exactly); never floats.
-- Every uniqueness the money depends on is a constraint here, so two
-- collectors processing the same postbacks at once cannot double-count:
-- conversion_events on the postback's dedup key, conversions on the
-- conversion key, commissions on (conversion, level).

-- ltree is a trusted extension (PostgreSQL 13+): the database owner may
-- create it.
CREATE EXTENSION IF NOT EXISTS ltree;

CREATE TABLE IF NOT EXISTS networks (
    id             bigserial    PRIMARY KEY,
    name           text         NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- The plaintext token stays in the ledger database (it is needed to
    -- re-derive Redis's keyed hash after a secret rotation); Redis only
    -- ever sees the hash. The API returns it once, on creation.
    postback_token text         NOT NULL UNIQUE CHECK (length(postback_token) BETWEEN 8 AND 200),
    created_at     timestamptz  NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS offers (
    id                      bigserial      PRIMARY KEY,
    name                    text           NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    network_id              bigint         NOT NULL REFERENCES networks (id),
    payout                  numeric(18, 6) NOT NULL CHECK (payout >= 0),
    currency                char(3)        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Fractions of the payout per level: [0] the converting affiliate,
    -- [1] its parent, ... Each in [0, 1], together at most 1.
    commission_levels       numeric(7, 6)[] NOT NULL
                            CHECK (cardinality(commission_levels) BETWEEN 1 AND 10),
    -- Conversions per UTC day before the offer is capped; NULL: no cap.
    daily_cap               integer        CHECK (daily_cap > 0),
    attribution_window_days integer        NOT NULL DEFAULT 30
                            CHECK (attribution_window_days BETWEEN 1 AND 3650),
    fallback_url            text,
    -- Operator's switch; `capped` is not a status here but derived from
    -- capped_on (see offer_daily).
    status                  text           NOT NULL DEFAULT 'active'
                            CHECK (status IN ('active', 'paused')),
    -- The UTC day the offer reached its cap; the offer is capped while this
    -- is today, and reopens on the next day.
    capped_on               date,
    -- Bumped on every change that edges see (Redis writes are guarded by it).
    version                 bigint         NOT NULL DEFAULT 1,
    created_at              timestamptz    NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS affiliates (
    id           bigserial   PRIMARY KEY,
    name         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    parent_id    bigint      REFERENCES affiliates (id),
    -- The referral tree: root id . ... . parent id . own id (labels are the
    -- decimal ids, which sqlx's ltree rules accept).
    path         ltree       NOT NULL UNIQUE,
    postback_url text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS affiliates_path_gist ON affiliates USING gist (path);

CREATE TABLE IF NOT EXISTS links (
    -- Link ids travel in click ids as 40 bits.
    id            bigserial   PRIMARY KEY CHECK (id <= 1099511627775),
    slug          text        NOT NULL UNIQUE
                  CHECK (slug ~ '^[A-Za-z0-9._-]{1,128}$'),
    offer_id      bigint      NOT NULL REFERENCES offers (id),
    affiliate_id  bigint      NOT NULL REFERENCES affiliates (id),
    destination   text        NOT NULL,
    redirect_code smallint    NOT NULL DEFAULT 302 CHECK (redirect_code IN (301, 302, 307, 308)),
    status        text        NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'paused', 'shadow_banned')),
    version       bigint      NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS links_offer ON links (offer_id);
CREATE INDEX IF NOT EXISTS links_affiliate ON links (affiliate_id);

-- One row per conversion (network, click id, txid, event): its current status.
CREATE TABLE IF NOT EXISTS conversions (
    id             bigserial      PRIMARY KEY,
    -- affgate_schema::DedupKey::for_conversion.
    conversion_key bytea          NOT NULL UNIQUE CHECK (octet_length(conversion_key) = 32),
    click_id       text           NOT NULL,
    network_id     bigint         NOT NULL REFERENCES networks (id),
    txid           text           NOT NULL,
    event          text           NOT NULL,
    link_id        bigint         NOT NULL,
    offer_id       bigint         NOT NULL REFERENCES offers (id),
    affiliate_id   bigint         NOT NULL REFERENCES affiliates (id),
    -- pending/approved/rejected/reversed follow the network's postbacks;
    -- quarantined (shadow-banned click), capped (over the offer's daily
    -- cap) and expired (after the attribution window) are decided once, at
    -- the first postback, and earn nothing.
    status         text           NOT NULL
                   CHECK (status IN ('pending', 'approved', 'rejected', 'reversed',
                                     'quarantined', 'capped', 'expired')),
    payout         numeric(18, 6) NOT NULL CHECK (payout >= 0),
    currency       char(3)        NOT NULL,
    click_ts       timestamptz    NOT NULL,
    -- Event time (edge receive) of the first postback.
    converted_at   timestamptz    NOT NULL,
    created_at     timestamptz    NOT NULL DEFAULT now(),
    updated_at     timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversions_click ON conversions (click_id);
CREATE INDEX IF NOT EXISTS conversions_affiliate ON conversions (affiliate_id, id);

-- Every postback that reached a conversion, once per dedup key, with what
-- it did to the conversion.
CREATE TABLE IF NOT EXISTS conversion_events (
    id            bigserial      PRIMARY KEY,
    -- affgate_schema::DedupKey::for_postback (same as postback_inbox's).
    dedup_key     bytea          NOT NULL UNIQUE CHECK (octet_length(dedup_key) = 32),
    conversion_id bigint         NOT NULL REFERENCES conversions (id),
    -- The status the postback asked for.
    status        text           NOT NULL
                  CHECK (status IN ('approved', 'pending', 'rejected', 'reversed')),
    payout        numeric(18, 6),
    currency      char(3)        NOT NULL,
    -- The conversion's status before and after this event (equal when the
    -- transition was not allowed, e.g. approved -> pending).
    status_before text,
    status_after  text           NOT NULL,
    applied       boolean        NOT NULL,
    edge_id       integer        NOT NULL,
    seq           bigint         NOT NULL,
    request_id    text           NOT NULL,
    ts            timestamptz    NOT NULL,
    recorded_at   timestamptz    NOT NULL DEFAULT now(),
    -- Set once the event is in ClickHouse's conversions mirror.
    mirrored_at   timestamptz
);
CREATE INDEX IF NOT EXISTS conversion_events_conversion ON conversion_events (conversion_id);
CREATE INDEX IF NOT EXISTS conversion_events_unmirrored
    ON conversion_events (id) WHERE mirrored_at IS NULL;

-- One row per affiliate and level of a conversion. The amount is the
-- split of the conversion's payout (see docs/conversions.md for the
-- rounding rule); it earns while status = 'approved'.
CREATE TABLE IF NOT EXISTS commissions (
    conversion_id bigint         NOT NULL REFERENCES conversions (id),
    level         smallint       NOT NULL CHECK (level >= 0),
    affiliate_id  bigint         NOT NULL REFERENCES affiliates (id),
    rate          numeric(7, 6)  NOT NULL,
    amount        numeric(18, 6) NOT NULL CHECK (amount >= 0),
    currency      char(3)        NOT NULL,
    status        text           NOT NULL
                  CHECK (status IN ('pending', 'approved', 'rejected', 'reversed')),
    updated_at    timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (conversion_id, level)
);
CREATE INDEX IF NOT EXISTS commissions_affiliate ON commissions (affiliate_id);

-- Conversions counted against an offer's daily cap, per UTC day. The row is
-- locked (SELECT ... FOR UPDATE) while a conversion is decided, so
-- concurrent collectors count each slot once.
CREATE TABLE IF NOT EXISTS offer_daily (
    offer_id    bigint  NOT NULL REFERENCES offers (id),
    day         date    NOT NULL,
    conversions integer NOT NULL DEFAULT 0,
    PRIMARY KEY (offer_id, day)
);

-- Clicks the edge marked quarantined (shadow-banned link), written by the
-- ingest window with the clicks, so a later conversion of one earns nothing.
CREATE TABLE IF NOT EXISTS quarantined_clicks (
    click_id text        PRIMARY KEY,
    ts       timestamptz NOT NULL
);

-- What conversion processing made of each inbox row: `recorded`, or why
-- not (`network_mismatch`, `unknown_link`, `bad_click_id`, ...).
ALTER TABLE postback_inbox ADD COLUMN IF NOT EXISTS outcome text;
