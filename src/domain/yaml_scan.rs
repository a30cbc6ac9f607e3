//! A linear pre-scan of YAML text that refuses deeply nested flow collections (`[[[...` or
//! `{a: {a: ...`) before serde_norway reads the document.
//!
//! Why: unsafe-libyaml-norway's scanner keeps one "possible simple key" slot per open flow
//! collection and walks every slot above its `not_simple_keys` mark for each token it fetches.
//! That mark only advances over keys that went stale, and a key that was used (`a:`) stays below
//! it forever, so in practice every token walks the whole stack: time is tokens x flow depth,
//! quadratic for `[[[[...`. serde_norway first collects every event of the document and only then
//! applies its recursion limit (128), so 80 KB of `{a: ` took 27 s in release before it was
//! refused. Here the same scanner runs token by token and stops at the first flow collection
//! deeper than [`MAX_FLOW_DEPTH`], so the walk never exceeds that many slots and the cost of both
//! the pre-scan and the real parse is linear in the text.
//!
//! Using the library's own scanner (rather than a hand-written bracket counter) means quoted
//! scalars, comments, block scalars and plain scalars like `data[at0001]` are tokenized exactly as
//! the real parse will tokenize them: nothing can be hidden from the count, and nothing outside a
//! real flow collection is counted.

use std::mem::MaybeUninit;

use unsafe_libyaml_norway as unsafe_sys;

/// Deepest flow-collection nesting accepted.
///
/// Within the limit the scanner's time is still tokens x depth: in a release build 8 MB of flat
/// YAML scans in about 1.4 s at depth 1, 2.8 s at 16, 4.5 s at 32, 6.4 s at 64 and 11.6 s at 128
/// (serde_norway's own recursion limit). 64 keeps the worst case within about five times the cost
/// of flat text of the same size while leaving room for any real document: FHIR Connect files
/// nest flow collections a few levels deep (the fixtures at most 4), and even a model written
/// entirely in flow style needs only 3 levels per `followedBy` level.
pub const MAX_FLOW_DEPTH: usize = 64;

/// A YAML document that the pre-scan refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// A flow collection (`[` or `{`) opened deeper than the limit.
    #[error(
        "FHIR Connect YAML: flow collections ([...] or {{...}}) nested deeper than {max} levels \
         at line {line}, column {column}"
    )]
    FlowTooDeep {
        /// The limit applied ([`MAX_FLOW_DEPTH`] for uploads).
        max: usize,
        /// 1-based line of the collection that went over the limit.
        line: u64,
        /// 1-based column of it.
        column: u64,
    },
}

/// What one pre-scan did: how many tokens it read and the deepest flow nesting it saw. Reported
/// so tests can assert on work done rather than on time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Tokens the scanner produced before the scan ended (or stopped).
    pub tokens: usize,
    /// The deepest flow nesting seen.
    pub max_depth: usize,
}

/// Owns an initialized libyaml parser on the heap: `yaml_parser_set_input_string` stores a
/// pointer to the parser inside itself, so it must not move, and it must be deleted exactly once.
struct Scanner(Box<MaybeUninit<unsafe_sys::yaml_parser_t>>);

impl Scanner {
    /// A scanner over `input`; the borrow keeps `input` alive while the scanner exists.
    fn new(input: &[u8]) -> Option<Self> {
        let mut boxed = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        let parser = boxed.as_mut_ptr();
        // SAFETY: `parser` points to writable memory for a yaml_parser_t; initialize zeroes and
        // sets it up (it fails only when an allocation fails, then nothing needs freeing).
        if unsafe { unsafe_sys::yaml_parser_initialize(parser) }.fail {
            return None;
        }
        // SAFETY: the parser is initialized; `input` outlives it (see `scan_flow_depth`, which
        // drops the scanner before returning), and the box keeps the parser at one address.
        unsafe {
            unsafe_sys::yaml_parser_set_encoding(parser, unsafe_sys::YAML_UTF8_ENCODING);
            unsafe_sys::yaml_parser_set_input_string(parser, input.as_ptr(), input.len() as u64);
        }
        Some(Scanner(boxed))
    }

