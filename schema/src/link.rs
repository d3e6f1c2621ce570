//! What a link must look like, shared by the control plane (which accepts
//! links through its API) and edges (which load them): slugs, destination
//! URLs and the macros a destination may use; and the Redis key names of
//! DESIGN.md's layout, written by the collector and read by edges.

/// The pub/sub channel announcing changes: `link:{slug}`, `offer:{id}`, `token:{hash}`.
pub const CHANNEL: &str = "affgate:changes";
/// `affgate:link:{slug}`: hash of a link.
pub const LINK_PREFIX: &str = "affgate:link:";
/// `affgate:offer:{id}`: hash of an offer's status and fallback.
pub const OFFER_PREFIX: &str = "affgate:offer:";
/// `affgate:token:{hex keyed blake3 of the token}`: a network id.
pub const TOKEN_PREFIX: &str = "affgate:token:";

/// The macros an edge expands in a destination.
pub const MACROS: [&str; 9] = [
    "click_id",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "link_id",
    "offer_id",
    "affiliate_id",
];

/// Longest slug.
pub const MAX_SLUG_LEN: usize = 128;
/// Longest destination or fallback URL.
pub const MAX_URL_LEN: usize = 2048;

/// Slugs are URL-safe: `A-Z a-z 0-9 - _ .`, 1 to 128 characters, and not
/// only dots (`/c/..` would be normalised away by clients).
pub fn valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && !slug.bytes().all(|b| b == b'.')
        && slug.len() <= MAX_SLUG_LEN
        && slug
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An absolute http(s) URL with a host, without spaces or control characters.
pub fn valid_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/'))
        && !s.bytes().any(|b| b.is_ascii_control() || b == b' ')
}

/// Why a destination template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("must be an absolute http(s) URL")]
    NotUrl,
    #[error("longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error(
        "unknown macro {{{0}}}; known: {{click_id}} {{sub1}}..{{sub5}} {{link_id}} {{offer_id}} {{affiliate_id}}"
    )]
    UnknownMacro(String),
    #[error("unclosed `{{`")]
    Unclosed,
}

/// Checks a destination: an absolute http(s) URL using known macros only.
pub fn check_destination(s: &str) -> Result<(), DestinationError> {
    if s.len() > MAX_URL_LEN {
        return Err(DestinationError::TooLong);
    }
    if !valid_url(s) {
        return Err(DestinationError::NotUrl);
    }
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or(DestinationError::Unclosed)?;
        let name = &after[..close];
        if !MACROS.contains(&name) {
            return Err(DestinationError::UnknownMacro(name.to_string()));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            check_destination("https://m.example/p?c={click_id}&s={sub1}&l={link_id}"),
            Ok(())
        );
        assert_eq!(check_destination("ftp://x/"), Err(DestinationError::NotUrl));
        assert_eq!(
            check_destination("https:///x"),
            Err(DestinationError::NotUrl)
        );
        assert_eq!(
            check_destination("https://a b/"),
            Err(DestinationError::NotUrl)
        );
        assert_eq!(
            check_destination("https://m.example/{nope}"),
            Err(DestinationError::UnknownMacro("nope".into()))
        );
        assert_eq!(
            check_destination("https://m.example/{click_id"),
            Err(DestinationError::Unclosed)
        );
        let long = format!("https://m.example/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check_destination(&long), Err(DestinationError::TooLong));
    }

    #[test]
    fn slugs() {
        assert!(valid_slug("abc-DEF_1.2"));
        assert!(!valid_slug(""));
        assert!(!valid_slug("a/b"));
        assert!(!valid_slug(".."));
        assert!(valid_slug("a.b"));
        assert!(!valid_slug(&"a".repeat(MAX_SLUG_LEN + 1)));
    }
}
