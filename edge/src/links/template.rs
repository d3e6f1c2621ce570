//! Destination templates: a link's destination URL with macros, parsed once
//! when the link is loaded and expanded on every click.
//!
//! Known macros: `{click_id}`, `{sub1}`…`{sub5}`, `{link_id}`, `{offer_id}`,
//! `{affiliate_id}`. Sub values come from the visitor's query string and are
//! percent-encoded on the way out (everything but RFC 3986 unreserved
//! characters), so a visitor cannot inject `&`, `#` or a scheme into the
//! destination. Any other `{...}` is left as written.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but `A-Z a-z 0-9 - . _ ~` is encoded.
const SUB_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(Box<str>),
    ClickId,
    Sub(usize),
    LinkId,
    OfferId,
    AffiliateId,
}

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// Length of the literal parts, to size the output once.
    literal_len: usize,
}

/// The values a click supplies to its destination.
#[derive(Debug, Clone, Copy)]
pub struct Macros<'a> {
    pub click_id: &'a str,
    pub subs: [&'a str; 5],
    pub link_id: u64,
    pub offer_id: u64,
    pub affiliate_id: u64,
}

impl Template {
    pub fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let (before, from_brace) = rest.split_at(open);
            lit.push_str(before);
            let macro_part = from_brace.find('}').and_then(|close| {
                let name = &from_brace[1..close];
                macro_named(name).map(|p| (p, close))
            });
            match macro_part {
                Some((part, close)) => {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit).into()));
                    }
                    parts.push(part);
                    rest = &from_brace[close + 1..];
                }
                None => {
                    lit.push('{');
                    rest = &from_brace[1..];
                }
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit.into()));
        }
        // A Location header carries ASCII: encode anything else in literals once, here.
        for p in &mut parts {
            if let Part::Lit(l) = p
                && !l.is_ascii()
            {
                *l = encode_non_ascii(l).into();
            }
        }
        let literal_len = parts
            .iter()
            .map(|p| match p {
                Part::Lit(l) => l.len(),
                _ => 0,
            })
            .sum();
        Template { parts, literal_len }
    }

    /// Names of `{...}` macros in `s` that this edge does not know, for validation by loaders.
    pub fn unknown_macros(s: &str) -> Vec<String> {
        let mut unknown = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close) => {
                    let name = &after[..close];
                    if macro_named(name).is_none() {
                        unknown.push(name.to_string());
                    }
                    rest = &after[close + 1..];
                }
                None => break,
            }
        }
        unknown
    }

    /// Expand into `out` (cleared first).
    pub fn expand_into(&self, m: &Macros<'_>, out: &mut String) {
        out.clear();
        out.reserve(self.literal_len + 64);
        for part in &self.parts {
            // Writing into a String cannot fail.
            let _ = match part {
                Part::Lit(l) => {
                    out.push_str(l);
                    Ok(())
                }
                Part::ClickId => {
                    out.push_str(m.click_id);
                    Ok(())
                }
                Part::Sub(i) => write!(out, "{}", utf8_percent_encode(m.subs[*i], SUB_ENCODE)),
                Part::LinkId => write!(out, "{}", m.link_id),
                Part::OfferId => write!(out, "{}", m.offer_id),
                Part::AffiliateId => write!(out, "{}", m.affiliate_id),
            };
        }
    }

    pub fn expand(&self, m: &Macros<'_>) -> String {
        let mut s = String::new();
        self.expand_into(m, &mut s);
        s
    }
}

fn encode_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii() {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn macro_named(name: &str) -> Option<Part> {
    Some(match name {
        "click_id" => Part::ClickId,
        "sub1" => Part::Sub(0),
        "sub2" => Part::Sub(1),
        "sub3" => Part::Sub(2),
        "sub4" => Part::Sub(3),
        "sub5" => Part::Sub(4),
        "link_id" => Part::LinkId,
        "offer_id" => Part::OfferId,
        "affiliate_id" => Part::AffiliateId,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<'a>(subs: [&'a str; 5]) -> Macros<'a> {
        Macros {
            click_id: "CID",
            subs,
            link_id: 11,
            offer_id: 22,
            affiliate_id: 33,
        }
    }

    #[test]
    fn expands_every_macro() {
        let t = Template::parse(
            "https://m.example/p?c={click_id}&a={sub1}&b={sub5}&l={link_id}&o={offer_id}&f={affiliate_id}",
        );
        assert_eq!(
            t.expand(&m(["x", "", "", "", "y"])),
            "https://m.example/p?c=CID&a=x&b=y&l=11&o=22&f=33"
        );
    }

    #[test]
    fn subs_are_percent_encoded() {
        let t = Template::parse("https://m.example/?s={sub1}");
        assert_eq!(
            t.expand(&m(["a b&c=d#e/é", "", "", "", ""])),
            "https://m.example/?s=a%20b%26c%3Dd%23e%2F%C3%A9"
        );
    }

    #[test]
    fn unknown_and_unbalanced_braces_stay_literal() {
        let t = Template::parse("https://m.example/{nope}/{click_id}/{sub1");
        assert_eq!(
            t.expand(&m(["", "", "", "", ""])),
            "https://m.example/{nope}/CID/{sub1"
        );
        assert_eq!(
            Template::unknown_macros("https://x/{nope}?{click_id}{sub9}"),
            vec!["nope", "sub9"]
        );
    }

    #[test]
    fn non_ascii_literals_are_percent_encoded() {
        let t = Template::parse("https://m.example/café?c={click_id}");
        assert_eq!(
            t.expand(&m(["", "", "", "", ""])),
            "https://m.example/caf%C3%A9?c=CID"
        );
    }

    #[test]
    fn a_template_without_macros_is_returned_as_is() {
        let t = Template::parse("https://m.example/landing?x=1");
        assert_eq!(
            t.expand(&m(["q", "", "", "", ""])),
            "https://m.example/landing?x=1"
        );
    }

    proptest::proptest! {
        #[test]
        fn expansion_never_leaks_reserved_characters_from_subs(sub in ".*") {
            let t = Template::parse("https://m.example/?s={sub1}");
            let out = t.expand(&m([&sub, "", "", "", ""]));
            let tail = &out["https://m.example/?s=".len()..];
            proptest::prop_assert!(tail.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
        }
    }
}
