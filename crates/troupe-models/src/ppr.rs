//! StoryMaker's Positional-aware Perceiver Resampler (PPR), PyTorch class `faceid_plus`
//! (`ip_adapter/ip_adapter_faceid.py`). Field names mirror the PyTorch attributes so the
//! released state-dict keys map one to one (see [`FaceIdPlus::load`]).

use burn::module::Param;
use burn::nn::{Gelu, LayerNorm, Linear, LinearConfig};
use burn::prelude::*;

use crate::resampler::{FacePerceiverResampler, Resampler, ResamplerConfig, layer_norm, linear};
use crate::weights::{StateDict, WeightError, join};

/// Sizes of [`FaceIdPlus`]; defaults are StoryMaker SDXL's.
#[derive(Config, Debug)]
pub struct FaceIdPlusConfig {
    /// UNet cross-attention width `D` (also the face resampler width).
    #[config(default = 2048)]
    pub cross_attention_dim: usize,
    /// ArcFace embedding width.
    #[config(default = 512)]
    pub id_embeddings_dim: usize,
    /// CLIP image-encoder hidden width (also the character resampler width `resample.dim`).
    #[config(default = 1280)]
    pub clip_embeddings_dim: usize,
    /// Face tokens produced from the ID embedding (queries of `perceiver_resampler`).
    #[config(default = 4)]
    pub num_tokens: usize,
    /// Layers in each resampler.
    #[config(default = 4)]
    pub resampler_depth: usize,
    /// Head width in both resamplers; heads = width / dim_head (32 for the face, 20 for `resample`).
    #[config(default = 64)]
    pub resampler_dim_head: usize,
    /// Learned queries of `resample` (body tokens per character).
    #[config(default = 16)]
    pub resampler_num_queries: usize,
    /// Feed-forward expansion factor in both resamplers.
    #[config(default = 4)]
    pub resampler_ff_mult: usize,
    /// Character slots in `pos_embed`.
    #[config(default = 3)]
    pub max_characters: usize,
}

impl FaceIdPlusConfig {
    /// Tokens per character slot and of `bg_embed`: `num_tokens + resampler_num_queries` (20).
    pub fn tokens_per_slot(&self) -> usize {
        self.num_tokens + self.resampler_num_queries
    }

    /// Config of the face resampler R1 (`perceiver_resampler`).
    pub fn face_resampler(&self) -> ResamplerConfig {
        let d = self.cross_attention_dim;
        ResamplerConfig::new(
            d,
            self.resampler_depth,
            self.resampler_dim_head,
            d / self.resampler_dim_head,
            self.num_tokens,
            self.clip_embeddings_dim,
            d,
        )
        .with_ff_mult(self.resampler_ff_mult)
    }

    /// Config of the character resampler R2 (`resample`).
    pub fn char_resampler(&self) -> ResamplerConfig {
        let c = self.clip_embeddings_dim;
        ResamplerConfig::new(
            c,
            self.resampler_depth,
            self.resampler_dim_head,
            c / self.resampler_dim_head,
            self.resampler_num_queries,
            c,
            self.cross_attention_dim,
        )
        .with_ff_mult(self.resampler_ff_mult)
    }

    /// Builds the PPR with PyTorch-like initialisation (`pos_embed`, `bg_embed`, `proj_out`
    /// zero, resampler latents `randn / sqrt(dim)`, other Linears burn's default uniform).
    pub fn init(&self, device: &Device) -> FaceIdPlus {
        let d = self.cross_attention_dim;
        let t = self.tokens_per_slot();
        let zero_linear = LinearConfig::new(d, d)
            .with_initializer(burn::nn::Initializer::Zeros)
            .init(device);
        FaceIdPlus {
            proj: IdProj {
                fc1: linear(
                    self.id_embeddings_dim,
                    2 * self.id_embeddings_dim,
                    true,
                    device,
                ),
                act: Gelu::new(),
                fc2: linear(
                    2 * self.id_embeddings_dim,
                    d * self.num_tokens,
                    true,
                    device,
                ),
            },
            norm: layer_norm(d, device),
            perceiver_resampler: self.face_resampler().init_face(device),
            resample: self.char_resampler().init_resampler(device),
            pos_embed: Param::from_tensor(Tensor::zeros([self.max_characters, t, d], device)),
            bg_embed: Param::from_tensor(Tensor::zeros([1, t, d], device)),
            proj_out: zero_linear,
            norm_out: layer_norm(d, device),
            num_tokens: self.num_tokens,
        }
    }
}

