//! `troupe plot RUN_DIR`: the loss curves of a run (`metrics.jsonl`) as a PNG.
//!
//! Drawn directly with `image` and the public-domain 8×8 bitmap font of `font8x8`, so the
//! command needs no system fonts or plotting stack.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directory (reads `metrics.jsonl`).
    run_dir: PathBuf,
    /// Output PNG (default: `RUN_DIR/losses.png`).
    #[arg(long)]
    out: Option<PathBuf>,
}

const W: u32 = 1200;
const H: u32 = 900;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const RAW: Rgb<u8> = Rgb([190, 200, 225]);
const SMOOTH: Rgb<u8> = Rgb([30, 80, 200]);

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, color: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    put(img, x + i as i64 * 8 + col, y + row as i64, color);
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(
            img,
            (x0 + t * (x1 - x0)).round() as i64,
            (y0 + t * (y1 - y0)).round() as i64,
            c,
        );
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// One panel at (x, y) of size (w, h): raw series and its exponential moving average.
fn panel(
    img: &mut RgbImage,
    origin: (i64, i64),
    size: (i64, i64),
    title: &str,
    pts: &[(f64, f64)],
) {
    let (x, y) = origin;
    let (w, h) = size;
    let (l, r, t, b) = (x + 80, x + w - 20, y + 30, y + h - 40);
    text(img, x + 80, y + 10, title, AXIS);
    if pts.is_empty() {
        text(img, l + 10, t + 20, "no data", AXIS);
        return;
    }
    let (s0, s1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
    let finite: Vec<f64> = pts.iter().map(|p| p.1).filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    // Also catches NaN bounds.
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        let pad = (lo.abs() * 0.1).max(1e-12);
        lo -= pad;
        hi += pad;
    }
    let px = |s: f64| l as f64 + (s - s0) / (s1 - s0) * (r - l) as f64;
    let py = |v: f64| b as f64 - (v - lo) / (hi - lo) * (b - t) as f64;
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let yy = py(v);
        line(img, (l as f64, yy), (r as f64, yy), GRID);
        text(img, x + 2, yy as i64 - 4, &label(v), AXIS);
    }
    line(img, (l as f64, t as f64), (l as f64, b as f64), AXIS);
    line(img, (l as f64, b as f64), (r as f64, b as f64), AXIS);
    text(img, l, b + 10, &format!("{}", s0 as u64), AXIS);
    let end = format!("step {}", s1 as u64);
    text(img, r - 8 * end.len() as i64, b + 10, &end, AXIS);
    let alpha = 2.0 / (1.0 + (pts.len() as f64 / 20.0).max(1.0));
    let mut ema: Option<f64> = None;
    let mut prev: Option<((f64, f64), (f64, f64))> = None;
    for &(s, v) in pts {
        if !v.is_finite() {
            continue;
        }
        let e = ema.map_or(v, |e| e + alpha * (v - e));
        ema = Some(e);
        let raw = (px(s), py(v));
        let smooth = (px(s), py(e));
        if let Some((pr, ps)) = prev {
            line(img, pr, raw, RAW);
            line(img, ps, smooth, SMOOTH);
        }
        prev = Some((raw, smooth));
    }
}

/// Reads `metrics.jsonl` by step (a torn last line is left out, with a warning); a step logged
/// twice (by a run from before resumes cut their records) keeps its last value.
fn read_metrics(path: &Path) -> Result<BTreeMap<u64, serde_json::Value>> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let (records, torn) = troupe_train::records::read_metrics(path)?;
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
    Ok(by_step)
}

pub fn run(args: PlotArgs) -> Result<ExitCode> {
    let metrics = read_metrics(&args.run_dir.join("metrics.jsonl"))?;
    if metrics.is_empty() {
        bail!(
            "{}: no metrics yet",
            args.run_dir.join("metrics.jsonl").display()
        );
    }
    let series = |key: &str| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|(s, v)| Some((*s as f64, v[key].as_f64()?)))
            .collect()
    };
    // A third row when the samples are scored (`[samples.scoring]`): identity and prompt
    // fidelity over training, next to the losses.
    let (face, clip_t) = (series("eval/face_sim"), series("eval/clip_t"));
    let rows = if face.is_empty() && clip_t.is_empty() {
        2
    } else {
        3
    };
    let mut img = RgbImage::from_pixel(W, H / 2 * rows, BG);
    let (pw, ph) = (W as i64 / 2, H as i64 / 2);
    if rows == 3 {
        let title = "sample face similarity (eval/face_sim, x100)";
        panel(&mut img, (0, 2 * ph), (pw, ph), title, &face);
        let title = "sample CLIP-T (eval/clip_t, x100)";
        panel(&mut img, (pw, 2 * ph), (pw, ph), title, &clip_t);
    }
    panel(&mut img, (0, 0), (pw, ph), "total loss", &series("loss"));
    panel(
        &mut img,
        (pw, 0),
        (pw, ph),
        "noise loss (region-weighted MSE)",
        &series("noise_loss"),
    );
    panel(
        &mut img,
        (0, ph),
        (pw, ph),
        "attention loss",
        &series("attn_loss"),
    );
    // The held-out loss when the run has one (a smooth curve), else the learning rate.
    let val = series("val/loss");
    let (title, last) = if val.is_empty() {
        ("learning rate (PPR)", series("lr"))
    } else {
        ("validation loss (fixed timesteps and noise)", val)
    };
    panel(&mut img, (pw, ph), (pw, ph), title, &last);
    let out = args.out.unwrap_or_else(|| args.run_dir.join("losses.png"));
    img.save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}
