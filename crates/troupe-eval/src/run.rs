//! The two halves of `troupe eval run`: generating a protocol's images with the StoryMaker
//! pipeline ([`generate`]), and scoring a folder laid out as the protocol names its images
//! ([`score`], also `troupe eval score` for images made elsewhere) into `scores.jsonl`,
//! `summary.json`, `references/` and `report.html`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use troupe_diffusion::gallery::{png, write_atomic};
use troupe_diffusion::pipeline::{Pipeline, Request, Settings, to_rgb8};
use troupe_diffusion::reference::Reference;
use troupe_diffusion::samplers::SamplerKind;
use troupe_faces::FaceAnalysis;

use crate::EvalError;
use crate::clip_score::read_image;
use crate::protocol::{Item, Protocol};
use crate::report::{RunData, render};
use crate::scorer::{Scorer, SubjectFeatures, Target};
use crate::summary::{ScoreLine, Summary};

/// Images CLIP scores in one batch.
const SCORE_BATCH: usize = 8;

/// Extensions an image of the layout may have (`p000-s0-i00.png` may be `….jpg`).
const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

fn io(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Input {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The protocol's subjects as pipeline references (`photo=` ones through `faces`).
pub fn subject_references(
    protocol: &Protocol,
    faces: Option<&FaceAnalysis>,
) -> Result<Vec<Reference>, EvalError> {
    protocol
        .subjects
        .iter()
        .map(|s| {
            crate::references::resolve(&s.reference, Path::new(""), faces).map_err(|e| {
                EvalError::Protocol {
                    path: protocol.path.display().to_string(),
                    message: format!("subject `{}`: {e}", s.name),
                }
            })
        })
        .collect()
}

/// The generation settings of `item` (protocol values over the pipeline's defaults).
pub fn settings(
    protocol: &Protocol,
    item: &Item,
    default_size: usize,
) -> Result<Settings, EvalError> {
    let g = &protocol.generation;
    let mut s = Settings::new(
        &item.prompt,
        g.width.unwrap_or(default_size),
        g.height.unwrap_or(default_size),
    );
    s.negative_prompt = g.negative_prompt.clone();
    s.steps = g.steps.unwrap_or(s.steps);
    if let Some(name) = &g.scheduler {
        s.sampler = SamplerKind::parse(name).map_err(|e| EvalError::Protocol {
            path: protocol.path.display().to_string(),
            message: format!("generation.scheduler: {e}"),
        })?;
    }
    s.guidance = g.guidance.unwrap_or(s.guidance);
    s.ip_scale = g.ip_scale.unwrap_or(s.ip_scale);
    s.lora_scale = g.lora_scale.unwrap_or(s.lora_scale);
    s.num_images = protocol.images_per_prompt;
    s.seed = item.seed;
    s.controlnet_scale = g.controlnet_scale.unwrap_or(s.controlnet_scale);
    Ok(s)
}

/// Generates every image of `protocol` into `images_dir` that is not there yet (a rerun
/// after an interruption continues), `batch` generation calls per UNet batch. Every setting
/// and reference is checked before the first step; `progress` is told `(done, total)` images
/// after each batch. Returns how many images were generated.
pub fn generate(
    protocol: &Protocol,
    pipeline: &Pipeline,
    references: &[Reference],
    images_dir: &Path,
    batch: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<usize, EvalError> {
    let items = protocol.items();
    // One call per (case, prompt, seed): its `images_per_prompt` items are consecutive.
    let calls: Vec<&[Item]> = items.chunks(protocol.images_per_prompt).collect();
    let mut prepared = Vec::new();
    let mut features = BTreeMap::new();
    // Each prompt's pose is decoded once (every call of a prompt has the same size).
    let mut poses: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for call in &calls {
        let s = settings(protocol, &call[0], pipeline.default_size)?;
        pipeline.check(&s)?;
        let prompt = call[0].prompt_index;
        if let Some(p) = protocol.prompts[prompt].pose.as_deref()
            && !poses.contains_key(&prompt)
        {
            poses.insert(
                prompt,
                troupe_diffusion::control::read_pose(p, s.width, s.height)?,
            );
        }
        if !features.contains_key(&call[0].subjects) {
            let refs: Vec<Reference> = call[0]
                .subjects
                .iter()
                .map(|&i| references[i].clone())
                .collect();
            features.insert(call[0].subjects.clone(), pipeline.characters(&refs)?);
        }
        prepared.push(s);
    }
    let files =
        |call: &[Item]| -> Vec<PathBuf> { call.iter().map(|i| images_dir.join(&i.file)).collect() };
    let todo: Vec<usize> = (0..calls.len())
        .filter(|&c| files(calls[c]).iter().any(|f| !f.exists()))
        .collect();
    let total = todo.len() * protocol.images_per_prompt;
    if todo.len() < calls.len() {
        eprintln!(
            "{} of {} images already in {}; generating the other {total}",
            (calls.len() - todo.len()) * protocol.images_per_prompt,
            items.len(),
            images_dir.display()
        );
    }
    let mut done = 0;
    for group in todo.chunks(batch.max(1)) {
        let requests = group
            .iter()
            .map(|&c| Request {
                settings: &prepared[c],
                characters: &features[&calls[c][0].subjects],
                latents: None,
                pose: poses.get(&calls[c][0].prompt_index).map(Vec::as_slice),
            })
            .collect();
        let outputs = pipeline.generate_batch(requests, &mut |_, _| {})?;
        for (&c, images) in group.iter().zip(outputs) {
            for (file, img) in files(calls[c]).iter().zip(to_rgb8(images)) {
                let dir = file.parent().expect("layout files have a folder");
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                write_atomic(file, &png(&img)).map_err(|e| io(file, e))?;
                done += 1;
            }
        }
        progress(done as u64, total as u64);
    }
    Ok(done)
}

/// The file of `item` in `images_dir`: its `.png` name, or the same stem with another image
/// extension.
fn find_image(images_dir: &Path, item: &Item) -> Option<PathBuf> {
    EXTENSIONS
        .iter()
        .map(|ext| images_dir.join(item.file.with_extension(ext)))
        .find(|p| p.is_file())
}

/// Scores every image of `protocol` found in `images_dir` (all must be there) and writes
/// `scores.jsonl`, `summary.json`, `references/NAME.png` and `report.html` into `out`.
/// `describe` adds scorer and generation settings to the summary; `progress` is told
/// `(done, total)` images as they are scored.
pub fn score(
    protocol: &Protocol,
    scorer: &Scorer,
    references: &[Reference],
    images_dir: &Path,
    out: &Path,
    describe: (BTreeMap<String, String>, BTreeMap<String, String>),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, EvalError> {
    let items = protocol.items();
    let mut files = Vec::with_capacity(items.len());
    let mut missing = Vec::new();
    for item in &items {
        match find_image(images_dir, item) {
            Some(f) => files.push(f),
            None => missing.push(item.file.display().to_string()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        return Err(io(
            images_dir,
            format!(
                "{} of the protocol's {} images are missing (no metric is averaged over a partial set), e.g. {}",
                missing.len(),
                items.len(),
                shown.join(", ")
            ),
        ));
    }
    let refs_dir = out.join("references");
    std::fs::create_dir_all(&refs_dir).map_err(|e| io(&refs_dir, e))?;
    let subjects: Vec<SubjectFeatures> = protocol
        .subjects
        .iter()
        .zip(references)
        .map(|(s, r)| {
            let path = refs_dir.join(format!("{}.png", s.name));
            write_atomic(&path, &png(&r.image)).map_err(|e| io(&path, e))?;
            scorer.subject(&s.name, &r.image, Path::new(&r.source))
        })
        .collect::<Result<_, _>>()?;
    let mut lines = Vec::with_capacity(items.len());
    for (chunk, paths) in items.chunks(SCORE_BATCH).zip(files.chunks(SCORE_BATCH)) {
        let images: Vec<RgbImage> = paths
            .iter()
            .map(|p| read_image(p))
            .collect::<Result<_, _>>()?;
        let targets: Vec<Target> = chunk
            .iter()
            .zip(&images)
            .zip(paths)
            .map(|((item, image), path)| Target {
                image,
                source: path,
                prompt: &item.prompt,
                subjects: item.subjects.iter().map(|&s| &subjects[s]).collect(),
            })
            .collect();
        for ((item, path), s) in chunk.iter().zip(paths).zip(scorer.score(&targets)?) {
            let mut line = ScoreLine::new(protocol, item, s);
            // The file as found (it may be a .jpg of the layout's stem).
            line.file = path
                .strip_prefix(images_dir)
                .unwrap_or(path)
                .display()
                .to_string();
            lines.push(line);
        }
        progress(lines.len() as u64, items.len() as u64);
    }
    let mut summary = Summary::new(protocol, &lines);
    (summary.scorers, summary.generation) = describe;
    summary.images_dir = match images_dir.strip_prefix(out) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => std::path::absolute(images_dir)
            .unwrap_or(images_dir.to_path_buf())
            .display()
            .to_string(),
    };
    let jsonl: String = lines
        .iter()
        .map(|l| serde_json::to_string(l).expect("score lines serialise") + "\n")
        .collect();
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        write_atomic(&p, bytes).map_err(|e| io(&p, e))
    };
    write("scores.jsonl", jsonl.as_bytes())?;
    let text = serde_json::to_string_pretty(&summary).expect("summaries serialise");
    write("summary.json", text.as_bytes())?;
    let run = RunData::load(out, protocol.name.clone())?;
    write("report.html", render(&[run])?.as_bytes())?;
    Ok(summary)
}
