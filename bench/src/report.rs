//! The results: rows of samples, the targets, and the Markdown section of
//! BENCHMARKS.md that bench/run rewrites.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::util::{Machine, median};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One comparison: our samples against one peer's.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: String,
    pub metric: String,
    pub unit: &'static str,
    pub better: Better,
    pub ours_name: String,
    pub ours: Vec<f64>,
    pub peer_name: String,
    pub peer: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub figure: String,
    /// None: not measured in this run.
    pub met: Option<bool>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    /// Medians by key, for the targets.
    pub facts: BTreeMap<String, f64>,
    /// Every sample and side figure, for results.json.
    pub raw: serde_json::Map<String, Value>,
}

impl Report {
    /// Adds a row; records the medians as facts `key.ours` / `key.peer`.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        key: &str,
        section: &str,
        metric: &str,
        unit: &'static str,
        better: Better,
        ours: (&str, &[f64]),
        peer: (&str, &[f64]),
    ) {
        self.facts.insert(format!("{key}.ours"), median(ours.1));
        if !peer.1.is_empty() {
            self.facts.insert(format!("{key}.peer"), median(peer.1));
        }
        self.raw.insert(
            key.to_string(),
            json!({
                "metric": metric, "unit": unit,
                "ours": {"name": ours.0, "samples": ours.1, "median": median(ours.1)},
                "peer": {"name": peer.0, "samples": peer.1, "median": median(peer.1)},
            }),
        );
        self.rows.push(Row {
            section: section.into(),
            metric: metric.into(),
            unit,
            better,
            ours_name: ours.0.into(),
            ours: ours.1.to_vec(),
            peer_name: peer.0.into(),
            peer: peer.1.to_vec(),
        });
    }

    /// The samples of one side (`"ours"` or `"peer"`) of a row.
    pub fn samples(&self, key: &str, side: &str) -> Vec<f64> {
        self.raw
            .get(key)
            .and_then(|v| v[side]["samples"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_f64())
            .collect()
    }

    /// Ours / peer, repetition by repetition (both sides ran in the same
    /// repetition, who went first alternating).
    pub fn pair_ratios(&self, key: &str) -> Vec<f64> {
        let (ours, peer) = (self.samples(key, "ours"), self.samples(key, "peer"));
        ours.iter().zip(&peer).map(|(a, b)| a / b).collect()
    }

    pub fn fact(&self, key: &str) -> Option<f64> {
        self.facts.get(key).copied().filter(|v| v.is_finite())
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("  note: {text}");
        self.notes.push(text);
    }

    pub fn target(&mut self, what: &str, figure: String, met: Option<bool>) {
        self.targets.push(Target {
            what: what.into(),
            figure,
            met,
        });
    }
}

/// A number with about four significant digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

fn with_unit(v: f64, unit: &str) -> String {
    if v.is_finite() {
        format!("{} {unit}", num(v))
    } else {
        "n/a".into()
    }
}

fn samples(v: &[f64]) -> String {
    v.iter().map(|x| num(*x)).collect::<Vec<_>>().join(", ")
}

pub struct RunInfo<'a> {
    pub command: &'a str,
    pub mode: &'a str,
    pub reps: usize,
    pub elapsed_s: f64,
    pub work: &'a str,
    pub sizes: &'a str,
}

pub fn markdown(report: &Report, m: &Machine, run: &RunInfo<'_>) -> String {
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push('\n');
    s.push_str(&format!(
        "## Results of the last run\n\n\
         `{}` ({} mode, {} repetition{} of each measurement; medians below), \
         {}, commit {}. The run took {:.1} min.\n\nImages: {}.\n\n",
        run.command,
        run.mode,
        run.reps,
        if run.reps == 1 { "" } else { "s" },
        m.date,
        m.commit,
        run.elapsed_s / 60.0,
        run.sizes,
    ));
    s.push_str("### Machine\n\n| | |\n|---|---|\n");
    for (k, v) in [
        (
            "file system",
            format!(
                "{} on {}, mounted at {} ({})",
                m.fs_type, m.disk, m.mount_point, m.mount_options
            ),
        ),
        ("work directory", run.work.to_string()),
        ("kernel", m.kernel.clone()),
        ("cores", format!("{} ({})", m.cores, m.cpu)),
        ("memory", m.memory.clone()),
        ("QEMU", m.qemu.clone()),
        ("Rust", m.rustc.clone()),
    ] {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str(
        "\n### Medians and ratios\n\n\
         Ratio = copyctl's median / the peer's median, pair by pair; \
         \"better\" says which direction wins.\n\n\
         | # | metric | better | copyctl | peer | peer's | copyctl / peer |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &report.rows {
        let ours = median(&r.ours);
        let peer = median(&r.peer);
        let ratio = if r.peer.is_empty() {
            f64::NAN
        } else {
            ours / peer
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.section,
            r.metric,
            match r.better {
                Better::Lower => "lower",
                Better::Higher => "higher",
            },
            with_unit(ours, r.unit),
            r.peer_name,
            with_unit(peer, r.unit),
            if ratio.is_finite() {
                format!("{ratio:.2}")
            } else {
                "n/a".into()
            },
        ));
    }
    s.push_str("\n### Targets\n\n| target | figure | |\n|---|---|---|\n");
    for t in &report.targets {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            t.what,
            t.figure,
            match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            }
        ));
    }
    if !report.notes.is_empty() {
        s.push_str("\n### Notes from this run\n\n");
        for n in &report.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s.push_str(
        "\n<details><summary>Every sample (copyctl; peer)</summary>\n\n\
         | # | metric | copyctl | peer |\n|---|---|---|---|\n",
    );
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {}: {} |\n",
            r.section,
            r.metric,
            samples(&r.ours),
            r.peer_name,
            samples(&r.peer)
        ));
    }
    s.push_str("\n</details>\n\n");
    s.push_str(END);
    s.push('\n');
    s
}

pub const BEGIN: &str =
    "<!-- bench:begin: bench/run rewrites everything from here to bench:end -->";
pub const END: &str = "<!-- bench:end -->";

/// Puts `section` between the markers of `existing` (or appends it).
pub fn splice(existing: &str, section: &str) -> String {
    match (existing.find(BEGIN), existing.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let after = e + END.len();
            let rest = existing[after..].trim_start_matches('\n');
            if rest.is_empty() {
                format!("{}{}\n", &existing[..b], section.trim_end())
            } else {
                format!("{}{}\n\n{}", &existing[..b], section.trim_end(), rest)
            }
        }
        _ => {
            let mut s = existing.trim_end().to_string();
            if !s.is_empty() {
                s.push_str("\n\n");
            }
            s.push_str(section);
            s
        }
    }
}
