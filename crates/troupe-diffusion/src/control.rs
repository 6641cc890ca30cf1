//! Pose conditioning: a frozen ControlNet whose residuals go into the UNet, in training and
//! in generation.
//!
//! StoryMaker's training script (storymaker.md §5.1) gives its optional ControlNet the pose
//! image and, unusually, the PPR image tokens as `encoder_hidden_states`; diffusers'
//! `StableDiffusionXLControlNetPipeline` (what the maintainers point users to for pose control
//! at inference) gives it the text. [`ControlContext`] chooses; rows without a pose get no
//! residuals (the ControlNet is skipped for them). The reference casts the residuals to fp16
//! whatever the run's precision (`weight_dtype = torch.float16` in `IPAdapter.forward`); here
//! they are added in the UNet's own dtype.

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use troupe_data::error::Location;
use troupe_data::image_io::{DecodeLimits, check_pose_shape, decode_rgb};
use troupe_data::ops::{Filter, resize_rgb_cached, to_unit};
use troupe_models::controlnet::{ControlNetInput, ControlNetModel};
use troupe_models::unet::{ControlResiduals, UNet2DConditionModel};
use troupe_models::weights::Precision;

use crate::DiffusionError;
use crate::conditioning::host;

/// What the ControlNet's cross-attentions attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlContext {
    /// The PPR image tokens (StoryMaker's `train_storymaker.py`).
    #[default]
    ImageTokens,
    /// The text encoders' states (diffusers' SDXL ControlNet pipeline).
    Text,
}

impl ControlContext {
    /// Parses `image_tokens` / `text` (also with a dash).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "image_tokens" | "image-tokens" => Some(Self::ImageTokens),
            "text" => Some(Self::Text),
            _ => None,
        }
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ImageTokens => "image_tokens",
            Self::Text => "text",
        }
    }
}

/// A loaded ControlNet that fits the UNet it conditions.
pub struct PoseControl {
    /// The frozen model.
    pub model: ControlNetModel,
    /// What it attends to.
    pub context: ControlContext,
    /// Its folder, for messages.
    pub path: String,
}

/// One UNet batch's inputs, as the ControlNet needs them.
pub struct ControlBatch<'a> {
    /// Noisy latents `[B, C, h, w]` (after the sampler's input scaling).
    pub sample: Tensor<4>,
    /// Timesteps `[B]`.
    pub timestep: Tensor<1>,
    /// The UNet's context `[B, text + N_ip, D]`.
    pub context: &'a Tensor<3>,
    /// How many of its tokens are text.
    pub text_tokens: usize,
    /// Padding bias of the image tokens `[B, N_ip]`.
    pub ip_bias: Option<&'a Tensor<2>>,
    /// Pooled text `[B, P]`.
    pub pooled: Tensor<2>,
    /// Time ids `[B, 6]`.
    pub time_ids: Tensor<2>,
    /// Poses in [0, 1] `[B, 3, H, W]`.
    pub pose: Tensor<4>,
    /// Per row: 1 where it has a pose, 0 where not (`None`: every row has one).
    pub has_pose: Option<Vec<f32>>,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
}

impl PoseControl {
    /// Loads a diffusers `controlnet/` folder in `precision` and checks it fits `unet`.
    pub fn load(
        dir: &Path,
        unet: &UNet2DConditionModel,
        precision: Precision,
        context: ControlContext,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let (model, _) = ControlNetModel::from_dir(dir, device, Some(precision.dtype()))?;
        // Frozen: no gradients for its weights (the adapter's still flow through it).
        let model = model.no_grad();
        let path = dir.display().to_string();
        model.check_fits(unet, &path)?;
        let width = unet.processors().iter().find_map(|p| p.cross_attention_dim);
        if model.cross_attention_dim() != width {
            return Err(DiffusionError::input(
                &path,
                "cross_attention_dim",
                format!(
                    "is {:?}, the UNet's context is {width:?} wide",
                    model.cross_attention_dim()
                ),
            ));
        }
        Ok(Self {
            model,
            context,
            path,
        })
    }

    /// The scaled residuals for one UNet batch; rows without a pose get zeros (the UNet then
    /// computes exactly what it computes without a ControlNet).
    pub fn residuals(&self, b: ControlBatch<'_>) -> ControlResiduals {
        let m = b.context.dims()[1];
        let (states, key_bias) = match self.context {
            ControlContext::ImageTokens => (
                b.context
                    .clone()
                    .narrow(1, b.text_tokens, m - b.text_tokens),
                b.ip_bias.cloned(),
            ),
            ControlContext::Text => (b.context.clone().narrow(1, 0, b.text_tokens), None),
        };
        let device = b.sample.device();
        let out = self.model.forward(
            ControlNetInput {
                sample: b.sample,
                timestep: b.timestep,
                encoder_hidden_states: states,
                text_embeds: Some(b.pooled),
                time_ids: Some(b.time_ids),
                controlnet_cond: b.pose,
                conditioning_scale: b.scale,
            },
            key_bias,
        );
        let Some(keep) = b.has_pose else {
            return out;
        };
        let n = keep.len();
        let keep = host(keep, [n, 1, 1, 1], &device);
        let gate = |t: Tensor<4>| {
            let dtype = t.dtype();
            t * keep.clone().cast(dtype)
        };
        ControlResiduals {
            down: out.down.into_iter().map(gate).collect(),
            mid: gate(out.mid),
        }
    }
}

/// Reads a pose image for generation at `width` × `height`: decoded strictly, resized (when its
/// size differs) as diffusers' control-image processor does (Pillow Lanczos), in [0, 1]
/// `[3, H, W]`. A pose of another shape than the image is refused, naming the file.
pub fn read_pose(path: &Path, width: usize, height: usize) -> Result<Vec<f32>, DiffusionError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| DiffusionError::input(&shown, "pose", format!("cannot read: {e}")))?;
    let img = decode_rgb(&bytes, &Location::file(path), DecodeLimits::default())
        .map_err(|e| DiffusionError::input(&shown, "pose", e.to_string()))?;
    let (w, h) = (width as u32, height as u32);
    check_pose_shape(img.dimensions(), (w, h), &Location::file(path))
        .map_err(|e| DiffusionError::input(&shown, "pose", e.message))?;
    let img = if img.dimensions() == (w, h) {
        img
    } else {
        resize_rgb_cached(&img, w, h, Filter::Lanczos3)
            .map_err(|e| DiffusionError::input(&shown, "pose", e.to_string()))?
    };
    let mut out = vec![0.0; 3 * width * height];
    to_unit(&img, &mut out);
    Ok(out)
}
