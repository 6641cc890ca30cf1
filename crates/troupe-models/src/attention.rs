//! diffusers `Attention` (`models/attention_processor.py`) with StoryMaker's processors
//! (storymaker.md §2): rank-r LoRA on q/k/v/out (`LoRAAttnProcessor2_0` for self-attention)
//! and decoupled image cross-attention (`LoRAIPAttnProcessor2_0`: `to_k_ip`/`to_v_ip`, text
//! and image tokens split at a fixed 77, output = text attention + scale × image attention).
//!
//! Keys: `to_q`, `to_k`, `to_v`, `to_out.0` under the attention's path; the adapter's under
//! `ip_adapter.{i}` where `i` is the processor's position in diffusers' `attn_processors`
//! order (see [`crate::unet::UNet2DConditionModel::processor_names`]).

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::efficient_attention::{default_block_rows, efficient_attention};
use crate::weights::{StateDict, join};

/// Runtime knobs of the adapter processors, shared by every attention of one forward pass.
#[derive(Debug, Clone)]
pub struct AdapterScales {
    /// Multiplies the LoRA deltas (`lora_scale`; training 1.0, StoryMaker inference 0.8).
    pub lora: f64,
    /// Multiplies the image-attention output (`scale`; training 1.0, inference 0.8).
    pub ip: f64,
    /// Text tokens at the start of `encoder_hidden_states`; the rest are image tokens.
    /// StoryMaker hard-codes 77 (quirk §8.2).
    pub text_tokens: usize,
}

impl Default for AdapterScales {
    fn default() -> Self {
        Self {
            lora: 1.0,
            ip: 1.0,
            text_tokens: 77,
        }
    }
}

/// Which attention op the UNet's attentions run. Both give the same outputs and gradients
/// (to f32 rounding); they differ in what an autodiff device keeps for backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// burn's `attention`: differentiated op by op, so every `(B, H, Nq, Nk)` probability
    /// tensor stays alive until backward.
    Plain,
    /// [`efficient_attention`]: backward recomputes the probabilities block by block.
    #[default]
    Efficient,
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(Self::Plain),
            "efficient" => Ok(Self::Efficient),
            _ => Err(format!("`{s}`: expected \"efficient\" or \"plain\"")),
        }
    }
}

/// Per-forward context: adapter scales and which processors return image-attention maps.
#[derive(Debug, Clone, Default)]
pub struct AttnContext {
    /// Adapter scales (ignored by attentions without an adapter).
    pub scales: AdapterScales,
    /// Processor indices whose image-attention probabilities are recorded.
    pub record: Vec<usize>,
    /// Additive bias on the image-token scores `[B, N_ip]`: 0 for real tokens, a large
    /// negative value for padding (batches whose images have different character counts).
    pub ip_bias: Option<Tensor<2>>,
    /// The attention op (the image-attention maps of `record`ed layers are always explicit).
    pub kernel: AttentionKernel,
    /// Additive bias on the context's key scores `[B, M]` in cross-attentions without an
    /// image branch: a ControlNet attending to image tokens of padded characters.
    pub key_bias: Option<Tensor<2>>,
}

/// Head-averaged image-attention probabilities of one cross-attention layer.
#[derive(Debug, Clone)]
pub struct AttnProbs {
    /// Processor index (diffusers `attn_processors` order).
    pub index: usize,
    /// `[B, N_ip, HW]`, f32: for each image token, its attention weight at each query pixel.
    pub probs: Tensor<3>,
}

/// diffusers `LoRALinearLayer(in, out, rank)`: `up(down(x))`, no alpha scaling.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// `in → rank`, no bias; init normal(std = 1/rank).
    pub down: Linear,
    /// `rank → out`, no bias; init zeros (the delta starts at 0).
    pub up: Linear,
}

impl LoraLinear {
    /// Fresh LoRA pair as diffusers initialises it.
    pub fn new(d_in: usize, d_out: usize, rank: usize, device: &Device) -> Self {
        let std = 1.0 / rank as f64;
        Self {
            down: LinearConfig::new(d_in, rank)
                .with_bias(false)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device),
            up: LinearConfig::new(rank, d_out)
                .with_bias(false)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }

    /// `x [.., in] → [.., out]`, computed in the LoRA weights' dtype and returned in `x`'s
    /// (frozen half-precision base, f32 trainable adapter).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let own = self.down.weight.val().dtype();
        let y = self.up.forward(self.down.forward(x.cast(own)));
        y.cast(dtype)
    }

    fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.linear(&mut self.down, &join(prefix, "down"));
        sd.linear(&mut self.up, &join(prefix, "up"));
    }
}

