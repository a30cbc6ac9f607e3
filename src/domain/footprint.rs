//! How many bytes of memory a cached value keeps alive: the weight the size-bounded caches
//! (`OPENFHIR_CACHE_*_MAX_BYTES`) charge each entry.
//!
//! The figures are estimates, computed once when an entry is stored. They are meant to err on
//! the high side: a bound that undercounts lets a node outgrow its memory limit, one that
//! overcounts only keeps fewer entries. `tests/offline/footprint.rs` checks each estimate against
//! the bytes the allocator actually handed out while the value was built.
//!
//! * Trees we own ([`TemplateTree`](crate::domain::opt::TemplateTree), [`serde_json::Value`]) are
//!   walked field by field.
//! * Helper trees ([`HelperTree`]) are walked node by node too: their nodes and strings sit
//!   behind `Arc`s, whose headers and per-node sizes the JSON text does not reflect.
//! * Typed FHIR Connect documents and mappers are deep structures of strings, vectors and maps
//!   with serde derives; their weight is the length of their JSON encoding (counted without
//!   building it) times [`TYPED_PER_JSON_BYTE`], which covers the per-string and per-collection
//!   headers the text does not show.

use serde::Serialize;
use serde_json::Value;

use crate::domain::fc_model::ModelDocument;
use crate::domain::helpers::{Helper, HelperTree};
use crate::domain::mapper::CompiledMapper;
use crate::domain::{FcDocument, FcList, OptDocument, Tenant};

/// Bytes per byte of JSON text charged to a typed, serde-derived structure (see the module
/// documentation; calibrated by `tests/offline/footprint.rs`).
pub const TYPED_PER_JSON_BYTE: usize = 5;

/// Bytes a B-tree map spends per entry beyond its key and value (node headers, spare slots).
const MAP_ENTRY_OVERHEAD: usize = 64;

/// One node of a JSON object's B-tree: 11 key and value slots, the edges of an internal node and
/// the header.
const BTREE_NODE: usize =
    11 * (std::mem::size_of::<String>() + std::mem::size_of::<Value>()) + 12 * 8 + 16;

/// The two reference counts in front of every `Arc`'s value.
const ARC_HEADER: usize = 2 * std::mem::size_of::<usize>();

/// What a value keeps alive in memory, in bytes: its own size plus everything it owns on the heap.
pub trait Footprint {
    /// The estimate, in bytes (see the module documentation).
    fn footprint(&self) -> usize;
}

/// What a size-bounded cache charges for `v`: its [`Footprint`] plus a quarter for the
/// allocator's own bookkeeping (a header per allocation, sizes rounded up to its size classes),
/// which the footprint, a sum of requested sizes, does not see.
pub fn charged<T: Footprint + ?Sized>(v: &T) -> usize {
    let f = v.footprint();
    f + f / 4
}

/// Heap bytes of a string (its capacity: what the allocator holds for it).
pub fn string_heap(s: &String) -> usize {
    s.capacity()
}

/// Heap bytes of an optional string.
pub fn opt_string_heap(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, string_heap)
}

/// Heap bytes of a vector of strings: the vector's buffer and every string's.
pub fn strings_heap(v: &[String]) -> usize {
    std::mem::size_of_val(v) + v.iter().map(string_heap).sum::<usize>()
}

/// Heap bytes of a JSON value, walked node by node.
pub fn json_heap(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.capacity(),
        Value::Array(a) => {
            a.capacity() * std::mem::size_of::<Value>() + a.iter().map(json_heap).sum::<usize>()
        }
        Value::Object(m) => json_map_heap(m),
    }
}

/// Heap bytes of a JSON object's map, walked node by node (an empty map holds none).
pub fn json_map_heap(m: &serde_json::Map<String, Value>) -> usize {
    if m.is_empty() {
        return 0;
    }
    // serde_json's map is a B-tree: nodes of 11 slots (key, value), at least half full except
    // the root, so even a one-entry map pays a whole node.
    let nodes = m.len().div_ceil(5).max(1);
    nodes * BTREE_NODE
        + m.iter()
            .map(|(k, v)| k.capacity() + json_heap(v))
            .sum::<usize>()
}

/// Length of `v`'s JSON encoding, counted as it is written (nothing is built).
pub fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing into a counter fails only if serializing does (a map with non-string keys), which
    // our types never have; the partial count is still a lower bound worth charging.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Footprint of a typed, serde-derived structure (see [`TYPED_PER_JSON_BYTE`]).
pub fn typed<T: Serialize + ?Sized>(v: &T) -> usize {
    json_len(v) * TYPED_PER_JSON_BYTE
}

