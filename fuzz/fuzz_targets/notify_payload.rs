//! NOTIFY payloads (one row's object or a packed array): `parse_payload` and the change each
//! parsed row stands for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::invalidation::{parse_payload, Notification};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for n in parse_payload(&text).unwrap_or_default() {
        if let Notification::Row(row) = n {
            assert!(matches!(
                row.operation.as_str(),
                "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE" | "EVICT"
            ));
            let _ = row.change();
        }
    }
});
