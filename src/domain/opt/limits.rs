//! The limits checked on an OPT's text before roxmltree parses it: element nesting, attributes
//! per tag and namespace declarations in scope, all in one linear scan ([`check_xml_depth`]).

use crate::error::{Error, Result};

/// Deepest XML element nesting accepted in an OPT. Real OPTs stay below 100 (each constraint
/// object adds two levels: `attributes` and `children`).
///
/// roxmltree's tokenizer recurses once per element level without a limit: about 2,000-5,000
/// nested elements (a body of a few kilobytes) overflow a 2 MiB thread stack in a release build
/// and a few hundred in a debug build, which aborts the whole process. [`check_xml_depth`] is
/// therefore run on the text *before* roxmltree sees it.
pub const MAX_DEPTH: usize = 256;

/// Most attributes (namespace declarations included) one start tag may have; checked by
/// [`check_xml_depth`]. roxmltree compares each attribute of a tag with the tag's earlier ones, so
/// its time grows with the square of this number per tag. OPT elements have at most a few.
pub const MAX_ATTRIBUTES: usize = 64;

/// Most namespace declarations (`xmlns`, `xmlns:p`) in scope at any element, its own and its
/// ancestors'; checked by [`check_xml_depth`]. At every element that declares a namespace,
/// roxmltree copies every namespace in scope and compares the copies with each other, so its time
/// and memory grow with the square of this number per declaring element (60 KB of declarations
/// took 12 s). OPTs declare two or three, on the root.
pub const MAX_NAMESPACES: usize = 16;

