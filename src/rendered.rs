//! Response bodies rendered once per cached value.
//!
//! A cached value is immutable and shared, so its JSON or YAML rendering is too: the first GET
//! that needs a representation renders it and every later GET of the same cached value reuses the
//! bytes (a reference-count bump). Coherence comes for free: an eviction drops the value and its
//! renderings together, and a reload starts with none.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;

/// A representation a response body can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    /// `application/json`.
    Json,
    /// `application/yaml`.
    Yaml,
}

/// Memoized renderings of one immutable value, one slot per [`Representation`].
///
/// Cloning gives an empty memo: a clone may be changed before it is shared, so it renders afresh.
#[derive(Default)]
pub struct Rendered {
    json: OnceLock<Bytes>,
    yaml: OnceLock<Bytes>,
}

impl Rendered {
    /// The bytes of `repr`, rendering them with `render` on first use. A failed rendering is not
    /// remembered (the next call tries again). Two first calls racing may both render; one result
    /// is kept and both are identical.
    pub fn get_or_render<E>(
        &self,
        repr: Representation,
        render: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        let slot = match repr {
            Representation::Json => &self.json,
            Representation::Yaml => &self.yaml,
        };
        if let Some(bytes) = slot.get() {
            return Ok(bytes.clone());
        }
        let bytes = render()?;
        Ok(slot.get_or_init(|| bytes).clone())
    }
}

impl Clone for Rendered {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendered")
            .field("json", &self.json.get().map(Bytes::len))
            .field("yaml", &self.yaml.get().map(Bytes::len))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn renders_each_representation_once() {
        let r = Rendered::default();
        let calls = Cell::new(0);
        let render = |s: &'static str| {
            calls.set(calls.get() + 1);
            Ok::<_, ()>(Bytes::from_static(s.as_bytes()))
        };
        assert_eq!(
            r.get_or_render(Representation::Json, || render("j")),
            Ok(Bytes::from("j"))
        );
        assert_eq!(
            r.get_or_render(Representation::Json, || render("x")),
            Ok(Bytes::from("j"))
        );
        assert_eq!(
            r.get_or_render(Representation::Yaml, || render("y")),
            Ok(Bytes::from("y"))
        );
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_failed_rendering_is_not_remembered_and_a_clone_starts_empty() {
        let r = Rendered::default();
        assert_eq!(
            r.get_or_render(Representation::Json, || Err("boom")),
            Err("boom")
        );
        assert_eq!(
            r.get_or_render(Representation::Json, || Ok::<_, &str>(Bytes::from("ok"))),
            Ok(Bytes::from("ok"))
        );
        let c = r.clone();
        assert_eq!(
            c.get_or_render(Representation::Json, || Ok::<_, &str>(Bytes::from("new"))),
            Ok(Bytes::from("new"))
        );
    }
}
