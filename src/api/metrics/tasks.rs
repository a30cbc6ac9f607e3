//! `openfhir_task_restarts_total{task}` and `openfhir_task_up{task}`: the supervised background
//! tasks (see [`crate::supervise`]), copied at scrape time like `Snapshot`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::snapshot::{counter, gauge, labelled, Sample};
use crate::supervise::TaskReport;

/// Every supervised task's report, taken when the scrape began.
#[derive(Debug)]
pub(super) struct Tasks(pub(super) Vec<TaskReport>);

impl Collector for Tasks {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let per_task = |f: fn(&TaskReport) -> u64| -> Vec<Sample> {
            self.0
                .iter()
                .map(|t| labelled("task", t.name, f(t)))
                .collect()
        };
        counter(
            &mut enc,
            "openfhir_task_restarts_total",
            "Times a background task was started again after it panicked or returned.",
            &per_task(|t| t.restarts),
        )?;
        gauge(
            &mut enc,
            "openfhir_task_up",
            "1 while a background task runs (or a one-shot task finished), 0 while it waits for \
             its restart, is dead or was stopped.",
            &per_task(|t| u64::from(t.up())),
        )
    }
}
