//! `scores.jsonl` (one line per image) and `summary.json` (mean, std and n per metric, overall,
//! per subject and per category, with the conventions stated).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::EvalError;
use crate::protocol::{Item, Protocol};
use crate::scorer::ImageScores;

/// One line of `scores.jsonl`. Scores are 100 × cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreLine {
    /// Image path under the images folder.
    pub file: String,
    /// Subject names, in placeholder order.
    pub subjects: Vec<String>,
    /// Prompt index in the protocol.
    pub prompt_index: usize,
    /// Prompt category.
    pub category: String,
    /// The prompt (class words filled in).
    pub prompt: String,
    /// Seed of the generation call.
    pub seed: u64,
    /// Index within the call.
    pub instance: usize,
    /// Faces the detector found (null without face models).
    pub faces_found: Option<usize>,
    /// Per subject: a face was matched to it.
    pub face_detected: Vec<bool>,
    /// Per subject: face similarity (0 when no face was matched).
    pub face_sim: Vec<f64>,
    /// CLIP-T.
    pub clip_t: f64,
    /// Per subject: CLIP-I.
    pub clip_i: Vec<f64>,
}

impl ScoreLine {
    /// The line of `item` with its scores.
    pub fn new(protocol: &Protocol, item: &Item, s: ImageScores) -> Self {
        Self {
            file: item.file.display().to_string(),
            subjects: item
                .subjects
                .iter()
                .map(|&i| protocol.subjects[i].name.clone())
                .collect(),
            prompt_index: item.prompt_index,
            category: protocol.prompts[item.prompt_index].category.clone(),
            prompt: item.prompt.clone(),
            seed: item.seed,
            instance: item.instance,
            faces_found: s.faces_found,
            face_detected: s.face_matched,
            face_sim: s.face_sim,
            clip_t: s.clip_t,
            clip_i: s.clip_i,
        }
    }
}

/// Mean, population standard deviation (`np.std`) and count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean (null when n = 0).
    pub mean: Option<f64>,
    /// Population std (null when n = 0).
    pub std: Option<f64>,
    /// Number of values.
    pub n: usize,
}

impl Stat {
    /// The statistics of `values`.
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self {
                mean: None,
                std: None,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        Self {
            mean: Some(mean),
            std: Some(var.sqrt()),
            n,
        }
    }
}

/// The metrics of a set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Images.
    pub images: usize,
    /// Face similarity per (image, subject), no face counted as 0 (null without face models).
    pub face_sim: Option<Stat>,
    /// Face similarity over the (image, subject) pairs with a matched face only.
    pub face_sim_detected: Option<Stat>,
    /// Matched faces / (image, subject) pairs.
    pub face_detection_rate: Option<f64>,
    /// CLIP-T per image.
    pub clip_t: Stat,
    /// CLIP-I per (image, subject).
    pub clip_i: Stat,
}

