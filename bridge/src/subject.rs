//! Subject templates for Covet -> NATS routes, and the escaping that keeps
//! a record's key from ever changing a subject's shape.
//!
//! A template is literal text with placeholders: `{topic}`, `{partition}`,
//! `{offset}` and `{key}`. A topic name goes in as it is (Covet topic names
//! are letters, digits, `.`, `_` and `-`, so its dots become subject
//! separators, as they read). A key is arbitrary bytes: every byte a
//! subject token cannot hold (`.`, `*`, `>`, whitespace, control and
//! non-ASCII bytes) and `%` itself become `%XX` (upper-case hex), so a
//! key is always exactly one token and distinct keys stay distinct. A
//! record without a key (or with an empty one) renders `_`, and a key that
//! is exactly `_` is escaped to `%5F`.

use std::fmt::Write as _;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Partition,
    Offset,
    Key,
}

/// What a record gives a template.
pub struct Fields<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<&'a [u8]>,
}

impl Template {
    /// Parses and checks a template: it must render a valid subject
    /// without wildcards for any record.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{text:?}: '{{' without '}}'"));
            };
            let part = match &rest[open + 1..open + close] {
                "topic" => Part::Topic,
                "partition" => Part::Partition,
                "offset" => Part::Offset,
                "key" => Part::Key,
                other => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{other}}} (use {{topic}}, {{partition}}, {{offset}} or {{key}})"
                    ))
                }
            };
            parts.push(part);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: '}}' without '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let template = Template {
            parts,
            source: text.to_string(),
        };
        // Any record renders the same shape: try one.
        let sample = template.render(&Fields {
            topic: "t",
            partition: 0,
            offset: 0,
            key: Some(b"k"),
        });
        if !crate::config::valid_subject(&sample, false) {
            return Err(format!(
                "{text:?} does not make a valid subject (it gave {sample:?}); no wildcards, no empty tokens"
            ));
        }
        Ok(template)
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The subject for one record.
    pub fn render(&self, f: &Fields<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.push_str(f.topic),
                Part::Partition => {
                    let _ = write!(out, "{}", f.partition);
                }
                Part::Offset => {
                    let _ = write!(out, "{}", f.offset);
                }
                Part::Key => escape_key(f.key, &mut out),
            }
        }
        out
    }
}

/// Appends `key` as one subject token (see the module docs).
pub fn escape_key(key: Option<&[u8]>, out: &mut String) {
    let key = match key {
        None | Some(b"") => {
            out.push('_');
            return;
        }
        Some(b"_") => {
            out.push_str("%5F");
            return;
        }
        Some(k) => k,
    };
    for &b in key {
        let plain = b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'%');
        if plain {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &[u8]) -> String {
        let mut s = String::new();
        escape_key(Some(k), &mut s);
        s
    }

    #[test]
    fn renders_every_placeholder() {
        let t = Template::parse("covet.{topic}.{partition}.{offset}.{key}").unwrap();
        let s = t.render(&Fields {
            topic: "orders",
            partition: 3,
            offset: 42,
            key: Some(b"c-1"),
        });
        assert_eq!(s, "covet.orders.3.42.c-1");
    }

    #[test]
    fn keys_are_one_token_and_distinct() {
        assert_eq!(key(b"a.b"), "a%2Eb");
        assert_eq!(key(b"*"), "%2A");
        assert_eq!(key(b">"), "%3E");
        assert_eq!(key(b"a b\t"), "a%20b%09");
        assert_eq!(key(b"50%"), "50%25");
        assert_eq!(key("é".as_bytes()), "%C3%A9");
        assert_eq!(key(b"_"), "%5F");
        let mut none = String::new();
        escape_key(None, &mut none);
        assert_eq!(none, "_");
        // Distinct keys never render the same.
        let keys: [&[u8]; 6] = [b"a.b", b"a%2Eb", b"_", b"%5F", b"a", b"a "];
        let rendered: std::collections::HashSet<String> = keys.iter().map(|k| key(k)).collect();
        assert_eq!(rendered.len(), keys.len());
        for k in keys {
            assert!(crate::config::valid_subject(&key(k), false), "{k:?}");
        }
    }

    #[test]
    fn bad_templates_are_refused() {
        for (t, why) in [
            ("a.{nope}", "unknown placeholder"),
            ("a.{key", "without"),
            ("a}", "without"),
            ("a.*.{key}", "valid subject"),
            ("a..{key}", "valid subject"),
            ("a.>", "valid subject"),
            ("", "valid subject"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t:?}: {e}");
        }
    }
}
