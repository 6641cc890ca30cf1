//! Evaluation for troupe: scoring generated images the way the Python stacks score them, so
//! numbers are comparable with papers and reproducible on the machine that trained.
//!
//! * [`protocol`]: the protocol file (subjects, prompts, seeds, settings, scorer models) and the
//!   images it names.
//! * [`clip_score`]: CLIP-T (image ↔ caption) and CLIP-I (image ↔ reference image) with a
//!   transformers `CLIPModel` folder, preprocessing as its `CLIPImageProcessor`.
//! * [`matching`]: generated faces ↔ subjects (greedy on similarity) and the no-face / negative
//!   score conventions.
//! * [`scorer`]: all three scores of an image against its prompt and subjects.
//! * [`summary`]: `scores.jsonl` lines and `summary.json` statistics.
//! * [`run`]: generating a protocol's images and scoring a folder of them.
//! * [`report`]: the self-contained `report.html`, one or several runs side by side.
//! * [`references`]: a subject's reference from any `troupe sample --reference` form,
//!   including a plain photo (identity and keypoints from face analysis).

pub mod clip_score;
pub mod matching;
pub mod protocol;
pub mod references;
pub mod report;
pub mod run;
pub mod scorer;
pub mod summary;

/// Why an evaluation cannot run, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A protocol or subjects file that cannot be used.
    #[error("{path}: {message}")]
    Protocol {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// An input (image, reference, output folder) that cannot be used.
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The CLIP scorer.
    #[error(transparent)]
    Clip(Box<clip_score::ScoreError>),
    /// Face analysis.
    #[error(transparent)]
    Face(#[from] troupe_faces::FaceError),
    /// A reference the generation pipeline rejects.
    #[error(transparent)]
    Reference(Box<troupe_diffusion::error::DiffusionError>),
}

// Boxed: the large errors would make every `Result<_, EvalError>` large.
impl From<clip_score::ScoreError> for EvalError {
    fn from(e: clip_score::ScoreError) -> Self {
        Self::Clip(Box::new(e))
    }
}

impl From<troupe_diffusion::error::DiffusionError> for EvalError {
    fn from(e: troupe_diffusion::error::DiffusionError) -> Self {
        Self::Reference(Box::new(e))
    }
}