impl Metrics {
    /// The metrics of `lines`; `subject` restricts the per-subject values to that subject.
    pub fn of<'a>(lines: impl Iterator<Item = &'a ScoreLine>, subject: Option<&str>) -> Self {
        let (mut fs, mut fs_found, mut ct, mut ci) = (vec![], vec![], vec![], vec![]);
        let (mut images, mut faces_known) = (0, true);
        for l in lines {
            images += 1;
            ct.push(l.clip_t);
            faces_known &= l.faces_found.is_some();
            for (k, name) in l.subjects.iter().enumerate() {
                if subject.is_some_and(|s| s != name) {
                    continue;
                }
                ci.push(l.clip_i[k]);
                fs.push(l.face_sim[k]);
                if l.face_detected[k] {
                    fs_found.push(l.face_sim[k]);
                }
            }
        }
        let faces = |v: &[f64]| faces_known.then(|| Stat::of(v));
        Self {
            images,
            face_sim: faces(&fs),
            face_sim_detected: faces(&fs_found),
            face_detection_rate: (faces_known && !fs.is_empty())
                .then(|| fs_found.len() as f64 / fs.len() as f64),
            clip_t: Stat::of(&ct),
            clip_i: Stat::of(&ci),
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Protocol name.
    pub protocol: String,
    /// Protocol description.
    pub description: String,
    /// The scoring rules, in words.
    pub conventions: BTreeMap<String, String>,
    /// Scorer models (paths as given) and settings.
    pub scorers: BTreeMap<String, String>,
    /// Generation settings (for `troupe eval run`; empty for `score`).
    pub generation: BTreeMap<String, String>,
    /// The images folder, relative to the summary's folder when inside it.
    pub images_dir: String,
    /// Each subject's reference (its image is `references/NAME.png` beside the summary).
    pub subjects: BTreeMap<String, String>,
    /// All images.
    pub overall: Metrics,
    /// Per subject.
    pub per_subject: BTreeMap<String, Metrics>,
    /// Per prompt category.
    pub per_category: BTreeMap<String, Metrics>,
}

impl Summary {
    /// Aggregates `lines`.
    pub fn new(protocol: &Protocol, lines: &[ScoreLine]) -> Self {
        let negative = match protocol.conventions.negative_face_sim.as_str() {
            "keep" => "kept as the raw cosine",
            _ => "clamped per image: max(similarity, 0) (FastComposer)",
        };
        let conventions = [
            ("scale", "100 × cosine similarity of L2-normalised features"),
            ("no_face", "a subject without a matched face scores 0 and is counted (FastComposer); face_sim_detected averages matched faces only"),
            ("negative_face_sim", negative),
            ("face_rule", "reference: its largest face; one subject: the generated image's largest face; several: faces matched to subjects greedily by similarity (FastComposer's multi-subject rule)"),
            ("clip_t", "generated image vs the prompt with class words filled in (not clamped)"),
            ("clip_i", "full generated image vs the subject's full reference image"),
            ("std", "population standard deviation (np.std)"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let per = |key: &dyn Fn(&ScoreLine) -> Vec<String>| {
            let mut keys: Vec<String> = lines.iter().flat_map(key).collect();
            keys.sort();
            keys.dedup();
            keys
        };
        let per_subject = per(&|l| l.subjects.clone())
            .into_iter()
            .map(|s| {
                let m = Metrics::of(lines.iter().filter(|l| l.subjects.contains(&s)), Some(&s));
                (s, m)
            })
            .collect();
        let per_category = per(&|l| vec![l.category.clone()])
            .into_iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let m = Metrics::of(lines.iter().filter(|l| l.category == c), None);
                (c, m)
            })
            .collect();
        Self {
            protocol: protocol.name.clone(),
            description: protocol.description.clone(),
            conventions,
            scorers: BTreeMap::new(),
            generation: BTreeMap::new(),
            images_dir: String::new(),
            subjects: protocol
                .subjects
                .iter()
                .map(|s| (s.name.clone(), s.reference.clone()))
                .collect(),
            overall: Metrics::of(lines.iter(), None),
            per_subject,
            per_category,
        }
    }
}

/// Reads `scores.jsonl` (line numbers in errors).
pub fn read_scores(path: &Path) -> Result<Vec<ScoreLine>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Input {
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| EvalError::Input {
                path: path.display().to_string(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(subjects: &[&str], detected: &[bool], fs: &[f64], ct: f64, ci: &[f64]) -> ScoreLine {
        ScoreLine {
            file: "x.png".into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            prompt_index: 0,
            category: "c".into(),
            prompt: "p".into(),
            seed: 0,
            instance: 0,
            faces_found: Some(detected.iter().filter(|d| **d).count()),
            face_detected: detected.to_vec(),
            face_sim: fs.to_vec(),
            clip_t: ct,
            clip_i: ci.to_vec(),
        }
    }

    #[test]
    fn no_face_counts_as_zero_and_rates_are_per_subject() {
        let lines = [
            line(&["a"], &[true], &[60.0], 20.0, &[70.0]),
            line(&["a"], &[false], &[0.0], 30.0, &[80.0]),
            line(
                &["a", "b"],
                &[true, false],
                &[40.0, 0.0],
                25.0,
                &[50.0, 60.0],
            ),
        ];
        let m = Metrics::of(lines.iter(), None);
        assert_eq!(m.images, 3);
        let fs = m.face_sim.unwrap();
        assert_eq!((fs.mean, fs.n), (Some(25.0), 4)); // (60 + 0 + 40 + 0) / 4
        assert_eq!(m.face_sim_detected.unwrap().mean, Some(50.0));
        assert_eq!(m.face_detection_rate, Some(0.5));
        assert_eq!(m.clip_t.mean, Some(25.0));
        assert_eq!(m.clip_i.n, 4);
        // np.std([20, 30, 25]) = sqrt(50/3)
        assert!((m.clip_t.std.unwrap() - (50.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let b = Metrics::of(lines[2..].iter(), Some("b"));
        assert_eq!(b.face_sim.unwrap().mean, Some(0.0));
        assert_eq!(b.clip_i.mean, Some(60.0));
        assert_eq!(b.face_detection_rate, Some(0.0));
    }
}
