//! Latency recording and summaries: an HDR histogram in nanoseconds, summarised in microseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles every latency distribution is reported at (the points of the CDF charts).
pub const CDF_POINTS: [f64; 18] = [
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.5, 99.0, 99.5,
    99.9, 100.0,
];

/// A latency recorder (nanosecond resolution, 3 significant digits, up to about 10 minutes).
#[derive(Debug, Clone)]
pub struct Recorder {
    h: Histogram<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        // Bounds are constants that hdrhistogram accepts; auto-resize covers anything longer.
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits"));
        h.auto(true);
        Recorder { h }
    }

    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        // With auto-resize on, recording only fails for values beyond u64 range: impossible here.
        let _ = self.h.record(ns);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Recorder) {
        let _ = self.h.add(&other.h);
    }

    /// Waits for load tasks that each return their recorder and operation count, and merges
    /// them; `what` names the tasks in the error if one panicked or was cancelled.
    pub async fn join(
        tasks: Vec<tokio::task::JoinHandle<super::BenchResult<(Recorder, u64)>>>,
        what: &str,
    ) -> super::BenchResult<(Recorder, u64)> {
        let mut all = Recorder::new();
        let mut ops = 0;
        for t in tasks {
            let (r, n) = t
                .await
                .map_err(|e| super::BenchError::Setup(format!("{what} failed: {e}")))??;
            all.merge(&r);
            ops += n;
        }
        Ok((all, ops))
    }

    /// Number of values recorded.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// The summary in microseconds.
    pub fn summary(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        if self.h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.h.len(),
            min_us: us(self.h.min()),
            mean_us: self.h.mean() / 1000.0,
            p50_us: us(self.h.value_at_quantile(0.50)),
            p90_us: us(self.h.value_at_quantile(0.90)),
            p99_us: us(self.h.value_at_quantile(0.99)),
            p999_us: us(self.h.value_at_quantile(0.999)),
            max_us: us(self.h.max()),
            cdf: CDF_POINTS
                .iter()
                .map(|&p| CdfPoint {
                    percentile: p,
                    us: us(self.h.value_at_quantile(p / 100.0)),
                })
                .collect(),
        }
    }
}

/// One point of a latency distribution.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct CdfPoint {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Latency at that percentile, in microseconds.
    pub us: f64,
}

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// The distribution at [`CDF_POINTS`].
    pub cdf: Vec<CdfPoint>,
}

/// Formats microseconds for tables: `0.41 µs`, `57 µs`, `1.8 ms`, `1.02 s`.
pub fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        return "-".into();
    }
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Formats a ratio: `1,234x`, `12x`, `1.3x`.
pub fn fmt_ratio(r: f64) -> String {
    if !r.is_finite() {
        return "-".into();
    }
    if r >= 1000.0 {
        let n = r.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        format!("{out}x")
    } else if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

/// Formats operations per second: `1.23 M/s`, `45.6 k/s`, `789/s`.
pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k/s", r / 1e3)
    } else {
        format!("{r:.0}/s")
    }
}

/// The current resident set size of this process, in bytes (Linux; `None` elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of this process (sockets included); `None` where `/proc` is missing.
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let mut r = Recorder::new();
        for us in 1..=100u64 {
            r.record(Duration::from_micros(us));
        }
        let s = r.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 50.0).abs() < 0.1, "{}", s.p50_us);
        assert!((s.p99_us - 99.0).abs() < 0.1, "{}", s.p99_us);
        assert!((s.max_us - 100.0).abs() < 0.1);
        assert_eq!(s.cdf.len(), CDF_POINTS.len());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_us(0.412), "0.41 µs");
        assert_eq!(fmt_us(57.2), "57 µs");
        assert_eq!(fmt_us(1830.0), "1.83 ms");
        assert_eq!(fmt_ratio(1234.4), "1,234x");
        assert_eq!(fmt_ratio(12.3), "12x");
        assert_eq!(fmt_rate(45_600.0), "45.6 k/s");
    }
}
