//! Perceiver resampler building blocks shared by IP-Adapter-plus and StoryMaker's PPR
//! (`ip_adapter/resampler.py`): [`FeedForward`], [`PerceiverAttention`], [`Resampler`]
//! (learned latent queries) and [`FacePerceiverResampler`] (queries passed in).
//!
//! State-dict mapping (PyTorch → Rust fields): `layers.{L}.0.*` → `layers[L].attn.*`,
//! `layers.{L}.1.0` → `layers[L].ff.norm`, `layers.{L}.1.1` → `layers[L].ff.up`,
//! `layers.{L}.1.3` → `layers[L].ff.down` (index 2 is the parameter-free GELU).
//! See [`crate::weights`] for the loader that applies this mapping.

use burn::module::Param;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Distribution};

use crate::weights::{StateDict, join};

/// LayerNorm epsilon used everywhere in the PPR (torch default).
pub const LN_EPS: f64 = 1e-5;

pub(crate) fn layer_norm(dim: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(LN_EPS).init(device)
}

pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// `Sequential(LayerNorm(dim), Linear(dim, mult*dim, bias=False), GELU(), Linear(mult*dim, dim, bias=False))`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// Index `.0`: pre-norm.
    pub norm: LayerNorm,
    /// Index `.1`: up projection `dim → mult*dim`, no bias.
    pub up: Linear,
    /// Index `.2`: exact (erf) GELU.
    pub act: Gelu,
    /// Index `.3`: down projection `mult*dim → dim`, no bias.
    pub down: Linear,
}

impl FeedForward {
    /// Creates a feed-forward block with random weights.
    pub fn new(dim: usize, mult: usize, device: &Device) -> Self {
        Self {
            norm: layer_norm(dim, device),
            up: linear(dim, dim * mult, false, device),
            act: Gelu::new(),
            down: linear(dim * mult, dim, false, device),
        }
    }

    /// `x [B, N, dim] → [B, N, dim]` (without the residual; callers add it).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.norm.forward(x); // [B, N, dim]
        let x = self.act.forward(self.up.forward(x)); // [B, N, mult*dim]
        self.down.forward(x) // [B, N, dim]
    }
}

/// Perceiver cross-attention: latents attend to `concat(norm1(x), norm2(latents))`.
#[derive(Module, Debug)]
pub struct PerceiverAttention {
    /// LayerNorm on the media features `x`.
    pub norm1: LayerNorm,
    /// LayerNorm on the latents.
    pub norm2: LayerNorm,
    /// `dim → heads*dim_head`, no bias.
    pub to_q: Linear,
    /// `dim → 2*heads*dim_head`, no bias; first half K, second half V.
    pub to_kv: Linear,
    /// `heads*dim_head → dim`, no bias.
    pub to_out: Linear,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
}

impl PerceiverAttention {
    /// Creates the attention block with random weights.
    pub fn new(dim: usize, dim_head: usize, heads: usize, device: &Device) -> Self {
        let inner = dim_head * heads;
        Self {
            norm1: layer_norm(dim, device),
            norm2: layer_norm(dim, device),
            to_q: linear(dim, inner, false, device),
            to_kv: linear(dim, 2 * inner, false, device),
            to_out: linear(inner, dim, false, device),
            heads,
            dim_head,
        }
    }

