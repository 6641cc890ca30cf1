//! Face analysis as insightface's `FaceAnalysis` runs the `buffalo_l` models: SCRFD detection
//! ([`detector`]) → 5-point similarity alignment (`norm_crop`, from `troupe-data`) → ArcFace
//! embedding ([`recognizer`]). Any model file of those families is given by path and run
//! unchanged by `tract` (pure Rust ONNX inference: no network, no Python, no C library).
//!
//! Images are RGB here; insightface takes BGR and swaps to RGB when it builds the network input,
//! so the networks see the same values.

pub mod detector;
pub mod recognizer;

use std::path::Path;

use image::RgbImage;

pub use detector::{Detection, ScrfdDetector};
pub use recognizer::ArcFaceRecognizer;

/// Why a model cannot be used or a face cannot be analysed, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The model file cannot be read, or is not the expected kind of model.
    #[error("{path}: {message}")]
    Model {
        /// The model file.
        path: String,
        /// What is wrong (for a model of the wrong kind: which inputs/outputs were expected).
        message: String,
    },
    /// Running a model failed.
    #[error("{path}: inference failed: {message}")]
    Inference {
        /// The model file.
        path: String,
        /// The runtime's message.
        message: String,
    },
}

impl FaceError {
    pub(crate) fn model(path: &Path, message: impl Into<String>) -> Self {
        Self::Model {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}

/// `model` optimised for one `[1, 3, h, w]` f32 input, ready to run.
pub(crate) fn plan_for(
    model: tract_onnx::prelude::InferenceModel,
    h: usize,
    w: usize,
    path: &Path,
) -> Result<std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>, FaceError> {
    use tract_onnx::prelude::*;
    let err = |e: TractError| FaceError::model(path, format!("{e:#}"));
    let fact = InferenceFact::dt_shape(f32::datum_type(), tvec!(1, 3, h, w));
    model
        .with_input_fact(0, fact)
        .map_err(err)?
        .into_optimized()
        .map_err(err)?
        .into_runnable()
        .map_err(err)
}

/// One detected face with its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    /// The detection (box, score, keypoints in image pixels).
    pub detection: Detection,
    /// ArcFace output as the model gives it.
    pub embedding: Vec<f32>,
}

impl Face {
    /// The L2-normalised embedding (insightface's `normed_embedding`).
    pub fn normed_embedding(&self) -> Vec<f32> {
        let norm = self
            .embedding
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        self.embedding
            .iter()
            .map(|&x| (x as f64 / norm) as f32)
            .collect()
    }
}

/// A detector and a recogniser, as `FaceAnalysis(allowed_modules=["detection", "recognition"])`.
pub struct FaceAnalysis {
    /// SCRFD.
    pub detector: ScrfdDetector,
    /// ArcFace.
    pub recognizer: ArcFaceRecognizer,
}

impl FaceAnalysis {
    /// Loads a detector (letterbox `det_size` × `det_size`) and a recogniser (aligning with
    /// `warp`'s `warpAffine` arithmetic).
    pub fn load(
        detector: &Path,
        recognizer: &Path,
        det_size: usize,
        warp: troupe_data::ops::geometry::WarpImpl,
    ) -> Result<Self, FaceError> {
        Ok(Self {
            detector: ScrfdDetector::load(detector, (det_size, det_size))?,
            recognizer: ArcFaceRecognizer::load(recognizer, warp)?,
        })
    }

    /// Every face of `img` in the detector's order (score, after NMS), each with its
    /// embedding (`FaceAnalysis.get(img)`).
    pub fn get(&self, img: &RgbImage) -> Result<Vec<Face>, FaceError> {
        self.detector
            .detect(img)?
            .into_iter()
            .map(|detection| {
                let embedding = self.recognizer.embed(img, &detection.kps)?;
                Ok(Face {
                    detection,
                    embedding,
                })
            })
            .collect()
    }

    /// The face with the largest box area (the StoryMaker pipeline's and `FaceAnalysis`
    /// users' rule), or `None` when no face is found.
    pub fn largest(&self, img: &RgbImage) -> Result<Option<Face>, FaceError> {
        let faces = self.get(img)?;
        Ok(largest(faces))
    }
}

/// Characters' identities for `troupe data pack`: for each mask, the largest face whose box
/// centre lies on it; its normed embedding and keypoints. The image is analysed once.
impl troupe_data::pack::IdentityProvider for FaceAnalysis {
    fn identities(
        &self,
        image: &RgbImage,
        masks: &[&image::GrayImage],
    ) -> Vec<troupe_data::pack::Identity> {
        let faces = match self.get(image) {
            Ok(f) => f,
            Err(e) => return masks.iter().map(|_| Err(e.to_string())).collect(),
        };
        masks
            .iter()
            .map(|mask| {
                let on_mask = faces.iter().filter(|f| {
                    let b = f.detection.bbox;
                    let (x, y) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                    x >= 0.0
                        && y >= 0.0
                        && (x as u32) < mask.width()
                        && (y as u32) < mask.height()
                        && mask.get_pixel(x as u32, y as u32).0[0] > 0
                });
                let face = largest(on_mask.cloned().collect()).ok_or_else(|| {
                    let n = faces.len();
                    format!(
                        "no detected face lies on the character's mask ({n} faces in the image)"
                    )
                })?;
                let kps = face.detection.kps.iter().flatten().copied().collect();
                Ok((face.normed_embedding(), kps))
            })
            .collect()
    }
}

/// The face of largest box area; ties go to the later one, as Python's `sorted(...)[-1]`.
pub fn largest(faces: Vec<Face>) -> Option<Face> {
    let mut best: Option<Face> = None;
    for f in faces {
        if best
            .as_ref()
            .is_none_or(|b| f.detection.area() >= b.detection.area())
        {
            best = Some(f);
        }
    }
    best
}
