//! Experiment results: a readable table, and with `--json` one JSON object as the last line.

use serde_json::{Map, Value};

/// Named results in the order they were added.
#[derive(Default)]
pub struct Report {
    title: String,
    rows: Vec<(String, Value)>,
}

impl Report {
    /// An empty report headed `title`.
    pub fn new(title: impl Into<String>) -> Report {
        Report {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// Adds one named result.
    pub fn add(&mut self, name: &str, value: impl Into<Value>) -> &mut Report {
        self.rows.push((name.to_owned(), value.into()));
        self
    }

    /// Adds a ratio or measurement rounded to 4 decimals (NaN becomes null).
    pub fn add_f64(&mut self, name: &str, value: f64) -> &mut Report {
        let rounded = (value * 10_000.0).round() / 10_000.0;
        let value = serde_json::Number::from_f64(rounded).map_or(Value::Null, Value::Number);
        self.rows.push((name.to_owned(), value));
        self
    }

    /// Adds a ratio close to 1 with 6 decimals, so that 0.99995 does not show as 1.
    pub fn add_ratio(&mut self, name: &str, value: f64) -> &mut Report {
        let rounded = (value * 1e6).round() / 1e6;
        let value = serde_json::Number::from_f64(rounded).map_or(Value::Null, Value::Number);
        self.rows.push((name.to_owned(), value));
        self
    }

    /// The value recorded under `name`.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.rows.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The results as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (name, value) in &self.rows {
            map.insert(name.clone(), value.clone());
        }
        Value::Object(map)
    }

    /// Prints the table, then the JSON line when `json` is set.
    pub fn print(&self, json: bool) {
        println!("{}", self.title);
        let width = self.rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, value) in &self.rows {
            let shown = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {name:<width$}  {shown}");
        }
        if json {
            println!("{}", self.to_json());
        }
    }
}

/// Peak resident memory of this process in MiB, from the kernel's accounting (0 if unknown).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
