//! Reading ztunnel's Prometheus text.

use std::collections::BTreeMap;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Label name → value.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// A label's value, `""` when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// Whether every pair of `labels` matches.
    pub fn matches(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == *v)
    }
}

/// Every sample of metric `name` in `text`.
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| parse_sample(line, name))
        .collect()
}

/// Sums the values of the samples of `name` whose labels include every pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let sum: f64 = samples(text, name)
        .iter()
        .filter(|s| s.matches(labels))
        .map(|s| s.value)
        .sum();
    // Counters are whole numbers.
    sum as u64
}

fn parse_sample(line: &str, name: &str) -> Option<Sample> {
    let rest = line.strip_prefix(name)?;
    let (labels, value) = match rest.strip_prefix('{') {
        Some(r) => r.rsplit_once("} ")?,
        None => ("", rest.strip_prefix(' ')?),
    };
    let mut map = BTreeMap::new();
    // ztunnel's label values never contain `",` so splitting on it is safe here.
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"")?;
        map.insert(k.to_string(), v.trim_end_matches('"').to_string());
    }
    Some(Sample {
        labels: map,
        value: value.trim().parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines_are_matched_by_labels() {
        let text = "# TYPE x counter\n\
                    x{reporter=\"source\",a=\"1\"} 3\n\
                    x{reporter=\"destination\",a=\"1\"} 4\n\
                    xy{reporter=\"source\"} 9\n\
                    x 2\n";
        assert_eq!(metric(text, "x", &[("a", "1")]), 7);
        assert_eq!(metric(text, "x", &[("reporter", "source")]), 3);
        assert_eq!(metric(text, "x", &[]), 9);
        assert_eq!(metric(text, "x", &[("a", "2")]), 0);
        let s = &samples(text, "x")[0];
        assert_eq!(s.label("reporter"), "source");
        assert_eq!(s.label("missing"), "");
    }
}
