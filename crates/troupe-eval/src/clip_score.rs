//! CLIP scores with a local transformers `CLIPModel` folder (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`, tokenizer files; default expectation
//! `openai/clip-vit-large-patch14`):
//!
//! * **CLIP-T** = 100 · cos(projected image features, projected caption features) — what
//!   torchmetrics' `CLIPScore` reports before it clamps at 0;
//! * **CLIP-I** = 100 · cos between a generated image and its reference image.
//!
//! Images are preprocessed as the folder's `CLIPImageProcessor` (PIL backend) does from uint8
//! pixels (`troupe_data::ops::clip_image`, shared with the generation pipeline's crops). Captions use the CLIP BPE tokenizer padded to 77, with the
//! text tower's own end-of-text pooling rule.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, Int};
use image::RgbImage;
use serde::Deserialize;
use troupe_data::ops::clip_image::ClipImageProcessor;
use troupe_data::ops::resize::PassOrder;
use troupe_models::clip::{ClipConfig, ClipTextModel, ClipVisionModel};
use troupe_models::error::ModelError;
use troupe_models::tokenizer::{ClipTokenizer, TokenizerError};
use troupe_models::weights::StateDict;

/// Why a scorer cannot be built or an input cannot be scored, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The model does not load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer does not load or cannot encode.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A config value or input that cannot be used.
    #[error("{path}: {message}")]
    Input {
        /// The file (or argument).
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl From<troupe_models::weights::WeightError> for ScoreError {
    fn from(e: troupe_models::weights::WeightError) -> Self {
        Self::Model(e.into())
    }
}

fn input(path: &Path, message: impl Into<String>) -> ScoreError {
    ScoreError::Input {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (the fields that change the pixels).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    /// Resize target: `{"shortest_edge": N}`.
    pub size: SizeConfig,
    /// Centre crop: `{"height": H, "width": W}`.
    pub crop_size: CropConfig,
    /// 1/255.
    #[serde(default = "rescale")]
    pub rescale_factor: f64,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
    /// PIL resampling filter (3 = bicubic; the only one implemented).
    #[serde(default = "bicubic")]
    pub resample: u32,
    /// Must be true (every CLIP checkpoint).
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// Must be true.
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    /// Must be true.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Must be true.
    #[serde(default = "yes")]
    pub do_normalize: bool,
}

/// `size` of the processor config.
#[derive(Debug, Clone, Deserialize)]
pub struct SizeConfig {
    /// Target of the shorter side.
    pub shortest_edge: u32,
}

/// `crop_size` of the processor config.
#[derive(Debug, Clone, Deserialize)]
pub struct CropConfig {
    /// Crop height.
    pub height: u32,
    /// Crop width.
    pub width: u32,
}

fn rescale() -> f64 {
    1.0 / 255.0
}
fn bicubic() -> u32 {
    3
}
fn yes() -> bool {
    true
}

/// The top-level `CLIPModel` config: both towers and the shared projection width.
#[derive(Debug, Clone, Deserialize)]
struct ClipModelConfig {
    text_config: ClipConfig,
    vision_config: ClipConfig,
    projection_dim: usize,
}

/// A CLIP model ready to score: both towers with projections, the tokenizer, the preprocessor.
pub struct ClipScorer {
    text: ClipTextModel,
    vision: ClipVisionModel,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
}

impl ClipScorer {
    /// Loads a transformers `CLIPModel` folder (f32/f16/bf16 weights, computed in f32).
    /// `pass_order` selects Pillow's resize arithmetic (13 changed it; today's stacks run 13).
    pub fn load(dir: &Path, pass_order: PassOrder, device: &Device) -> Result<Self, ScoreError> {
        let config_path = dir.join("config.json");
        let mut config: ClipModelConfig = troupe_models::error::read_json_config(&config_path)?;
        // The towers' own `projection_dim` entries are stale defaults in saved CLIPModel configs.
        config.text_config.projection_dim = config.projection_dim;
        config.vision_config.projection_dim = config.projection_dim;
        let pp = dir.join("preprocessor_config.json");
        let processor: ImageProcessorConfig = troupe_models::error::read_json_config(&pp)?;
        check_processor(&processor, &pp)?;
        let mut sd = StateDict::from_dir(dir, "model")?.with_dtype(Some(DType::F32));
        let mut text = ClipTextModel::new(&config.text_config, true, device);
        text.load(&mut sd);
        let mut vision = ClipVisionModel::new(&config.vision_config, device)
            .map_err(|e| input(&config_path, format!("vision_config: {e}")))?;
        vision.load(&mut sd);
        sd.remove("logit_scale"); // the contrastive temperature: not part of a score
        sd.finish("CLIPModel")?;
        Ok(Self {
            text,
            vision,
            tokenizer: ClipTokenizer::from_dir(dir)?,
            processor: ClipImageProcessor {
                shortest_edge: processor.size.shortest_edge,
                crop_width: processor.crop_size.width,
                crop_height: processor.crop_size.height,
                rescale_factor: processor.rescale_factor,
                mean: processor.image_mean,
                std: processor.image_std,
                pass_order,
            },
            device: device.clone(),
        })
    }

    /// The processor's pixel values of `img`: `[3, crop_h, crop_w]`.
    pub fn pixel_values(&self, img: &RgbImage, source: &Path) -> Result<Vec<f32>, ScoreError> {
        self.processor
            .process(img)
            .map_err(|e| input(source, e.to_string()))
    }

    /// L2-normalised projected image features of `images` (`[N, P]`).
    pub fn image_features(&self, images: &[(&RgbImage, &Path)]) -> Result<Tensor<2>, ScoreError> {
        let (cw, ch) = (
            self.processor.crop_width as usize,
            self.processor.crop_height as usize,
        );
        let mut pixels = Vec::with_capacity(images.len() * 3 * cw * ch);
        for (img, source) in images {
            pixels.extend(self.pixel_values(img, source)?);
        }
        let x = Tensor::from_data(
            TensorData::new(pixels, [images.len(), 3, ch, cw]),
            &self.device,
        );
        Ok(l2_normalize(self.vision.forward(x).image_embeds))
    }

    /// L2-normalised projected caption features (`[N, P]`).
    pub fn text_features(&self, captions: &[String]) -> Result<Tensor<2>, ScoreError> {
        let mut ids = Vec::new();
        for c in captions {
            ids.extend(self.tokenizer.encode(c)?.into_iter().map(|i| i as i64));
        }
        let n = self.tokenizer.max_length();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(ids, [captions.len(), n]), &self.device);
        let embeds = self
            .text
            .forward(ids)
            .text_embeds
            .expect("the scorer's text tower has a projection");
        Ok(l2_normalize(embeds))
    }
}

fn check_processor(p: &ImageProcessorConfig, path: &Path) -> Result<(), ScoreError> {
    if p.resample != 3 {
        return Err(input(
            path,
            format!(
                "`resample` = {}: only 3 (bicubic) is implemented",
                p.resample
            ),
        ));
    }
    for (name, on) in [
        ("do_resize", p.do_resize),
        ("do_center_crop", p.do_center_crop),
        ("do_rescale", p.do_rescale),
        ("do_normalize", p.do_normalize),
    ] {
        if !on {
            return Err(input(path, format!("`{name}` = false is not implemented")));
        }
    }
    if p.size.shortest_edge == 0 || p.crop_size.width == 0 || p.crop_size.height == 0 {
        return Err(input(path, "`size` and `crop_size` must be positive"));
    }
    Ok(())
}

fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt();
    x / norm
}

/// `100 · a · bᵀ` for row-normalised features: `[Na, Nb]` scores as host values.
pub fn scores(a: Tensor<2>, b: Tensor<2>) -> Vec<Vec<f64>> {
    let [na, nb] = [a.dims()[0], b.dims()[0]];
    let m = a.matmul(b.transpose()).mul_scalar(100.0);
    let v: Vec<f32> = m
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    (0..na)
        .map(|i| v[i * nb..(i + 1) * nb].iter().map(|&x| x as f64).collect())
        .collect()
}

/// Decodes an image file for scoring (header checked against the decode limits first).
pub fn read_image(path: &Path) -> Result<RgbImage, ScoreError> {
    let bytes = std::fs::read(path).map_err(|e| input(path, format!("cannot read: {e}")))?;
    let at = troupe_data::error::Location::file(path);
    troupe_data::image_io::decode_rgb(&bytes, &at, troupe_data::image_io::DecodeLimits::default())
        .map_err(|e| input(path, e.to_string()))
}
