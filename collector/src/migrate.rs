//! `affgate-collector migrate`: brings ClickHouse and PostgreSQL to the
//! schema this binary writes. Idempotent: run it at every deploy.
//!
//! Both sets of files are compiled into the binary, so it needs no
//! migrations directory at run time.
//!
//! PostgreSQL (`migrations/postgres/<VERSION>_<DESCRIPTION>.sql`): sqlx's
//! migrator, which records applied versions and their checksums in
//! `_sqlx_migrations`, runs each file in a transaction, and holds an
//! advisory lock so concurrent runs wait for each other.
//!
//! ClickHouse (`migrations/clickhouse/NNNN_name.sql`): ClickHouse has no
//! transactions and its HTTP interface takes one statement per request, so
//! this module's runner:
//! 1. creates the database (`CREATE DATABASE IF NOT EXISTS`);
//! 2. runs `0000_affgate_migrations.sql`, the bookkeeping table, every time;
//! 3. for every later file not yet recorded there, runs its statements in
//!    order, then records the file's version, name and blake3 checksum.
//!
//! A run that died between a file's statements (or before recording it) is
//! repaired by the next run, which runs the whole file again: every
//! statement is `CREATE ... IF NOT EXISTS`, except in a file that rebuilds a
//! table derived from `clicks` (`0004_clicks_hourly_flags.sql`), which first
//! drops it (`DROP ... IF EXISTS`) and then fills it again with
//! `INSERT ... SELECT ... FROM clicks`, so running it again from the top
//! gives the same table. In the files, `{db}` stands for the configured database
//! (checked to be a plain identifier) and qualifies every table name, so a
//! materialized view never depends on a session's current database. A file
//! changed after it was applied is refused, as sqlx does for PostgreSQL.

use anyhow::{Context, bail};
use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

use crate::config::{ClickHouseConfig, is_plain_identifier};
use crate::store::clickhouse::client;

/// The PostgreSQL migrations, embedded at build time (`build.rs` reruns the
/// build when the directory changes).
pub static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");

/// The ClickHouse migrations, in order. A unit test checks this list
/// against the directory, so a new file cannot be forgotten here.
pub const CLICKHOUSE: &[(&str, &str)] = &[
    (
        "0000_affgate_migrations.sql",
        include_str!("../../migrations/clickhouse/0000_affgate_migrations.sql"),
    ),
    (
        "0001_clicks.sql",
        include_str!("../../migrations/clickhouse/0001_clicks.sql"),
    ),
    (
        "0002_conversions.sql",
        include_str!("../../migrations/clickhouse/0002_conversions.sql"),
    ),
    (
        "0003_clicks_hourly.sql",
        include_str!("../../migrations/clickhouse/0003_clicks_hourly.sql"),
    ),
    (
        "0004_clicks_hourly_flags.sql",
        include_str!("../../migrations/clickhouse/0004_clicks_hourly_flags.sql"),
    ),
];

/// What one run did: file names applied now, and already applied before.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub applied: Vec<String>,
    pub already: Vec<String>,
}

/// Applies the ClickHouse migrations to `cfg.database`, creating it first.
pub async fn clickhouse(cfg: &ClickHouseConfig) -> anyhow::Result<Report> {
    clickhouse_files(cfg, CLICKHOUSE).await
}

/// Applies `files` (a prefix of [`CLICKHOUSE`], in order) as [`clickhouse`]
/// does: tests use it to build a database as an older release left it and
/// then upgrade it.
pub async fn clickhouse_files(
    cfg: &ClickHouseConfig,
    files: &[(&str, &str)],
) -> anyhow::Result<Report> {
    let db = cfg.database.as_str();
    if !is_plain_identifier(db) {
        bail!("clickhouse database `{db}` is not a plain identifier");
    }
    let server = client(cfg, None);
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
        .execute()
        .await
        .with_context(|| format!("create clickhouse database {db} at {}", cfg.url))?;
    let ch = client(cfg, Some(db));

    let mut numbered = Vec::new();
    for (name, text) in files {
        let version = file_version(name)?;
        numbered.push((version, *name, *text));
    }
    let (bootstrap, rest): (Vec<_>, Vec<_>) = numbered.into_iter().partition(|(v, _, _)| *v == 0);
    for (_, name, text) in &bootstrap {
        run_clickhouse_file(&ch, db, name, text).await?;
    }

    let applied: Vec<(u32, String)> = ch
        .query(&format!(
            "SELECT version, checksum FROM {db}.affgate_migrations FINAL ORDER BY version"
        ))
        .fetch_all()
        .await
        .with_context(|| format!("read {db}.affgate_migrations"))?;

    let mut report = Report::default();
    for (version, name, text) in rest {
        let checksum = blake3::hash(text.as_bytes()).to_hex().to_string();
        if let Some((_, recorded)) = applied.iter().find(|(v, _)| *v == version) {
            if *recorded != checksum {
                bail!(
                    "clickhouse migration {name} was changed after it was applied \
                     (recorded checksum {recorded}, file {checksum}); add a new migration instead"
                );
            }
            report.already.push(name.to_string());
            continue;
        }
        run_clickhouse_file(&ch, db, name, text).await?;
        ch.query(&format!(
            "INSERT INTO {db}.affgate_migrations (version, name, checksum, applied_at) \
             VALUES (?, ?, ?, now())"
        ))
        .bind(version)
        .bind(name)
        .bind(checksum.as_str())
        .execute()
        .await
        .with_context(|| format!("record clickhouse migration {name}"))?;
        report.applied.push(name.to_string());
    }
    Ok(report)
}

