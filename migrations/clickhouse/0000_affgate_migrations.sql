-- Bookkeeping for `affgate-collector migrate`: one row per applied
-- migration file. The runner executes this file before every run (it is not
-- recorded itself). ReplacingMergeTree on the version, so two runs racing
-- to record the same file leave one row after a merge; readers use FINAL.
CREATE TABLE IF NOT EXISTS {db}.affgate_migrations
(
    version    UInt32,
    name       String,
    -- blake3 of the file, hex: a file changed after it was applied is refused.
    checksum   String,
    applied_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY version;
