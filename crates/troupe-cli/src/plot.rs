//! `troupe plot RUN_DIR [RUN_DIR ...]`: the loss curves of one or several runs (their
//! `metrics.jsonl`) as a PNG, drawn with `plotters`.
//!
//! Each panel shows every run's raw values faintly and their smoothed curve on top (the
//! debiased exponential moving average of TensorBoard's smoothing slider), with round tick
//! values and a legend naming the runs. Text uses an embedded subset of DejaVu Sans
//! (`assets/`), so the command needs no system fonts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories (each read from its `metrics.jsonl`); several are overlaid.
    #[arg(required = true)]
    run_dirs: Vec<PathBuf>,
    /// Output PNG (default: `RUN_DIR/losses.png` for one run; required for several).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Smoothing weight in [0, 1), as TensorBoard's slider: 0 draws the raw values only,
    /// 0.99 is very smooth. Series of fewer than 20 points are never smoothed.
    #[arg(long, default_value_t = 0.9)]
    smoothing: f64,
}

const PANEL: (u32, u32) = (600, 450);
/// Series shorter than this are drawn unsmoothed.
const MIN_SMOOTHED: usize = 20;
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
/// Run colours (matplotlib's tab10), assigned in command-line order.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One run's metrics: a name for the legend and its records merged by step.
struct Run {
    name: String,
    by_step: BTreeMap<u64, serde_json::Value>,
}

impl Run {
    /// The `(step, value)` points of one metric, in step order.
    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.by_step
            .iter()
            .filter_map(|(s, v)| Some((*s as f64, v[key].as_f64()?)))
            .collect()
    }
}

/// Reads `metrics.jsonl` by step (a torn last line is left out, with a warning); a step logged
/// twice (by a run from before resumes cut their records) keeps its last value.
fn read_run(dir: &Path) -> Result<Run> {
    let path = dir.join("metrics.jsonl");
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let (records, torn) = troupe_train::records::read_metrics(&path)?;
    if let Some(torn) = torn {
        eprintln!("warning: {torn}");
    }
    let mut by_step = BTreeMap::new();
    for v in records {
        let step = v["step"]
            .as_u64()
            .expect("read_metrics keeps records with a step");
        // Several records may share a step (training line, validation scalars): merge them.
        match (by_step.get_mut(&step), v) {
            (Some(serde_json::Value::Object(old)), serde_json::Value::Object(new)) => {
                old.extend(new)
            }
            (_, v) => {
                by_step.insert(step, v);
            }
        }
    }
    if by_step.is_empty() {
        bail!("{}: no metrics yet", path.display());
    }
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(Run { name, by_step })
}

/// TensorBoard's smoothing: an exponential moving average with weight `w`, debiased so the
/// first points are not pulled towards zero. Non-finite values are left out.
fn smooth(points: &[(f64, f64)], w: f64) -> Vec<(f64, f64)> {
    let (mut ema, mut debias) = (0.0, 1.0);
    let mut out = Vec::with_capacity(points.len());
    for &(s, v) in points.iter().filter(|p| p.1.is_finite()) {
        ema = ema * w + (1.0 - w) * v;
        debias *= w;
        out.push((s, if w == 0.0 { v } else { ema / (1.0 - debias) }));
    }
    out
}

/// A metric drawn in one panel: its title and the candidate keys (the first a run has wins).
struct Panel {
    title: &'static str,
    keys: &'static [&'static str],
}

/// The panels for these runs: four loss panels, and a row of sample scores when any run
/// scored its samples (`[samples.scoring]`).
fn layout(runs: &[Run]) -> Vec<Panel> {
    let has = |key: &str| runs.iter().any(|r| !r.series(key).is_empty());
    let mut panels = vec![
        Panel {
            title: "total loss",
            keys: &["loss"],
        },
        Panel {
            title: "noise loss (region-weighted MSE)",
            keys: &["noise_loss"],
        },
        Panel {
            title: "attention loss",
            keys: &["attn_loss"],
        },
        // The held-out loss when a run has one (a smooth curve), else the learning rate.
        if has("val/loss") {
            Panel {
                title: "validation loss (fixed timesteps and noise)",
                keys: &["val/loss"],
            }
        } else {
            Panel {
                title: "learning rate (PPR)",
                keys: &["lr"],
            }
        },
    ];
    if has("eval/face_sim") || has("eval/clip_t") {
        panels.push(Panel {
            title: "sample face similarity (x100)",
            keys: &["eval/face_sim"],
        });
        panels.push(Panel {
            title: "sample CLIP-T (x100)",
            keys: &["eval/clip_t"],
        });
    }
    panels
}

