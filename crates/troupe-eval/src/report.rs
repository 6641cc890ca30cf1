//! `report.html`: one self-contained page (images embedded as JPEG thumbnails) with the summary
//! table, per-subject and per-category tables, and per-subject grids of generated images beside
//! their references, each image with its scores; several runs (adapters, checkpoints) side by
//! side, matched by image file name.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use image::RgbImage;

use crate::EvalError;
use crate::summary::{Metrics, ScoreLine, Stat, Summary, read_scores};

/// Longest side of an embedded image.
const THUMB: u32 = 192;

/// One evaluated run: an output folder of `troupe eval run` / `score`.
pub struct RunData {
    /// Column label.
    pub label: String,
    /// The folder (`summary.json`, `scores.jsonl`, `references/`).
    pub dir: PathBuf,
    /// Its summary.
    pub summary: Summary,
    /// Its scores.
    pub lines: Vec<ScoreLine>,
}

impl RunData {
    /// Reads `dir/summary.json` and `dir/scores.jsonl`.
    pub fn load(dir: &Path, label: String) -> Result<Self, EvalError> {
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::Input {
            path: path.display().to_string(),
            message: format!("cannot read ({e}); is this a `troupe eval` output folder?"),
        })?;
        let summary = serde_json::from_str(&text).map_err(|e| EvalError::Input {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            label,
            dir: dir.to_path_buf(),
            summary,
            lines: read_scores(&dir.join("scores.jsonl"))?,
        })
    }

    fn image_path(&self, file: &str) -> PathBuf {
        self.dir.join(&self.summary.images_dir).join(file)
    }
}

/// An image file as an embedded JPEG thumbnail (`data:` URI).
fn thumbnail(path: &Path) -> Result<String, EvalError> {
    let img = crate::clip_score::read_image(path)?;
    Ok(data_uri(&img))
}

fn data_uri(img: &RgbImage) -> String {
    let (w, h) = img.dimensions();
    let s = (THUMB as f64 / w.max(h) as f64).min(1.0);
    let small = image::imageops::thumbnail(
        img,
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 88)
        .encode_image(&small)
        .expect("JPEG encoding into memory does not fail");
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn stat(s: Option<&Stat>) -> String {
    match s {
        Some(Stat {
            mean: Some(m),
            std: Some(d),
            n,
        }) => format!("{m:.2} <small>± {d:.2} (n={n})</small>"),
        Some(Stat { n, .. }) => format!("— <small>(n={n})</small>"),
        None => "—".into(),
    }
}

/// How one metric is shown.
type MetricCell = fn(&Metrics) -> String;

/// The metrics of a table, in order.
const METRICS: [(&str, MetricCell); 6] = [
    ("Face similarity", |m| stat(m.face_sim.as_ref())),
    ("Face detection rate", |m| {
        m.face_detection_rate
            .map_or("—".into(), |r| format!("{:.1}%", 100.0 * r))
    }),
    ("Face similarity (detected only)", |m| {
        stat(m.face_sim_detected.as_ref())
    }),
    ("CLIP-T", |m| stat(Some(&m.clip_t))),
    ("CLIP-I", |m| stat(Some(&m.clip_i))),
    ("Images", |m| m.images.to_string()),
];

/// Rows = metrics, columns = runs.
fn metric_rows(metrics: &[Option<&Metrics>]) -> String {
    let mut out = String::new();
    for (name, f) in METRICS {
        let _ = write!(out, "<tr><th>{name}</th>");
        for m in metrics {
            let _ = write!(out, "<td>{}</td>", m.map_or("—".into(), f));
        }
        out.push_str("</tr>\n");
    }
    out
}

fn header_row(first: &str, runs: &[RunData]) -> String {
    let mut out = format!("<tr><th>{first}</th>");
    for r in runs {
        let _ = write!(out, "<th>{}</th>", esc(&r.label));
    }
    out + "</tr>\n"
}

/// One table keyed by subject or category: a row per key, a column group per metric with a
/// column per run.
fn keyed_table(
    runs: &[RunData],
    title: &str,
    get: &dyn Fn(&Summary) -> &BTreeMap<String, Metrics>,
) -> String {
    let mut keys: Vec<&String> = runs.iter().flat_map(|r| get(&r.summary).keys()).collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return String::new();
    }
    let n = runs.len();
    let mut out = format!("<h2>{title}</h2>\n<table>\n<tr><th rowspan=2></th>");
    for (name, _) in METRICS {
        let _ = write!(out, "<th colspan={n}>{name}</th>");
    }
    out += "</tr>\n<tr>";
    for _ in METRICS {
        for r in runs {
            let _ = write!(out, "<th><small>{}</small></th>", esc(&r.label));
        }
    }
    out += "</tr>\n";
    for key in keys {
        let _ = write!(out, "<tr><th>{}</th>", esc(key));
        for (_, f) in METRICS {
            for r in runs {
                let cell = get(&r.summary).get(key).map_or("—".into(), f);
                let _ = write!(out, "<td>{cell}</td>");
            }
        }
        out += "</tr>\n";
    }
    out + "</table>\n"
}

