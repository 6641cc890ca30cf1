//! Synthetic StoryMaker-style datasets: the committed tiny fixture (`datasets/tiny`) and
//! benchmark shards with large images.
//!
//! Every sample is a pure function of (seed, index): a gradient background with mild noise and
//! one to three cartoon people (body ellipse + head circle, shaded), each with an exact mask of
//! its visible pixels, the mask's tight bbox, five face keypoints inside the head, a per-identity
//! unit-norm embedding (people recur across images), a caption built from the people's
//! descriptors and, for a share of rows, a stick-figure pose image.

use std::path::Path;

use image::{GrayImage, RgbImage};

use crate::error::Result;
use crate::image_io::{encode_png_gray, encode_png_rgb};
use crate::rng::{KeyedRng, Purpose};
use crate::schema::{Character, EMBEDDING_DIM, EncodedImage, MAX_CHARACTERS, Sample};
use crate::shard::{ShardInfo, ShardWriter, ShardWriterOptions};

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Number of samples.
    pub rows: usize,
    /// Smallest image width / height (each drawn independently in `min_side..=max_side`).
    pub min_side: u32,
    /// Largest image width / height.
    pub max_side: u32,
    /// Seed; the same options give byte-identical output.
    pub seed: u64,
    /// Share of rows that carry a pose image (0 to 1).
    pub pose_fraction: f64,
    /// Distinct people; embeddings are per identity, so people recur across images.
    pub identities: usize,
    /// JPEG quality of the main image (1 to 100).
    pub jpeg_quality: u8,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            rows: 48,
            min_side: 192,
            max_side: 320,
            seed: 0,
            pose_fraction: 0.5,
            identities: 6,
            jpeg_quality: 90,
        }
    }
}

// Stream tags (the `a` coordinate of `KeyedRng` under `Purpose::Sample`); large values keep these
// streams apart from the loader's (epoch, index) streams.
const TAG_LAYOUT: u64 = 0x5359_4e54_0000_0001;
const TAG_NOISE: u64 = 0x5359_4e54_0000_0002;
const TAG_IDENTITY: u64 = 0x5359_4e54_0000_0003;
const TAG_EMBEDDING: u64 = 0x5359_4e54_0000_0004;
const TAG_EMB_NOISE: u64 = 0x5359_4e54_0000_0005;

fn stream(seed: u64, tag: u64, b: u64) -> KeyedRng {
    KeyedRng::new(seed, Purpose::Sample, tag, b)
}

/// Standard normal via Box–Muller.
fn gaussian(rng: &mut KeyedRng) -> f64 {
    let u1 = 1.0 - rng.uniform(); // (0, 1]
    let u2 = rng.uniform();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Normalises in place (sum in f64, values stay f32) so the L2 norm is 1 to f32 precision.
fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (*x as f64 / norm) as f32;
        }
    }
}

const CLOTHES: &[(&str, [u8; 3])] = &[
    ("red", [200, 40, 40]),
    ("blue", [40, 70, 200]),
    ("green", [40, 150, 60]),
    ("yellow", [230, 200, 40]),
    ("purple", [130, 50, 170]),
    ("orange", [235, 130, 30]),
    ("pink", [235, 120, 170]),
    ("teal", [30, 150, 150]),
    ("white", [235, 235, 230]),
    ("black", [30, 30, 35]),
    ("gray", [128, 128, 128]),
    ("brown", [120, 75, 40]),
];
const HAIR: &[(&str, [u8; 3])] = &[
    ("dark-haired", [35, 25, 20]),
    ("blonde", [220, 190, 110]),
    ("red-haired", [170, 70, 30]),
    ("gray-haired", [170, 170, 170]),
    ("brown-haired", [100, 60, 30]),
];
const SKIN: &[[u8; 3]] = &[
    [250, 215, 185],
    [225, 180, 140],
    [190, 135, 95],
    [140, 95, 65],
    [95, 65, 45],
];
const PEOPLE: &[&str] = &[
    "woman",
    "man",
    "girl",
    "boy",
    "person",
    "old man",
    "old woman",
    "young woman",
    "young man",
];
const SCENES: &[&str] = &[
    "in a park",
    "on a city street",
    "at the beach",
    "in a kitchen",
    "in front of a brick wall",
    "in a forest",
    "in an office",
    "on a mountain trail",
    "in a living room",
    "at a train station",
];
const ACTIONS: &[&str] = &[
    "standing", "posing", "smiling", "waiting", "talking", "walking",
];
const COUNTS: &[&str] = &["one person", "two people", "three people"];

