//! The library's error type.

use std::sync::Arc;

/// Everything that can go wrong inside the library.
///
/// HTTP status mapping lives in one place (`api::error`); this type only says *what* happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (names the variable or file key and the value).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// The database could not be reached or a query failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),

    /// No connection could be taken from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),

    /// Applying the schema migrations failed.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// Migration version number.
        version: i32,
        /// Migration file name.
        name: String,
        /// The underlying database error.
        source: tokio_postgres::Error,
    },

    /// An uploaded document is malformed or lacks a required field.
    #[error("{message}")]
    Invalid {
        /// One-line summary.
        message: String,
        /// Every problem found, each naming the offending field or position.
        details: Vec<String>,
    },

    /// The named thing does not exist.
    #[error("{what} '{id}' not found")]
    NotFound {
        /// Kind of thing (`tenant`, `OPT`, `context`, `model`).
        what: &'static str,
        /// Its id.
        id: String,
    },

    /// The request is understood but cannot be carried out with what is stored (e.g. a mapper
    /// that names models not uploaded): answered 422 with every problem.
    #[error("{message}")]
    Unprocessable {
        /// One-line summary.
        message: String,
        /// Every problem found.
        details: Vec<String>,
    },

    /// The change is not allowed (e.g. deleting the default tenant).
    #[error("{0}")]
    Conflict(String),

    /// An OPT, context or model with that template id or name already exists (a create, or a
    /// rename onto a taken key); the message is openFHIR's, and like openFHIR's it is a 400.
    #[error("{0}")]
    Duplicate(String),

    /// A stored row could not be decoded (corrupt or hand-edited data).
    #[error("stored {what} '{id}' is unreadable: {reason}")]
    CorruptRow {
        /// Kind of row.
        what: &'static str,
        /// Its key.
        id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The database does not answer at startup.
    #[error("cannot reach the database at {url}: {cause}. {hint}")]
    DatabaseUnreachable {
        /// The URL, password masked.
        url: String,
        /// What the driver said.
        cause: String,
        /// How to fix it.
        hint: String,
    },

    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {io} (set OPENFHIR_HTTP_ADDR to a free address)")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (in the message, not a separate source, so it is printed once).
        io: std::io::Error,
    },

    /// The cluster port could not be bound.
    #[error(
        "cannot listen for cluster peers on {addr}: {io} (is another node using it? set \
         CLUSTER_BIND_ADDR or CLUSTER_PORT to a free address)"
    )]
    ClusterBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (in the message, not a separate source, so it is printed once).
        io: std::io::Error,
    },

    /// A cache load failed; the same failure is shared by every caller that waited on it.
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    /// Builds an [`Error::Invalid`] with a single detail.
    pub fn invalid(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            details: vec![detail.into()],
        }
    }

    /// The error behind any number of [`Error::Shared`] wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// True when retrying later may succeed (the database is unreachable, restarting or
    /// overloaded), i.e. HTTP 503.
    pub fn is_unavailable(&self) -> bool {
        match self.root() {
            Error::Db(e) => match e.code() {
                // No SQLSTATE: the connection itself failed or closed.
                None => true,
                // 08 connection exception, 53 insufficient resources, 57 operator intervention
                // (e.g. shutdown), 58 system error.
                // 42P01 undefined table / 3D000 no such database: not migrated or not there yet.
                Some(c) => {
                    matches!(&c.code()[..2], "08" | "53" | "57" | "58")
                        || matches!(c.code(), "42P01" | "3D000")
                }
            },
            Error::Pool(_) | Error::Migration { .. } | Error::DatabaseUnreachable { .. } => true,
            _ => false,
        }
    }

    /// True when PostgreSQL refused a value the client sent (SQLSTATE class 22, data exception),
    /// e.g. a NUL character: a client error, not an outage.
    pub fn is_bad_value(&self) -> bool {
        matches!(self.root(), Error::Db(e) if e.code().is_some_and(|c| c.code().starts_with("22")))
    }
}

impl From<Arc<Error>> for Error {
    fn from(e: Arc<Error>) -> Self {
        Error::Shared(e)
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
