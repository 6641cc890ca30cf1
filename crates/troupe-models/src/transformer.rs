//! diffusers `Transformer2DModel` (continuous inputs) and `BasicTransformerBlock`
//! (`models/transformers/transformer_2d.py`, `models/attention.py`), as used by SD/SDXL UNets.
//!
//! Keys: `norm`, `proj_in`, `transformer_blocks.{i}.{norm1, attn1, norm2, attn2, norm3,
//! ff.net.0.proj, ff.net.2}`, `proj_out`.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;

use crate::attention::{Attention, AttentionConfig, AttnContext, AttnProbs};
use crate::resnet::{conv2d, group_norm};
use crate::weights::{StateDict, join};

/// `FeedForward(dim, activation_fn="geglu")`: `net.0` = GEGLU (`proj: dim → 2·inner`),
/// `net.1` dropout, `net.2` = `Linear(inner, dim)`; inner = 4·dim.
#[derive(Module, Debug)]
pub struct GegluFeedForward {
    /// `net.0.proj`: hidden and gate halves in one Linear.
    pub proj: Linear,
    /// `net.2`: back to `dim`.
    pub out: Linear,
}

impl GegluFeedForward {
    fn new(dim: usize, device: &Device) -> Self {
        let inner = 4 * dim;
        Self {
            proj: LinearConfig::new(dim, 2 * inner).init(device),
            out: LinearConfig::new(inner, dim).init(device),
        }
    }

    /// `[B, N, dim] → [B, N, dim]`: `out(hidden * gelu(gate))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.proj.forward(x); // [B, N, 2·inner]
        let inner = h.dims()[2] / 2;
        let hidden = h.clone().narrow(2, 0, inner); // first half
        let gate = h.narrow(2, inner, inner); // second half
        self.out.forward(hidden * gelu(gate))
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.linear(&mut self.proj, &join(prefix, "net.0.proj"));
        sd.linear(&mut self.out, &join(prefix, "net.2"));
    }
}

/// Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// LayerNorm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    /// LayerNorm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention to `encoder_hidden_states`.
    pub attn2: Attention,
    /// LayerNorm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward.
    pub ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    /// `first_index` is attn1's processor index; attn2 gets the next one.
    fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
        first_index: usize,
        device: &Device,
    ) -> Self {
        let ln = || LayerNormConfig::new(dim).with_epsilon(1e-5).init(device);
        Self {
            norm1: ln(),
            attn1: AttentionConfig::new(dim, None, heads, dim_head).init(first_index, device),
            norm2: ln(),
            attn2: AttentionConfig::new(dim, Some(cross_dim), heads, dim_head)
                .init(first_index + 1, device),
            norm3: ln(),
            ff: GegluFeedForward::new(dim, device),
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        ctx: &AttnContext,
        probs: &mut Vec<AttnProbs>,
    ) -> Tensor<3> {
        let (a, _) = self.attn1.forward(self.norm1.forward(x.clone()), None, ctx);
        let x = a + x;
        let (a, p) = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context.clone()), ctx);
        probs.extend(p);
        let x = a + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.layer_norm(&mut self.norm1, &join(prefix, "norm1"));
        self.attn1.load(sd, &join(prefix, "attn1"));
        sd.layer_norm(&mut self.norm2, &join(prefix, "norm2"));
        self.attn2.load(sd, &join(prefix, "attn2"));
        sd.layer_norm(&mut self.norm3, &join(prefix, "norm3"));
        self.ff.load(sd, &join(prefix, "ff"));
    }
}

/// `proj_in`/`proj_out`: a Linear when `use_linear_projection`, else a 1×1 conv.
#[derive(Module, Debug)]
pub enum Projection {
    /// SDXL (`use_linear_projection = true`).
    Linear(Linear),
    /// SD 1.x (1×1 conv).
    Conv(Conv2d),
}

