//! CloudWatch Embedded Metric Format: metrics written as one JSON log line, turned into CloudWatch metrics by
//! the Logs service itself.
//!
//! The functions print one such line per invocation, so their metrics cost no `PutMetricData` call, no extra
//! IAM permission and no latency. The format: a top-level `_aws` object names the namespace, the dimension
//! sets and each metric's unit; the values themselves sit beside it as top-level members, where they double
//! as searchable log fields.

use serde_json::{Map, Value, json};

use crate::domain::UnixMillis;

/// The CloudWatch namespace of every wakeeper metric.
pub const NAMESPACE: &str = "wakeeper";

/// Most metrics one directive may declare (a CloudWatch limit).
pub const MAX_METRICS: usize = 100;

/// Most dimensions one dimension set may hold (a CloudWatch limit).
pub const MAX_DIMENSIONS: usize = 30;

/// The unit of a metric, as CloudWatch names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count of things.
    Count,
    /// A duration in milliseconds.
    Milliseconds,
    /// A plain number.
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::None => "None",
        }
    }
}

/// One EMF log line being put together. Dimensions, metrics and properties share one flat namespace in the
/// output, so a later entry with an existing name replaces the earlier one.
#[derive(Debug, Clone)]
pub struct Emf {
    namespace: String,
    dimensions: Vec<(String, String)>,
    metrics: Vec<(String, f64, Unit)>,
    properties: Map<String, Value>,
}

impl Emf {
    /// A line for metrics in `namespace` (e.g. `wakeeper`).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), dimensions: Vec::new(), metrics: Vec::new(), properties: Map::new() }
    }

    /// Adds a dimension every metric of the line is reported under (e.g. `Function`). Past
    /// [`MAX_DIMENSIONS`] further dimensions are ignored rather than making CloudWatch reject the whole line.
    pub fn dimension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.dimensions.retain(|(n, _)| *n != name);
        if self.dimensions.len() < MAX_DIMENSIONS {
            self.dimensions.push((name, value.into()));
        }
        self
    }

    /// Adds a metric. Past [`MAX_METRICS`] further metrics are ignored, for the same reason.
    pub fn metric(mut self, name: impl Into<String>, value: f64, unit: Unit) -> Self {
        let name = name.into();
        self.metrics.retain(|(n, _, _)| *n != name);
        if self.metrics.len() < MAX_METRICS {
            self.metrics.push((name, value, unit));
        }
        self
    }

    /// Adds a count metric.
    pub fn count(self, name: impl Into<String>, value: u64) -> Self {
        self.metric(name, value as f64, Unit::Count)
    }

    /// Adds a duration metric in milliseconds.
    pub fn millis(self, name: impl Into<String>, value: u64) -> Self {
        self.metric(name, value as f64, Unit::Milliseconds)
    }

    /// Adds a log-only field (searchable in Logs Insights, not a metric). Never pass a secret.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// The JSON object of the line, stamped at `timestamp`.
    pub fn to_value(&self, timestamp: UnixMillis) -> Value {
        let mut root = self.properties.clone();
        for (name, value) in &self.dimensions {
            root.insert(name.clone(), Value::String(value.clone()));
        }
        for (name, value, _) in &self.metrics {
            // Non-finite numbers are not JSON; CloudWatch would drop the line.
            let v = if value.is_finite() { json!(value) } else { json!(0) };
            root.insert(name.clone(), v);
        }
        let dimension_names: Vec<&str> = self.dimensions.iter().map(|(n, _)| n.as_str()).collect();
        let declared: Vec<Value> =
            self.metrics.iter().map(|(name, _, unit)| json!({ "Name": name, "Unit": unit.as_str() })).collect();
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [dimension_names],
                    "Metrics": declared,
                }],
            }),
        );
        Value::Object(root)
    }

    /// The line itself: one JSON object, no newline inside.
    pub fn to_line(&self, timestamp: UnixMillis) -> String {
        self.to_value(timestamp).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_declares_every_metric_and_carries_its_value() {
        let line = Emf::new("wakeeper")
            .dimension("Function", "health-sweep")
            .count("Healthy", 7)
            .millis("DurationMs", 120)
            .property("host_unreachable", false)
            .to_line(1_700_000_000_000);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000i64);
        assert_eq!(directive["Namespace"], "wakeeper");
        assert_eq!(directive["Dimensions"], json!([["Function"]]));
        assert_eq!(
            directive["Metrics"],
            json!([{ "Name": "Healthy", "Unit": "Count" }, { "Name": "DurationMs", "Unit": "Milliseconds" }])
        );
        // Every declared metric and dimension must be a top-level member, or CloudWatch ignores it.
        assert_eq!(v["Function"], "health-sweep");
        assert_eq!(v["Healthy"], 7.0);
        assert_eq!(v["DurationMs"], 120.0);
        assert_eq!(v["host_unreachable"], false);
    }

    #[test]
    fn repeated_names_replace_and_limits_hold() {
        let mut emf = Emf::new("ns").count("A", 1).count("A", 2);
        for i in 0..150 {
            emf = emf.count(format!("m{i}"), i);
        }
        let v = emf.to_value(0);
        let declared = v["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array().unwrap();
        assert_eq!(declared.len(), MAX_METRICS);
        assert_eq!(v["A"], 2.0);
        assert_eq!(declared.iter().filter(|m| m["Name"] == "A").count(), 1);
    }

    #[test]
    fn non_finite_values_do_not_break_the_line() {
        let line = Emf::new("ns").metric("X", f64::NAN, Unit::None).to_line(0);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["X"], 0);
    }
}
