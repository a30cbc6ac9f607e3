//! The definition tree of an OPT (openEHR Operational Template): every constrained node with its
//! openEHR path, name, occurrences and archetype, ready for resolving FHIR Connect paths.
//!
//! [`TemplateTree::parse`] reads the whole template once; the result is immutable and can be shared
//! (`Arc<TemplateTree>`) between requests.

use std::collections::HashMap;
use std::rc::Rc;

use roxmltree::Node as XmlNode;

use crate::domain::opt::Template;
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

const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// How often a node may occur: `lower..=upper`, `upper: None` = unbounded (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrences {
    /// Minimum number of occurrences.
    pub lower: u32,
    /// Maximum number of occurrences; `None` when unbounded.
    pub upper: Option<u32>,
}

impl Default for Occurrences {
    /// `1..1`, the openEHR default when a constraint has no `occurrences`.
    fn default() -> Self {
        Occurrences {
            lower: 1,
            upper: Some(1),
        }
    }
}

/// What kind of constraint a node is (its `xsi:type`, grouped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeKind {
    /// `C_COMPLEX_OBJECT`: an RM object with attributes.
    Complex,
    /// `C_ARCHETYPE_ROOT`: the root of an archetype used in the template.
    ArchetypeRoot,
    /// `ARCHETYPE_SLOT`: a place where other archetypes may be plugged in.
    Slot,
    /// Anything else (`C_STRING`, `C_CODE_PHRASE`, `C_DV_QUANTITY`, `C_CODE_REFERENCE`, ...):
    /// a leaf constraint, see [`Node::constraint`] for the exact type.
    Leaf,
}

/// One constraint object of the definition tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `rm_type_name` (`COMPOSITION`, `OBSERVATION`, `ELEMENT`, `DV_QUANTITY`, ...).
    pub rm_type: String,
    /// The `xsi:type` of the constraint (`C_COMPLEX_OBJECT`, `C_ARCHETYPE_ROOT`,
    /// `ARCHETYPE_SLOT`, `C_DV_QUANTITY`, ...), namespace prefix removed.
    pub constraint: String,
    /// Grouped [`Node::constraint`].
    pub kind: NodeKind,
    /// `node_id` (`at0004`); `None` when absent or empty, as on most leaves.
    pub node_id: Option<String>,
    /// `archetype_id/value` of a `C_ARCHETYPE_ROOT` (`openEHR-EHR-OBSERVATION.height.v2`).
    pub archetype_id: Option<String>,
    /// `occurrences` (`1..1` when the constraint has none).
    pub occurrences: Occurrences,
    /// `rm_attribute_name` of the attribute this node hangs under; `None` for the root.
    pub attribute: Option<String>,
    /// The node's text from the nearest archetype root's `term_definitions` (`code` = node id,
    /// `items id="text"`).
    pub name: Option<String>,
    /// The openEHR path: attribute names with `[node id]` (or `[archetype id]` on archetype
    /// roots); `/` for the root. A node without node id has the path of its attribute.
    pub path: String,
    /// Slot only: the `includes` assertions (`string_expression`), e.g.
    /// `archetype_id/value matches {/openEHR-EHR-CLUSTER\.device\.v1/}`.
    pub slot_includes: Vec<String>,
    /// The nodes under this node's attributes, in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// Every node of this subtree (this one first), depth first, in document order.
    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        let mut stack = vec![self];
        std::iter::from_fn(move || {
            let n = stack.pop()?;
            stack.extend(n.children.iter().rev());
            Some(n)
        })
    }
}

/// A parsed OPT: its header and its definition tree, indexed by path. Immutable.
#[derive(Debug, Clone)]
pub struct TemplateTree {
    header: Template,
    root: Node,
    /// Path -> child-index route from the root, to the first node (in document order) with that
    /// path.
    paths: HashMap<String, Box<[u32]>>,
    len: usize,
}

