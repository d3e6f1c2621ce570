#!/usr/bin/env python3
"""Run every ClickHouse migration through a current ClickHouse, in process.

The migrations in migrations/clickhouse/ must work on ClickHouse 18.16 (what
Debian ships; collector/tests/stores.rs runs them there) and on current
releases. PyPI's `chdb` embeds a current ClickHouse, so this script checks
the second half without a server:

    pip install chdb
    python3 tests/chdb/check_ddl.py

It applies the files in order the way `affgate-collector migrate` does
(comments dropped, statements split at `;`, `{db}` replaced by the database
name), each file a second time right after itself (a run that died before
recording a file runs it again from the top),
then inserts clicks and conversions, some twice, and checks that FINAL and
the hourly rollup count each click id once. Exit status 0 when every check
passed, 1 otherwise.
"""

import json
import pathlib
import re
import sys

try:
    import chdb
except ImportError:
    sys.exit("check_ddl: chdb is not installed: pip install chdb")

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "migrations" / "clickhouse"
DB = "affgate_chdb_check"


def split_statements(text):
    """The same rules as collector/src/migrate.rs split_statements."""
    out, cur, i, n = [], [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            cur.append(" ")
            i = j + 2
            continue
        if c in "'\"`":
            j = i + 1
            while True:
                if j >= n:
                    raise ValueError(f"unterminated {c}quote{c}")
                if text[j] == "\\":
                    j += 2
                    continue
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        if c == ";":
            stmt = "".join(cur).strip()
            if stmt:
                out.append(stmt)
            cur = []
        else:
            cur.append(c)
        i += 1
    stmt = "".join(cur).strip()
    if stmt:
        out.append(stmt)
    return out


class Checks:
    def __init__(self, conn):
        self.conn = conn
        self.passed = 0
        self.failed = 0

    def q(self, sql):
        return str(self.conn.query(sql, "TabSeparated")).strip()

    def check(self, what, got, want):
        if got == want:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed += 1
            print(f"FAIL  {what}: got {got!r}, want {want!r}")


def click(click_id, ts, link_id, quarantined=0, fallback=0, ip="::ffff:1.2.3.4"):
    return (
        f"('{click_id}', toDateTime({ts}, 'UTC'), {ts * 1000 + 123}, 1, {link_id}, 10, 20, "
        f"'slug{link_id}', IPv6StringToNum('{ip}'), 'ua', '', 's1', '', '', '', '', "
        f"{quarantined}, {fallback}, {ts * 1000 + 500})"
    )


CLICK_COLUMNS = (
    "click_id, ts, ts_ms, edge_id, link_id, offer_id, affiliate_id, slug, ip, "
    "user_agent, referer, sub1, sub2, sub3, sub4, sub5, quarantined, fallback, received_ms"
)


def main():
    conn = chdb.connect(":memory:")
    c = Checks(conn)
    print(f"check_ddl: ClickHouse {c.q('SELECT version()')} (chdb {chdb.__version__})")

    files = sorted(MIGRATIONS.glob("*.sql"))
    if not files:
        sys.exit(f"check_ddl: no migrations in {MIGRATIONS}")
    c.q(f"CREATE DATABASE IF NOT EXISTS {DB}")
    # Each file twice before the next, as the runner does when a run died
    # before recording a file: it runs that file again from the top, and no
    # later file has run yet.
    for f in files:
        for round_ in (1, 2):
            for i, sql in enumerate(split_statements(f.read_text().replace("{db}", DB)), 1):
                try:
                    conn.query(sql)
                except Exception as e:  # chdb raises its own error type
                    c.failed += 1
                    print(f"FAIL  {f.name} statement {i} (round {round_}): {e}")
                    print(f"      {sql.splitlines()[0]}")
    c.check("all migrations applied, each twice", c.failed, 0)
    if c.failed:
        print(f"check_ddl: {c.passed} passed, {c.failed} failed")
        return 1

    # ClickHouse 18.16 does not convert a materialized view's result to its
    # target's column types (the insert fails after the base rows landed);
    # current releases do, so compare the types here, strictly.
    views = conn.query(
        f"SELECT name, as_select, create_table_query FROM system.tables "
        f"WHERE database = '{DB}' AND engine = 'MaterializedView'",
        "JSONEachRow",
    )
    views = [json.loads(line) for line in str(views).splitlines() if line.strip()]
    c.check("materialized views found", len(views) > 0, True)
    for v in views:
        m = re.search(r"\bTO\s+([\w.`]+)", v["create_table_query"])
        if not m:
            c.check(f"{v['name']} writes TO a table", False, True)
            continue
        target = m.group(1).replace("`", "").split(".")[-1]
        got = c.q(f"DESCRIBE TABLE ({v['as_select']})")
        got = [tuple(line.split("\t")[:2]) for line in got.splitlines()]
        want = c.q(
            f"SELECT name, type FROM system.columns WHERE database = '{DB}' "
            f"AND table = '{target}' ORDER BY position"
        )
        want = [tuple(line.split("\t")) for line in want.splitlines()]
        c.check(f"{v['name']} result types equal {target}'s columns", sorted(got), sorted(want))

    # The runner's bookkeeping insert.
    for _ in range(2):
        c.q(
            f"INSERT INTO {DB}.affgate_migrations (version, name, checksum, applied_at) "
            "VALUES (1, '0001_clicks.sql', 'abc', now())"
        )
    c.check(
        "affgate_migrations FINAL keeps one row per version",
        c.q(f"SELECT count() FROM {DB}.affgate_migrations FINAL"),
        "1",
    )

    # Clicks: 4 distinct ids over two hours and two links, in three inserts
    # that repeat some of them, as redelivery does.
    h0 = 1_700_000_000 - 1_700_000_000 % 3600
    batch1 = [click("c1", h0 + 10, 1), click("c2", h0 + 20, 1, quarantined=1)]
    batch2 = batch1 + [click("c3", h0 + 3600 + 5, 2, fallback=1, ip="2001:db8::1")]
    batch3 = [click("c4", h0 + 30, 1), click("c1", h0 + 10, 1)]
    for b in (batch1, batch2, batch3):
        c.q(f"INSERT INTO {DB}.clicks ({CLICK_COLUMNS}) VALUES {', '.join(b)}")

    c.check("clicks FINAL counts each click id once", c.q(f"SELECT count() FROM {DB}.clicks FINAL"), "4")
    c.check(
        "rollup counts distinct clicks despite duplicate inserts",
        c.q(f"SELECT uniqExactMerge(clicks) FROM {DB}.clicks_hourly"),
        "4",
    )
    def totals():
        return c.q(
            f"SELECT hour, link_id, clicks, quarantined, fallbacks FROM {DB}.clicks_hourly_totals "
            "ORDER BY hour, link_id"
        ).replace("\t", " ")

    want_totals = "2023-11-14 22:00:00 1 3 1 0\n2023-11-14 23:00:00 2 1 0 1"
    c.check("rollup per hour and link", totals(), want_totals)
    c.q(f"OPTIMIZE TABLE {DB}.clicks FINAL")
    c.q(f"OPTIMIZE TABLE {DB}.clicks_hourly FINAL")
    c.check("clicks after merge", c.q(f"SELECT count() FROM {DB}.clicks"), "4")
    c.check(
        "rollup after merge",
        c.q(f"SELECT sum(clicks) FROM {DB}.clicks_hourly_totals"),
        "4",
    )
    # 0004 rebuilds the rollup from clicks: run it again on a database that
    # holds clicks, and the totals are the same.
    rebuild = MIGRATIONS / "0004_clicks_hourly_flags.sql"
    for sql in split_statements(rebuild.read_text().replace("{db}", DB)):
        conn.query(sql)
    c.check("rollup rebuilt from clicks by 0004", totals(), want_totals)
    c.check(
        "ip reads back as text",
        c.q(f"SELECT IPv6NumToString(ip) FROM {DB}.clicks FINAL WHERE click_id IN ('c1', 'c3') ORDER BY click_id"),
        "::ffff:1.2.3.4\n2001:db8::1",
    )
    c.check(
        "month partition in UTC",
        c.q(f"SELECT DISTINCT partition FROM system.parts WHERE database = '{DB}' AND table = 'clicks' AND active"),
        "202311",
    )

    # Conversions: the same event twice collapses; a status change is a new row.
    conv = (
        f"INSERT INTO {DB}.conversions (dedup_key, conversion_key, click_id, ts, ts_ms, edge_id, "
        "network_id, txid, event, status, payout, currency, request_id, link_id, offer_id, "
        "affiliate_id, received_ms) VALUES "
        "(unhex(repeat('aa', 32)), unhex(repeat('cc', 32)), 'c1', toDateTime({ts}, 'UTC'), {ts}000, 1, 7, "
        "'T-1', 'conversion', '{status}', {payout}, 'USD', 'r1', 1, 10, 20, {ts}500)"
    )
    for _ in range(2):
        c.q(conv.format(ts=h0 + 100, status="pending", payout="12.5"))
    c.q(conv.format(ts=h0 + 200, status="approved", payout="NULL").replace("repeat('aa', 32)", "repeat('bb', 32)"))
    c.check("conversions FINAL: one row per dedup key", c.q(f"SELECT count() FROM {DB}.conversions FINAL"), "2")
    c.check(
        "conversion status, payout and currency types",
        c.q(
            f"SELECT status, payout, toTypeName(payout), currency FROM {DB}.conversions FINAL ORDER BY ts"
        ).replace("\t", " "),
        "pending 12.5 Nullable(Decimal(18, 6)) USD\napproved \\N Nullable(Decimal(18, 6)) USD",
    )

    c.q(f"DROP DATABASE {DB}")
    print(f"check_ddl: {c.passed} passed, {c.failed} failed")
    return 0 if c.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
