//! The static links file and networks file, for an edge without Redis.
//!
//! Links: CSV with header `slug,link_id,destination` and optional columns
//! `status` (`active`|`paused`|`shadow_banned`), `redirect_code`
//! (301|302|307|308), `offer_id`, `affiliate_id`, in any order.
//! Networks: CSV `network_id,name,postback_token`.
//! Anything that does not parse is refused with the file and line number,
//! and the caller keeps what it had.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use affgate_schema::click_id::MAX_LINK_ID;
use affgate_schema::keys::{Keys, token_hash};

use super::{Link, LinkStatus, Snapshot, Template, valid_redirect_code, valid_slug, valid_url};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}

const LINK_COLUMNS: &[&str] = &[
    "slug",
    "link_id",
    "destination",
    "status",
    "redirect_code",
    "offer_id",
    "affiliate_id",
];

/// Load both files into a snapshot.
pub fn load(links: &Path, networks: Option<&Path>, keys: &Keys) -> Result<Snapshot, FileError> {
    let mut snap = Snapshot {
        links: load_links(links)?,
        ..Snapshot::default()
    };
    if let Some(n) = networks {
        snap.tokens = load_networks(n, keys)?;
    }
    Ok(snap)
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn line_err(path: &Path, line: u64, reason: impl Into<String>) -> FileError {
    FileError::Line {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn reader(text: &str) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes())
}

/// Column positions from the header; unknown and missing columns are errors on line 1.
fn columns(
    path: &Path,
    rdr: &mut csv::Reader<&[u8]>,
    known: &[&str],
    required: &[&str],
) -> Result<Vec<Option<usize>>, FileError> {
    let header = rdr
        .headers()
        .map_err(|e| line_err(path, 1, format!("header: {e}")))?
        .clone();
    let mut pos = vec![None; known.len()];
    for (i, name) in header.iter().enumerate() {
        match known.iter().position(|k| *k == name) {
            Some(k) if pos[k].is_some() => {
                return Err(line_err(path, 1, format!("column `{name}` given twice")));
            }
            Some(k) => pos[k] = Some(i),
            None => {
                return Err(line_err(
                    path,
                    1,
                    format!("unknown column `{name}` (known: {})", known.join(", ")),
                ));
            }
        }
    }
    for r in required {
        let k = known.iter().position(|k| k == r).unwrap_or(0);
        if pos[k].is_none() {
            return Err(line_err(path, 1, format!("missing column `{r}`")));
        }
    }
    Ok(pos)
}

fn parse_id(path: &Path, line: u64, name: &str, v: &str) -> Result<u64, FileError> {
    v.parse::<u64>().map_err(|_| {
        line_err(
            path,
            line,
            format!("{name} `{v}` is not a non-negative integer"),
        )
    })
}

fn load_links(path: &Path) -> Result<Vec<(Box<str>, Link)>, FileError> {
    let text = read(path)?;
    let mut rdr = reader(&text);
    let cols = columns(
        path,
        &mut rdr,
        LINK_COLUMNS,
        &["slug", "link_id", "destination"],
    )?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            line_err(path, line, e.to_string())
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let get = |k: usize| cols[k].and_then(|i| rec.get(i)).unwrap_or("");
        let slug = get(0);
        if !valid_slug(slug) {
            return Err(line_err(
                path,
                line,
                format!("slug `{slug}` must be 1-128 of A-Z a-z 0-9 - _ ."),
            ));
        }
        if !seen.insert(slug.to_string()) {
            return Err(line_err(path, line, format!("slug `{slug}` appears twice")));
        }
        let link_id = parse_id(path, line, "link_id", get(1))?;
        if link_id > MAX_LINK_ID {
            return Err(line_err(
                path,
                line,
                format!("link_id {link_id} is above {MAX_LINK_ID}"),
            ));
        }
        let destination = get(2);
        if !valid_url(destination) {
            return Err(line_err(
                path,
                line,
                format!("destination `{destination}` is not an absolute http(s) URL"),
            ));
        }
        let unknown = Template::unknown_macros(destination);
        if !unknown.is_empty() {
            return Err(line_err(
                path,
                line,
                format!("destination has unknown macro {{{}}}", unknown[0]),
            ));
        }
        let status = LinkStatus::parse(get(3)).ok_or_else(|| {
            line_err(
                path,
                line,
                format!("status `{}` is not active, paused or shadow_banned", get(3)),
            )
        })?;
        let redirect_code = match get(4) {
            "" => 302,
            v => v
                .parse::<u16>()
                .ok()
                .filter(|c| valid_redirect_code(*c))
                .ok_or_else(|| {
                    line_err(
                        path,
                        line,
                        format!("redirect_code `{v}` is not 301, 302, 307 or 308"),
                    )
                })?,
        };
        let offer_id = match get(5) {
            "" => 0,
            v => parse_id(path, line, "offer_id", v)?,
        };
        let affiliate_id = match get(6) {
            "" => 0,
            v => parse_id(path, line, "affiliate_id", v)?,
        };
        out.push((
            slug.into(),
            Link {
                link_id,
                destination: Template::parse(destination),
                status,
                redirect_code,
                offer_id,
                affiliate_id,
                network_id: 0,
                fallback_url: None,
                version: 0,
            },
        ));
    }
    Ok(out)
}