    /// `[B, n, h*dh] → [B, h, n, dh]`.
    fn split_heads(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, n, _] = t.dims();
        t.reshape([b, n, self.heads, self.dim_head]).swap_dims(1, 2)
    }

    /// `x [B, N, dim]` (media), `latents [B, L, dim]` → `[B, L, dim]` (no residual).
    pub fn forward(&self, x: Tensor<3>, latents: Tensor<3>) -> Tensor<3> {
        let x = self.norm1.forward(x); // [B, N, dim]
        let latents = self.norm2.forward(latents); // [B, L, dim]
        let [b, l, _] = latents.dims();
        let inner = self.heads * self.dim_head;

        let q = self.to_q.forward(latents.clone()); // [B, L, inner]
        let kv_input = Tensor::cat(vec![x, latents], 1); // [B, N+L, dim]
        let kv = self.to_kv.forward(kv_input); // [B, N+L, 2*inner]
        let k = kv.clone().narrow(2, 0, inner); // [B, N+L, inner]
        let v = kv.narrow(2, inner, inner); // [B, N+L, inner]

        let q = self.split_heads(q); // [B, h, L, dh]
        let k = self.split_heads(k); // [B, h, N+L, dh]
        let v = self.split_heads(v); // [B, h, N+L, dh]

        // q and k each scaled by dh^-0.25 (more stable in f16 than scaling the product).
        let scale = (self.dim_head as f64).powf(-0.25);
        let w = q
            .mul_scalar(scale)
            .matmul(k.mul_scalar(scale).swap_dims(2, 3)); // [B, h, L, N+L]
        let dtype = w.dtype();
        let w = if dtype == DType::F32 {
            softmax(w, 3)
        } else {
            softmax(w.cast(FloatDType::F32), 3).cast(dtype) // softmax in f32
        };
        let out = w.matmul(v); // [B, h, L, dh]
        let out = out.swap_dims(1, 2).reshape([b, l, inner]); // [B, L, inner]
        self.to_out.forward(out) // [B, L, dim]
    }
}

/// One resampler layer: `ModuleList([PerceiverAttention, FeedForward])` (keys `.0`, `.1`).
#[derive(Module, Debug)]
pub struct PerceiverBlock {
    /// Index `.0`.
    pub attn: PerceiverAttention,
    /// Index `.1`.
    pub ff: FeedForward,
}

impl PerceiverBlock {
    fn new(dim: usize, dim_head: usize, heads: usize, ff_mult: usize, device: &Device) -> Self {
        Self {
            attn: PerceiverAttention::new(dim, dim_head, heads, device),
            ff: FeedForward::new(dim, ff_mult, device),
        }
    }

    /// `latents = attn(x, latents) + latents; latents = ff(latents) + latents`.
    fn forward(&self, x: Tensor<3>, latents: Tensor<3>) -> Tensor<3> {
        let latents = self.attn.forward(x, latents.clone()) + latents; // [B, L, dim]
        self.ff.forward(latents.clone()) + latents // [B, L, dim]
    }
}

fn blocks(
    dim: usize,
    depth: usize,
    dim_head: usize,
    heads: usize,
    ff_mult: usize,
    device: &Device,
) -> Vec<PerceiverBlock> {
    (0..depth)
        .map(|_| PerceiverBlock::new(dim, dim_head, heads, ff_mult, device))
        .collect()
}

/// Sizes of a perceiver resampler.
#[derive(Config, Debug)]
pub struct ResamplerConfig {
    /// Internal width (`dim`).
    pub dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Width of one attention head.
    pub dim_head: usize,
    /// Number of heads.
    pub heads: usize,
    /// Number of learned latent queries (ignored by [`FacePerceiverResampler`]).
    pub num_queries: usize,
    /// Width of the input features (`embedding_dim`).
    pub embedding_dim: usize,
    /// Output width (`output_dim`).
    pub output_dim: usize,
    /// Feed-forward expansion factor.
    #[config(default = 4)]
    pub ff_mult: usize,
}

/// IP-Adapter-plus resampler with learned latent queries `latents (1, nq, dim)`.
#[derive(Module, Debug)]
pub struct Resampler {
    /// Learned queries `(1, num_queries, dim)`, init `randn / sqrt(dim)`.
    pub latents: Param<Tensor<3>>,
    /// `embedding_dim → dim`, with bias.
    pub proj_in: Linear,
    /// `dim → output_dim`, with bias.
    pub proj_out: Linear,
    /// LayerNorm(output_dim).
    pub norm_out: LayerNorm,
    /// `depth` perceiver blocks.
    pub layers: Vec<PerceiverBlock>,
}

impl ResamplerConfig {
    /// Builds a [`Resampler`] with random weights.
    pub fn init_resampler(&self, device: &Device) -> Resampler {
        let latents = Tensor::<3>::random(
            [1, self.num_queries, self.dim],
            Distribution::Normal(0.0, 1.0),
            device,
        )
        .div_scalar((self.dim as f64).sqrt());
        // The same blocks as the face resampler, plus learned queries.
        let FacePerceiverResampler {
            proj_in,
            proj_out,
            norm_out,
            layers,
        } = self.init_face(device);
        Resampler {
            latents: Param::from_tensor(latents),
            proj_in,
            proj_out,
            norm_out,
            layers,
        }
    }

