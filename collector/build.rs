//! Rebuild when a PostgreSQL migration is added or changed: `sqlx::migrate!`
//! embeds the directory, and cargo does not see into it by itself. (The
//! ClickHouse files are `include_str!`ed, which cargo tracks.)

fn main() {
    println!("cargo:rerun-if-changed=../migrations/postgres");
}