async fn run_clickhouse_file(
    ch: &clickhouse::Client,
    db: &str,
    name: &str,
    text: &str,
) -> anyhow::Result<()> {
    let statements = split_statements(&text.replace("{db}", db))
        .with_context(|| format!("clickhouse migration {name}"))?;
    for (i, sql) in statements.iter().enumerate() {
        ch.query(sql).execute().await.with_context(|| {
            format!(
                "clickhouse migration {name}, statement {} (`{}`)",
                i + 1,
                headline(sql)
            )
        })?;
    }
    Ok(())
}

/// `0003_clicks_hourly.sql` → 3.
fn file_version(name: &str) -> anyhow::Result<u32> {
    name.split_once('_')
        .and_then(|(v, _)| v.parse().ok())
        .filter(|_| name.ends_with(".sql"))
        .with_context(|| format!("migration file {name}: expected NNNN_name.sql"))
}

/// The statement's first line, for error messages.
fn headline(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default().trim();
    if line.chars().count() > 80 {
        format!("{}...", line.chars().take(80).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Splits a migration file into statements: drops `--` line comments and
/// `/* */` block comments, splits at `;` outside quotes, trims, and skips
/// empty pieces. Quotes: '...' strings (with '' and \' escapes), "..." and
/// `...` identifiers.
///
/// Comments go because the HTTP client treats `?` as a bind placeholder,
/// and a comment is where a stray one would hide.
pub fn split_statements(text: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        cur.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                let mut closed = false;
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        closed = true;
                        break;
                    }
                    prev = c;
                }
                if !closed {
                    bail!("unterminated /* comment");
                }
                cur.push(' ');
            }
            '\'' | '"' | '`' => {
                cur.push(c);
                let mut closed = false;
                while let Some(d) = chars.next() {
                    cur.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            cur.push(e);
                        }
                    } else if d == c {
                        if chars.peek() == Some(&c) {
                            cur.push(c);
                            chars.next();
                        } else {
                            closed = true;
                            break;
                        }
                    }
                }
                if !closed {
                    bail!("unterminated {c}quote{c}");
                }
            }
            ';' => push_statement(&mut out, &mut cur),
            c => cur.push(c),
        }
    }
    push_statement(&mut out, &mut cur);
    Ok(out)
}

fn push_statement(out: &mut Vec<String>, cur: &mut String) {
    let stmt = cur
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string();
    if !stmt.is_empty() {
        out.push(stmt);
    }
    cur.clear();
}

/// Applies the PostgreSQL migrations.
pub async fn postgres(pool: &PgPool) -> anyhow::Result<Report> {
    let before = applied_postgres_versions(pool).await?;
    POSTGRES.run(pool).await.map_err(|e| postgres_error(&e))?;
    let mut report = Report::default();
    for m in POSTGRES.iter() {
        let name = postgres_file_name(m.version, &m.description);
        if before.contains(&m.version) {
            report.already.push(name);
        } else {
            report.applied.push(name);
        }
    }
    Ok(report)
}

async fn applied_postgres_versions(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await
        .context("connect to postgres")?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .context("read _sqlx_migrations")
}

fn postgres_file_name(version: i64, description: &str) -> String {
    // sqlx turns `_` in the file name into spaces in the description.
    format!("{version:04}_{}.sql", description.replace(' ', "_"))
}

