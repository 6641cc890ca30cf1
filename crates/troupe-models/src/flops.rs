//! Floating-point operations of one UNet forward pass, counted from the config the way
//! PyTorch's `FlopCounterMode` counts them: 2 per multiply-add of every convolution, linear
//! layer and attention matrix product (`QKᵀ` and `PV`); normalisations, activations and
//! element-wise ops are not counted. With an adapter: the LoRA branches of every attention
//! projection and the decoupled image attention (its key/value projections over the image
//! tokens and its two products). Used for MFU in `troupe debug bench-train`.

use crate::error::ConfigError;
use crate::unet::UNet2DConditionConfig;

/// The shapes of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct FlopShape {
    /// Batch size (the number of samples through the UNet).
    pub batch: usize,
    /// Latent height.
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Text tokens in `encoder_hidden_states`.
    pub text_tokens: usize,
    /// Image tokens appended to them (0 without an adapter).
    pub image_tokens: usize,
    /// LoRA rank of the adapter's processors (0 without an adapter).
    pub lora_rank: usize,
}

/// Running totals over one sample; everything is scaled by the batch at the end.
struct Counter {
    flops: f64,
    shape: FlopShape,
}

impl Counter {
    fn conv(&mut self, k: usize, cin: usize, cout: usize, pixels: usize) {
        self.flops += 2.0 * (k * k * cin * cout * pixels) as f64;
    }

    fn linear(&mut self, din: usize, dout: usize, tokens: usize) {
        self.flops += 2.0 * (din * dout * tokens) as f64;
    }

    /// A LoRA branch `up(down(x))` of rank r on a `din → dout` projection.
    fn lora(&mut self, din: usize, dout: usize, tokens: usize) {
        let r = self.shape.lora_rank;
        self.linear(din, r, tokens);
        self.linear(r, dout, tokens);
    }

    /// A projection with its LoRA branch when an adapter is attached.
    fn projection(&mut self, din: usize, dout: usize, tokens: usize) {
        self.linear(din, dout, tokens);
        if self.shape.lora_rank > 0 {
            self.lora(din, dout, tokens);
        }
    }

    /// `QKᵀ` and `PV` of `nq` queries over `nk` keys of total width `c` (all heads).
    fn products(&mut self, nq: usize, nk: usize, c: usize) {
        self.flops += 4.0 * (nq * nk * c) as f64;
    }

    fn resnet(&mut self, cin: usize, cout: usize, pixels: usize, time_dim: usize) {
        self.conv(3, cin, cout, pixels);
        self.linear(time_dim, cout, 1);
        self.conv(3, cout, cout, pixels);
        if cin != cout {
            self.conv(1, cin, cout, pixels);
        }
    }

    /// `Transformer2DModel` with linear projections: `layers` blocks of self-attention,
    /// cross-attention (text + image tokens), GEGLU feed-forward.
    fn transformer(&mut self, c: usize, layers: usize, cross: usize, n: usize) {
        let (text, image) = (self.shape.text_tokens, self.shape.image_tokens);
        self.linear(c, c, n); // proj_in
        for _ in 0..layers {
            for _ in 0..3 {
                self.projection(c, c, n); // attn1 q, k, v
            }
            self.products(n, n, c);
            self.projection(c, c, n); // attn1 out
            self.projection(c, c, n); // attn2 q
            self.projection(cross, c, text); // attn2 k
            self.projection(cross, c, text); // attn2 v
            self.products(n, text, c);
            if image > 0 {
                self.linear(cross, c, image); // to_k_ip
                self.linear(cross, c, image); // to_v_ip
                self.products(n, image, c);
            }
            self.projection(c, c, n); // attn2 out
            self.linear(c, 8 * c, n); // GEGLU proj (2 × 4c)
            self.linear(4 * c, c, n);
        }
        self.linear(c, c, n); // proj_out
    }
}

impl UNet2DConditionConfig {
    /// FLOPs of one forward pass of `shape.batch` samples (see the module docs for what counts).
    pub fn forward_flops(&self, shape: FlopShape) -> Result<f64, ConfigError> {
        let down = self.down_blocks("config")?;
        let n = down.len();
        let ch = &self.block_out_channels;
        let c0 = ch[0];
        let time_dim = 4 * c0;
        let mut k = Counter { flops: 0.0, shape };
        let pixels = |level: usize| (shape.height >> level) * (shape.width >> level);
        k.linear(c0, time_dim, 1);
        k.linear(time_dim, time_dim, 1);
        if let Some(p) = self.projection_class_embeddings_input_dim {
            k.linear(p, time_dim, 1);
            k.linear(time_dim, time_dim, 1);
        }
        k.conv(3, self.in_channels, c0, pixels(0));
        let mut skips = vec![c0];
        let mut prev = c0;
        for (i, b) in down.iter().enumerate() {
            let attn = b.kind.starts_with("CrossAttn");
            for _ in 0..b.layers {
                k.resnet(prev, ch[i], pixels(i), time_dim);
                prev = ch[i];
                if attn {
                    k.transformer(
                        ch[i],
                        b.transformer_layers,
                        b.cross_attention_dim,
                        pixels(i),
                    );
                }
                skips.push(prev);
            }
            if i + 1 < n {
                k.conv(3, prev, prev, pixels(i + 1)); // stride-2 downsampler
                skips.push(prev);
            }
        }
        let last = &down[n - 1];
        let mid = pixels(n - 1);
        k.resnet(prev, prev, mid, time_dim);
        k.transformer(prev, last.transformer_layers, last.cross_attention_dim, mid);
        k.resnet(prev, prev, mid, time_dim);
        for (j, b) in down.iter().rev().enumerate() {
            let level = n - 1 - j;
            let attn = self.up_block_types[j].starts_with("CrossAttn");
            for _ in 0..b.layers + 1 {
                let skip = skips.pop().expect("one skip per up-block resnet");
                k.resnet(prev + skip, ch[level], pixels(level), time_dim);
                prev = ch[level];
                if attn {
                    k.transformer(
                        prev,
                        b.transformer_layers,
                        b.cross_attention_dim,
                        pixels(level),
                    );
                }
            }
            if level > 0 {
                k.conv(3, prev, prev, pixels(level - 1)); // upsampler after ×2 nearest
            }
        }
        k.conv(3, c0, self.out_channels, pixels(0));
        Ok(k.flops * shape.batch as f64)
    }
}
