//! SCRFD face detection as insightface's `model_zoo/scrfd.py` (`SCRFD.detect`) does it, for the
//! `det_10g` / `det_2.5g` / `det_500m` output layout: 9 outputs = scores, box distances and
//! keypoint distances for strides 8/16/32 with 2 anchors per location (6 outputs: no keypoints).
//!
//! Steps, each as the Python code: letterbox the image into `det_size` (aspect kept,
//! `cv2.resize` bilinear, zero padding right/bottom); blob `(x − 127.5) / 128` in RGB; run;
//! per stride keep anchors with score ≥ threshold, decode `centre ∓ distance·stride`; divide by
//! the letterbox scale; sort by score (stable); greedy NMS at IoU 0.4 with the `+1` box
//! convention — all in float32 as numpy computes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::{GrayImage, RgbImage};
use tract_onnx::prelude::*;
use troupe_data::ops::resize::resize_mask_bilinear_u8;

use crate::FaceError;

/// One detected face, in image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `x1, y1, x2, y2`.
    pub bbox: [f32; 4],
    /// Detection score.
    pub score: f32,
    /// Five keypoints `[x, y]` (eyes, nose, mouth corners).
    pub kps: [[f32; 2]; 5],
}

impl Detection {
    /// Box area in float32, as `(x2 − x1)·(y2 − y1)` on insightface's float32 boxes.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// Strides of the 3-level SCRFD heads.
const STRIDES: [usize; 3] = [8, 16, 32];
/// Anchors per feature-map location.
const ANCHORS: usize = 2;

type Plan = Arc<TypedRunnableModel>;

/// An SCRFD model, optimised per input size on first use.
pub struct ScrfdDetector {
    path: PathBuf,
    model: InferenceModel,
    plans: Mutex<HashMap<(usize, usize), Plan>>,
    /// Letterbox size `(width, height)` (insightface `det_size`).
    pub det_size: (usize, usize),
    /// Score threshold (`det_thresh`, 0.5).
    pub threshold: f32,
    /// NMS IoU threshold (0.4).
    pub nms_threshold: f32,
    /// Whether the model has the keypoint heads.
    pub use_kps: bool,
}

impl ScrfdDetector {
    /// Loads an SCRFD ONNX file; a model with another output layout (e.g. a recogniser) is
    /// refused with the layout that was expected.
    pub fn load(path: &Path, det_size: (usize, usize)) -> Result<Self, FaceError> {
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| FaceError::model(path, format!("cannot load as ONNX: {e}")))?;
        let outputs = model
            .output_outlets()
            .map_err(|e| FaceError::model(path, e.to_string()))?;
        let use_kps = match outputs.len() {
            9 => true,
            6 => false,
            n => {
                return Err(FaceError::model(
                    path,
                    format!(
                        "{n} outputs: not an SCRFD detector (expected 9 = scores, boxes and keypoints for strides 8/16/32, or 6 without keypoints)"
                    ),
                ));
            }
        };
        if !det_size.0.is_multiple_of(32)
            || !det_size.1.is_multiple_of(32)
            || det_size.0 == 0
            || det_size.1 == 0
        {
            return Err(FaceError::model(
                path,
                format!(
                    "det_size {}x{} is not a positive multiple of 32",
                    det_size.0, det_size.1
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            model,
            plans: Mutex::new(HashMap::new()),
            det_size,
            threshold: 0.5,
            nms_threshold: 0.4,
            use_kps,
        })
    }

    fn plan(&self, w: usize, h: usize) -> Result<Plan, FaceError> {
        let mut plans = self.plans.lock().expect("plan cache lock");
        if let Some(p) = plans.get(&(w, h)) {
            return Ok(p.clone());
        }
        let plan = crate::plan_for(self.model.clone(), h, w, &self.path)?;
        plans.insert((w, h), plan.clone());
        Ok(plan)
    }

    /// The letterboxed network input `[1, 3, H, W]` and the scale `new_height / image height`.
    pub fn blob(&self, img: &RgbImage) -> (Vec<f32>, f64) {
        let (dw, dh) = self.det_size;
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let im_ratio = ih as f64 / iw as f64;
        let model_ratio = dh as f64 / dw as f64;
        let (nw, nh) = if im_ratio > model_ratio {
            ((dh as f64 / im_ratio) as usize, dh)
        } else {
            (dw, (dw as f64 * im_ratio) as usize)
        };
        let scale = nh as f64 / ih as f64;
        let resized: Vec<GrayImage> = (0..3)
            .map(|c| {
                let plane = GrayImage::from_fn(iw as u32, ih as u32, |x, y| {
                    image::Luma([img.get_pixel(x, y).0[c]])
                });
                resize_mask_bilinear_u8(&plane, nw as u32, nh as u32)
            })
            .collect();
        // Padding is zero pixels: (0 − 127.5) / 128.
        let mut blob = vec![(0.0 - 127.5) / 128.0; 3 * dh * dw];
        for (c, plane) in resized.iter().enumerate() {
            for y in 0..nh {
                for x in 0..nw {
                    let v = plane.get_pixel(x as u32, y as u32).0[0] as f32;
                    blob[c * dh * dw + y * dw + x] = (v - 127.5) * (1.0 / 128.0);
                }
            }
        }
        (blob, scale)
    }

    /// Runs the network on a blob: the 6 or 9 raw outputs, flattened (a batch dimension of 1,
    /// where the model has one, changes nothing).
    pub fn run(&self, blob: Vec<f32>) -> Result<Vec<Vec<f32>>, FaceError> {
        let (w, h) = self.det_size;
        let plan = self.plan(w, h)?;
        let infer = |e: TractError| FaceError::Inference {
            path: self.path.display().to_string(),
            message: format!("{e:#}"),
        };
        let input = Tensor::from_shape(&[1, 3, h, w], &blob).map_err(infer)?;
        let outputs = plan.run(tvec!(input.into_tvalue())).map_err(infer)?;
        outputs
            .iter()
            .map(|t| {
                let view = t.try_as_plain_ram().map_err(infer)?;
                Ok(view.as_slice::<f32>().map_err(infer)?.to_vec())
            })
            .collect()
    }

    /// Every face, best score first, after NMS (`SCRFD.detect(img, max_num=0)`).
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Detection>, FaceError> {
        let (blob, scale) = self.blob(img);
        let outputs = self.run(blob)?;
        self.check_outputs(&outputs)?;
        Ok(self.decode(&outputs, scale))
    }

    /// Checks the raw outputs' sizes against the SCRFD layout at this `det_size` (a model with
    /// the right output count but another anchor layout must not be indexed out of bounds).
    fn check_outputs(&self, outputs: &[Vec<f32>]) -> Result<(), FaceError> {
        let (w, h) = self.det_size;
        let per_value = if self.use_kps { [1, 4, 10] } else { [1, 4, 0] };
        for (level, &stride) in STRIDES.iter().enumerate() {
            let anchors = (w / stride) * (h / stride) * ANCHORS;
            for (head, &k) in per_value.iter().enumerate().filter(|(_, k)| **k > 0) {
                let got = outputs[level + head * STRIDES.len()].len();
                if got != anchors * k {
                    return Err(FaceError::model(
                        &self.path,
                        format!(
                            "output {} has {got} values at {w}x{h}; SCRFD with 2 anchors per location at stride {stride} needs {}",
                            level + head * STRIDES.len(),
                            anchors * k
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Candidates above the threshold from the raw outputs (sizes as [`Self::detect`] checks
    /// them), in image pixels, sorted by score (stable), then NMS.
    pub fn decode(&self, outputs: &[Vec<f32>], scale: f64) -> Vec<Detection> {
        let (w, h) = self.det_size;
        let mut candidates = Vec::new();
        for (level, &stride) in STRIDES.iter().enumerate() {
            let (fw, fh) = (w / stride, h / stride);
            let scores = &outputs[level];
            let boxes = &outputs[level + STRIDES.len()];
            let kps = self.use_kps.then(|| &outputs[level + 2 * STRIDES.len()]);
            for i in 0..fw * fh * ANCHORS {
                let score = scores[i];
                if score < self.threshold {
                    continue;
                }
                let cell = i / ANCHORS;
                let (cx, cy) = (((cell % fw) * stride) as f32, ((cell / fw) * stride) as f32);
                let s = stride as f32;
                let d = |j: usize| boxes[i * 4 + j] * s;
                let mut det = Detection {
                    bbox: [cx - d(0), cy - d(1), cx + d(2), cy + d(3)],
                    score,
                    kps: [[0.0; 2]; 5],
                };
                if let Some(k) = kps {
                    for (p, point) in det.kps.iter_mut().enumerate() {
                        *point = [cx + k[i * 10 + 2 * p] * s, cy + k[i * 10 + 2 * p + 1] * s];
                    }
                }
                candidates.push(det);
            }
        }
        // numpy divides float32 arrays by the Python float scale as float32.
        let inv = scale as f32;
        for d in &mut candidates {
            d.bbox.iter_mut().for_each(|v| *v /= inv);
            d.kps.iter_mut().flatten().for_each(|v| *v /= inv);
        }
        candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        nms(candidates, self.nms_threshold)
    }
}

/// insightface's greedy NMS: areas `(x2 − x1 + 1)·(y2 − y1 + 1)`, a box is dropped when its
/// overlap with a kept one is above `threshold`; `dets` sorted by score.
pub fn nms(dets: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    let area = |d: &Detection| (d.bbox[2] - d.bbox[0] + 1.0) * (d.bbox[3] - d.bbox[1] + 1.0);
    let mut order: Vec<usize> = (0..dets.len()).collect();
    let mut keep = Vec::new();
    while let Some((&i, rest)) = order.split_first() {
        keep.push(i);
        let a = &dets[i];
        order = rest
            .iter()
            .copied()
            .filter(|&j| {
                let b = &dets[j];
                let w = (a.bbox[2].min(b.bbox[2]) - a.bbox[0].max(b.bbox[0]) + 1.0).max(0.0);
                let h = (a.bbox[3].min(b.bbox[3]) - a.bbox[1].max(b.bbox[1]) + 1.0).max(0.0);
                let inter = w * h;
                inter / (area(a) + area(b) - inter) <= threshold
            })
            .collect();
    }
    keep.into_iter().map(|i| dets[i].clone()).collect()
}
