//! OPT XML: `parse_opt` (the header) and `TemplateTree::parse` (the definition tree), whose
//! results must agree; a tree holds together (every node is found at its path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::domain::parse_opt;
use openfhir_cache::domain::opt::TemplateTree;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let header = parse_opt(xml);
    if let Ok(tree) = TemplateTree::parse(xml) {
        if let Ok(h) = &header {
            assert_eq!(h, tree.header());
        }
        assert_eq!(tree.len(), tree.iter().count());
        for n in tree.iter() {
            assert_eq!(tree.find(&n.path).map(|f| &f.path), Some(&n.path));
        }
    }
});
