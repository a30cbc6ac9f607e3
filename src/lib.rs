//! # openfhir-cache
//!
//! Coherent in-memory caches of openFHIR artifacts (OPT templates, FHIR Connect contexts and
//! models, tenant records), with PostgreSQL as the source of truth.
//!
//! ## The coherence model, in short
//! * Reads go through per-group caches ([`cache`]) whose TTL comes from the environment
//!   (`0` disabled, `-1` infinite, `N` seconds expire-after-write). Concurrent misses on one key
//!   load once (with TTL `0` there is no cache, so every read loads).
//! * Writes go to PostgreSQL ([`store`]); only after COMMIT is the change applied to the caches,
//!   through one rule ([`cache::targets`]) that every invalidation channel shares.
//! * An eviction that races with an in-flight load of the same key wins: entries carry the
//!   generation they were loaded under, and an entry older than the key's current generation is
//!   never served ([`cache::VersionedCache`]).
//!
//! ## Layers
//! Modules depend one way, each only on those above it in this list
//! (`tests/offline/architecture.rs` checks it): [`config`], [`error`], [`rendered`],
//! [`supervise`], [`domain`], [`cache`], [`store`], [`invalidation`], [`cluster`], [`node`],
//! [`bootstrap`], [`api`], [`app`], and the benchmark harness `bench` (feature `bench`, on by
//! default) over all of them.
//!
//! ## Embedding
//! Build a [`node::Node`] from a [`config::Config`] and call its read and write methods; or run
//! the whole HTTP node with [`app::start`].
#![warn(missing_docs)]

pub mod api;
pub mod app;
#[cfg(feature = "bench")]
pub mod bench;
pub mod bootstrap;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod invalidation;
pub mod node;
pub mod rendered;
pub mod store;
pub mod supervise;

pub use config::Config;
pub use error::{Error, Result};
pub use node::Node;