/// The range a panel's axis spans: the finite values' extent, widened when it is a point.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return None;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.03
    } else {
        (lo.abs() * 0.1).max(1e-6)
    };
    Some((lo - pad, hi + pad))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    runs: &[Run],
    smoothing: f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            let key = panel.keys.iter().find(|k| !r.series(k).is_empty());
            key.map(|k| r.series(k)).unwrap_or_default()
        })
        .collect();
    let non_finite: usize = series
        .iter()
        .map(|s| s.iter().filter(|p| !p.1.is_finite()).count())
        .sum();
    let title = match non_finite {
        0 => panel.title.to_string(),
        n => format!("{} ({n} non-finite values not drawn)", panel.title),
    };
    let all = || series.iter().flatten();
    let (Some(xs), Some(ys)) = (extent(all().map(|p| p.0)), extent(all().map(|p| p.1))) else {
        area.titled(&title, (FONT, 18))
            .map_err(draw_error)?
            .draw(&Text::new("no data", (40, 40), (FONT, 16)))
            .map_err(draw_error)?;
        return Ok(());
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&title, (FONT, 18))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(6)
        .y_labels(6)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_label_formatter(&|s| format!("{s:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_error)?;
    for (i, (run, points)) in runs.iter().zip(&series).enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let finite = || points.iter().copied().filter(|p| p.1.is_finite());
        // A handful of evaluations (validation, sample scores) is drawn as it is: smoothing
        // them would only hide their values.
        let smoothing = if points.len() < MIN_SMOOTHED {
            0.0
        } else {
            smoothing
        };
        if smoothing > 0.0 {
            chart
                .draw_series(LineSeries::new(finite(), color.mix(0.25)))
                .map_err(draw_error)?;
        }
        chart
            .draw_series(LineSeries::new(
                smooth(points, smoothing),
                color.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(&run.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// plotters' errors borrow the backend's error type; keep their message.
fn draw_error<E: std::error::Error + Send + Sync>(
    e: plotters::drawing::DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Makes the embedded font the one plotters draws `FONT` with.
fn register_font() -> Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
        .map_err(|_| anyhow!("the embedded plot font does not parse"))
}

/// Draws the panels of `runs` into an RGB image, two panels per row.
fn render(runs: &[Run], smoothing: f64) -> Result<image::RgbImage> {
    let panels = layout(runs);
    let rows = panels.len().div_ceil(2);
    let (w, h) = (PANEL.0 * 2, PANEL.1 * rows as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        for (area, panel) in root.split_evenly((rows, 2)).iter().zip(&panels) {
            draw_panel(area, panel, runs, smoothing)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(image::RgbImage::from_raw(w, h, buf).expect("the buffer holds w x h RGB pixels"))
}

pub fn run(args: PlotArgs) -> Result<ExitCode> {
    if !(0.0..1.0).contains(&args.smoothing) {
        bail!("--smoothing {}: must be in [0, 1)", args.smoothing);
    }
    let out = match (&args.out, args.run_dirs.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [dir]) => dir.join("losses.png"),
        (None, _) => bail!("plotting several runs: name the output PNG with --out"),
    };
    register_font()?;
    let runs = args
        .run_dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>>>()?;
    let img = render(&runs, args.smoothing)?;
    img.save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_debiased_and_skips_non_finite_values() {
        let pts = [(0.0, 2.0), (1.0, f64::NAN), (2.0, 2.0), (3.0, 4.0)];
        let s = smooth(&pts, 0.9);
        // A constant start stays at its value (no pull towards zero), NaN is left out.
        assert_eq!(s.len(), 3);
        assert!((s[0].1 - 2.0).abs() < 1e-12 && (s[1].1 - 2.0).abs() < 1e-12);
        // Then it moves towards the new value, by (1 - w) / (1 - w^3) of the step.
        let expected = 2.0 + 2.0 * 0.1 / (1.0 - 0.9f64.powi(3));
        assert!((s[2].1 - expected).abs() < 1e-12, "{:?}", s[2]);
        assert_eq!(smooth(&pts, 0.0)[2], (3.0, 4.0));
    }

    fn run(name: &str, steps: u64, loss: impl Fn(u64) -> f64) -> Run {
        let by_step = (1..=steps)
            .map(|s| {
                let (l, n) = (loss(s), loss(s) * 0.8);
                let v = serde_json::json!({"step": s, "loss": l, "noise_loss": n,
                    "attn_loss": l - n, "lr": 1e-4});
                (s, v)
            })
            .collect();
        Run {
            name: name.into(),
            by_step,
        }
    }

    #[test]
    fn several_runs_are_overlaid_in_every_panel() {
        register_font().unwrap();
        let runs = [
            run("first", 200, |s| 1.0 / (1.0 + s as f64 * 0.05)),
            run("second", 120, |s| 0.6 + 0.1 * ((s as f64) * 0.3).sin()),
        ];
        let img = render(&runs, 0.9).unwrap();
        assert_eq!(img.dimensions(), (2 * PANEL.0, 2 * PANEL.1));
        // Each panel holds a curve of each run in its own colour (a legend swatch alone is
        // 36 pixels).
        for (px, py) in [(0, 0), (1, 0), (0, 1)] {
            for color in &COLORS[..2] {
                let drawn = (0..PANEL.1)
                    .flat_map(|y| (0..PANEL.0).map(move |x| (x, y)))
                    .filter(|&(x, y)| {
                        let p = img.get_pixel(px * PANEL.0 + x, py * PANEL.1 + y);
                        p.0 == [color.0, color.1, color.2]
                    })
                    .count();
                assert!(
                    drawn > 300,
                    "panel ({px}, {py}): {drawn} pixels of {color:?}"
                );
            }
        }
    }
}
