//! `troupe debug …` subcommands: look inside model components.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use troupe_models::tokenizer::ClipTokenizer;

#[derive(Subcommand)]
pub enum DebugCommand {
    /// Tokenise prompts as SDXL's CLIP tokenizer does; prints each prompt's ids on one line.
    Tokenize {
        /// Tokenizer folder (e.g. SDXL's `tokenizer/` or `tokenizer_2/`): `tokenizer.json`, or
        /// `vocab.json` + `merges.txt`, with `tokenizer_config.json` / `special_tokens_map.json`.
        #[arg(long)]
        model: PathBuf,
        /// Prompts to tokenise.
        #[arg(required = true)]
        prompts: Vec<String>,
    },
}

pub fn run(cmd: DebugCommand) -> Result<ExitCode> {
    match cmd {
        DebugCommand::Tokenize { model, prompts } => {
            let tok = ClipTokenizer::from_dir(&model)
                .with_context(|| format!("loading the tokenizer in {}", model.display()))?;
            let mut out = std::io::stdout().lock();
            for prompt in &prompts {
                let ids = tok.encode(prompt)?;
                let line: Vec<String> = ids.iter().map(u32::to_string).collect();
                writeln!(out, "{}", line.join(" "))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
