//! Scenario 7, helpers: what one use of a template's helper tree costs, against building the
//! tree again. A use gets an isolated copy (`Node::helpers_copy`, after its cache hit, is a
//! `HelperTree::clone`, which shares every node with the cached tree); a use that writes one
//! deep helper's state copies the path to it. In-process and on the growth chart's tree; no
//! node or database is involved, so the figures are the data structure's alone.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

use super::data::{CONTEXT, MODELS, OPT};
use super::harness::Harness;
use super::{BenchError, BenchResult};
use crate::domain::fc_model::{parse_context, parse_model};
use crate::domain::helpers::{self, HelperTree};
use crate::domain::opt::TemplateTree;
use crate::domain::{mapper, FcFormat};

/// The helper-tree figures: medians per operation over the samples.
#[derive(Debug, Clone, Serialize)]
pub struct HelpersReport {
    /// Helpers in the tree.
    pub helpers: usize,
    /// Depth of the helper the `copy_write` operation writes (1 is a root): the deepest one.
    pub write_depth: usize,
    /// Samples of each operation, interleaved (build, copy, copy and write, then again) so that
    /// other work on the machine slows all three alike.
    pub samples: usize,
    /// Builds per sample (a sample is the mean over them).
    pub build_iterations: usize,
    /// Copies, and copies with a write, per sample.
    pub copy_iterations: usize,
    /// `helpers::build` of the tree from the compiled mapper and the parsed template, dropped
    /// after: median ns per build.
    pub build_ns: f64,
    /// An isolated copy (`clone`), dropped after: median ns per copy.
    pub copy_ns: f64,
    /// An isolated copy, then one deep helper's state written, dropped after: median ns.
    pub copy_write_ns: f64,
    /// `build_ns / copy_ns`: how many times cheaper a use's copy is than a rebuild.
    pub copy_speedup: f64,
    /// `build_ns / copy_write_ns`.
    pub copy_write_speedup: f64,
}

/// The target: an isolated copy at least this many times cheaper than a rebuild (issue 17).
pub const COPY_SPEEDUP_TARGET: f64 = 20.0;

/// Runs the measurement on a blocking thread (it is CPU-bound for up to a second and must not
/// stall the runtime's workers).
pub async fn run(h: &Harness) -> BenchResult<HelpersReport> {
    let (samples, builds, copies) = (
        h.sizes.helper_samples,
        h.sizes.helper_builds,
        h.sizes.helper_copies,
    );
    tokio::task::spawn_blocking(move || measure(samples, builds, copies))
        .await
        .map_err(|e| BenchError::Setup(format!("helpers measurement failed: {e}")))?
}

/// The mean ns per call of `op` over `n` calls in a row.
fn per_op(n: usize, mut op: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        op();
    }
    t.elapsed().as_nanos() as f64 / n.max(1) as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure(samples: usize, builds: usize, copies: usize) -> BenchResult<HelpersReport> {
    let setup = |e: crate::Error| BenchError::Setup(format!("helpers: the bench data: {e}"));
    let context = parse_context(CONTEXT, FcFormat::Yaml).map_err(setup)?;
    let mut models = std::collections::BTreeMap::new();
    for m in MODELS {
        let doc = parse_model(m, FcFormat::Yaml).map_err(setup)?;
        models.insert(doc.name().unwrap_or_default().to_string(), doc);
    }
    let template = TemplateTree::parse(OPT).map_err(setup)?;
    let index = mapper::compile(&context, &models, true)
        .map_err(|e| BenchError::Setup(format!("helpers: the bench data: {e}")))?;
    let tree: HelperTree = helpers::build(&index, &template);
    let deep = tree.deepest_path();

    let (mut build, mut copy, mut write) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        build.push(per_op(builds, || {
            black_box(helpers::build(black_box(&index), black_box(&template)));
        }));
        copy.push(per_op(copies, || {
            black_box(black_box(&tree).clone());
        }));
        write.push(per_op(copies, || {
            let mut c = black_box(&tree).clone();
            if let Some(h) = c.get_mut(black_box(&deep)) {
                h.state_mut()
                    .insert("value".into(), serde_json::Value::from(1.8));
            }
            black_box(c);
        }));
    }
    let (build_ns, copy_ns, copy_write_ns) =
        (median(&mut build), median(&mut copy), median(&mut write));
    Ok(HelpersReport {
        helpers: tree.iter().count(),
        write_depth: deep.len(),
        samples,
        build_iterations: builds,
        copy_iterations: copies,
        build_ns,
        copy_ns,
        copy_write_ns,
        copy_speedup: build_ns / copy_ns,
        copy_write_speedup: build_ns / copy_write_ns,
    })
}
