//! The expensive part the FHIR Connect cache spares every mapping request, measured side by side
//! with what a cached request does instead:
//!
//! * OPT parse, by size (the fixture, ~300 KB and ~3 MB);
//! * mapper compile vs a cached mapper fetch;
//! * helper build vs an isolated helper copy (what every request gets: it shares the cached
//!   tree's nodes), and a copy that then writes one deep helper's state (copying that path).
//!
//! `cargo bench --bench compiled`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use openfhir_cache::cache::VersionedCache;
use openfhir_cache::config::Ttl;
use openfhir_cache::domain::fc_model::{parse_context, parse_model, ModelDocument};
use openfhir_cache::domain::opt::TemplateTree;
use openfhir_cache::domain::{helpers, mapper, FcFormat};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The fixture with its observations repeated until it is about `target` bytes.
fn big_opt(target: usize) -> String {
    let base = fixture("growth_chart.opt");
    let content = base
        .find("<rm_attribute_name>content</rm_attribute_name>")
        .unwrap();
    let start = content + base[content..].find("<children").unwrap();
    let end = base.rfind("<cardinality>").unwrap();
    let block = &base[start..end];
    let copies = (target / block.len()).max(1);
    let mut out = String::with_capacity(target + base.len());
    out.push_str(&base[..start]);
    for i in 0..copies {
        out.push_str(
            &block
                .replace(".height.v2", &format!(".height_{i}.v2"))
                .replace(".body_weight.v2", &format!(".body_weight_{i}.v2")),
        );
    }
    out.push_str(&base[end..]);
    out
}

fn models() -> BTreeMap<String, ModelDocument> {
    [
        "height.model.yml",
        "weight.model.yml",
        "height.ext-add.yml",
        "height.ext-append.yml",
        "height.ext-overwrite.yml",
    ]
    .iter()
    .map(|f| {
        let m = parse_model(&fixture(f), FcFormat::Yaml).unwrap();
        (m.name().unwrap().to_string(), m)
    })
    .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("opt_parse");
    for (label, xml) in [
        ("fixture", fixture("growth_chart.opt")),
        ("300KB", big_opt(300_000)),
        ("3MB", big_opt(3_000_000)),
    ] {
        g.throughput(Throughput::Bytes(xml.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label), &xml, |b, xml| {
            b.iter(|| TemplateTree::parse(black_box(xml)).unwrap())
        });
    }
    g.finish();

    let context = parse_context(&fixture("growth_chart.context.yml"), FcFormat::Yaml).unwrap();
    let models = models();
    let template = TemplateTree::parse(&fixture("growth_chart.opt")).unwrap();
    let index = mapper::compile(&context, &models, true).unwrap();
    let tree = helpers::build(&index, &template);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = VersionedCache::<mapper::MapperIndex>::new("mapper", Ttl::Infinite);
    rt.block_on(
        cache.get_or_load("default", Some("growth_chart"), || async {
            Ok(index.clone())
        }),
    )
    .unwrap();

    let mut g = c.benchmark_group("mapper");
    g.bench_function("compile", |b| {
        b.iter(|| mapper::compile(black_box(&context), black_box(&models), true).unwrap())
    });
    g.bench_function("cached_fetch", |b| {
        b.to_async(&rt).iter(|| async {
            cache
                .get_or_load("default", Some("growth_chart"), || async {
                    unreachable!("cached")
                })
                .await
                .unwrap()
        })
    });
    g.finish();

    // The deepest helper: writing it copies the longest path.
    let deep = tree.deepest_path();
    let mut g = c.benchmark_group("helpers");
    g.bench_function("build", |b| {
        b.iter(|| helpers::build(black_box(&index), black_box(&template)))
    });
    g.bench_function("copy", |b| b.iter(|| black_box(&tree).clone()));
    g.bench_function("copy_and_write_one_state", |b| {
        b.iter(|| {
            let mut copy = black_box(&tree).clone();
            if let Some(h) = copy.get_mut(black_box(&deep)) {
                h.state_mut()
                    .insert("value".into(), serde_json::Value::from(1.8));
            }
            copy
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