/// Names the file, and the line of the failing statement when PostgreSQL
/// says where in the file it failed.
fn postgres_error(e: &MigrateError) -> anyhow::Error {
    let MigrateError::ExecuteMigration(inner, version) = e else {
        return anyhow::anyhow!("postgres migrations: {e}");
    };
    let Some(m) = POSTGRES.iter().find(|m| m.version == *version) else {
        return anyhow::anyhow!("postgres migration {version}: {inner}");
    };
    let name = postgres_file_name(m.version, &m.description);
    let position = inner
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .and_then(|pg| match pg.position() {
            Some(sqlx::postgres::PgErrorPosition::Original(p)) => Some(p),
            _ => None,
        });
    match position {
        Some(p) => {
            // 1-based character offset into the file.
            let before: String = m.sql.chars().take(p.saturating_sub(1)).collect();
            let line = before.matches('\n').count() + 1;
            let text = m.sql.lines().nth(line - 1).unwrap_or_default().trim();
            anyhow::anyhow!("postgres migration {name}, line {line} (`{text}`): {inner}")
        }
        None => anyhow::anyhow!("postgres migration {name}: {inner}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_list_matches_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/clickhouse");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = CLICKHOUSE.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(listed, on_disk, "CLICKHOUSE must list every file, in order");
        let versions: Vec<u32> = CLICKHOUSE
            .iter()
            .map(|(n, _)| file_version(n).unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "versions strictly increase: {versions:?}"
        );
        assert_eq!(versions[0], 0, "0000 is the bookkeeping table");
    }

    /// The table a statement starting with `prefix` names, if it does.
    fn table_after<'a>(sql: &'a str, prefix: &str) -> Option<&'a str> {
        sql.strip_prefix(prefix)?
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
    }

    #[test]
    fn clickhouse_statements_are_portable_and_idempotent() {
        for (name, text) in CLICKHOUSE {
            let statements = split_statements(text).unwrap();
            for (i, sql) in statements.iter().enumerate() {
                let upper = sql.to_ascii_uppercase();
                if let Some(target) = table_after(&upper, "INSERT INTO ") {
                    // Only a rebuild: the same file dropped the table and
                    // created it again before filling it.
                    for before in ["DROP TABLE IF EXISTS ", "CREATE TABLE IF NOT EXISTS "] {
                        assert!(
                            statements[..i].iter().any(|s| {
                                table_after(&s.to_ascii_uppercase(), before) == Some(target)
                            }),
                            "{name}: INSERT INTO {target} without {before}{target} first"
                        );
                    }
                } else if upper.starts_with("DROP ") {
                    assert!(
                        upper.starts_with("DROP TABLE IF EXISTS {DB}."),
                        "{name}: DROP TABLE IF EXISTS {{db}}.name: {sql}"
                    );
                } else {
                    assert!(
                        upper.starts_with("CREATE ") && upper.contains("IF NOT EXISTS"),
                        "{name}: every other statement is CREATE ... IF NOT EXISTS: {sql}"
                    );
                }
                assert!(!sql.contains('?'), "{name}: `?` is a bind placeholder");
                for missing_in_18_16 in ["LOWCARDINALITY", "DATETIME64", " TTL ", "IPV6", "CODEC("]
                {
                    assert!(
                        !upper.contains(missing_in_18_16),
                        "{name}: {missing_in_18_16} does not exist in ClickHouse 18.16"
                    );
                }
                for table in ["CREATE TABLE", "CREATE MATERIALIZED VIEW", "CREATE VIEW"] {
                    if upper.starts_with(table) {
                        assert!(sql.contains("{db}."), "{name}: qualify names with {{db}}.");
                    }
                }
            }
        }
    }

    #[test]
    fn splitting_statements() {
        let sql = "-- a comment; with ? and ;\nCREATE TABLE a (x String DEFAULT 'a;b''c\\'d') ;\n\
                   /* block ; */ CREATE VIEW b AS SELECT \"x;\" FROM `t;`;\n\n  ;";
        assert_eq!(
            split_statements(sql).unwrap(),
            vec![
                "CREATE TABLE a (x String DEFAULT 'a;b''c\\'d')".to_string(),
                "CREATE VIEW b AS SELECT \"x;\" FROM `t;`".to_string(),
            ]
        );
        assert!(split_statements("SELECT 'x").is_err());
        assert!(split_statements("SELECT /* x").is_err());
        assert_eq!(split_statements("-- only\n").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn file_versions() {
        assert_eq!(file_version("0003_clicks_hourly.sql").unwrap(), 3);
        assert!(file_version("clicks.sql").is_err());
        assert!(file_version("0003_clicks.txt").is_err());
    }

    #[test]
    fn postgres_files_are_embedded() {
        let names: Vec<String> = POSTGRES
            .iter()
            .map(|m| postgres_file_name(m.version, &m.description))
            .collect();
        assert_eq!(names.first().map(String::as_str), Some("0001_inbox.sql"));
    }
}
