//! NOTIFY payloads: `catchup::parse_payload` and the change a parsed row stands for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::invalidation::{parse_payload, Notification};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(Notification::Row(row)) = parse_payload(&text) {
        assert!(matches!(
            row.operation.as_str(),
            "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE"
        ));
        let _ = row.change();
    }
});
