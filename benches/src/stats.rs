//! Measuring helpers: percentiles, medians, process RSS and CPU time.

use std::time::Duration;

/// The `p`-th percentile (0–100) of a sample, by nearest rank. Sorts the sample in place.
pub fn percentile(sample: &mut [Duration], p: f64) -> Duration {
    if sample.is_empty() {
        return Duration::ZERO;
    }
    sample.sort_unstable();
    let rank = ((p / 100.0) * sample.len() as f64).ceil() as usize;
    sample[rank.clamp(1, sample.len()) - 1]
}

/// The median of a list of numbers (mean of the middle two for even lengths).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident set size of process `pid` in bytes (0 if it is gone).
pub fn process_rss_bytes(pid: u32) -> u64 {
    rss_of(&pid.to_string())
}

/// The anonymous part (heap, stacks) of process `pid`'s resident memory, in bytes, from
/// `/proc/<pid>/smaps_rollup` (0 if it is gone); the rest of RSS is mapped files.
pub fn process_anon_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

fn rss_of(proc_dir: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{proc_dir}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn cpu_time() -> Duration {
    cpu_of("self")
}

/// CPU time (user + system) process `pid` has used so far (zero if it is gone).
pub fn process_cpu_time(pid: u32) -> Duration {
    cpu_of(&pid.to_string())
}

fn cpu_of(proc_dir: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{proc_dir}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Clock ticks are 100 Hz on every Linux configuration we run on.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&mut s, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rss_and_cpu_are_readable() {
        assert!(rss_bytes() > 0);
        let _ = cpu_time();
        let me = std::process::id();
        let anon = process_anon_bytes(me);
        assert!(anon > 0 && anon <= process_rss_bytes(me), "{anon}");
    }
}
