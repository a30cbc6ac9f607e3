//! The definition tree of an OPT (openEHR Operational Template): every constrained node with its
//! openEHR path, name, occurrences and archetype, ready for resolving FHIR Connect paths.
//!
//! [`TemplateTree::parse`] reads the whole template once; the result is immutable and can be shared
//! (`Arc<TemplateTree>`) between requests.

use std::collections::HashMap;
use std::rc::Rc;

use roxmltree::Node as XmlNode;

use super::limits::{check_xml_depth, MAX_DEPTH};
use crate::domain::opt::Template;
use crate::error::{Error, Result};

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

impl crate::domain::footprint::Footprint for Node {
    /// This node and its subtree: every string's and vector's heap buffer.
    fn footprint(&self) -> usize {
        use crate::domain::footprint::{opt_string_heap, strings_heap};
        std::mem::size_of::<Node>()
            + self.rm_type.capacity()
            + self.constraint.capacity()
            + opt_string_heap(&self.node_id)
            + opt_string_heap(&self.archetype_id)
            + opt_string_heap(&self.attribute)
            + opt_string_heap(&self.name)
            + self.path.capacity()
            + strings_heap(&self.slot_includes)
            // The children's own slots are counted by their `size_of::<Node>()`; add spare capacity.
            + (self.children.capacity() - self.children.len()) * std::mem::size_of::<Node>()
            + self.children.iter().map(|c| c.footprint()).sum::<usize>()
    }
}

impl crate::domain::footprint::Footprint for TemplateTree {
    /// The tree, its header and its path index (a hash map: one slot of key, value and control
    /// byte per entry, with the table's spare slots).
    fn footprint(&self) -> usize {
        use crate::domain::footprint::opt_string_heap;
        let h = &self.header;
        let slot = std::mem::size_of::<(String, Box<[u32]>)>() + 1;
        let index: usize = self
            .paths
            .iter()
            .map(|(k, v)| k.capacity() + std::mem::size_of_val(&**v))
            .sum::<usize>()
            + (self.paths.capacity() * 8 / 7 + 1) * slot;
        std::mem::size_of::<Self>()
            + h.template_id.capacity()
            + h.normalized_id.capacity()
            + opt_string_heap(&h.concept)
            + opt_string_heap(&h.language)
            + opt_string_heap(&h.sem_ver)
            + self.root.footprint()
            - std::mem::size_of::<Node>()
            + index
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
    use crate::domain::opt::tests::opt;

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
}