fn load_networks(path: &Path, keys: &Keys) -> Result<Vec<(String, u64)>, FileError> {
    const COLS: &[&str] = &["network_id", "name", "postback_token"];
    let text = read(path)?;
    let mut rdr = reader(&text);
    let cols = columns(path, &mut rdr, COLS, COLS)?;
    let mut out = Vec::new();
    let mut seen_ids = HashSet::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            line_err(path, line, e.to_string())
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let get = |k: usize| cols[k].and_then(|i| rec.get(i)).unwrap_or("");
        let id = parse_id(path, line, "network_id", get(0))?;
        if !seen_ids.insert(id) {
            return Err(line_err(
                path,
                line,
                format!("network_id {id} appears twice"),
            ));
        }
        let token = get(2);
        if token.len() < 8 || token.len() > 256 || token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(line_err(
                path,
                line,
                "postback_token must be 8-256 printable ASCII characters",
            ));
        }
        out.push((token_hash(keys, token), id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use affgate_schema::keys::Secret;

    fn keys() -> Keys {
        Keys::derive(&Secret::from_bytes([7; 32]))
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_links_with_optional_columns_in_any_order() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "links.csv",
            "destination,slug,link_id,status,redirect_code,offer_id,affiliate_id\n\
             https://m.example/?c={click_id},abc,1,,,,\n\
             https://m.example/b,b-2,2,paused,307,5,6\n\
             # a comment\n\
             https://m.example/c,c,3,shadow_banned,301,5,7\n",
        );
        let links = load_links(&p).unwrap();
        assert_eq!(links.len(), 3);
        assert_eq!(&*links[0].0, "abc");
        assert_eq!(links[0].1.redirect_code, 302, "302 is the default");
        assert_eq!(links[1].1.status, LinkStatus::Paused);
        assert_eq!(links[1].1.redirect_code, 307);
        assert_eq!((links[1].1.offer_id, links[1].1.affiliate_id), (5, 6));
        assert_eq!(links[2].1.status, LinkStatus::ShadowBanned);
    }

    #[test]
    fn errors_carry_the_line_number() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "slug,link_id,destination\nok,1,https://m.example/\nbad slug,2,https://m.example/\n",
                "line 3",
            ),
            (
                "slug,link_id,destination\nok,1,https://m.example/\nok,2,https://m.example/\n",
                "line 3",
            ),
            (
                "slug,link_id,destination\nok,x,https://m.example/\n",
                "line 2",
            ),
            (
                "slug,link_id,destination\nok,1,ftp://m.example/\n",
                "line 2",
            ),
            (
                "slug,link_id,destination,redirect_code\nok,1,https://m.example/,303\n",
                "line 2",
            ),
            (
                "slug,link_id,destination,status\nok,1,https://m.example/,gone\n",
                "line 2",
            ),
            (
                "slug,link_id,destination\nok,1,https://m.example/{nope}\n",
                "line 2",
            ),
            ("slug,link_id,destination\nok,1\n", "line 2"),
            ("slug,link_id,dest\n", "line 1"),
            ("slug,link_id\n", "line 1"),
        ];
        for (text, want) in cases {
            let p = write(&d, "l.csv", text);
            let err = load_links(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: `{err}` should name {want}");
            assert!(err.contains("l.csv"), "{err} should name the file");
        }
    }

    #[test]
    fn networks_are_held_as_token_hashes() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "n.csv",
            "network_id,name,postback_token\n4,Net,s3cret-token\n",
        );
        let tokens = load_networks(&p, &keys()).unwrap();
        assert_eq!(tokens, vec![(token_hash(&keys(), "s3cret-token"), 4)]);
        assert!(
            !tokens[0].0.contains("s3cret"),
            "no plaintext token is kept"
        );
        let p = write(&d, "n.csv", "network_id,name,postback_token\n4,Net,short\n");
        assert!(
            load_networks(&p, &keys())
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
    }
}
