//! The result table every section adds its figures to, printed as it grows and rendered as Markdown and JSON;
//! the percentile helpers the figures are taken with.

/// One line of the result table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub figure: String,
    pub wakeeper: String,
    pub baileys: String,
    pub ratio: String,
    pub target: String,
    pub verdict: String,
}

/// Rows, notes under the table, and every raw figure for the JSON file.
#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    pub raw: serde_json::Map<String, serde_json::Value>,
}

impl Table {
    pub fn row(&mut self, figure: &str, wakeeper: String, target: &str, met: Option<bool>) {
        self.rows.push(Row {
            figure: figure.into(),
            wakeeper,
            baileys: String::new(),
            ratio: String::new(),
            target: target.into(),
            verdict: verdict(met),
        });
        println!("  {figure}: {}", self.rows.last().expect("pushed").wakeeper);
    }

    pub fn note(&mut self, note: String) {
        println!("  note: {note}");
        self.notes.push(note);
    }

    pub fn raw(&mut self, key: &str, value: serde_json::Value) {
        self.raw.insert(key.into(), value);
    }

    pub fn find(&mut self, figure: &str) -> Option<&mut Row> {
        self.rows.iter_mut().find(|r| r.figure == figure)
    }

    pub fn render(&self, machine: &str) -> String {
        let headers = ["Figure", "wakeeper", "Baileys 7.0.0-rc14", "wakeeper/Baileys", "Target", "Met"];
        let mut out = String::new();
        out.push_str(machine);
        out.push_str("\n\n");
        out.push_str(&format!("| {} |\n", headers.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.figure, r.wakeeper, r.baileys, r.ratio, r.target, r.verdict
            ));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }
}

fn verdict(met: Option<bool>) -> String {
    match met {
        Some(true) => "yes".into(),
        Some(false) => "**no**".into(),
        None => "-".into(),
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).floor() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}
