//! The image scorer: CLIP-T, CLIP-I and face similarity of a generated image against its
//! prompt and its subjects' reference images, all ×100 cosines.
//!
//! * Face similarity: the reference's face is its largest detected face (a reference without
//!   one is an error, as FastComposer asserts). One subject: the generated image's largest face
//!   (insightface's / FastComposer's rule); several: faces matched to subjects greedily
//!   ([`crate::matching`]). No face → 0, counted. Negative cosines clamped or kept per image
//!   ([`Negative`]).
//! * CLIP-T: the image against the prompt with the class words filled in.
//! * CLIP-I: the full generated image against the full reference image.

use std::path::Path;

use burn::prelude::*;
use image::RgbImage;
use troupe_data::ops::geometry::WarpImpl;
use troupe_data::ops::resize::PassOrder;
use troupe_faces::FaceAnalysis;

use crate::EvalError;
use crate::clip_score::ClipScorer;
use crate::matching::{Negative, greedy_match, subject_scores};

/// Where the scorer models are and how they run.
#[derive(Debug, Clone)]
pub struct ScorerModels<'a> {
    /// transformers `CLIPModel` folder.
    pub clip: &'a Path,
    /// SCRFD detector and ArcFace recogniser ONNX files (no face metrics without them).
    pub faces: Option<(&'a Path, &'a Path)>,
    /// Detector input side.
    pub det_size: usize,
    /// Detection threshold.
    pub threshold: f32,
    /// Per-image negative face-similarity rule.
    pub negative: Negative,
}

/// A subject's reference features.
#[derive(Debug, Clone)]
pub struct SubjectFeatures {
    /// Subject name.
    pub name: String,
    /// L2-normalised CLIP image features of the reference image.
    pub clip: Vec<f32>,
    /// Normed embedding of the reference's largest face (when face models are loaded).
    pub face: Option<Vec<f32>>,
}

/// One image to score.
pub struct Target<'a> {
    /// The image.
    pub image: &'a RgbImage,
    /// Its file (for errors).
    pub source: &'a Path,
    /// The prompt it was generated with.
    pub prompt: &'a str,
    /// The subjects it should show, in placeholder order.
    pub subjects: Vec<&'a SubjectFeatures>,
}

/// The scores of one image (×100 cosines).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// Faces the detector found (`None` without face models).
    pub faces_found: Option<usize>,
    /// Per subject: whether a face was matched to it.
    pub face_matched: Vec<bool>,
    /// Per subject: face similarity (0 when unmatched; clamped or kept per the rule).
    pub face_sim: Vec<f64>,
    /// CLIP-T.
    pub clip_t: f64,
    /// Per subject: CLIP-I against its reference image.
    pub clip_i: Vec<f64>,
}

/// CLIP and (optionally) face models, loaded once.
pub struct Scorer {
    clip: ClipScorer,
    faces: Option<FaceAnalysis>,
    negative: Negative,
}

impl Scorer {
    /// Loads the models (CLIP on `device`; faces on the CPU with `tract`), with today's
    /// library arithmetic (Pillow 13, OpenCV 5), what a Python scorer installed now runs.
    pub fn load(models: &ScorerModels, device: &Device) -> Result<Self, EvalError> {
        let clip = ClipScorer::load(models.clip, PassOrder::Pillow13, device)?;
        let faces = match models.faces {
            Some((det, rec)) => {
                let mut fa = FaceAnalysis::load(det, rec, models.det_size, WarpImpl::OpenCv5)?;
                fa.detector.threshold = models.threshold;
                Some(fa)
            }
            None => None,
        };
        Ok(Self {
            clip,
            faces,
            negative: models.negative,
        })
    }

    /// Whether face metrics are computed.
    pub fn has_faces(&self) -> bool {
        self.faces.is_some()
    }

    /// A subject's reference features; an error when the face models find no face in it.
    pub fn subject(
        &self,
        name: &str,
        image: &RgbImage,
        source: &Path,
    ) -> Result<SubjectFeatures, EvalError> {
        let clip = self.clip_rows(&[(image, source)])?.remove(0);
        let face = match &self.faces {
            None => None,
            Some(fa) => {
                let face = fa.largest(image)?.ok_or_else(|| EvalError::Input {
                    path: source.display().to_string(),
                    message: format!(
                        "subject `{name}`: the face detector finds no face in the reference image \
                         (face similarity needs one; use a reference with a clear face)"
                    ),
                })?;
                Some(face.normed_embedding())
            }
        };
        Ok(SubjectFeatures {
            name: name.to_string(),
            clip,
            face,
        })
    }

    /// Scores `targets` (CLIP runs them as one batch; captions are encoded once each).
    pub fn score(&self, targets: &[Target]) -> Result<Vec<ImageScores>, EvalError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<(&RgbImage, &Path)> = targets.iter().map(|t| (t.image, t.source)).collect();
        let images = self.clip_rows(&pairs)?;
        let mut captions: Vec<String> = targets.iter().map(|t| t.prompt.to_string()).collect();
        captions.sort();
        captions.dedup();
        let texts = rows(self.clip.text_features(&captions)?);
        let mut out = Vec::with_capacity(targets.len());
        for (t, img) in targets.iter().zip(&images) {
            let text = &texts[captions
                .binary_search_by(|c| c.as_str().cmp(t.prompt))
                .unwrap()];
            let (faces_found, face_matched, face_sim) = self.faces(t)?;
            out.push(ImageScores {
                faces_found,
                face_matched,
                face_sim,
                clip_t: 100.0 * dot(img, text),
                clip_i: t
                    .subjects
                    .iter()
                    .map(|s| 100.0 * dot(img, &s.clip))
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Face count, matched flags and similarities of one target (×100).
    #[allow(clippy::type_complexity)]
    fn faces(&self, t: &Target) -> Result<(Option<usize>, Vec<bool>, Vec<f64>), EvalError> {
        let n = t.subjects.len();
        let Some(fa) = &self.faces else {
            return Ok((None, vec![false; n], vec![0.0; n]));
        };
        let mut faces = fa.get(t.image)?;
        let found = faces.len();
        if n == 1 {
            // The largest face only (ties: the later one, as `sorted(...)[-1]`).
            faces = troupe_faces::largest(faces).into_iter().collect();
        }
        let embeddings: Vec<Vec<f32>> = faces.iter().map(|f| f.normed_embedding()).collect();
        let sims: Vec<Vec<f64>> = t
            .subjects
            .iter()
            .map(|s| {
                let r = s
                    .face
                    .as_ref()
                    .expect("subjects carry faces when models do");
                embeddings.iter().map(|e| dot(e, r)).collect()
            })
            .collect();
        let matched = greedy_match(&sims).iter().map(Option::is_some).collect();
        let sim = subject_scores(&sims, self.negative)
            .into_iter()
            .map(|s| 100.0 * s)
            .collect();
        Ok((Some(found), matched, sim))
    }

    fn clip_rows(&self, images: &[(&RgbImage, &Path)]) -> Result<Vec<Vec<f32>>, EvalError> {
        Ok(rows(self.clip.image_features(images)?))
    }
}

/// `[N, P]` features as host rows.
fn rows(x: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, p] = x.dims();
    let v: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    v.chunks(p).map(<[f32]>::to_vec).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}
