//! Scaled-dot-product attention whose backward pass never keeps the `(B, H, Nq, Nk)`
//! probabilities.
//!
//! burn's autodiff differentiates `attention` through its decomposed fallback, which stores the
//! softmax probabilities of every layer until backward: ≈ 670 MB per 4096-token self-attention
//! of one SDXL sample in f32, and the dominant cost of an adapter step at 1024². This op keeps
//! only its inputs (`q`, `k`, `v`, the key bias) and recomputes the probabilities in backward,
//! a block of query rows at a time, with the FlashAttention-2 backward equations:
//!
//! ```text
//! S = Q Kᵀ·scale + bias    P = softmax(S)      (one block of query rows, every key)
//! dV += Pᵀ dO              dP = dO Vᵀ
//! D  = rowsum(P ∘ dP)      (= rowsum(dO ∘ O))  dS = P ∘ (dP − D)
//! dQ  = dS K·scale         dK += dSᵀ Q·scale    dbias += Σ_{heads, queries} dS
//! ```
//!
//! Blocks span whole key rows, so each block's softmax is exact and no running log-sum-exp is
//! needed. The forward pass is the backend's own attention (flex and CubeCL run a fused flash
//! kernel); softmax statistics are taken in f32 whatever the input dtype.
//!
//! Wired into burn as a backend extension: the concrete backends run their attention, and the
//! autodiff backend registers the backward step above.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::AttentionModuleOptions;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{FloatDType, Shape, Slice};

/// Elements of one block's `(B, H, rows, Nk)` score tensor (64 MiB in f32): sets how many query
/// rows the backward pass recomputes at once.
pub const BLOCK_SCORE_ELEMENTS: usize = 1 << 24;

/// Query rows per backward block for `batch × heads` attentions over `keys` keys.
pub fn default_block_rows(batch: usize, heads: usize, keys: usize) -> usize {
    (BLOCK_SCORE_ELEMENTS / (batch * heads * keys).max(1)).max(1)
}

/// Attention with a recomputing backward; see the module docs. Two methods rather than an
/// optional bias: the extension macro does not route `Option` tensor inputs.
#[backend_extension(Flex, Cube: cfg(any(feature = "cuda", feature = "vulkan")), Autodiff)]
pub trait EfficientAttentionBackend: Backend {
    /// `q [B, H, Nq, d]`, `k [B, H, Nk, d]`, `v [B, H, Nk, dv]` → `[B, H, Nq, dv]`; scale
    /// `1/√d`. `block_rows` only matters to the backward pass.
    fn efficient_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        block_rows: usize,
    ) -> FloatTensor<Self> {
        let _ = block_rows;
        backend_attention::<Self>(q, k, v, None)
    }

    /// As [`Self::efficient_attention`] with `key_bias [B, 1, 1, Nk]` added to every score of
    /// that key.
    fn efficient_attention_biased(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        block_rows: usize,
    ) -> FloatTensor<Self> {
        let _ = block_rows;
        backend_attention::<Self>(q, k, v, Some(key_bias))
    }
}

impl EfficientAttentionBackend for Flex {}

#[cfg(any(feature = "cuda", feature = "vulkan"))]
impl EfficientAttentionBackend for burn::backend::Cube {}

/// The backend's attention with the key bias broadcast to every head and query.
fn backend_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    key_bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let [b, h, nq, _] = q.shape().dims();
    let nk = k.shape()[2];
    let bias = key_bias.map(|t| B::float_expand(t, Shape::from([b, h, nq, nk])));
    B::attention(q, k, v, None, bias, AttentionModuleOptions::default())
}

/// Backward step of [`EfficientAttentionBackend::efficient_attention`] on `Autodiff`.
#[derive(Debug)]
struct EfficientAttentionStep;

/// What the backward step keeps: the inputs, never the probabilities.
#[derive(Debug, Clone)]
struct Saved<P> {
    q: P,
    k: P,
    v: P,
    key_bias: Option<P>,
    block_rows: usize,
}

/// Input gradients, `[dq, dk, dv, dbias]`.
type InputGrads<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