/// A person: descriptor words, colours and identity embedding, all a function of (seed, id).
#[derive(Debug, Clone)]
struct Identity {
    person: &'static str,
    clothes: (&'static str, [u8; 3]),
    hair: (&'static str, [u8; 3]),
    skin: [u8; 3],
    /// Mentions hair in the caption.
    say_hair: bool,
    embedding: Vec<f32>,
}

impl Identity {
    fn new(seed: u64, id: u64) -> Self {
        let mut r = stream(seed, TAG_IDENTITY, id);
        let pick = |r: &mut KeyedRng, n: usize| r.below(n as u64) as usize;
        let person = PEOPLE[pick(&mut r, PEOPLE.len())];
        // Consecutive identities wear distinct colours (offset by the seed), so captions tell
        // the people of a small set apart.
        let clothes = CLOTHES[((id % CLOTHES.len() as u64) as usize
            + (seed % CLOTHES.len() as u64) as usize)
            % CLOTHES.len()];
        let hair = HAIR[pick(&mut r, HAIR.len())];
        let skin = SKIN[pick(&mut r, SKIN.len())];
        let say_hair = r.uniform() < 0.5;
        let mut e = stream(seed, TAG_EMBEDDING, id);
        let mut embedding: Vec<f32> = (0..EMBEDDING_DIM)
            .map(|_| gaussian(&mut e) as f32)
            .collect();
        normalise(&mut embedding);
        Self {
            person,
            clothes,
            hair,
            skin,
            say_hair,
            embedding,
        }
    }

    fn describe(&self, with_hair: bool) -> String {
        let article = |w: &str| {
            if w.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            }
        };
        if with_hair {
            format!(
                "{} {} {} in {}",
                article(self.hair.0),
                self.hair.0,
                self.person,
                self.clothes.0
            )
        } else {
            format!(
                "{} {} in {}",
                article(self.person),
                self.person,
                self.clothes.0
            )
        }
    }
}

fn join_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [a, b] => format!("{a} and {b}"),
        _ => format!(
            "{} and {}",
            items[..items.len() - 1].join(", "),
            items[items.len() - 1]
        ),
    }
}

/// Geometry of one drawn person, in image pixels.
#[derive(Debug, Clone, Copy)]
struct Figure {
    cx: f64,
    /// Body ellipse centre y and radii.
    body_cy: f64,
    body_rx: f64,
    body_ry: f64,
    /// Head circle centre and radius.
    head_cx: f64,
    head_cy: f64,
    head_r: f64,
    /// Ground (feet) line.
    feet_y: f64,
}

fn scale(c: [u8; 3], f: f64) -> [u8; 3] {
    c.map(|v| (v as f64 * f).round().clamp(0.0, 255.0) as u8)
}

/// Calls `f(x, y, dx, dy)` for every pixel whose centre lies inside the ellipse, where (dx, dy) is
/// the pixel centre's offset in units of the radii.
fn for_ellipse(
    w: u32,
    h: u32,
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
    mut f: impl FnMut(usize, f64, f64),
) {
    let x0 = (cx - rx).floor().max(0.0) as u32;
    let x1 = ((cx + rx).ceil().max(0.0) as u32).min(w);
    let y0 = (cy - ry).floor().max(0.0) as u32;
    let y1 = ((cy + ry).ceil().max(0.0) as u32).min(h);
    for y in y0..y1 {
        let dy = (y as f64 + 0.5 - cy) / ry;
        for x in x0..x1 {
            let dx = (x as f64 + 0.5 - cx) / rx;
            if dx * dx + dy * dy <= 1.0 {
                f((y * w + x) as usize, dx, dy);
            }
        }
    }
}