    /// The next token's type and start mark, or `None` at the end of the stream or on a
    /// scanner error (serde_norway reports the error itself when it reads the document).
    fn next(&mut self) -> Option<(unsafe_sys::yaml_token_type_t, unsafe_sys::yaml_mark_t)> {
        let parser = self.0.as_mut_ptr();
        let mut token = MaybeUninit::<unsafe_sys::yaml_token_t>::uninit();
        // SAFETY: the parser is initialized (`new`); yaml_parser_scan fully writes the token
        // (zeroed first) whether or not it fails, and the token is deleted after reading it.
        unsafe {
            if unsafe_sys::yaml_parser_scan(parser, token.as_mut_ptr()).fail {
                return None;
            }
            let t = token.as_mut_ptr();
            let out = ((*t).type_, (*t).start_mark);
            unsafe_sys::yaml_token_delete(t);
            match out.0 {
                unsafe_sys::YAML_NO_TOKEN | unsafe_sys::YAML_STREAM_END_TOKEN => None,
                _ => Some(out),
            }
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        // SAFETY: only built initialized (`new`), deleted once here.
        unsafe { unsafe_sys::yaml_parser_delete(self.0.as_mut_ptr()) }
    }
}

/// Scans `text` and refuses it when its flow collections nest deeper than `max`. Stops at the
/// first collection over the limit, so its cost is linear in the text (each token walks at most
/// `max + 1` simple-key slots). A scanner error ends the scan without an error: the real parse
/// stops at the same place and reports it.
pub fn scan_flow_depth(text: &str, max: usize) -> Result<ScanStats, ScanError> {
    let mut stats = ScanStats::default();
    let Some(mut scanner) = Scanner::new(text.as_bytes()) else {
        return Ok(stats);
    };
    let mut depth = 0usize;
    while let Some((kind, mark)) = scanner.next() {
        stats.tokens += 1;
        match kind {
            unsafe_sys::YAML_FLOW_SEQUENCE_START_TOKEN
            | unsafe_sys::YAML_FLOW_MAPPING_START_TOKEN => {
                depth += 1;
                stats.max_depth = stats.max_depth.max(depth);
                if depth > max {
                    return Err(ScanError::FlowTooDeep {
                        max,
                        line: mark.line + 1,
                        column: mark.column + 1,
                    });
                }
            }
            // libyaml ignores a closer at level 0 the same way.
            unsafe_sys::YAML_FLOW_SEQUENCE_END_TOKEN | unsafe_sys::YAML_FLOW_MAPPING_END_TOKEN => {
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_real_flow_collections() {
        // Brackets inside plain, quoted and block scalars and comments are not collections.
        let doc = "a: data[at0001]/events[at0002]\nb: '[[['\nc: \"{{{\"\nd: |\n  [[[\n# [[[\ne: [1, {x: [2]}]\n";
        let s = scan_flow_depth(doc, 3).unwrap();
        assert_eq!(s.max_depth, 3);
        assert!(scan_flow_depth(doc, 2).is_err());
        assert_eq!(scan_flow_depth("a: b\n", 0).unwrap().max_depth, 0);
    }

    #[test]
    fn names_the_position_over_the_limit() {
        let e = scan_flow_depth("x: 1\ny: [[[[", 2).unwrap_err();
        assert_eq!(
            e,
            ScanError::FlowTooDeep {
                max: 2,
                line: 2,
                column: 6
            }
        );
        assert!(e
            .to_string()
            .contains("nested deeper than 2 levels at line 2"));
    }

    #[test]
    fn scanner_errors_are_left_to_the_parser() {
        // A tab where a token is expected, an unterminated quote: no refusal from the pre-scan.
        assert!(scan_flow_depth("a: 'x", 1).is_ok());
        assert!(scan_flow_depth("a: [\t@", 1).is_ok());
        assert!(scan_flow_depth("", 1).is_ok());
    }
}