/// `proj = Sequential(Linear(id, 2*id), GELU(), Linear(2*id, num_tokens*D))`; keys `proj.0`, `proj.2`.
#[derive(Module, Debug)]
pub struct IdProj {
    /// Index `.0`.
    pub fc1: Linear,
    /// Index `.1` (exact erf GELU).
    pub act: Gelu,
    /// Index `.2`.
    pub fc2: Linear,
}

/// The PPR (`faceid_plus`): ArcFace ID + CLIP crops of each character → IP tokens.
#[derive(Module, Debug)]
pub struct FaceIdPlus {
    /// ID MLP.
    pub proj: IdProj,
    /// LayerNorm on the ID tokens.
    pub norm: LayerNorm,
    /// R1: face resampler; the ID tokens are its queries.
    pub perceiver_resampler: FacePerceiverResampler,
    /// R2: character resampler with learned queries.
    pub resample: Resampler,
    /// `(max_characters, tokens_per_slot, D)` positional embedding per character slot.
    pub pos_embed: Param<Tensor<3>>,
    /// `(1, tokens_per_slot, D)` learned background tokens.
    pub bg_embed: Param<Tensor<3>>,
    /// Fusion Linear(D, D), zero-initialised.
    pub proj_out: Linear,
    /// LayerNorm after the fusion.
    pub norm_out: LayerNorm,
    /// Face tokens per character.
    pub num_tokens: usize,
}

impl FaceIdPlus {
    /// Inference forward (no token-group dropout).
    ///
    /// `id_embeds [B, id_dim]`, `clip_embeds [B, S, clip_dim]` (character crop),
    /// `face_embeds [B, S, clip_dim]` (aligned face crop) → `[1+B, tokens_per_slot, D]`,
    /// where row 0 is always `bg_embed` (StoryMaker quirk) and row 1+i is character i.
    pub fn forward(
        &self,
        id_embeds: Tensor<2>,
        clip_embeds: Tensor<3>,
        face_embeds: Tensor<3>,
    ) -> Tensor<3> {
        self.forward_with_drop(id_embeds, clip_embeds, face_embeds, false, false)
    }

    /// Forward with the training-time token-group dropout decided by the caller's RNG
    /// (StoryMaker: each with p = 0.1, one coin per call for the whole batch):
    /// `drop_face` zeroes the 4 face tokens, `drop_clip` the 16 body tokens, before `pos_embed`.
    pub fn forward_with_drop(
        &self,
        id_embeds: Tensor<2>,
        clip_embeds: Tensor<3>,
        face_embeds: Tensor<3>,
        drop_face: bool,
        drop_clip: bool,
    ) -> Tensor<3> {
        let [b, _] = id_embeds.dims();
        let [slots, _, d] = self.pos_embed.val().dims();
        assert!(
            b >= 1 && b <= slots,
            "PPR: {b} characters, at most {slots} supported"
        );
        let x = self.proj.fc1.forward(id_embeds); // [B, 2*id]
        let x = self.proj.fc2.forward(self.proj.act.forward(x)); // [B, nt*D]
        let x = self.norm.forward(x.reshape([b, self.num_tokens, d])); // [B, nt, D]
        let out = self.perceiver_resampler.forward(x.clone(), face_embeds); // [B, nt, D]
        let mut out = x + out; // [B, nt, D] shortcut, scale 1.0
        let mut clip = self.resample.forward(clip_embeds); // [B, nq, D]
        if drop_face {
            out = out.mul_scalar(0.0);
        }
        if drop_clip {
            clip = clip.mul_scalar(0.0);
        }
        let pos = self.pos_embed.val().narrow(0, 0, b); // [B, T, D]
        let cat = Tensor::cat(vec![out, clip], 1) + pos; // [B, T, D]
        let res = self.norm_out.forward(self.proj_out.forward(cat.clone())) + cat; // [B, T, D]
        Tensor::cat(vec![self.bg_embed.val(), res], 0) // [1+B, T, D]
    }
}

impl FaceIdPlus {
    /// Loads the `image_proj_model` state dict (keys of storymaker.md §3.3, no prefix) from a
    /// `.safetensors` file into this module (shapes come from its config). Every key must be
    /// used exactly once.
    pub fn load_state_dict(self, path: impl AsRef<std::path::Path>) -> Result<Self, WeightError> {
        self.load_from(StateDict::from_file(path)?)
    }

    /// Like [`Self::load_state_dict`], from an opened [`StateDict`].
    pub fn load_from(mut self, mut sd: StateDict) -> Result<Self, WeightError> {
        self.load(&mut sd, "");
        sd.finish("PPR (faceid_plus)")?;
        Ok(self)
    }

