//! StoryMaker's training losses (storymaker.md §5.2), written for batches of any size:
//!
//! * **noise MSE** with character regions up-weighted: `e = (pred − target)²`,
//!   `e ← e + w·e·M` with `M = clamp(Σᵢ maskᵢ, 0, 1)` where the image was not dropped, then the
//!   mean over everything (optionally min-SNR weighted per sample);
//! * **attention loss**: for the chosen cross-attention layers, each layer's image-attention
//!   probabilities `(B, N_ip, hw)` are upsampled (bilinear; ×2 for the latent/4 layers of
//!   training) to half the latent size, where the masks are downsampled ×½ from the latent size, summed over each slot's tokens (background slot 0,
//!   character slot 1+i), averaged over layers, and compared with the character masks and the
//!   background `1 − clamp(Σᵢ maskᵢ, 0, 1)` by MSE: `(Σᵢ mseᵢ + mse_bg) / N` per image with
//!   N characters, then the batch mean.

use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

/// `clamp(Σᵢ maskᵢ, 0, 1)`: `masks [B, C, h, w]` → `[B, 1, h, w]`.
pub fn character_region(masks: Tensor<4>) -> Tensor<4> {
    masks.sum_dim(1).clamp(0.0, 1.0)
}

/// Noise-prediction loss. `pred`, `target`: `[B, 4, h, w]`; `region`: `[B, 1, h, w]`
/// ([`character_region`]); `keep [B]`: 1 where the image conditioning was kept (up-weighting
/// applies), 0 where dropped; `sample_weight [B]`: min-SNR weights or ones.
pub fn noise_loss(
    pred: Tensor<4>,
    target: Tensor<4>,
    region: Tensor<4>,
    keep: Tensor<1>,
    sample_weight: Tensor<1>,
    mask_loss_weight: f64,
) -> Tensor<1> {
    let [b, c, h, w] = pred.dims();
    let e = (pred - target).square(); // [B, 4, h, w]
    let up = region
        .mul(keep.reshape([b, 1, 1, 1]))
        .mul_scalar(mask_loss_weight); // [B, 1, h, w]
    let e = e.clone() + e * up; // e + w·e·M
    let per_sample = e.reshape([b, c * h * w]).mean_dim(1).reshape([b]); // [B]
    (per_sample * sample_weight).mean()
}

/// Attention-map loss over recorded layers.
///
/// `layers`: each `(B, N_ip, hw)` with the spatial size `(lh, lw)` of that layer; `masks
/// [B, C, H, W]` at latent resolution; `characters[b]` real characters of sample `b`;
/// `tokens_per_slot` tokens per slot (background slot first). Returns a scalar.
pub fn attention_loss(
    layers: &[Tensor<3>],
    layer_size: [usize; 2],
    masks: Tensor<4>,
    characters: &[usize],
    tokens_per_slot: usize,
) -> Tensor<1> {
    let device = masks.device();
    let [b, c, mh, mw] = masks.dims();
    let [lh, lw] = layer_size;
    // Compared at half the latent (train_storymaker.py:622, `lsh // 2`), whatever the layers'
    // size: they are upsampled to it (×2 for the latent/4 layers of training).
    let target_size = [mh / 2, mw / 2];
    // Masks ×½ of the latent, as the reference (bilinear, half-pixel centres).
    let masks = interpolate(
        masks,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size(target_size),
    ); // [B, C, H/2, W/2]
    let slots = 1 + c;
    let mut sum: Option<Tensor<4>> = None;
    for probs in layers {
        let [_, n_ip, _] = probs.dims();
        let p = probs.clone().reshape([b, n_ip, lh, lw]);
        let p = interpolate(
            p,
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(false)
                .with_output_size(target_size),
        ); // [B, N_ip, H/2, W/2]
        // Sum over each slot's tokens; samples with fewer characters have fewer slots, so pad.
        let have = n_ip / tokens_per_slot;
        let per_slot = p
            .reshape([b, have, tokens_per_slot, target_size[0], target_size[1]])
            .sum_dim(2)
            .reshape([b, have, target_size[0], target_size[1]]); // [B, slots', H/2, W/2]
        let per_slot = if have < slots {
            let pad = Tensor::zeros([b, slots - have, target_size[0], target_size[1]], &device);
            Tensor::cat(vec![per_slot, pad], 1)
        } else {
            per_slot.narrow(1, 0, slots)
        };
        sum = Some(match sum {
            Some(s) => s + per_slot,
            None => per_slot,
        });
    }
    let Some(sum) = sum else {
        return Tensor::zeros([1], &device);
    };
    let maps = sum.div_scalar(layers.len() as f64); // [B, 1+C, H/2, W/2]
    let bg_target = masks
        .clone()
        .sum_dim(1)
        .clamp(0.0, 1.0)
        .neg()
        .add_scalar(1.0); // [B, 1, ..]
    let targets = Tensor::cat(vec![bg_target, masks], 1); // [B, 1+C, ..]
    // Per-slot MSE; only the background and real characters count.
    let hw = (target_size[0] * target_size[1]) as f64;
    let mse = (maps - targets)
        .square()
        .reshape([b, slots, target_size[0] * target_size[1]])
        .sum_dim(2)
        .div_scalar(hw)
        .reshape([b, slots]); // [B, 1+C]
    // Reference: (Σᵢ mseᵢ + mse_bg) / N per image (N characters), then the batch mean.
    let mut weight = vec![0f32; b * slots];
    for (i, &n) in characters.iter().enumerate() {
        let n = n.min(c);
        for s in 0..=n {
            weight[i * slots + s] = 1.0 / n.max(1) as f32;
        }
    }
    let weight = Tensor::<2>::from_data(TensorData::new(weight, [b, slots]), &device);
    (mse * weight).sum().div_scalar(b as f64)
}