    /// Builds a [`FacePerceiverResampler`] with random weights (`num_queries` unused).
    pub fn init_face(&self, device: &Device) -> FacePerceiverResampler {
        FacePerceiverResampler {
            proj_in: linear(self.embedding_dim, self.dim, true, device),
            proj_out: linear(self.dim, self.output_dim, true, device),
            norm_out: layer_norm(self.output_dim, device),
            layers: blocks(
                self.dim,
                self.depth,
                self.dim_head,
                self.heads,
                self.ff_mult,
                device,
            ),
        }
    }
}

impl Resampler {
    /// `x [B, N, embedding_dim] → [B, num_queries, output_dim]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let b = x.dims()[0];
        let mut latents = self.latents.val().repeat_dim(0, b); // [B, nq, dim]
        let x = self.proj_in.forward(x); // [B, N, dim]
        for layer in &self.layers {
            latents = layer.forward(x.clone(), latents); // [B, nq, dim]
        }
        self.norm_out.forward(self.proj_out.forward(latents)) // [B, nq, output_dim]
    }
}

/// Face perceiver resampler (FaceID-Plus): the queries are passed in, no learned latents.
#[derive(Module, Debug)]
pub struct FacePerceiverResampler {
    /// `embedding_dim → dim`, with bias.
    pub proj_in: Linear,
    /// `dim → output_dim`, with bias.
    pub proj_out: Linear,
    /// LayerNorm(output_dim).
    pub norm_out: LayerNorm,
    /// `depth` perceiver blocks.
    pub layers: Vec<PerceiverBlock>,
}

impl FacePerceiverResampler {
    /// `latents [B, L, dim]`, `x [B, N, embedding_dim]` → `[B, L, output_dim]`.
    pub fn forward(&self, latents: Tensor<3>, x: Tensor<3>) -> Tensor<3> {
        let x = self.proj_in.forward(x); // [B, N, dim]
        let mut latents = latents;
        for layer in &self.layers {
            latents = layer.forward(x.clone(), latents); // [B, L, dim]
        }
        self.norm_out.forward(self.proj_out.forward(latents)) // [B, L, output_dim]
    }
}

impl FeedForward {
    /// Loads `{prefix}.0` (norm), `.1` (up), `.3` (down).
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.layer_norm(&mut self.norm, &join(prefix, "0"));
        sd.linear(&mut self.up, &join(prefix, "1"));
        sd.linear(&mut self.down, &join(prefix, "3"));
    }
}

impl PerceiverAttention {
    /// Loads `norm1`, `norm2`, `to_q`, `to_kv`, `to_out` under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.layer_norm(&mut self.norm1, &join(prefix, "norm1"));
        sd.layer_norm(&mut self.norm2, &join(prefix, "norm2"));
        sd.linear(&mut self.to_q, &join(prefix, "to_q"));
        sd.linear(&mut self.to_kv, &join(prefix, "to_kv"));
        sd.linear(&mut self.to_out, &join(prefix, "to_out"));
    }
}

fn load_blocks(layers: &mut [PerceiverBlock], sd: &mut StateDict, prefix: &str) {
    for (i, block) in layers.iter_mut().enumerate() {
        let p = join(prefix, &format!("layers.{i}"));
        block.attn.load(sd, &join(&p, "0"));
        block.ff.load(sd, &join(&p, "1"));
    }
}

impl Resampler {
    /// Loads an IP-Adapter-plus `Resampler` state dict under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.param(&mut self.latents, &join(prefix, "latents"));
        sd.linear(&mut self.proj_in, &join(prefix, "proj_in"));
        sd.linear(&mut self.proj_out, &join(prefix, "proj_out"));
        sd.layer_norm(&mut self.norm_out, &join(prefix, "norm_out"));
        load_blocks(&mut self.layers, sd, prefix);
    }
}

impl FacePerceiverResampler {
    /// Loads a `FacePerceiverResampler` state dict under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.linear(&mut self.proj_in, &join(prefix, "proj_in"));
        sd.linear(&mut self.proj_out, &join(prefix, "proj_out"));
        sd.layer_norm(&mut self.norm_out, &join(prefix, "norm_out"));
        load_blocks(&mut self.layers, sd, prefix);
    }
}