/// The FlashAttention-2 backward (module docs), one block of query rows at a time.
fn backward_blocks<B: Backend>(
    s: Saved<FloatTensor<B>>,
    grad_out: FloatTensor<B>,
) -> InputGrads<B> {
    let dtype: FloatDType = s.q.dtype().into();
    let [b, h, nq, d] = s.q.shape().dims();
    let scale = (d as f64).powf(-0.5);
    let f32 = |t| B::float_cast(t, FloatDType::F32);
    let back = |t| B::float_cast(t, dtype);
    let k_t = B::float_swap_dims(s.k.clone(), 2, 3);
    let v_t = B::float_swap_dims(s.v.clone(), 2, 3);
    let rows = |t: &FloatTensor<B>, r: std::ops::Range<usize>| {
        B::float_slice(
            t.clone(),
            &[
                Slice::from(..),
                Slice::from(..),
                Slice::from(r),
                Slice::from(..),
            ],
        )
    };
    let (mut dk, mut dv, mut dbias) = (None, None, None);
    let mut dq = Vec::new();
    let add = |acc: Option<FloatTensor<B>>, t| {
        Some(match acc {
            Some(a) => B::float_add(a, t),
            None => t,
        })
    };
    for start in (0..nq).step_by(s.block_rows.max(1)) {
        let r = start..(start + s.block_rows).min(nq);
        let (q, d_out) = (rows(&s.q, r.clone()), rows(&grad_out, r));
        let mut scores = f32(B::float_mul_scalar(
            B::float_matmul(q.clone(), k_t.clone()),
            scale.into(),
        ));
        if let Some(bias) = &s.key_bias {
            scores = B::float_add(scores, f32(bias.clone()));
        }
        let p = softmax_last::<B>(scores); // [B, H, rows, Nk], f32
        dv = add(
            dv,
            B::float_matmul(B::float_swap_dims(back(p.clone()), 2, 3), d_out.clone()),
        );
        let dp = f32(B::float_matmul(d_out, v_t.clone()));
        let row_dot = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
        let ds = B::float_mul(p, B::float_sub(dp, row_dot)); // [B, H, rows, Nk], f32
        if s.key_bias.is_some() {
            let db = B::float_sum_dim(B::float_sum_dim(ds.clone(), 2), 1);
            dbias = add(dbias, db);
        }
        let ds = B::float_mul_scalar(back(ds), scale.into());
        dq.push(B::float_matmul(ds.clone(), s.k.clone()));
        dk = add(dk, B::float_matmul(B::float_swap_dims(ds, 2, 3), q));
    }
    let zeros = |t: &FloatTensor<B>| B::float_zeros(t.shape(), &t.device(), dtype);
    let dk = dk.unwrap_or_else(|| zeros(&s.k));
    let dv = dv.unwrap_or_else(|| zeros(&s.v));
    let dq = if dq.is_empty() {
        B::float_zeros(Shape::from([b, h, nq, d]), &s.q.device(), dtype)
    } else {
        B::float_cat(dq, 2)
    };
    let dbias = s.key_bias.map(|bias| {
        let bias_dtype: FloatDType = bias.dtype().into();
        match dbias {
            Some(g) => B::float_cast(g, bias_dtype),
            None => B::float_zeros(bias.shape(), &bias.device(), bias_dtype),
        }
    });
    (dq, dk, dv, dbias)
}

/// Softmax over the last axis (max-subtracted).
fn softmax_last<B: Backend>(scores: FloatTensor<B>) -> FloatTensor<B> {
    let max = B::float_max_dim(scores.clone(), 3);
    let e = B::float_exp(B::float_sub(scores, max));
    let sum = B::float_sum_dim(e.clone(), 3);
    B::float_div(e, sum)
}

impl EfficientAttentionStep {
    fn run<B: Backend, const N: usize>(ops: Ops<Saved<FloatTensor<B>>, N>, grads: &mut Gradients) {
        let grad_out = grads.consume::<B>(&ops.node);
        let (dq, dk, dv, dbias) = backward_blocks::<B>(ops.state, grad_out);
        let mut found = [Some(dq), Some(dk), Some(dv), dbias].into_iter();
        for parent in ops.parents {
            let grad = found.next().flatten();
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend> Backward<B, 3> for EfficientAttentionStep {
    type State = Saved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 3>(ops, grads);
    }
}

impl<B: Backend> Backward<B, 4> for EfficientAttentionStep {
    type State = Saved<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 4>(ops, grads);
    }
}

impl<B: Backend, C: CheckpointStrategy> EfficientAttentionBackend for Autodiff<B, C> {
    fn efficient_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        block_rows: usize,
    ) -> FloatTensor<Self> {
        tracked_attention::<B, C>(q, k, v, None, block_rows)
    }

    fn efficient_attention_biased(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        block_rows: usize,
    ) -> FloatTensor<Self> {
        tracked_attention::<B, C>(q, k, v, Some(key_bias), block_rows)
    }
}

/// Forward on the inner backend, registering [`EfficientAttentionStep`] when any input is
/// tracked.
fn tracked_attention<B: Backend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    key_bias: Option<FloatTensor<Autodiff<B, C>>>,
    block_rows: usize,
) -> FloatTensor<Autodiff<B, C>> {
    let (q, q_node) = q.into_parts();
    let (k, k_node) = k.into_parts();
    let (v, v_node) = v.into_parts();
    let (key_bias, bias_node) = key_bias.map(|t| t.into_parts()).unzip();
    let out = backend_attention::<B>(q.clone(), k.clone(), v.clone(), key_bias.clone());
    let saved = Saved {
        q,
        k,
        v,
        key_bias,
        block_rows,
    };
    match bias_node {
        None => match <EfficientAttentionStep as Backward<B, 3>>::prepare::<C>(
            EfficientAttentionStep,
            [q_node, k_node, v_node],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(saved, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
        Some(bias_node) => match <EfficientAttentionStep as Backward<B, 4>>::prepare::<C>(
            EfficientAttentionStep,
            [q_node, k_node, v_node, bias_node],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(saved, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    }
}

/// `q [B, H, Nq, d]`, `k [B, H, Nk, d]`, `v [B, H, Nk, dv]`, `key_bias [B, Nk]` (added to the
/// scores of each key, e.g. a large negative value for padding) → `[B, H, Nq, dv]`, equal to
/// `softmax(q kᵀ/√d + bias) v`. On an autodiff device its backward recomputes the probabilities
/// in blocks of `block_rows` query rows (see [`default_block_rows`]) instead of storing them.
pub fn efficient_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<2>>,
    block_rows: usize,
) -> Tensor<4> {
    let b = q.dims()[0];
    let nk = k.dims()[2];
    let dtype = q.dtype();
    let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(match key_bias {
        Some(bias) => {
            let bias = bias.cast(dtype).reshape([b, 1, 1, nk]).into_dispatch();
            <Dispatch as EfficientAttentionBackend>::efficient_attention_biased(
                q, k, v, bias, block_rows,
            )
        }
        None => <Dispatch as EfficientAttentionBackend>::efficient_attention(q, k, v, block_rows),
    })
}
