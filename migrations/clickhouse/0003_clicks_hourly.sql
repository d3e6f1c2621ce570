-- Hourly click counts per link, offer and affiliate for dashboards.
--
-- Counts are exact sets of click ids (uniqExact states), not sums, so a click
-- inserted twice (redelivery) is still counted once, before and after merges.
-- The materialized view sees only rows inserted after it exists: on a
-- database that already holds clicks, backfill with
--   INSERT INTO {db}.clicks_hourly SELECT ... FROM {db}.clicks (the view's SELECT).
--
-- Every expression is cast to the target column's exact type: a view whose
-- result types differ from its target fails each insert after the base rows
-- have landed (ClickHouse 18.16 does not convert).
CREATE TABLE IF NOT EXISTS {db}.clicks_hourly
(
    hour         DateTime('UTC'),
    link_id      UInt64,
    offer_id     UInt64,
    affiliate_id UInt64,
    clicks       AggregateFunction(uniqExact, String),
    quarantined  AggregateFunction(uniqExactIf, String, UInt8),
    fallbacks    AggregateFunction(uniqExactIf, String, UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, link_id, offer_id, affiliate_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.clicks_hourly_mv
TO {db}.clicks_hourly
AS SELECT
    toDateTime(toStartOfHour(ts), 'UTC')                     AS hour,
    toUInt64(link_id)                                         AS link_id,
    toUInt64(offer_id)                                        AS offer_id,
    toUInt64(affiliate_id)                                    AS affiliate_id,
    uniqExactState(toString(click_id))                        AS clicks,
    uniqExactIfState(toString(click_id), toUInt8(quarantined)) AS quarantined,
    uniqExactIfState(toString(click_id), toUInt8(fallback))    AS fallbacks
FROM {db}.clicks
GROUP BY hour, link_id, offer_id, affiliate_id;

-- Finished numbers for dashboards: distinct clicks per hour and key.
CREATE VIEW IF NOT EXISTS {db}.clicks_hourly_totals
AS SELECT
    hour,
    link_id,
    offer_id,
    affiliate_id,
    uniqExactMerge(clicks)        AS clicks,
    uniqExactIfMerge(quarantined) AS quarantined,
    uniqExactIfMerge(fallbacks)   AS fallbacks
FROM {db}.clicks_hourly
GROUP BY hour, link_id, offer_id, affiliate_id;