fn caption(l: &ScoreLine) -> String {
    let mut parts = Vec::new();
    for (k, s) in l.subjects.iter().enumerate() {
        let face = match (l.faces_found, l.face_detected[k]) {
            (None, _) => String::new(),
            (Some(_), true) => format!("FS {:.1} · ", l.face_sim[k]),
            (Some(_), false) => "<b class=noface>no face</b> · ".into(),
        };
        let who = if l.subjects.len() > 1 {
            format!("{}: ", esc(s))
        } else {
            String::new()
        };
        parts.push(format!("{who}{face}CI {:.1}", l.clip_i[k]));
    }
    format!("{}<br>CT {:.1}", parts.join("<br>"), l.clip_t)
}

/// Per-case grids: rows (prompt, seed), one column per run, each cell the call's images.
fn grids(runs: &[RunData]) -> Result<String, EvalError> {
    // Case → (prompt index, seed) → run → lines, in protocol order of the first run.
    type Cell<'a> = BTreeMap<usize, Vec<&'a ScoreLine>>;
    let mut cases: BTreeMap<String, BTreeMap<(usize, u64), Cell>> = BTreeMap::new();
    for (r, run) in runs.iter().enumerate() {
        for l in &run.lines {
            cases
                .entry(l.subjects.join("+"))
                .or_default()
                .entry((l.prompt_index, l.seed))
                .or_default()
                .entry(r)
                .or_default()
                .push(l);
        }
    }
    let mut out = String::from("<h2>Images</h2>\n");
    for (case, rows) in &cases {
        let _ = write!(
            out,
            "<h3>{}</h3>\n<div class=refs>",
            esc(case).replace('+', " + ")
        );
        for name in case.split('+') {
            let path = runs[0].dir.join("references").join(format!("{name}.png"));
            let _ = write!(
                out,
                "<figure><img src=\"{}\" alt=\"reference {n}\"><figcaption>reference: {n}</figcaption></figure>",
                thumbnail(&path)?,
                n = esc(name)
            );
        }
        out += "</div>\n<table class=grid>\n";
        out += &header_row("prompt · seed", runs);
        for ((_, seed), by_run) in rows {
            let first = by_run.values().next().and_then(|v| v.first());
            let prompt = first.map_or(String::new(), |l| esc(&l.prompt));
            let _ = write!(out, "<tr><th>{prompt}<br><small>seed {seed}</small></th>");
            for (r, run) in runs.iter().enumerate() {
                out += "<td>";
                for l in by_run.get(&r).into_iter().flatten() {
                    let _ = write!(
                        out,
                        "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                        thumbnail(&run.image_path(&l.file))?,
                        esc(&l.file),
                        caption(l)
                    );
                }
                out += "</td>";
            }
            out += "</tr>\n";
        }
        out += "</table>\n";
    }
    Ok(out)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}th,td{border:1px solid #ccc;padding:4px 8px;\
text-align:left;vertical-align:top}th{background:#f4f4f4}small{color:#666}\
figure{display:inline-block;margin:2px;text-align:center;font-size:11px}\
figure img{display:block;max-width:192px}.refs figure{margin-right:1em}.noface{color:#c00}\
dl{font-size:13px}dt{font-weight:bold}dd{margin:0 0 .4em 1.5em}";

/// The report of `runs` (at least one), every image embedded.
pub fn render(runs: &[RunData]) -> Result<String, EvalError> {
    let first = &runs[0].summary;
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>troupe eval: {p}</title>\
         <style>{STYLE}</style></head><body>\n<h1>Evaluation: {p}</h1>\n<p>{d}</p>\n",
        p = esc(&first.protocol),
        d = esc(&first.description)
    );
    out += "<h2>Summary</h2>\n<table>\n";
    out += &header_row("metric", runs);
    let overall: Vec<Option<&Metrics>> = runs.iter().map(|r| Some(&r.summary.overall)).collect();
    out += &metric_rows(&overall);
    out += "</table>\n";
    out += &keyed_table(runs, "Per subject", &|s| &s.per_subject);
    out += &keyed_table(runs, "Per category", &|s| &s.per_category);
    out += "<h2>How the numbers are made</h2>\n<dl>";
    for (k, v) in &first.conventions {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(v));
    }
    for r in runs {
        let models: Vec<String> = r
            .summary
            .scorers
            .iter()
            .chain(&r.summary.generation)
            .map(|(k, v)| format!("{}: {}", esc(k), esc(v)))
            .collect();
        let _ = write!(
            out,
            "<dt>{}</dt><dd>{}<br>{}</dd>",
            esc(&r.label),
            esc(&r.dir.display().to_string()),
            models.join("<br>")
        );
    }
    out += "</dl>\n";
    out += &grids(runs)?;
    out += "</body></html>\n";
    Ok(out)
}