/// Calls `f(pixel)` for every pixel within `t` of the segment (a) to (b).
fn for_segment(w: u32, h: u32, a: (f64, f64), b: (f64, f64), t: f64, mut f: impl FnMut(usize)) {
    let x0 = (a.0.min(b.0) - t).floor().max(0.0) as u32;
    let x1 = ((a.0.max(b.0) + t).ceil().max(0.0) as u32).min(w);
    let y0 = (a.1.min(b.1) - t).floor().max(0.0) as u32;
    let y1 = ((a.1.max(b.1) + t).ceil().max(0.0) as u32).min(h);
    let (vx, vy) = (b.0 - a.0, b.1 - a.1);
    let len2 = vx * vx + vy * vy;
    for y in y0..y1 {
        let py = y as f64 + 0.5;
        for x in x0..x1 {
            let px = x as f64 + 0.5;
            let s = if len2 > 0.0 {
                (((px - a.0) * vx + (py - a.1) * vy) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (ex, ey) = (px - a.0 - s * vx, py - a.1 - s * vy);
            if ex * ex + ey * ey <= t * t {
                f((y * w + x) as usize);
            }
        }
    }
}

fn put(rgb: &mut [u8], i: usize, c: [u8; 3]) {
    rgb[3 * i..3 * i + 3].copy_from_slice(&c);
}

/// The five face keypoints (left eye, right eye, nose, left mouth, right mouth) inside the head.
fn face_keypoints(fig: &Figure, r: &mut KeyedRng) -> [(f64, f64); 5] {
    const CANON: [(f64, f64); 5] = [
        (-0.35, -0.15),
        (0.35, -0.15),
        (0.0, 0.12),
        (-0.25, 0.4),
        (0.25, 0.4),
    ];
    let angle = r.uniform_range(-0.26, 0.26); // about ±15°
    let s = r.uniform_range(0.85, 1.1) * fig.head_r;
    let (ox, oy) = (
        r.uniform_range(-0.05, 0.05) * fig.head_r,
        r.uniform_range(-0.05, 0.05) * fig.head_r,
    );
    let (sin, cos) = angle.sin_cos();
    CANON.map(|(x, y)| {
        (
            fig.head_cx + ox + s * (x * cos - y * sin),
            fig.head_cy + oy + s * (x * sin + y * cos),
        )
    })
}

/// Approximate joints and the limbs between them, OpenPose-like colours.
fn draw_stick_figure(pose: &mut [u8], w: u32, h: u32, fig: &Figure, r: &mut KeyedRng) {
    const COLOURS: [[u8; 3]; 13] = [
        [255, 0, 0],
        [255, 85, 0],
        [255, 170, 0],
        [255, 255, 0],
        [170, 255, 0],
        [85, 255, 0],
        [0, 255, 0],
        [0, 255, 85],
        [0, 255, 170],
        [0, 255, 255],
        [0, 170, 255],
        [0, 85, 255],
        [85, 0, 255],
    ];
    let neck = (fig.cx, fig.head_cy + fig.head_r);
    let top = fig.body_cy - fig.body_ry;
    let sh_y = top + 0.3 * fig.body_ry;
    let (ls, rs) = (
        (fig.cx - 0.8 * fig.body_rx, sh_y),
        (fig.cx + 0.8 * fig.body_rx, sh_y),
    );
    let hip_y = fig.body_cy + 0.35 * fig.body_ry;
    let (lh, rh) = (
        (fig.cx - 0.45 * fig.body_rx, hip_y),
        (fig.cx + 0.45 * fig.body_rx, hip_y),
    );
    let arm = 0.55 * fig.body_ry;
    let limb = |from: (f64, f64), angle: f64, len: f64| {
        (from.0 + len * angle.sin(), from.1 + len * angle.cos())
    };
    let (la, ra) = (-r.uniform_range(0.1, 1.2), r.uniform_range(0.1, 1.2));
    let le = limb(ls, la, arm);
    let lw = limb(le, la + r.uniform_range(-0.6, 0.6), arm);
    let re = limb(rs, ra, arm);
    let rw = limb(re, ra + r.uniform_range(-0.6, 0.6), arm);
    let leg = ((fig.feet_y - hip_y) / 2.0).max(1.0);
    let (ll, rl) = (-r.uniform_range(0.0, 0.3), r.uniform_range(0.0, 0.3));
    let lk = limb(lh, ll, leg);
    let lf = limb(lk, ll * 0.5, leg);
    let rk = limb(rh, rl, leg);
    let rf = limb(rk, rl * 0.5, leg);
    let head = (fig.head_cx, fig.head_cy);
    let limbs = [
        (head, neck),
        (neck, ls),
        (neck, rs),
        (ls, le),
        (le, lw),
        (rs, re),
        (re, rw),
        (neck, lh),
        (neck, rh),
        (lh, lk),
        (lk, lf),
        (rh, rk),
        (rk, rf),
    ];
    let t = (fig.head_r * 0.18).max(1.0);
    for (k, (a, b)) in limbs.iter().enumerate() {
        for_segment(w, h, *a, *b, t, |i| put(pose, i, COLOURS[k]));
    }
    for p in [head, neck, ls, rs, le, re, lw, rw, lh, rh, lk, rk, lf, rf] {
        for_ellipse(w, h, p.0, p.1, t * 1.6, t * 1.6, |i, _, _| {
            put(pose, i, [255, 255, 255])
        });
    }
}

/// One synthetic sample; a pure function of (`opts.seed`, `index`) and the drawing options.
pub fn synth_sample(opts: &SynthOptions, index: usize) -> Sample {
    let seed = opts.seed;
    let mut r = stream(seed, TAG_LAYOUT, index as u64);
    let lo = opts.min_side.max(8).min(opts.max_side.max(8));
    let hi = opts.max_side.max(lo);
    let w = lo + r.below((hi - lo + 1) as u64) as u32;
    let h = lo + r.below((hi - lo + 1) as u64) as u32;
    let (wf, hf) = (w as f64, h as f64);
    let npx = (w * h) as usize;

    // Background: a gradient between two muted colours along a random direction.
    let muted = |r: &mut KeyedRng| [0; 3].map(|_: u8| r.uniform_range(60.0, 220.0));
    let (c0, c1) = (muted(&mut r), muted(&mut r));
    let angle = r.uniform_range(0.0, std::f64::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let corners = [(0.0, 0.0), (wf, 0.0), (0.0, hf), (wf, hf)].map(|(x, y)| x * dx + y * dy);
    let pmin = corners.iter().cloned().fold(f64::INFINITY, f64::min);
    let pmax = corners.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut rgb = vec![0u8; 3 * npx];
    for y in 0..h {
        for x in 0..w {
            let t = ((x as f64 + 0.5) * dx + (y as f64 + 0.5) * dy - pmin) / (pmax - pmin);
            let c = [0, 1, 2].map(|k| (c0[k] + (c1[k] - c0[k]) * t).round() as u8);
            put(&mut rgb, (y * w + x) as usize, c);
        }
    }

    // People: distinct identities where possible.
    let n = 1 + r.below(MAX_CHARACTERS as u64) as usize;
    let pool = opts.identities.max(1);
    let ids: Vec<u64> = if pool >= n {
        let mut chosen = Vec::with_capacity(n);
        while chosen.len() < n {
            let id = r.below(pool as u64);
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        chosen
    } else {
        (0..n).map(|_| r.below(pool as u64)).collect()
    };
    let people: Vec<Identity> = ids.iter().map(|&id| Identity::new(seed, id)).collect();

    // Layout: one slot per person, side by side; jitter lets neighbours overlap slightly, but a
    // person's centre column is never reached by the next one (|jitter| + body radius < 0.6 slot),
    // so every mask keeps pixels.
    let slot = wf / n as f64;
    let mut owner = vec![0u8; npx];
    let mut figures = Vec::with_capacity(n);
    let mut keypoints = Vec::with_capacity(n);
    for (k, who) in people.iter().enumerate() {
        let cx = slot * (k as f64 + 0.5) + slot * r.uniform_range(-0.12, 0.12);
        let feet_y = hf * r.uniform_range(0.9, 1.02);
        let height = (hf * r.uniform_range(0.55, 0.88))
            .min(slot * r.uniform_range(2.2, 2.8))
            .min(feet_y * 0.97);
        let head_r = (height * r.uniform_range(0.11, 0.14))
            .min(slot * 0.35)
            .max(1.5);
        let body_rx = (height * r.uniform_range(0.17, 0.22))
            .min(slot * 0.48)
            .max(1.5);
        let body_ry = ((height - 2.0 * head_r) / 2.0 * 1.1).max(1.5);
        let fig = Figure {
            cx,
            body_cy: feet_y - body_ry,
            body_rx,
            body_ry,
            head_cx: cx + head_r * r.uniform_range(-0.1, 0.1),
            head_cy: feet_y - height + head_r,
            head_r,
            feet_y,
        };
        let tag = k as u8 + 1;
        // Body: clothes colour, lit from the upper left.
        let light = r.uniform_range(-0.25, 0.25);
        let body = who.clothes.1;
        for_ellipse(
            w,
            h,
            fig.cx,
            fig.body_cy,
            fig.body_rx,
            fig.body_ry,
            |i, ex, ey| {
                let z = (1.0 - ex * ex - ey * ey).max(0.0).sqrt();
                let f = 0.65 + 0.35 * z - 0.15 * (ex * (0.8 + light) + ey * 0.6);
                put(&mut rgb, i, scale(body, f));
                owner[i] = tag;
            },
        );
        // Head: skin, hair on top, shaded.
        for_ellipse(
            w,
            h,
            fig.head_cx,
            fig.head_cy,
            head_r,
            head_r,
            |i, ex, ey| {
                let z = (1.0 - ex * ex - ey * ey).max(0.0).sqrt();
                let f = 0.7 + 0.3 * z - 0.12 * (ex * 0.8 + ey * 0.6);
                let base = if ey < -0.45 + 0.1 * ex.abs() {
                    who.hair.1
                } else {
                    who.skin
                };
                put(&mut rgb, i, scale(base, f));
                owner[i] = tag;
            },
        );
        // Face: dark eyes and a mouth line through the keypoints (inside the head, so the mask
        // is unchanged).
        let kp = face_keypoints(&fig, &mut r);
        let dark = scale(who.skin, 0.3);
        let eye = (head_r * 0.09).max(0.6);
        for p in &kp[..2] {
            for_ellipse(w, h, p.0, p.1, eye, eye, |i, _, _| {
                put(&mut rgb, i, [20, 20, 25])
            });
        }
        for_segment(w, h, kp[3], kp[4], (head_r * 0.04).max(0.5), |i| {
            put(&mut rgb, i, dark)
        });
        keypoints.push(
            kp.iter()
                .flat_map(|&(x, y)| [x.clamp(0.0, wf) as f32, y.clamp(0.0, hf) as f32])
                .collect::<Vec<f32>>(),
        );
        figures.push(fig);
    }

    // Mild noise over everything.
    let mut noise = stream(seed, TAG_NOISE, index as u64);
    for px in rgb.chunks_exact_mut(3) {
        let bits = noise.next_u64();
        for (k, v) in px.iter_mut().enumerate() {
            let b = ((bits >> (8 * k)) & 0xff) as i32;
            let d = (b * 13) / 256 - 6; // -6..=6
            *v = (*v as i32 + d).clamp(0, 255) as u8;
        }
    }

    // Masks (exactly the visible pixels) and their tight bboxes.
    let mut characters = Vec::with_capacity(n);
    for (k, who) in people.iter().enumerate() {
        let tag = k as u8 + 1;
        let mut mask = vec![0u8; npx];
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
        for (i, &o) in owner.iter().enumerate() {
            if o == tag {
                mask[i] = 255;
                let (x, y) = (i as u32 % w, i as u32 / w);
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
        debug_assert!(x0 < x1, "character {k} of sample {index} has an empty mask");
        let mask = GrayImage::from_raw(w, h, mask).expect("mask buffer has image size");
        // Per-image embedding: the identity's, with tiny noise, re-normalised.
        let mut en = stream(
            seed,
            TAG_EMB_NOISE,
            (index as u64) * MAX_CHARACTERS as u64 + k as u64,
        );
        let sigma = 0.1 / (EMBEDDING_DIM as f64).sqrt();
        let mut embedding: Vec<f32> = who
            .embedding
            .iter()
            .map(|&v| (v as f64 + sigma * gaussian(&mut en)) as f32)
            .collect();
        normalise(&mut embedding);
        characters.push(Character {
            embedding,
            keypoints: std::mem::take(&mut keypoints[k]),
            mask: EncodedImage {
                bytes: encode_png_gray(&mask),
                path: Some(format!("synth/{index:06}_mask{k}.png")),
            },
            bbox: [x0, y0, x1, y1],
        });
    }

    // Pose for a share of rows.
    let pose = if r.uniform() < opts.pose_fraction {
        let mut buf = vec![0u8; 3 * npx];
        for fig in &figures {
            draw_stick_figure(&mut buf, w, h, fig, &mut r);
        }
        let img = RgbImage::from_raw(w, h, buf).expect("pose buffer has image size");
        Some(EncodedImage {
            bytes: encode_png_rgb(&img),
            path: Some(format!("synth/{index:06}_pose.png")),
        })
    } else {
        None
    };

    // Caption from the people's descriptors.
    let descs: Vec<String> = people
        .iter()
        .map(|p| p.describe(p.say_hair && r.uniform() < 0.7))
        .collect();
    let list = join_list(&descs);
    let scene = SCENES[r.below(SCENES.len() as u64) as usize];
    let action = ACTIONS[r.below(ACTIONS.len() as u64) as usize];
    let caption = match r.below(4) {
        0 => format!("{}: {list} {action} {scene}", COUNTS[n - 1]),
        1 => format!("a photo of {list} {scene}"),
        2 if n > 1 => format!("{list} {action} together {scene}"),
        2 => format!("{list} {action} {scene}"),
        _ => format!("{scene}, {list}"),
    };

    let img = RgbImage::from_raw(w, h, rgb).expect("image buffer has image size");
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, opts.jpeg_quality.clamp(1, 100))
        .encode_image(&img)
        .expect("JPEG encoding to memory cannot fail");

    Sample {
        id: format!("synth-{seed}-{index:06}"),
        image: EncodedImage {
            bytes: jpeg,
            path: Some(format!("synth/{index:06}.jpg")),
        },
        width: w,
        height: h,
        caption,
        characters,
        pose,
    }
}

/// Generates `opts.rows` samples (in parallel, written in index order) into shards in `dir`.
pub fn write_dataset(
    dir: &Path,
    opts: &SynthOptions,
    writer_options: ShardWriterOptions,
) -> Result<Vec<ShardInfo>> {
    let mut writer = ShardWriter::new(dir, writer_options)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 32);
    let batch = threads * 4;
    let mut start = 0;
    while start < opts.rows {
        let end = (start + batch).min(opts.rows);
        let mut out: Vec<Option<Sample>> = vec![None; end - start];
        std::thread::scope(|s| {
            let parts: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        (start + t..end)
                            .step_by(threads)
                            .map(|i| (i, synth_sample(opts, i)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for part in parts {
                for (i, sample) in part.join().expect("synth worker panicked") {
                    out[i - start] = Some(sample);
                }
            }
        });
        for sample in out {
            writer.push(sample.expect("every index generated"))?;
        }
        start = end;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;
    use crate::schema::validate_fields;

    fn small() -> SynthOptions {
        SynthOptions {
            min_side: 64,
            max_side: 200,
            ..SynthOptions::default()
        }
    }

    fn nonzero_bbox(img: &GrayImage) -> Option<[u32; 4]> {
        let mut b: Option<[u32; 4]> = None;
        for (x, y, p) in img.enumerate_pixels() {
            if p.0[0] != 0 {
                let e = b.get_or_insert([x, y, x + 1, y + 1]);
                *e = [e[0].min(x), e[1].min(y), e[2].max(x + 1), e[3].max(y + 1)];
            }
        }
        b
    }

    #[test]
    fn synth_is_deterministic_and_shards_are_byte_identical() {
        let opts = SynthOptions {
            rows: 13,
            ..small()
        };
        assert_eq!(synth_sample(&opts, 5), synth_sample(&opts, 5));
        assert_ne!(
            synth_sample(&opts, 5),
            synth_sample(
                &SynthOptions {
                    seed: 1,
                    ..opts.clone()
                },
                5
            )
        );
        let wo = || ShardWriterOptions {
            rows_per_row_group: 4,
            shard_rows: 8,
            ..ShardWriterOptions::default()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = write_dataset(a.path(), &opts, wo()).unwrap();
        let sb = write_dataset(b.path(), &opts, wo()).unwrap();
        assert_eq!(sa.len(), 2);
        assert_eq!(sa.iter().map(|s| s.rows).sum::<u64>(), 13);
        for (x, y) in sa.iter().zip(&sb) {
            assert_eq!(x.path.file_name(), y.path.file_name());
            assert_eq!(
                std::fs::read(&x.path).unwrap(),
                std::fs::read(&y.path).unwrap()
            );
        }
        // The shards read back to exactly the generated samples, in order.
        let reader = crate::shard::ShardReader::open(&sa[0].path).unwrap();
        assert_eq!(reader.num_rows(), 8);
        assert_eq!(reader.read_sizes().unwrap()[3], {
            let s = synth_sample(&opts, 3);
            (s.width, s.height)
        });
    }

    #[test]
    fn synth_samples_pass_validate_fields() {
        for opts in [
            small(),
            SynthOptions {
                min_side: 17,
                max_side: 40,
                seed: 3,
                identities: 2,
                ..small()
            },
        ] {
            for i in 0..256 {
                let s = synth_sample(&opts, i);
                let errors = validate_fields(&s, &Location::row("synth", i as u64));
                assert!(errors.is_empty(), "sample {i}: {errors:?}");
                assert_eq!(s.id, format!("synth-{}-{i:06}", opts.seed));
                assert!(s.caption.len() > 10, "{}", s.caption);
                for ch in &s.characters {
                    let n32 = ch.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let n64 = ch
                        .embedding
                        .iter()
                        .map(|&v| v as f64 * v as f64)
                        .sum::<f64>()
                        .sqrt();
                    assert!((n64 - 1.0).abs() < 1e-6, "f64 norm {n64}");
                    assert!((n32 - 1.0).abs() < 1e-5, "f32 norm {n32}");
                    for p in ch.keypoints.chunks_exact(2) {
                        assert!(
                            p[0] >= 0.0
                                && p[0] <= s.width as f32
                                && p[1] >= 0.0
                                && p[1] <= s.height as f32
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn synth_masks_are_nonempty_and_bbox_is_tight() {
        let opts = small();
        let mut occluded = 0;
        for i in 0..60 {
            let s = synth_sample(&opts, i);
            let img = image::load_from_memory(&s.image.bytes).unwrap();
            assert_eq!((img.width(), img.height()), (s.width, s.height));
            if let Some(p) = &s.pose {
                let p = image::load_from_memory(&p.bytes).unwrap();
                assert_eq!((p.width(), p.height()), (s.width, s.height));
            }
            let mut union = vec![0u32; (s.width * s.height) as usize];
            for ch in &s.characters {
                let m = image::load_from_memory(&ch.mask.bytes).unwrap();
                assert!(
                    matches!(m, image::DynamicImage::ImageLuma8(_)),
                    "mask is not 8-bit gray"
                );
                let m = m.to_luma8();
                assert_eq!(m.dimensions(), (s.width, s.height));
                assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
                assert_eq!(nonzero_bbox(&m), Some(ch.bbox), "sample {i}");
                for (u, p) in union.iter_mut().zip(m.pixels()) {
                    *u += (p.0[0] != 0) as u32;
                }
                // Keypoints lie on the character's own visible pixels or at least in its bbox.
                let [x0, y0, x1, y1] = ch.bbox;
                for p in ch.keypoints.chunks_exact(2) {
                    assert!(
                        p[0] >= x0 as f32 - 1.0 && p[0] <= x1 as f32 + 1.0,
                        "sample {i}"
                    );
                    assert!(
                        p[1] >= y0 as f32 - 1.0 && p[1] <= y1 as f32 + 1.0,
                        "sample {i}"
                    );
                }
            }
            // Masks are disjoint (occluded pixels belong to the front character only).
            assert!(union.iter().all(|&c| c <= 1), "sample {i}: masks overlap");
            // Count occlusions: a neighbour's bbox reaching into the previous one.
            for pair in s.characters.windows(2) {
                if pair[1].bbox[0] < pair[0].bbox[2] {
                    occluded += 1;
                }
            }
        }
        assert!(occluded > 0, "no sample shows any occlusion");
    }

    #[test]
    fn synth_character_counts_and_sizes_vary() {
        let opts = SynthOptions::default();
        let mut counts = [0usize; 4];
        let mut sizes = std::collections::HashSet::new();
        let mut odd = false;
        let mut poses = 0;
        let mut captions = std::collections::HashSet::new();
        for i in 0..50 {
            let s = synth_sample(&opts, i);
            counts[s.characters.len()] += 1;
            assert!((192..=320).contains(&s.width) && (192..=320).contains(&s.height));
            odd |= s.width % 2 == 1 || s.height % 2 == 1;
            sizes.insert((s.width, s.height));
            poses += s.pose.is_some() as usize;
            captions.insert(s.caption.clone());
        }
        assert!(
            counts[1] > 0 && counts[2] > 0 && counts[3] > 0,
            "{counts:?}"
        );
        assert!(sizes.len() > 40, "{}", sizes.len());
        assert!(odd);
        assert!((10..=40).contains(&poses), "{poses}");
        assert!(captions.len() > 40);
    }

    #[test]
    fn synth_identity_embeddings_recur() {
        let opts = SynthOptions::default();
        let a = synth_sample(&opts, 0);
        let mut best = 0.0f32;
        for i in 1..20 {
            let b = synth_sample(&opts, i);
            for x in &a.characters {
                for y in &b.characters {
                    let dot: f32 = x
                        .embedding
                        .iter()
                        .zip(&y.embedding)
                        .map(|(p, q)| p * q)
                        .sum();
                    best = best.max(dot);
                }
            }
        }
        assert!(best > 0.95, "no recurring identity (best cosine {best})");
    }
}