/// One StoryMaker processor's trainable weights (`ip_adapter.{i}.*`).
#[derive(Module, Debug)]
pub struct AttnAdapter {
    /// LoRA on `to_q`.
    pub to_q_lora: LoraLinear,
    /// LoRA on `to_k` (text tokens only).
    pub to_k_lora: LoraLinear,
    /// LoRA on `to_v` (text tokens only).
    pub to_v_lora: LoraLinear,
    /// LoRA on `to_out.0`.
    pub to_out_lora: LoraLinear,
    /// Image-token key projection `cross_dim → hidden`, no bias, no LoRA (cross-attention only).
    pub to_k_ip: Option<Linear>,
    /// Image-token value projection (cross-attention only).
    pub to_v_ip: Option<Linear>,
}

impl AttnAdapter {
    /// Fresh adapter with the reference's init: LoRA as diffusers, `to_k_ip`/`to_v_ip`
    /// PyTorch's default Linear init (StoryMaker does not copy `to_k`/`to_v`, §5.1).
    /// `cross_dim` is `None` for self-attention (no image branch).
    pub fn new(hidden: usize, cross_dim: Option<usize>, rank: usize, device: &Device) -> Self {
        let kv_in = cross_dim.unwrap_or(hidden);
        let ip = |_: ()| {
            LinearConfig::new(kv_in, hidden)
                .with_bias(false)
                .init(device)
        };
        Self {
            to_q_lora: LoraLinear::new(hidden, hidden, rank, device),
            to_k_lora: LoraLinear::new(kv_in, hidden, rank, device),
            to_v_lora: LoraLinear::new(kv_in, hidden, rank, device),
            to_out_lora: LoraLinear::new(hidden, hidden, rank, device),
            to_k_ip: cross_dim.map(|_| ip(())),
            to_v_ip: cross_dim.map(|_| ip(())),
        }
    }

    /// Loads `{prefix}.to_q_lora.down.weight` … (`prefix` = `ip_adapter.{i}` or `{i}`).
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        self.to_q_lora.load(sd, &join(prefix, "to_q_lora"));
        self.to_k_lora.load(sd, &join(prefix, "to_k_lora"));
        self.to_v_lora.load(sd, &join(prefix, "to_v_lora"));
        self.to_out_lora.load(sd, &join(prefix, "to_out_lora"));
        if let Some(l) = self.to_k_ip.as_mut() {
            sd.linear(l, &join(prefix, "to_k_ip"));
        }
        if let Some(l) = self.to_v_ip.as_mut() {
            sd.linear(l, &join(prefix, "to_v_ip"));
        }
    }
}