    /// Loads the keys under `prefix` (`""` or `image_proj_model`), recording problems in `sd`.
    pub fn load(&mut self, sd: &mut StateDict, prefix: &str) {
        sd.param(&mut self.pos_embed, &join(prefix, "pos_embed"));
        sd.param(&mut self.bg_embed, &join(prefix, "bg_embed"));
        sd.linear(&mut self.proj.fc1, &join(prefix, "proj.0"));
        sd.linear(&mut self.proj.fc2, &join(prefix, "proj.2"));
        sd.layer_norm(&mut self.norm, &join(prefix, "norm"));
        sd.linear(&mut self.proj_out, &join(prefix, "proj_out"));
        sd.layer_norm(&mut self.norm_out, &join(prefix, "norm_out"));
        self.perceiver_resampler
            .load(sd, &join(prefix, "perceiver_resampler"));
        self.resample.load(sd, &join(prefix, "resample"));
    }
}

/// Safetensors metadata key holding the PPR resamplers' head width.
pub const DIM_HEAD_METADATA: &str = "troupe.ppr.resampler_dim_head";

impl FaceIdPlusConfig {
    /// Reads the sizes of a PPR state dict under `prefix`: from the file's adapter spec
    /// ([`crate::adapter::SPEC_METADATA`]) when present, else from its tensor shapes. The head
    /// width is not visible in the shapes (heads × dim_head = width): it then comes from the
    /// metadata [`DIM_HEAD_METADATA`] (older troupe files), else StoryMaker's 64.
    pub fn from_state_dict(sd: &StateDict, prefix: &str) -> Result<Self, WeightError> {
        // A troupe file states its whole architecture.
        if let Some(json) = sd.metadata().get(crate::adapter::SPEC_METADATA) {
            let spec: crate::adapter::AdapterSpec =
                serde_json::from_str(json).map_err(|e| WeightError::Format {
                    path: sd.path().to_string(),
                    message: format!("metadata `{}`: {e}", crate::adapter::SPEC_METADATA),
                })?;
            return Ok(spec.ppr);
        }
        let dim_head = match sd.metadata().get(DIM_HEAD_METADATA) {
            Some(v) => v.parse().map_err(|_| WeightError::Format {
                path: sd.path().to_string(),
                message: format!("metadata `{DIM_HEAD_METADATA}` = `{v}` is not a number"),
            })?,
            None => 64,
        };
        let shape = |name: &str| -> Result<Vec<usize>, WeightError> {
            let key = join(prefix, name);
            sd.shape(&key)
                .map(<[usize]>::to_vec)
                .ok_or(WeightError::MissingKey {
                    path: sd.path().to_string(),
                    key,
                })
        };
        let pos = shape("pos_embed")?; // [slots, T, D]
        let fc1 = shape("proj.0.weight")?; // [2·id, id]
        let fc2 = shape("proj.2.weight")?; // [nt·D, 2·id]
        let proj_in = shape("resample.proj_in.weight")?; // [dim, clip]
        let latents = shape("resample.latents")?; // [1, nq, clip]
        let ff_up = shape("resample.layers.0.1.1.weight")?; // [mult·clip, clip]
        let bad = |message: String| WeightError::Format {
            path: sd.path().to_string(),
            message,
        };
        if pos.len() != 3
            || fc1.len() != 2
            || fc2.len() != 2
            || latents.len() != 3
            || ff_up.len() != 2
        {
            return Err(bad("PPR tensors have unexpected ranks".into()));
        }
        let d = pos[2];
        let depth = (0..)
            .take_while(|i| {
                sd.shape(&join(prefix, &format!("resample.layers.{i}.0.to_q.weight")))
                    .is_some()
            })
            .count();
        let heads_ok = dim_head > 0 && d % dim_head == 0 && proj_in[0] % dim_head == 0;
        if !heads_ok {
            return Err(bad(format!(
                "head width {dim_head} does not divide the PPR widths {d} and {} (set metadata `{DIM_HEAD_METADATA}`)",
                proj_in[0]
            )));
        }
        if d == 0 || fc2[0] % d != 0 || proj_in[0] == 0 || ff_up[0] % proj_in[0] != 0 {
            return Err(bad(format!(
                "inconsistent PPR shapes: pos_embed {pos:?}, proj.2 {fc2:?}"
            )));
        }
        Ok(Self::new()
            .with_cross_attention_dim(d)
            .with_id_embeddings_dim(fc1[1])
            .with_clip_embeddings_dim(proj_in[1])
            .with_num_tokens(fc2[0] / d)
            .with_resampler_depth(depth)
            .with_resampler_dim_head(dim_head)
            .with_resampler_num_queries(latents[1])
            .with_resampler_ff_mult(ff_up[0] / proj_in[0])
            .with_max_characters(pos[0]))
    }
}
