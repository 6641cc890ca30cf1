//! CLIP BPE tokenizer, matching what SDXL pipelines feed their two text encoders.
//!
//! diffusers' `StableDiffusionXLPipeline` calls transformers' `CLIPTokenizer` as
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`: BOS (49406), the
//! byte-level BPE ids (with the `</w>` end-of-word suffix), EOS (49407), then padding up to 77.
//! Truncation keeps BOS, the first 75 BPE tokens and EOS. The padding token differs per folder:
//! SDXL's `tokenizer/` pads with `<|endoftext|>` (49407), `tokenizer_2/` with `!` (id 0).
//!
//! # Why the `tokenizers` crate
//!
//! Since transformers 5, `CLIPTokenizer` *is* a thin Python wrapper around Hugging Face's Rust
//! `tokenizers` library (`CLIPTokenizerFast` is an alias of it; the pure-Python "slow" tokenizer
//! is gone). Building the very same pipeline from the same crate is the shortest way to match it
//! id for id, including its edge cases: Unicode classes in the pre-tokenizer regex, the byte-level
//! alphabet, and how special tokens are split out of the prompt. We use it with default features
//! off and `fancy-regex` on (the default `onig` regex backend needs a C library).
//!
//! # The pipeline (transformers 5.23 `models/clip/tokenization_clip.py`)
//!
//! * normaliser: NFC, every run of whitespace (`\s+`) becomes one space, lowercase;
//! * pre-tokeniser: the CLIP regex
//!   `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!   (matches kept, the rest dropped), then GPT-2 byte-level mapping (no prefix space);
//! * model: BPE with `</w>` end-of-word suffix, unknown token `<|endoftext|>`;
//! * post-processor: `<|startoftext|> … <|endoftext|>`;
//! * special tokens (`bos`, `eos`, `unk`, `pad` and `added_tokens_decoder` from the folder's
//!   configs) are matched in the raw prompt before BPE. A consequence worth knowing: with SDXL's
//!   `tokenizer_2/`, whose pad token is `!`, every `!` in a prompt becomes the special token 0
//!   instead of BPE's `!</w>` (256) or a merged `!!</w>`. transformers does the same, so we do too.
//!
//! ftfy is **not** applied. transformers 4.x's slow `CLIPTokenizer` ran `ftfy.fix_text` when ftfy
//! was installed (else a BERT-style whitespace cleanup), but transformers 5.x, which the SDXL
//! reference environment pins, has no such step; we match 5.x. (open_clip's original tokenizer,
//! with ftfy and HTML unescaping, differs on roughly a third of the fixture prompts; those are
//! recorded in the fixture for information only.)
//!
//! When the folder holds a `tokenizer.json`, its BPE model (vocab, merges, added tokens) is used,
//! but — like transformers, whose `CLIPTokenizer.__init__` rebuilds the pipeline from the
//! extracted vocab and merges — the normaliser, pre-tokeniser and post-processor are the ones
//! above, and padding/truncation come from the call, not from the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// Sequence length SDXL's text encoders take, used when `tokenizer_config.json` gives none.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// CLIP's pre-tokeniser regex, as in transformers' `CLIPTokenizer`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Errors while loading a tokenizer folder or encoding. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{dir}: no tokenizer.json and no vocab.json + merges.txt")]
    MissingFiles { dir: PathBuf },
    #[error("encoding {prompt:?}: {message}")]
    Encode { prompt: String, message: String },
}

/// A special token as the configs describe it: content plus `AddedToken` flags.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
    normalized: bool,
    special: bool,
}

impl SpecialToken {
    /// Parses a config value: either a plain string or an `AddedToken` object. Plain strings and
    /// missing flags default like transformers' `AddedToken(..., special=True)`.
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self::plain(s)),
            Value::Object(m) => {
                let content = m.get("content")?.as_str()?.to_owned();
                let flag = |k: &str, d: bool| m.get(k).and_then(Value::as_bool).unwrap_or(d);
                Some(Self {
                    content,
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    single_word: flag("single_word", false),
                    normalized: flag("normalized", false),
                    special: flag("special", true),
                })
            }
            _ => None,
        }
    }

    fn plain(s: &str) -> Self {
        Self {
            content: s.to_owned(),
            lstrip: false,
            rstrip: false,
            single_word: false,
            normalized: false,
            special: true,
        }
    }

    fn to_added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// Reads an optional JSON file; `Ok(None)` when it does not exist.
fn read_json_opt(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_owned(),
            source,
        })
}