impl Projection {
    fn new(c_in: usize, c_out: usize, linear: bool, device: &Device) -> Self {
        if linear {
            Self::Linear(LinearConfig::new(c_in, c_out).init(device))
        } else {
            Self::Conv(conv2d(c_in, c_out, 1, 1, 0, device))
        }
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        match self {
            Self::Linear(l) => sd.linear(l, prefix),
            Self::Conv(c) => sd.conv2d(c, prefix),
        }
    }
}

/// Sizes of a [`Transformer2DModel`].
#[derive(Config, Debug)]
pub struct Transformer2DConfig {
    /// Channels in and out (`in_channels`); also the inner width `heads × dim_head`.
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of `encoder_hidden_states`.
    pub cross_attention_dim: usize,
    /// GroupNorm groups of `norm`.
    pub norm_groups: usize,
    /// Linear (true) or 1×1 conv projections.
    pub use_linear_projection: bool,
}

/// GroupNorm → proj_in → transformer blocks → proj_out, plus the input as residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    /// GroupNorm (eps 1e-6).
    pub norm: GroupNorm,
    /// Input projection.
    pub proj_in: Projection,
    /// The blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Output projection.
    pub proj_out: Projection,
}

impl Transformer2DConfig {
    /// Creates the model; `first_index` is the processor index of the first block's attn1
    /// (each block takes two).
    pub fn init(&self, first_index: usize, device: &Device) -> Transformer2DModel {
        let inner = self.heads * self.dim_head;
        let c = self.channels;
        Transformer2DModel {
            norm: group_norm(self.norm_groups, c, 1e-6, device),
            proj_in: Projection::new(c, inner, self.use_linear_projection, device),
            transformer_blocks: (0..self.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        inner,
                        self.heads,
                        self.dim_head,
                        self.cross_attention_dim,
                        first_index + 2 * i,
                        device,
                    )
                })
                .collect(),
            proj_out: Projection::new(inner, c, self.use_linear_projection, device),
        }
    }
}

impl Transformer2DModel {
    /// `x [B, C, H, W]`, `context [B, M, cross_dim]` → `[B, C, H, W]`; image-attention maps of
    /// recorded processors are appended to `probs`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        ctx: &AttnContext,
        probs: &mut Vec<AttnProbs>,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let tokens = |x: Tensor<4>| {
            let ch = x.dims()[1];
            x.permute([0, 2, 3, 1]).reshape([b, h * w, ch]) // [B, HW, C]
        };
        let mut t = match &self.proj_in {
            Projection::Linear(l) => l.forward(tokens(x)),
            Projection::Conv(conv) => tokens(conv.forward(x)),
        };
        for block in &self.transformer_blocks {
            t = block.forward(t, context, ctx, probs); // [B, HW, inner]
        }
        let image = |t: Tensor<3>| {
            let ch = t.dims()[2];
            t.reshape([b, h, w, ch]).permute([0, 3, 1, 2]) // [B, C, H, W]
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => image(l.forward(t)),
            Projection::Conv(conv) => conv.forward(image(t)),
        };
        debug_assert_eq!(out.dims()[1], c);
        out + residual
    }

    /// Loads the model's keys under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.group_norm(&mut self.norm, &join(prefix, "norm"));
        self.proj_in.load(sd, &join(prefix, "proj_in"));
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.load(sd, &join(prefix, &format!("transformer_blocks.{i}")));
        }
        self.proj_out.load(sd, &join(prefix, "proj_out"));
    }

    /// The attentions in processor order (attn1, attn2 of each block).
    pub fn attentions_mut(&mut self) -> impl Iterator<Item = &mut Attention> {
        self.transformer_blocks
            .iter_mut()
            .flat_map(|b| [&mut b.attn1, &mut b.attn2])
    }

    /// The attentions in processor order.
    pub fn attentions(&self) -> impl Iterator<Item = &Attention> {
        self.transformer_blocks
            .iter()
            .flat_map(|b| [&b.attn1, &b.attn2])
    }
}
