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

/// A macro, stored in [`Template::text`] as one byte below 0x20 (its tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Macro {
    ClickId = 1,
    Sub1 = 2,
    Sub2 = 3,
    Sub3 = 4,
    Sub4 = 5,
    Sub5 = 6,
    LinkId = 7,
    OfferId = 8,
    AffiliateId = 9,
}

impl Macro {
    fn from_tag(b: u8) -> Option<Macro> {
        Some(match b {
            1 => Macro::ClickId,
            2 => Macro::Sub1,
            3 => Macro::Sub2,
            4 => Macro::Sub3,
            5 => Macro::Sub4,
            6 => Macro::Sub5,
            7 => Macro::LinkId,
            8 => Macro::OfferId,
            9 => Macro::AffiliateId,
            _ => return None,
        })
    }
}

/// A parsed destination: one allocation per link, the literal text with
/// each macro replaced by its one-byte tag (1-9).
///
/// Invariant: the text is ASCII and its only bytes below 0x20 are macro
/// tags. [`Template::parse`] guarantees it by percent-encoding non-ASCII
/// bytes and control characters in literals (a `Location` header could not
/// carry them anyway), so expansion is a scan for bytes below 0x20.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: Box<str>,
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
        let mut text = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let (before, from_brace) = rest.split_at(open);
            push_literal(&mut text, before);
            let macro_part = from_brace.find('}').and_then(|close| {
                let name = &from_brace[1..close];
                macro_named(name).map(|m| (m, close))
            });
            match macro_part {
                Some((m, close)) => {
                    text.push(char::from(m as u8));
                    rest = &from_brace[close + 1..];
                }
                None => {
                    text.push('{');
                    rest = &from_brace[1..];
                }
            }
        }
        push_literal(&mut text, rest);
        Template {
            text: text.into_boxed_str(),
        }
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
        out.reserve(self.text.len() + 64);
        let mut rest = &*self.text;
        while let Some(at) = rest.bytes().position(|b| b < 0x20) {
            out.push_str(&rest[..at]);
            // Writing into a String cannot fail.
            let _ = match Macro::from_tag(rest.as_bytes()[at]) {
                Some(Macro::ClickId) => {
                    out.push_str(m.click_id);
                    Ok(())
                }
                Some(Macro::Sub1) => write_sub(out, m.subs[0]),
                Some(Macro::Sub2) => write_sub(out, m.subs[1]),
                Some(Macro::Sub3) => write_sub(out, m.subs[2]),
                Some(Macro::Sub4) => write_sub(out, m.subs[3]),
                Some(Macro::Sub5) => write_sub(out, m.subs[4]),
                Some(Macro::LinkId) => write!(out, "{}", m.link_id),
                Some(Macro::OfferId) => write!(out, "{}", m.offer_id),
                Some(Macro::AffiliateId) => write!(out, "{}", m.affiliate_id),
                // `parse` writes no other byte below 0x20.
                None => Ok(()),
            };
            rest = &rest[at + 1..];
        }
        out.push_str(rest);
    }

    pub fn expand(&self, m: &Macros<'_>) -> String {
        let mut s = String::new();
        self.expand_into(m, &mut s);
        s
    }

    /// Heap bytes this template holds (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.text.len()
    }
}

fn write_sub(out: &mut String, sub: &str) -> std::fmt::Result {
    write!(out, "{}", utf8_percent_encode(sub, SUB_ENCODE))
}

/// A literal, with non-ASCII bytes and controls percent-encoded (see [`Template`]).
fn push_literal(out: &mut String, lit: &str) {
    if lit.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        out.push_str(lit);
    } else {
        out.push_str(&encode_non_ascii(lit));
    }
}

fn encode_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn macro_named(name: &str) -> Option<Macro> {
    Some(match name {
        "click_id" => Macro::ClickId,
        "sub1" => Macro::Sub1,
        "sub2" => Macro::Sub2,
        "sub3" => Macro::Sub3,
        "sub4" => Macro::Sub4,
        "sub5" => Macro::Sub5,
        "link_id" => Macro::LinkId,
        "offer_id" => Macro::OfferId,
        "affiliate_id" => Macro::AffiliateId,
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
    fn control_characters_in_literals_cannot_pose_as_macros() {
        let t = Template::parse("https://m.example/\u{1}x\ty?c={click_id}");
        assert_eq!(
            t.expand(&m(["", "", "", "", ""])),
            "https://m.example/%01x%09y?c=CID"
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