/// The CLIP tokenizer of one SDXL tokenizer folder (`tokenizer/` or `tokenizer_2/`).
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else `vocab.json` + `merges.txt`;
    /// plus the optional `tokenizer_config.json` (`model_max_length`, special tokens,
    /// `added_tokens_decoder`) and `special_tokens_map.json` (which overrides the former's
    /// `bos_token`/`eos_token`/`unk_token`/`pad_token`, as in transformers).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_json_opt(&config_path)?.unwrap_or(Value::Null);
        let map = read_json_opt(&map_path)?.unwrap_or(Value::Null);

        // Special tokens, with CLIPTokenizer's defaults.
        let mut specials: BTreeMap<&str, SpecialToken> = BTreeMap::new();
        for (key, default) in [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            let tok = [&map, &config]
                .into_iter()
                .find_map(|v| v.get(key).and_then(SpecialToken::from_value))
                .unwrap_or_else(|| SpecialToken::plain(default));
            specials.insert(key, tok);
        }

        // `added_tokens_decoder` (id -> AddedToken), in id order.
        let mut added: Vec<(u32, SpecialToken)> = Vec::new();
        if let Some(Value::Object(m)) = config.get("added_tokens_decoder") {
            for (id, v) in m {
                let id: u32 = id.parse().map_err(|_| TokenizerError::Invalid {
                    path: config_path.clone(),
                    message: format!("added_tokens_decoder key {id:?} is not a token id"),
                })?;
                let tok = SpecialToken::from_value(v).ok_or_else(|| TokenizerError::Invalid {
                    path: config_path.clone(),
                    message: format!("added_tokens_decoder[{id}] has no content"),
                })?;
                added.push((id, tok));
            }
            added.sort_by_key(|(id, _)| *id);
        }

        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_u64() {
                // transformers writes 1e30 ("VERY_LARGE_INTEGER") when there is no limit.
                Some(n) if (3..=1_000_000).contains(&n) => n as usize,
                _ if v.is_f64() && v.as_f64().is_some_and(|f| f >= 1e6) => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(TokenizerError::Invalid {
                        path: config_path,
                        message: format!("model_max_length {v} is not a usable length"),
                    });
                }
            },
        };

        let unk = specials["unk_token"].content.clone();
        let tokenizer_json = dir.join("tokenizer.json");
        let (mut tokenizer, model_path) = if tokenizer_json.is_file() {
            let t = Tokenizer::from_file(&tokenizer_json).map_err(|e| TokenizerError::Invalid {
                path: tokenizer_json.clone(),
                message: e.to_string(),
            })?;
            (t, tokenizer_json)
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for p in [&vocab, &merges] {
                if !p.is_file() {
                    if !vocab.is_file() && !merges.is_file() {
                        return Err(TokenizerError::MissingFiles {
                            dir: dir.to_owned(),
                        });
                    }
                    return Err(TokenizerError::Io {
                        path: p.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                    });
                }
            }
            let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                .continuing_subword_prefix(String::new())
                .end_of_word_suffix("</w>".to_owned())
                .unk_token(unk)
                .build()
                .map_err(|e| TokenizerError::Invalid {
                    path: vocab.clone(),
                    message: format!("{e} (with {})", merges.display()),
                })?;
            (Tokenizer::new(bpe), vocab)
        };
        let invalid = |message: String| TokenizerError::Invalid {
            path: model_path.clone(),
            message,
        };

        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| invalid(e.to_string()))?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| invalid(e.to_string()))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| invalid(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));

        // Register the special tokens the way transformers does: `added_tokens_decoder` first,
        // then bos/eos/unk/pad unless already there. Tokens already in the vocabulary keep their
        // id (`!` is 0, the CLIP markers are 49406/49407).
        let existing: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        let mut to_add: Vec<AddedToken> = Vec::new();
        let mut seen: Vec<String> = existing;
        for (id, tok) in &added {
            if tokenizer
                .token_to_id(&tok.content)
                .is_some_and(|v| v != *id)
            {
                return Err(TokenizerError::Invalid {
                    path: dir.join("tokenizer_config.json"),
                    message: format!(
                        "added token {:?} is id {id} in added_tokens_decoder but {} in the vocabulary",
                        tok.content,
                        tokenizer.token_to_id(&tok.content).unwrap_or_default()
                    ),
                });
            }
            if !seen.contains(&tok.content) {
                seen.push(tok.content.clone());
                to_add.push(tok.to_added());
            }
        }
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let tok = &specials[key];
            if !seen.contains(&tok.content) {
                seen.push(tok.content.clone());
                to_add.push(tok.to_added());
            }
        }
        tokenizer
            .add_special_tokens(to_add)
            .map_err(|e| invalid(e.to_string()))?;

        let id_of = |key: &str| -> Result<u32, TokenizerError> {
            let content = &specials[key].content;
            tokenizer
                .token_to_id(content)
                .ok_or_else(|| invalid(format!("{key} {content:?} is not in the vocabulary")))
        };
        let bos_id = id_of("bos_token")?;
        let eos_id = id_of("eos_token")?;
        let pad_id = id_of("pad_token")?;

        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                (specials["eos_token"].content.clone(), eos_id),
                (specials["bos_token"].content.clone(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| invalid(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: specials["pad_token"].content.clone(),
        }));

        Ok(Self {
            tokenizer,
            max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Encodes one prompt into exactly [`max_length`](Self::max_length) ids (77 for SDXL):
    /// BOS, BPE ids (truncated to `max_length - 2`), EOS, padding.
    /// A prompt is user input, so a tokenizer failure is an error naming it, never a panic.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| TokenizerError::Encode {
                prompt: prompt.to_owned(),
                message: e.to_string(),
            })?;
        let ids = enc.get_ids().to_vec();
        debug_assert_eq!(ids.len(), self.max_length);
        Ok(ids)
    }

    /// Encodes several prompts; the result is in prompt order, each [`max_length`](Self::max_length)
    /// long.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let encs = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| TokenizerError::Encode {
                prompt: format!("(a batch of {} prompts)", prompts.len()),
                message: e.to_string(),
            })?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Id used to pad after EOS (49407 for SDXL's `tokenizer/`, 0 for `tokenizer_2/`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `<|startoftext|>` id (49406).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `<|endoftext|>` id (49407).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Length of every encoded prompt: `model_max_length` from `tokenizer_config.json`, else 77.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
