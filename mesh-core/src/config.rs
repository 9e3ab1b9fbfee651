//! Configuration plumbing shared by every binary: an injectable key→value source (so tests build
//! config from a map and never touch the process environment) and duration parsing.

use std::collections::HashMap;
use std::time::Duration;

/// A key→value configuration source.
pub trait Source {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

impl Source for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSource;

impl Source for EnvSource {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

/// Two sources; the first one that has a key wins (flags over environment).
#[derive(Debug, Clone)]
pub struct Layered<A, B>(pub A, pub B);

impl<A: Source, B: Source> Source for Layered<A, B> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).or_else(|| self.1.get(key))
    }
}

/// Parses `90d`, `24h`, `30m`, `15s`, `500ms` or a bare number of seconds; zero is rejected.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let expected = || "expected a duration like 90d, 24h, 30m, 15s or 500ms".to_string();
    let n: u64 = number.parse().map_err(|_| expected())?;
    let duration = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86400).map(Duration::from_secs),
        _ => return Err(expected()),
    }
    .ok_or_else(|| "the duration is too long".to_string())?;
    if duration.is_zero() {
        return Err("the duration must be positive".to_string());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("90d", 90 * 86400),
            ("24h", 86400),
            ("30m", 1800),
            ("15s", 15),
            ("7", 7),
            (" 2h ", 7200),
        ];
        for (v, secs) in ok {
            assert_eq!(parse_duration(v).unwrap(), Duration::from_secs(secs), "{v}");
        }
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "h", "-1s", "1w", "1.5h", "0", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(
            parse_duration(&format!("{}d", u64::MAX / 2))
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn layered_prefers_the_first_source() {
        let flags = HashMap::from([("A".to_string(), "flag".to_string())]);
        let env = HashMap::from([
            ("A".to_string(), "env".to_string()),
            ("B".to_string(), "env".to_string()),
        ]);
        let l = Layered(flags, env);
        assert_eq!(l.get("A").as_deref(), Some("flag"));
        assert_eq!(l.get("B").as_deref(), Some("env"));
        assert_eq!(l.get("C"), None);
    }
}