/// Bytes reserved for the rendered response bodies of an entry (`Rendered` fills them on first
/// use, after the entry was weighed): one JSON and one YAML rendering of about the source's size.
fn rendered_allowance(source_len: usize) -> usize {
    2 * source_len
}

impl Footprint for OptDocument {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.tenant.capacity()
            + self.template.template_id.capacity()
            + self.template.normalized_id.capacity()
            + opt_string_heap(&self.template.concept)
            + opt_string_heap(&self.template.language)
            + opt_string_heap(&self.template.sem_ver)
            + self.content.len()
            + self.tree.footprint()
    }
}

impl Footprint for FcDocument {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.tenant.capacity()
            + self.id.capacity()
            + self.display_id.capacity()
            + opt_string_heap(&self.archetype)
            + opt_string_heap(&self.extends)
            + ARC_HEADER
            + self.content.len()
            + ARC_HEADER
            + std::mem::size_of::<Value>()
            + json_heap(&self.json)
            + rendered_allowance(self.content.len())
    }
}

impl Footprint for FcList {
    fn footprint(&self) -> usize {
        let docs: usize = self.docs.iter().map(|d| d.footprint()).sum();
        let text: usize = self.docs.iter().map(|d| d.content.len()).sum();
        std::mem::size_of::<Self>()
            + self.docs.capacity() * std::mem::size_of::<usize>()
            + docs
            + rendered_allowance(text)
    }
}

impl Footprint for Tenant {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.id.capacity()
            + self.name.capacity()
            + json_heap(&self.config)
    }
}

impl Footprint for ModelDocument {
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + typed(self)
    }
}

impl Footprint for CompiledMapper {
    fn footprint(&self) -> usize {
        let i = &self.index;
        let models: usize = i
            .by_model
            .iter()
            .map(|(k, m)| {
                MAP_ENTRY_OVERHEAD + 2 * std::mem::size_of::<usize>() + k.capacity() + m.footprint()
            })
            .sum();
        let archetypes: usize = i
            .by_archetype
            .iter()
            .map(|(k, v)| MAP_ENTRY_OVERHEAD + 48 + k.capacity() + strings_heap(v))
            .sum();
        std::mem::size_of::<Self>()
            + i.template_id.capacity()
            + typed(&*i.context)
            + models
            + archetypes
            + strings_heap(&i.merged_extensions)
            + strings_heap(&i.warnings)
            + opt_string_heap(&i.start)
            + self.node.capacity()
    }
}

/// Bytes of an `Arc<str>` holding `s`: the two counts and the text.
fn arc_str(s: &str) -> usize {
    ARC_HEADER + s.len()
}

/// One helper node: its `Arc` block, its strings, its child list and its state. A model's name
/// is one string shared by all its helpers, charged to each of them (on the high side).
fn helper_heap(h: &Helper) -> usize {
    let children = match h.children().len() {
        // Every leaf shares one empty list, charged once per tree.
        0 => 0,
        n => ARC_HEADER + n * std::mem::size_of::<std::sync::Arc<Helper>>(),
    };
    ARC_HEADER
        + std::mem::size_of::<Helper>()
        + arc_str(h.model())
        + arc_str(h.mapping())
        + h.fhir_path().map_or(0, arc_str)
        + h.openehr_path().map_or(0, arc_str)
        + children
        + json_map_heap(h.state())
}

/// A tree as the cache holds it: every node counted once (in a built tree no node is shared;
/// the copies a use makes are not in the cache).
impl Footprint for HelperTree {
    fn footprint(&self) -> usize {
        // The template id, the root list, the unresolved list, then the one empty child list
        // every leaf shares, then the nodes.
        std::mem::size_of::<Self>()
            + arc_str(self.template_id())
            + ARC_HEADER
            + std::mem::size_of_val(self.roots())
            + ARC_HEADER
            + std::mem::size_of::<Vec<String>>()
            + strings_heap(self.unresolved())
            + ARC_HEADER
            + self.iter().map(helper_heap).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_heap_counts_strings_arrays_and_objects() {
        assert_eq!(json_heap(&Value::Null), 0);
        let s = Value::String("x".repeat(100));
        assert!(json_heap(&s) >= 100);
        let a = serde_json::json!(["a".repeat(50), "b".repeat(50)]);
        assert!(json_heap(&a) >= 100 + 2 * std::mem::size_of::<Value>());
        let o = serde_json::json!({ "k".repeat(10): "v".repeat(90) });
        assert!(json_heap(&o) >= 100);
    }

    #[test]
    fn json_len_is_the_encoding_length() {
        let v = serde_json::json!({"a": [1, 2, "three"]});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
    }
}