/// diffusers `Attention` as used by UNet transformer blocks and the VAE mid-block.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection (from `encoder_hidden_states` for cross-attention).
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0`; `to_out.1` is dropout).
    pub to_out: Linear,
    /// StoryMaker processor weights, when an adapter is attached.
    pub adapter: Option<AttnAdapter>,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Position in diffusers' `attn_processors` order (UNet only).
    pub index: usize,
}

/// Sizes of an [`Attention`].
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Query (and output) width.
    pub query_dim: usize,
    /// Key/value input width; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Bias on q/k/v (`attention_bias`; false in the UNet, true in the VAE).
    pub bias: bool,
}

impl AttentionConfig {
    /// Sizes without q/k/v bias.
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Self {
        Self {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
        }
    }

    /// Sets whether q/k/v have a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Creates the attention (lazy parameters, to be loaded).
    pub fn init(&self, index: usize, device: &Device) -> Attention {
        let inner = self.heads * self.dim_head;
        let kv_in = self.cross_attention_dim.unwrap_or(self.query_dim);
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        Attention {
            to_q: lin(self.query_dim, inner, self.bias),
            to_k: lin(kv_in, inner, self.bias),
            to_v: lin(kv_in, inner, self.bias),
            to_out: lin(inner, self.query_dim, true),
            adapter: None,
            heads: self.heads,
            dim_head: self.dim_head,
            index,
        }
    }
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` under `prefix`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.linear(&mut self.to_q, &join(prefix, "to_q"));
        sd.linear(&mut self.to_k, &join(prefix, "to_k"));
        sd.linear(&mut self.to_v, &join(prefix, "to_v"));
        sd.linear(&mut self.to_out, &join(prefix, "to_out.0"));
    }

    /// Hidden size `h` of this processor (`heads × dim_head`).
    pub fn hidden_size(&self) -> usize {
        self.heads * self.dim_head
    }

    /// Input width of `to_k`.
    pub fn kv_dim(&self) -> usize {
        self.to_k.weight.lazy_shape().dims::<2>()[0]
    }

    /// `[B, N, h] → [B, heads, N, dh]`.
    fn split_heads(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, n, _] = t.dims();
        t.reshape([b, n, self.heads, self.dim_head]).swap_dims(1, 2)
    }

    /// `[B, heads, N, dh] → [B, N, h]`.
    fn merge_heads(&self, t: Tensor<4>) -> Tensor<3> {
        let [b, _, n, _] = t.dims();
        t.swap_dims(1, 2)
            .reshape([b, n, self.heads * self.dim_head])
    }

    fn project(&self, base: &Linear, lora: Option<&LoraLinear>, x: Tensor<3>, s: f64) -> Tensor<3> {
        match lora {
            Some(l) => base.forward(x.clone()) + l.forward(x).mul_scalar(s),
            None => base.forward(x),
        }
    }

    /// `hidden [B, N, query_dim]`, `context [B, M, kv_dim]` (`None` = self-attention) →
    /// `[B, N, query_dim]`, plus the head-averaged image-attention probabilities when this
    /// processor is in `ctx.record` and has an image branch.
    ///
    /// With an adapter on a cross-attention, `context` holds `text_tokens` text tokens followed
    /// by image tokens; with no image tokens the image branch is skipped.
    pub fn forward(
        &self,
        hidden: Tensor<3>,
        context: Option<Tensor<3>>,
        ctx: &AttnContext,
    ) -> (Tensor<3>, Option<AttnProbs>) {
        let ad = self.adapter.as_ref();
        let s = ctx.scales.lora;
        let q = self.project(&self.to_q, ad.map(|a| &a.to_q_lora), hidden.clone(), s);
        let is_cross = context.is_some();
        let context = context.unwrap_or(hidden);
        // Split text / image tokens only where the adapter has an image branch.
        let (text, image) = match ad.and_then(|a| a.to_k_ip.as_ref().zip(a.to_v_ip.as_ref())) {
            Some(ip) => {
                let m = context.dims()[1];
                let t = ctx.scales.text_tokens.min(m);
                let image = (m > t).then(|| (context.clone().narrow(1, t, m - t), ip));
                (context.narrow(1, 0, t), image)
            }
            None => (context, None),
        };
        let k = self.project(&self.to_k, ad.map(|a| &a.to_k_lora), text.clone(), s);
        let v = self.project(&self.to_v, ad.map(|a| &a.to_v_lora), text, s);
        let q = self.split_heads(q); // [B, H, N, dh]
        let k = self.split_heads(k); // [B, H, M, dh]
        let v = self.split_heads(v); // [B, H, M, dh]
        let key_bias = ctx.key_bias.clone().filter(|_| is_cross && image.is_none());
        let mut out = attend(ctx.kernel, q.clone(), k, v, key_bias); // [B, H, N, dh]
        let mut probs = None;
        if let Some((tokens, (to_k_ip, to_v_ip))) = image {
            let k_ip = self.split_heads(in_own_dtype(to_k_ip, tokens.clone())); // [B, H, Ni, dh]
            let v_ip = self.split_heads(in_own_dtype(to_v_ip, tokens)); // [B, H, Ni, dh]
            let [b, h, n, _] = q.dims();
            let ni = k_ip.dims()[2];
            let a_ip = if ctx.record.contains(&self.index) {
                // Explicit softmax path, as the reference's `ip_loss > 0` branch.
                let scale = (self.dim_head as f64).powf(-0.5);
                let mut w = q.matmul(k_ip.swap_dims(2, 3)).mul_scalar(scale); // [B, H, N, Ni]
                if let Some(bias) = &ctx.ip_bias {
                    let dtype = w.dtype();
                    w = w + bias
                        .clone()
                        .cast(dtype)
                        .reshape([b, 1, 1, ni])
                        .expand([b, h, n, ni]);
                }
                let dtype = w.dtype();
                let p = softmax(w.cast(FloatDType::F32), 3); // [B, H, N, Ni]
                let [b, h, n, ni] = p.dims();
                let avg = p.clone().sum_dim(1).div_scalar(h as f64); // [B, 1, N, Ni]
                probs = Some(AttnProbs {
                    index: self.index,
                    probs: avg.reshape([b, n, ni]).swap_dims(1, 2), // [B, Ni, N]
                });
                p.cast(dtype).matmul(v_ip) // [B, H, N, dh]
            } else {
                attend(ctx.kernel, q, k_ip, v_ip, ctx.ip_bias.clone())
            };
            out = out + a_ip.mul_scalar(ctx.scales.ip);
        }
        let out = self.merge_heads(out); // [B, N, h]
        let out = self.project(&self.to_out, ad.map(|a| &a.to_out_lora), out, s);
        (out, probs)
    }
}

/// `linear(x)` computed in the weights' dtype and returned in `x`'s (an f32 adapter projection
/// on a half-precision UNet's activations).
fn in_own_dtype(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    linear
        .forward(x.cast(linear.weight.val().dtype()))
        .cast(dtype)
}

/// `softmax(q kᵀ/√d + key_bias) v` with the chosen op; `key_bias [B, Nk]`.
fn attend(
    kernel: AttentionKernel,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
) -> Tensor<4> {
    let [b, h, nq, _] = q.dims();
    let nk = k.dims()[2];
    match kernel {
        AttentionKernel::Efficient => {
            efficient_attention(q, k, v, key_bias, default_block_rows(b, h, nk))
        }
        AttentionKernel::Plain => {
            let bias = key_bias.map(|t| {
                t.cast(q.dtype())
                    .reshape([b, 1, 1, nk])
                    .expand([b, h, nq, nk])
            });
            attention(q, k, v, None, bias, AttentionModuleOptions::default())
        }
    }
}
