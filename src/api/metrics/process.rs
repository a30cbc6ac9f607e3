//! The standard `process_*` series of `/metrics` (names and meanings as in the Prometheus
//! clients' process collectors), read from `/proc/self` at scrape time with `procfs`. Where
//! `/proc` cannot be read (another OS, a sandbox), the series are left out; nothing fails.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

/// Collects the `process_*` series on each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

/// One figure: name, help, whether it is a counter (else a gauge), value.
type Figure = (&'static str, &'static str, bool, f64);

#[cfg(target_os = "linux")]
fn figures() -> Vec<Figure> {
    use procfs::process::{LimitValue, Process};
    let mut out = Vec::new();
    let Ok(me) = Process::myself() else {
        return out;
    };
    if let Ok(stat) = me.stat() {
        let ticks = procfs::ticks_per_second() as f64;
        if ticks > 0.0 {
            out.push((
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                true,
                (stat.utime + stat.stime) as f64 / ticks,
            ));
            if let Ok(boot) = procfs::boot_time_secs() {
                out.push((
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    false,
                    boot as f64 + stat.starttime as f64 / ticks,
                ));
            }
        }
        out.push((
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            false,
            stat.vsize as f64,
        ));
        out.push((
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            false,
            stat.rss as f64 * procfs::page_size() as f64,
        ));
    }
    if let Ok(n) = me.fd_count() {
        out.push((
            "process_open_fds",
            "Number of open file descriptors.",
            false,
            n as f64,
        ));
    }
    if let Ok(limits) = me.limits() {
        if let LimitValue::Value(max) = limits.max_open_files.soft_limit {
            out.push((
                "process_max_fds",
                "Maximum number of open file descriptors.",
                false,
                max as f64,
            ));
        }
    }
    out
}

#[cfg(not(target_os = "linux"))]
fn figures() -> Vec<Figure> {
    Vec::new()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for (name, help, is_counter, v) in figures() {
            if is_counter {
                // The encoders add `_total`.
                let family = name.strip_suffix("_total").unwrap_or(name);
                let m =
                    enc.encode_descriptor(family, help, None, ConstCounter::new(v).metric_type())?;
                ConstCounter::new(v).encode(m)?;
            } else {
                let m =
                    enc.encode_descriptor(name, help, None, ConstGauge::new(v).metric_type())?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn every_process_series_is_read_on_linux() {
        let names: Vec<&str> = super::figures().iter().map(|f| f.0).collect();
        for want in [
            "process_cpu_seconds_total",
            "process_start_time_seconds",
            "process_virtual_memory_bytes",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
}
