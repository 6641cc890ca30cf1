//! diffusers `models/resnet.py` and `models/downsampling.py`/`upsampling.py` blocks shared by the
//! UNet and the VAE: [`ResnetBlock2D`], [`Downsample2D`], [`Upsample2D`].
//!
//! Keys mirror diffusers: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`;
//! `downsamplers.0.conv`; `upsamplers.0.conv`.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::weights::{StateDict, join};

/// `GroupNorm(groups, channels, eps)` with affine parameters.
pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `Conv2d(c_in, c_out, k, stride, padding)` with bias.
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

/// Sizes of a [`ResnetBlock2D`] (`resnet_time_scale_shift = "default"`, no up/down sampling).
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Time-embedding width; `None` in the VAE (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (32).
    pub groups: usize,
    /// GroupNorm epsilon (1e-6).
    pub eps: f64,
    /// The output is divided by this (1.0).
    pub output_scale_factor: f64,
}

impl ResnetBlock2DConfig {
    /// A block with diffusers' defaults (32 groups, eps 1e-6, no output scaling).
    pub fn new(in_channels: usize, out_channels: usize, temb_channels: Option<usize>) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups: 32,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }

    /// Sets the GroupNorm groups.
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Sets the GroupNorm epsilon.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the output divisor.
    pub fn with_output_scale_factor(mut self, scale: f64) -> Self {
        self.output_scale_factor = scale;
        self
    }
}

/// `out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// First GroupNorm.
    pub norm1: GroupNorm,
    /// First 3×3 conv.
    pub conv1: Conv2d,
    /// Time-embedding projection (UNet only).
    pub time_emb_proj: Option<Linear>,
    /// Second GroupNorm.
    pub norm2: GroupNorm,
    /// Second 3×3 conv.
    pub conv2: Conv2d,
    /// 1×1 conv when channels change.
    pub conv_shortcut: Option<Conv2d>,
    /// Output divisor.
    pub output_scale_factor: f64,
}

impl ResnetBlock2DConfig {
    /// Creates the block (lazy parameters, to be loaded).
    pub fn init(&self, device: &Device) -> ResnetBlock2D {
        let (i, o) = (self.in_channels, self.out_channels);
        ResnetBlock2D {
            norm1: group_norm(self.groups, i, self.eps, device),
            conv1: conv2d(i, o, 3, 1, 1, device),
            time_emb_proj: self
                .temb_channels
                .map(|t| LinearConfig::new(t, o).init(device)),
            norm2: group_norm(self.groups, o, self.eps, device),
            conv2: conv2d(o, o, 3, 1, 1, device),
            conv_shortcut: (i != o).then(|| conv2d(i, o, 1, 1, 0, device)),
            output_scale_factor: self.output_scale_factor,
        }
    }
}

impl ResnetBlock2D {
    /// `x [B, C_in, H, W]`, `temb [B, T]` → `[B, C_out, H, W]`.
    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone()))); // [B, Co, H, W]
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(silu(t)); // [B, Co]
                let [b, c] = t.dims();
                h + t.reshape([b, c, 1, 1])
            }
            _ => h,
        };
        let h = self.conv2.forward(silu(self.norm2.forward(h))); // dropout is identity
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        let out = x + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }

    /// Loads the block's keys under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.group_norm(&mut self.norm1, &join(prefix, "norm1"));
        sd.conv2d(&mut self.conv1, &join(prefix, "conv1"));
        if let Some(l) = self.time_emb_proj.as_mut() {
            sd.linear(l, &join(prefix, "time_emb_proj"));
        }
        sd.group_norm(&mut self.norm2, &join(prefix, "norm2"));
        sd.conv2d(&mut self.conv2, &join(prefix, "conv2"));
        if let Some(c) = self.conv_shortcut.as_mut() {
            sd.conv2d(c, &join(prefix, "conv_shortcut"));
        }
    }
}

/// Stride-2 3×3 conv (`Downsample2D(use_conv=True)`). The UNet pads 1 on every side; the VAE
/// (`padding=0`) pads only right and bottom by 1, as diffusers' `F.pad(x, (0, 1, 0, 1))`.
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The strided conv (`downsamplers.0.conv`).
    pub conv: Conv2d,
}

impl Downsample2D {
    /// `symmetric_padding`: true in the UNet, false in the VAE encoder.
    pub fn new(channels: usize, symmetric_padding: bool, device: &Device) -> Self {
        let padding = if symmetric_padding {
            PaddingConfig2d::Explicit(1, 1, 1, 1)
        } else {
            PaddingConfig2d::Explicit(0, 0, 1, 1) // (top, left, bottom, right)
        };
        let conv = Conv2dConfig::new([channels, channels], [3, 3])
            .with_stride([2, 2])
            .with_padding(padding)
            .init(device);
        Self { conv }
    }

    /// `[B, C, H, W] → [B, C, ⌈H/2⌉, ⌈W/2⌉]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
    }

    /// Loads `{prefix}.conv`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.conv2d(&mut self.conv, &join(prefix, "conv"));
    }
}

/// Nearest-neighbour ×2 (or to an explicit size) followed by a 3×3 conv (`Upsample2D`).
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The conv after upsampling (`upsamplers.0.conv`).
    pub conv: Conv2d,
}

impl Upsample2D {
    /// Creates the block (lazy parameters).
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, 1, 1, device),
        }
    }

    /// `[B, C, H, W] → [B, C, 2H, 2W]`, or `[B, C, size]` when the UNet forwards an odd skip size.
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let x = match size {
            None => {
                // Exact ×2 nearest as a broadcast copy: each pixel becomes a 2×2 block.
                let [b, c, h, w] = x.dims();
                x.reshape([b, c, h, 1, w, 1])
                    .expand([b, c, h, 2, w, 2])
                    .reshape([b, c, 2 * h, 2 * w])
            }
            Some(size) => interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
            ),
        };
        self.conv.forward(x)
    }

    /// Loads `{prefix}.conv`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.conv2d(&mut self.conv, &join(prefix, "conv"));
    }
}
