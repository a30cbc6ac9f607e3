//! The tests that need no database, no socket and no other process: the HTTP router driven in
//! memory, decoders fed hostile input, parsers, and checks of the documentation, the deployment
//! files and the source layout. One binary with a module per area; run one area with
//! `cargo test --test offline router::`.
//!
//! Nothing here sets an environment variable or binds an address. The one piece of process-wide
//! state is the global allocator (`alloc`), whose counters are per thread.

mod alloc;
mod architecture;
mod cluster_wire;
mod deploy;
mod domain_parse;
mod footprint;
mod fuzz_seeds;
mod hostile_input;
mod readme;
mod router;
