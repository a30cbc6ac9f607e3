//! Configuration values: `Ttl`, `HostPort` and `parse_initial_hosts` on the whole input, and
//! `Config::from_sources` with the input's lines as the values of the variables, in `VARS`
//! order. Whatever parses prints back to the same value.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use openfhir_cache::config::{parse_initial_hosts, Config, HostPort, Ttl, VARS};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = Ttl::from_str(&text) {
        assert_eq!(Ttl::from_str(&t.to_string()), Ok(t));
    }
    if let Ok(h) = HostPort::from_str(&text) {
        assert_eq!(HostPort::from_str(&h.to_string()), Ok(h));
    }
    if let Ok(hosts) = parse_initial_hosts(&text) {
        for h in hosts {
            assert_eq!(HostPort::from_str(&h.to_string()), Ok(h));
        }
    }
    let values: Vec<&str> = text.split('\n').collect();
    let env = |name: &str| {
        VARS.iter()
            .position(|v| v.env == name)
            .and_then(|i| values.get(i))
            .map(|v| v.to_string())
    };
    let _ = Config::from_sources(None, env);
});
