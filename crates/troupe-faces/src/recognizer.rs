//! The ArcFace recogniser as insightface's `model_zoo/arcface_onnx.py` runs it: the face
//! aligned by `norm_crop` to the model's input size (112), the blob `(x − mean) / std` in RGB —
//! mean = 127.5 and std = 127.5, or 0 and 1 for graphs that normalise themselves (insightface
//! looks for `Sub` and `Mul` nodes among the first 8) — and the raw output embedding.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use troupe_data::ops::geometry::{WarpImpl, norm_crop_with};

use crate::FaceError;

/// An ArcFace ONNX model.
pub struct ArcFaceRecognizer {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    /// Input side (112 for `w600k_r50` / `glintr100`).
    pub input_size: usize,
    /// Subtracted from pixel values.
    pub input_mean: f32,
    /// Divides pixel values.
    pub input_std: f32,
    /// Embedding width.
    pub embedding_dim: usize,
    /// `cv2.warpAffine` arithmetic of the alignment.
    pub warp: WarpImpl,
}

impl ArcFaceRecognizer {
    /// Loads an ArcFace ONNX file (input `[1, 3, S, S]`, one output `[1, D]`); another kind of
    /// model is refused with what was expected. `warp` selects OpenCV 4 or 5 arithmetic for
    /// the alignment.
    pub fn load(path: &Path, warp: WarpImpl) -> Result<Self, FaceError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_path(path)
            .map_err(|e| FaceError::model(path, format!("cannot load as ONNX: {e}")))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| FaceError::model(path, "no graph"))?;
        let early = |prefixes: &[&str]| {
            graph
                .node
                .iter()
                .take(8)
                .any(|n| prefixes.iter().any(|p| n.name.starts_with(p)))
        };
        let self_normalising = early(&["Sub", "_minus"]) && early(&["Mul", "_mul"]);
        let (input_mean, input_std) = if self_normalising {
            (0.0, 1.0)
        } else {
            (127.5, 127.5)
        };
        let expected = "expected an ArcFace recogniser: one input [1, 3, S, S], one output [1, D]";
        if graph.output.len() != 1 || graph.input.is_empty() {
            let (i, o) = (graph.input.len(), graph.output.len());
            return Err(FaceError::model(
                path,
                format!("{i} inputs and {o} outputs: {expected}"),
            ));
        }
        let model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| FaceError::model(path, format!("{e:#}")))?;
        let fact = model
            .input_fact(0)
            .map_err(|e| FaceError::model(path, format!("{e:#}")))?;
        let dims: Vec<Option<usize>> = fact
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.as_i64()).map(|d| d as usize))
            .collect();
        let input_size = match dims.as_slice() {
            [_, Some(3), Some(h), Some(w)] if h == w => *h,
            _ => {
                return Err(FaceError::model(
                    path,
                    format!("input shape {dims:?}: {expected}"),
                ));
            }
        };
        let plan = crate::plan_for(model, input_size, input_size, path)?;
        let out = plan
            .model()
            .output_fact(0)
            .map_err(|e| FaceError::model(path, format!("{e:#}")))?;
        let embedding_dim = out
            .shape
            .as_concrete()
            .and_then(|s| s.last().copied())
            .unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            plan,
            input_size,
            input_mean,
            input_std,
            embedding_dim,
            warp,
        })
    }

    /// The aligned face crop (`norm_crop(img, kps, input_size)`).
    pub fn align(&self, img: &RgbImage, kps: &[[f32; 2]; 5]) -> RgbImage {
        norm_crop_with(img, kps, self.input_size as u32, self.warp)
    }

    /// The embedding of the face at `kps` in `img` (insightface's `face.embedding`).
    pub fn embed(&self, img: &RgbImage, kps: &[[f32; 2]; 5]) -> Result<Vec<f32>, FaceError> {
        self.embed_aligned(&self.align(img, kps))
    }

    /// The embedding of an already aligned crop of the input size.
    pub fn embed_aligned(&self, face: &RgbImage) -> Result<Vec<f32>, FaceError> {
        let s = self.input_size;
        let scale = 1.0 / self.input_std;
        let mut blob = vec![0f32; 3 * s * s];
        for (x, y, p) in face.enumerate_pixels() {
            for c in 0..3 {
                blob[c * s * s + y as usize * s + x as usize] =
                    (p.0[c] as f32 - self.input_mean) * scale;
            }
        }
        let infer = |e: TractError| FaceError::Inference {
            path: self.path.display().to_string(),
            message: format!("{e:#}"),
        };
        let input = Tensor::from_shape(&[1, 3, s, s], &blob).map_err(infer)?;
        let out = self.plan.run(tvec!(input.into_tvalue())).map_err(infer)?;
        let view = out[0].try_as_plain_ram().map_err(infer)?;
        Ok(view.as_slice::<f32>().map_err(infer)?.to_vec())
    }
}
