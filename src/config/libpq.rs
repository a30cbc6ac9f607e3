//! libpq's `key = value` connection strings, read once here for the two uses of
//! `DATABASE_URL` in that form: splitting out the TLS settings ([`super::database`]) and masking
//! the password for logs and errors ([`super::secret`]).
//!
//! Values are bare words or single-quoted with `\` escapes, as libpq reads them.

/// One `key = value` pair (or a lone word without `=`), as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pair {
    /// The key.
    pub key: String,
    /// The value; `None` for a word without `=`.
    pub value: Option<Value>,
}

/// A value: its text with quotes and escapes removed, and as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Value {
    /// Unquoted and unescaped.
    pub text: String,
    /// As written, quotes included.
    pub raw: String,
    /// False for a quoted value that runs to the end without its closing quote.
    pub closed: bool,
}

/// Every pair of `s`, in order. Never fails: callers decide what a malformed pair means.
pub(super) fn pairs(s: &str) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            out.push(Pair { key, value: None });
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let (mut text, mut raw, mut closed) = (String::new(), String::new(), true);
        if chars.next_if_eq(&'\'').is_some() {
            raw.push('\'');
            closed = false;
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(e) = chars.next() {
                            raw.push(e);
                            text.push(e);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => text.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                raw.push(c);
                text.push(c);
            }
        }
        out.push(Pair {
            key,
            value: Some(Value { text, raw, closed }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str, raw: &str, closed: bool) -> Option<Value> {
        Some(Value {
            text: text.into(),
            raw: raw.into(),
            closed,
        })
    }

    #[test]
    fn bare_quoted_escaped_lone_and_unclosed() {
        let p = pairs(r"host = db  password='a b\'c\\d' lone sslmode=require x='open");
        let want = [
            ("host", v("db", "db", true)),
            ("password", v(r"a b'c\d", r"'a b\'c\\d'", true)),
            ("lone", None),
            ("sslmode", v("require", "require", true)),
            ("x", v("open", "'open", false)),
        ];
        assert_eq!(p.len(), want.len(), "{p:?}");
        for (got, (key, value)) in p.iter().zip(want) {
            assert_eq!(got.key, key);
            assert_eq!(got.value, value, "{key}");
        }
        assert!(pairs("  ").is_empty());
    }
}