impl TemplateTree {
    /// Parses an OPT.
    ///
    /// DTDs are refused (roxmltree's default), so entities are never expanded. Fails with
    /// [`Error::Invalid`] naming what is missing when the text is not XML, the root is not
    /// `<template>`, `template_id/value` or `definition` is missing, a number is malformed, the
    /// elements nest deeper than [`MAX_DEPTH`] (or break another limit of [`check_xml_depth`]), or
    /// the definition's paths would take more than four times the text's size plus 1 MiB (each
    /// node repeats its parent's path, so long names in a deep tree, or many children under a long
    /// path, could otherwise cost gigabytes for a text of kilobytes).
    pub fn parse(xml: &str) -> Result<TemplateTree> {
        let xml = crate::domain::opt::xml_start(xml);
        check_xml_depth(xml, MAX_DEPTH)?;
        let doc = roxmltree::Document::parse(xml)
            .map_err(|e| Error::invalid("malformed OPT XML", format!("malformed OPT XML: {e}")))?;
        let root = doc.root_element();
        let header = crate::domain::opt::read_header(root)?;
        let definition = child(root, "definition").ok_or_else(|| {
            Error::invalid(
                "OPT has no definition",
                "missing <definition> under <template>: the constraint tree is required",
            )
        })?;
        let root_node = build_tree(definition, path_budget(xml.len()))?;
        let mut paths = HashMap::new();
        let mut len = 0;
        let mut stack: Vec<(&Node, Vec<u32>)> = vec![(&root_node, Vec::new())];
        while let Some((n, route)) = stack.pop() {
            len += 1;
            for (i, c) in n.children.iter().enumerate().rev() {
                let mut r = route.clone();
                r.push(i as u32);
                stack.push((c, r));
            }
            paths
                .entry(n.path.clone())
                .or_insert_with(|| route.into_boxed_slice());
        }
        Ok(TemplateTree {
            header,
            root: root_node,
            paths,
            len,
        })
    }

    /// The header: template id (as written and normalized), concept, language, `sem_ver`.
    pub fn header(&self) -> &Template {
        &self.header
    }

    /// `template_id/value` as written (`Growth chart`).
    pub fn template_id(&self) -> &str {
        &self.header.template_id
    }

    /// The root of the definition tree (path `/`).
    pub fn root(&self) -> &Node {
        &self.root
    }

    /// The first node (in document order) whose path is `path`.
    pub fn find(&self, path: &str) -> Option<&Node> {
        let route = self.paths.get(path)?;
        let mut n = &self.root;
        for &i in route.iter() {
            n = &n.children[i as usize];
        }
        Some(n)
    }

    /// Every node of the tree, depth first, in document order.
    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.root.iter()
    }

    /// Number of nodes in the tree.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of distinct paths (nodes sharing a path count once).
    pub fn path_count(&self) -> usize {
        self.paths.len()
    }
}

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

/// Parses an OPT into its [`TemplateTree`]; see [`TemplateTree::parse`].
pub fn parse_template(xml: &str) -> Result<TemplateTree> {
    TemplateTree::parse(xml)
}

fn child<'a, 'i>(node: XmlNode<'a, 'i>, name: &'static str) -> Option<XmlNode<'a, 'i>> {
    elements(node, name).next()
}