/// Refuses XML whose elements nest deeper than `max`, with a linear scan of the text that
/// allocates only a stack of `max` bytes. Run it before handing untrusted XML to roxmltree, whose
/// tokenizer recurses once per level (see [`MAX_DEPTH`]).
///
/// It also refuses what makes roxmltree's time or memory grow faster than the text: a start tag
/// with more than [`MAX_ATTRIBUTES`] attributes, and more than [`MAX_NAMESPACES`] namespace
/// declarations in scope at one element.
///
/// The scan skips comments, CDATA sections, processing instructions, declarations and quoted
/// attribute values the way an XML tokenizer does. It does not check well-formedness: a document
/// it accepts may still be malformed, and roxmltree reports that.
pub fn check_xml_depth(xml: &str, max: usize) -> Result<()> {
    let b = xml.as_bytes();
    let skip_to = |from: usize, end: &str| {
        xml[from..]
            .find(end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    // An attribute named `xmlns` or `xmlns:...` starts here. Checked wherever an `x` appears
    // outside quotes, not only after whitespace, so a lenient tokenizer cannot be slipped a
    // declaration the scan did not count (counting too many is harmless).
    let is_xmlns = |at: usize| {
        b[at..].starts_with(b"xmlns")
            && b.get(at + 5)
                .is_some_and(|c| matches!(c, b':' | b'=') || c.is_ascii_whitespace())
    };
    // The namespace declarations of each open element; its length is the depth.
    let mut open: Vec<u8> = Vec::new();
    let mut in_scope = 0usize;
    let mut i = 0;
    while let Some(p) = xml[i..].find('<') {
        i += p;
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_to(i + 4, "-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_to(i + 9, "]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_to(i + 2, "?>");
        } else if rest.starts_with(b"<!") {
            i = skip_to(i + 2, ">");
        } else if rest.starts_with(b"</") {
            in_scope -= usize::from(open.pop().unwrap_or(0));
            i = skip_to(i + 2, ">");
        } else {
            // A start tag: find its '>' outside quoted attribute values. A '<' inside the tag
            // ends the scan of it (the document is malformed there, and the tokenizer stops).
            let mut j = i + 1;
            let mut quote = None;
            let mut closed = false;
            let (mut attributes, mut namespaces) = (0usize, 0usize);
            while j < b.len() {
                let c = b[j];
                match quote {
                    _ if c == b'<' => break,
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == b'"' || c == b'\'' => quote = Some(c),
                    None if c == b'>' => {
                        closed = true;
                        break;
                    }
                    None if c == b'=' => attributes += 1,
                    None if c == b'x' && is_xmlns(j) => namespaces += 1,
                    None => {}
                }
                j += 1;
            }
            if attributes > MAX_ATTRIBUTES {
                return Err(Error::invalid(
                    "malformed OPT",
                    format!("an element has more than {MAX_ATTRIBUTES} attributes (at byte {i})"),
                ));
            }
            if in_scope + namespaces > MAX_NAMESPACES {
                return Err(Error::invalid(
                    "malformed OPT",
                    format!(
                        "more than {MAX_NAMESPACES} namespace declarations are in scope (at byte {i})"
                    ),
                ));
            }
            let self_closing = closed && b[j - 1] == b'/';
            if !self_closing {
                if open.len() >= max {
                    return Err(Error::invalid(
                        "malformed OPT",
                        format!("elements nest deeper than {max} levels (at byte {i})"),
                    ));
                }
                // At most MAX_ATTRIBUTES (checked above), so it fits a byte.
                open.push(namespaces as u8);
                in_scope += namespaces;
            }
            i = if closed { j + 1 } else { j };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::opt::tests::opt;
    use crate::domain::opt::TemplateTree;

    #[test]
    fn depth_scan() {
        assert!(check_xml_depth("<a><b/><c x='>' y=\"/>\"></c></a>", 2).is_ok());
        assert!(check_xml_depth("<a><b><c/></b></a>", 2).is_ok());
        assert!(check_xml_depth("<a><b><c></c></b></a>", 2).is_err());
        // Comments, CDATA, PIs and declarations open nothing.
        let quiet =
            "<?xml version='1.0'?><!DOCTYPE a><a><!-- <b><b> --><![CDATA[<b><b>]]><?pi <b>?></a>";
        assert!(check_xml_depth(quiet, 1).is_ok());
        // Deep enough to overflow roxmltree's recursion in any build: refused, not a crash.
        let deep = format!("{}{}", "<a>".repeat(200_000), "</a>".repeat(200_000));
        let e = TemplateTree::parse(&deep).unwrap_err();
        assert!(e.to_string().contains("malformed OPT"), "{e}");
        let unclosed = "<a>".repeat(200_000);
        assert!(TemplateTree::parse(&unclosed).is_err());
    }

    #[test]
    fn attribute_and_namespace_limits() {
        let tag = |n: usize, prefix: &str| {
            (0..n)
                .map(|i| format!(" {prefix}{i}='v'"))
                .collect::<String>()
        };
        let max = MAX_ATTRIBUTES;
        assert!(check_xml_depth(&format!("<a{}/>", tag(max, "x")), 4).is_ok());
        let e = check_xml_depth(&format!("<a{}/>", tag(max + 1, "x")), 4).unwrap_err();
        assert!(e.to_string().contains("malformed OPT"), "{e}");
        // '=' inside quoted values is not an attribute.
        assert!(check_xml_depth(&format!("<a x='{}'/>", "=".repeat(1000)), 4).is_ok());

        // Namespaces: the element's own and its ancestors' count; closed elements' do not.
        let ns = |n: usize| tag(n, "xmlns:p");
        let m = MAX_NAMESPACES;
        assert!(check_xml_depth(&format!("<a{}><b{}/></a>", ns(m - 1), ns(1)), 4).is_ok());
        assert!(check_xml_depth(&format!("<a{}><b{}/></a>", ns(m - 1), ns(2)), 4).is_err());
        let siblings = format!(
            "<a{}>{}</a>",
            ns(m / 2),
            format!("<b{}/>", ns(m / 2)).repeat(50)
        );
        assert!(check_xml_depth(&siblings, 4).is_ok());
        let nested = format!(
            "<a{}><b{}></b><b{}></b></a>",
            ns(m / 2),
            ns(m / 2),
            ns(m / 2)
        );
        assert!(check_xml_depth(&nested, 4).is_ok());
        let chain = format!("{}{}", format!("<b{}>", ns(2)).repeat(m), "</b>".repeat(m));
        assert!(check_xml_depth(&chain, 2 * m).is_err());
        // Counted with or without whitespace before them, and the default namespace too.
        let tight = format!("<a x='1'{}/>", "xmlns:q='u'".repeat(m + 1));
        assert!(check_xml_depth(&tight, 4).is_err());
        let default = format!("<a xmlns='u'>{}</a>", "<b xmlns='u'>".repeat(m));
        assert!(check_xml_depth(&default, 2 * m).is_err());
        // The fixture-like root (xmlns and xmlns:xsi) is fine.
        assert!(TemplateTree::parse(&opt("<definition/>")).is_ok());
    }
}