fn elements<'a, 'i>(
    node: XmlNode<'a, 'i>,
    name: &'static str,
) -> impl Iterator<Item = XmlNode<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn text(node: Option<XmlNode<'_, '_>>) -> Option<String> {
    node.and_then(|n| n.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

fn xsi_type<'a>(node: XmlNode<'a, '_>) -> Option<&'a str> {
    node.attribute((XSI_NS, "type"))
        .or_else(|| {
            node.attributes()
                .find(|a| a.name() == "type")
                .map(|a| a.value())
        })
        .map(|t| t.rsplit(':').next().unwrap_or(t))
}

fn occurrences(node: XmlNode<'_, '_>, path: &str) -> Result<Occurrences> {
    let Some(occ) = child(node, "occurrences") else {
        return Ok(Occurrences::default());
    };
    let num = |name: &'static str| -> Result<Option<u32>> {
        match text(child(occ, name)) {
            None => Ok(None),
            Some(t) => t.parse().map(Some).map_err(|_| {
                Error::invalid(
                    "malformed OPT",
                    format!("occurrences/{name} of {path} is {t:?}, not a whole number >= 0"),
                )
            }),
        }
    };
    let unbounded = text(child(occ, "upper_unbounded")).as_deref() == Some("true");
    let lower = num("lower")?.unwrap_or(0);
    let upper = if unbounded { None } else { num("upper")? };
    Ok(Occurrences { lower, upper })
}

/// The bytes the paths and attribute names of the tree of an OPT of `len` bytes may take (see
/// [`TemplateTree::parse`]). Real OPTs take well under their own size.
fn path_budget(len: usize) -> usize {
    len.saturating_mul(4).saturating_add(1 << 20)
}

/// Everything under `definition`, built with an explicit stack (no recursion): the frames live
/// on the heap, and [`check_xml_depth`] has already bounded their number. Fails once the nodes'
/// paths and attribute names add up to more than `budget` bytes.
fn build_tree(definition: XmlNode<'_, '_>, budget: usize) -> Result<Node> {
    struct Frame<'a, 'i> {
        node: Node,
        /// The XML children still to build, with the attribute each hangs under.
        pending: std::vec::IntoIter<(Rc<str>, XmlNode<'a, 'i>)>,
        terms: Rc<Terms>,
    }
    let open = |obj, attribute: Option<Rc<str>>, parent_path: &str, terms: &Rc<Terms>| {
        let (node, pending, terms) = open_node(obj, attribute.as_deref(), parent_path, terms)?;
        Ok::<_, Error>(Frame {
            node,
            pending: pending.into_iter(),
            terms,
        })
    };
    let mut spent = 0usize;
    let mut charge = |frame: &Frame| {
        spent += frame.node.path.len() + frame.node.attribute.as_ref().map_or(0, String::len);
        if spent > budget {
            return Err(Error::invalid(
                "OPT too large",
                format!(
                    "the paths of the definition's nodes add up to more than {budget} bytes \
                     (4 times the OPT's size plus 1 MiB): long names repeated in a deep tree"
                ),
            ));
        }
        Ok(())
    };
    let root = open(definition, None, "", &Rc::new(Terms::new()))?;
    charge(&root)?;
    let mut stack = vec![root];
    loop {
        let top = stack.last_mut().expect("the root frame is popped last");
        if let Some((attr, xml)) = top.pending.next() {
            let frame = open(xml, Some(attr), &top.node.path, &top.terms)?;
            charge(&frame)?;
            stack.push(frame);
        } else {
            let done = stack.pop().expect("not empty").node;
            match stack.last_mut() {
                Some(parent) => parent.node.children.push(done),
                None => return Ok(done),
            }
        }
    }
}

type Terms = HashMap<String, String>;

/// Reads one constraint object (a `children` or `definition` element) without its subtree.
/// Returns the node (no children yet), its XML children with their attribute names, and the term
/// definitions in force below it (its own when it is an archetype root, else `terms`).
#[allow(clippy::type_complexity)]
fn open_node<'a, 'i>(
    obj: XmlNode<'a, 'i>,
    attribute: Option<&str>,
    parent_path: &str,
    terms: &Rc<Terms>,
) -> Result<(Node, Vec<(Rc<str>, XmlNode<'a, 'i>)>, Rc<Terms>)> {
    let constraint = xsi_type(obj).unwrap_or("C_COMPLEX_OBJECT").to_string();
    let kind = match constraint.as_str() {
        "C_COMPLEX_OBJECT" => NodeKind::Complex,
        "C_ARCHETYPE_ROOT" => NodeKind::ArchetypeRoot,
        "ARCHETYPE_SLOT" => NodeKind::Slot,
        _ => NodeKind::Leaf,
    };
    let rm_type = text(child(obj, "rm_type_name")).unwrap_or_default();
    let node_id = text(child(obj, "node_id"));
    let archetype_id = if kind == NodeKind::ArchetypeRoot {
        text(child(obj, "archetype_id").and_then(|a| child(a, "value")))
    } else {
        None
    };
    let path = match attribute {
        None => "/".to_string(),
        Some(attr) => {
            let base = if parent_path == "/" { "" } else { parent_path };
            match archetype_id.as_deref().or(node_id.as_deref()) {
                Some(id) => format!("{base}/{attr}[{id}]"),
                None => format!("{base}/{attr}"),
            }
        }
    };

    // An archetype root brings its own term definitions for itself and everything below it.
    let terms = if kind == NodeKind::ArchetypeRoot {
        Rc::new(
            elements(obj, "term_definitions")
                .filter_map(|t| {
                    let code = t.attribute("code")?;
                    let txt = elements(t, "items").find(|i| i.attribute("id") == Some("text"))?;
                    Some((code.to_string(), text(Some(txt))?))
                })
                .collect::<Terms>(),
        )
    } else {
        Rc::clone(terms)
    };
    let name = node_id.as_ref().and_then(|id| terms.get(id).cloned());

    let slot_includes = if kind == NodeKind::Slot {
        elements(obj, "includes")
            .filter_map(|i| text(child(i, "string_expression")))
            .collect()
    } else {
        Vec::new()
    };

    let mut pending = Vec::new();
    for attr in elements(obj, "attributes") {
        let Some(attr_name) = text(child(attr, "rm_attribute_name")) else {
            return Err(Error::invalid(
                "malformed OPT",
                format!("an attribute of {path} has no rm_attribute_name"),
            ));
        };
        let attr_name: Rc<str> = attr_name.into();
        pending.extend(elements(attr, "children").map(|c| (Rc::clone(&attr_name), c)));
    }

    let node = Node {
        occurrences: occurrences(obj, &path)?,
        rm_type,
        constraint,
        kind,
        node_id,
        archetype_id,
        attribute: attribute.map(str::to_string),
        name,
        path,
        slot_includes,
        children: Vec::new(),
    };
    Ok((node, pending, terms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(definition: &str) -> String {
        format!(
            r#"<template xmlns="http://schemas.openehr.org/v1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><template_id><value>T</value></template_id>{definition}</template>"#
        )
    }

    #[test]
    fn root_and_leaf_paths() {
        let xml = opt(
            r#"<definition xsi:type="C_ARCHETYPE_ROOT"><rm_type_name>CLUSTER</rm_type_name><node_id>at0000</node_id>
            <archetype_id><value>openEHR-EHR-CLUSTER.x.v1</value></archetype_id>
            <attributes xsi:type="C_MULTIPLE_ATTRIBUTE"><rm_attribute_name>items</rm_attribute_name>
              <children xsi:type="C_COMPLEX_OBJECT"><rm_type_name>ELEMENT</rm_type_name>
                <occurrences><lower_unbounded>false</lower_unbounded><upper_unbounded>true</upper_unbounded><lower>0</lower></occurrences>
                <node_id>at0001</node_id>
                <attributes xsi:type="C_SINGLE_ATTRIBUTE"><rm_attribute_name>value</rm_attribute_name>
                  <children xsi:type="C_STRING"><rm_type_name>STRING</rm_type_name><node_id/></children>
                </attributes></children></attributes>
            <term_definitions code="at0001"><items id="text">Thing</items></term_definitions>
            </definition>"#,
        );
        let t = TemplateTree::parse(&xml).unwrap();
        assert_eq!(t.root().path, "/");
        assert_eq!(
            t.root().archetype_id.as_deref(),
            Some("openEHR-EHR-CLUSTER.x.v1")
        );
        let e = t.find("/items[at0001]").unwrap();
        assert_eq!(e.name.as_deref(), Some("Thing"));
        assert_eq!(
            e.occurrences,
            Occurrences {
                lower: 0,
                upper: None
            }
        );
        let leaf = t.find("/items[at0001]/value").unwrap();
        assert_eq!(
            (leaf.kind, leaf.constraint.as_str()),
            (NodeKind::Leaf, "C_STRING")
        );
        assert_eq!(leaf.occurrences, Occurrences::default());
        assert_eq!(t.len(), 3);
    }

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
