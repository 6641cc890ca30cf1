//! An evaluation protocol (a TOML file): the subjects, the prompts (`{}` stands for a subject's
//! class word), seeds and images per prompt, the generation settings and the scorer models.
//! [`Protocol::items`] expands it into the images it names, each with its file name under the
//! images folder: `CASE/pPPP-sSEED-iII.png`, where CASE is the subject name (names joined by
//! `+` for a multi-subject prompt).
//!
//! Paths in a protocol (and in a `--subjects` file) are relative to that file's folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::EvalError;
use crate::matching::Negative;

/// A protocol as read from its file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// Short name (report titles, `summary.json`).
    pub name: String,
    /// Free text for the report.
    #[serde(default)]
    pub description: String,
    /// Images per (subject, prompt, seed): one generation call with `num_images`.
    #[serde(default = "one")]
    pub images_per_prompt: usize,
    /// Seeds; each prompt is generated once per seed.
    #[serde(default = "seed_zero")]
    pub seeds: Vec<u64>,
    /// Generation settings (unset: the pipeline's defaults).
    #[serde(default)]
    pub generation: GenerationSpec,
    /// Scorer models (command-line flags override them).
    #[serde(default)]
    pub scorers: ScorerSpec,
    /// Scoring conventions.
    #[serde(default)]
    pub conventions: Conventions,
    /// Subjects (may also come from a separate subjects file).
    #[serde(default)]
    pub subjects: Vec<Subject>,
    /// Prompts, in order (the order numbers the files).
    pub prompts: Vec<PromptSpec>,
    /// The folder relative paths are resolved against.
    #[serde(skip)]
    pub base: PathBuf,
    /// The file this came from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[generation]`: what `troupe sample` takes, for every image of the protocol.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    /// SDXL diffusers folder.
    pub model: Option<PathBuf>,
    /// CLIP image encoder folder.
    pub image_encoder: Option<PathBuf>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Sampler name.
    pub scheduler: Option<String>,
    /// Guidance scale.
    pub guidance: Option<f64>,
    /// Image-attention scale.
    pub ip_scale: Option<f64>,
    /// LoRA scale.
    pub lora_scale: Option<f64>,
    /// Width in pixels.
    pub width: Option<usize>,
    /// Height in pixels.
    pub height: Option<usize>,
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// A pose ControlNet folder (diffusers layout), for prompts with a `pose`.
    pub controlnet: Option<PathBuf>,
    /// Its residuals' scale (`controlnet_conditioning_scale`).
    pub controlnet_scale: Option<f64>,
    /// What it attends to: `text` (diffusers' pipeline, the default here) or `image_tokens`
    /// (StoryMaker's training).
    pub controlnet_context: Option<troupe_diffusion::control::ControlContext>,
}

/// `[scorers]`: the scorer models.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerSpec {
    /// transformers `CLIPModel` folder (CLIP-T and CLIP-I).
    pub clip: Option<PathBuf>,
    /// SCRFD detector ONNX file.
    pub face_detector: Option<PathBuf>,
    /// ArcFace recogniser ONNX file.
    pub face_recognizer: Option<PathBuf>,
    /// Detector input side (insightface's `det_size`).
    #[serde(default = "det_size")]
    pub det_size: usize,
    /// Detection score threshold.
    #[serde(default = "threshold")]
    pub threshold: f32,
}

impl Default for ScorerSpec {
    fn default() -> Self {
        Self {
            clip: None,
            face_detector: None,
            face_recognizer: None,
            det_size: det_size(),
            threshold: threshold(),
        }
    }
}

/// `[conventions]`: how per-image face scores are formed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Conventions {
    /// `"clamp"`: `max(similarity, 0)` per image (FastComposer); `"keep"`: the raw cosine.
    #[serde(default = "clamp")]
    pub negative_face_sim: String,
}

impl Default for Conventions {
    fn default() -> Self {
        Self {
            negative_face_sim: clamp(),
        }
    }
}

impl Conventions {
    /// The negative-similarity rule.
    pub fn negative(&self) -> Result<Negative, String> {
        match self.negative_face_sim.as_str() {
            "clamp" => Ok(Negative::Clamp),
            "keep" => Ok(Negative::Keep),
            other => Err(format!(
                "`conventions.negative_face_sim` = {other:?}: expected \"clamp\" or \"keep\""
            )),
        }
    }
}

/// One subject: a name, the class word its prompts use, and its reference in any
/// `troupe sample --reference` form (`photo=IMG,mask=MASK`, `image=…,mask=…,embedding=…,
/// keypoints=…`, or `SHARD#ROW_ID[:C]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    /// Plain name (a folder name of the images layout).
    pub name: String,
    /// Class word put in place of `{}` (e.g. `man`, `woman`, `person`).
    pub class: String,
    /// The reference.
    pub reference: String,
}

/// One prompt.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// The text; each `{}` becomes a subject's class word.
    pub text: String,
    /// Category (accessory, style, action, context, …) for per-category means.
    #[serde(default)]
    pub category: String,
    /// For a prompt with several `{}`: the subject tuples to generate it with (names, in
    /// placeholder order). Unset: every subject alone (the prompt must then have one `{}`).
    pub subjects: Option<Vec<Vec<String>>>,
    /// A pose image every image of this prompt is generated with (needs
    /// `generation.controlnet`); relative to the protocol file.
    pub pose: Option<PathBuf>,
}

/// A subjects file (`--subjects`): `[[subjects]]` entries only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectsFile {
    subjects: Vec<Subject>,
}

/// One image the protocol names.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Subject names joined by `+` (the layout's folder).
    pub case: String,
    /// Indices into [`Protocol::subjects`], in placeholder order.
    pub subjects: Vec<usize>,
    /// Index into [`Protocol::prompts`].
    pub prompt_index: usize,
    /// The prompt with class words filled in (generated and scored with).
    pub prompt: String,
    /// The seed of its generation call.
    pub seed: u64,
    /// Its index among the call's `images_per_prompt` images.
    pub instance: usize,
    /// Path under the images folder.
    pub file: PathBuf,
}

fn one() -> usize {
    1
}
fn seed_zero() -> Vec<u64> {
    vec![0]
}
fn det_size() -> usize {
    640
}
fn threshold() -> f32 {
    0.5
}
fn clamp() -> String {
    "clamp".into()
}

fn bad(path: &Path, message: impl Into<String>) -> EvalError {
    EvalError::Protocol {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| bad(path, e.to_string()))
}

impl Protocol {
    /// Reads a protocol; `subjects` (a file of `[[subjects]]`) adds to or supplies its
    /// subjects. Everything is checked ([`Protocol::check`]).
    pub fn load(path: &Path, subjects: Option<&Path>) -> Result<Self, EvalError> {
        let mut p: Protocol = read_toml(path)?;
        p.base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        p.path = path.to_path_buf();
        let here = p.base.clone();
        p.subjects
            .iter_mut()
            .for_each(|s| s.reference = relative_reference(&s.reference, &here));
        if let Some(file) = subjects {
            let mut more: SubjectsFile = read_toml(file)?;
            let there = file.parent().unwrap_or(Path::new("."));
            more.subjects
                .iter_mut()
                .for_each(|s| s.reference = relative_reference(&s.reference, there));
            p.subjects.extend(more.subjects);
        }
        for f in [
            &mut p.generation.model,
            &mut p.generation.image_encoder,
            &mut p.scorers.clip,
            &mut p.scorers.face_detector,
            &mut p.scorers.face_recognizer,
            &mut p.generation.controlnet,
        ] {
            if let Some(v) = f.as_mut() {
                *v = here.join(&*v);
            }
        }
        for prompt in &mut p.prompts {
            if let Some(v) = prompt.pose.as_mut() {
                *v = here.join(&*v);
            }
        }
        p.check()?;
        Ok(p)
    }

    /// Checks names, placeholders and counts, naming the file and field.
    pub fn check(&self) -> Result<(), EvalError> {
        let at = |m: String| bad(&self.path, m);
        if self.subjects.is_empty() {
            return Err(at(
                "no subjects: add `[[subjects]]` (name, class, reference) or pass --subjects FILE"
                    .into(),
            ));
        }
        if self.prompts.is_empty() {
            return Err(at("`prompts` is empty".into()));
        }
        if self.images_per_prompt == 0 {
            return Err(at("`images_per_prompt` must be at least 1".into()));
        }
        if self.seeds.is_empty() {
            return Err(at("`seeds` is empty".into()));
        }
        if self.generation.controlnet.is_none()
            && let Some(i) = self.prompts.iter().position(|p| p.pose.is_some())
        {
            return Err(at(format!(
                "prompts[{i}].pose needs `generation.controlnet` (a pose ControlNet folder)"
            )));
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.subjects.iter().enumerate() {
            let plain = !s.name.is_empty()
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !s.name.starts_with('.');
            if !plain {
                return Err(at(format!(
                    "subjects[{i}].name = {:?}: use letters, digits, '-', '_' or '.' (it names a folder)",
                    s.name
                )));
            }
            if !names.insert(s.name.as_str()) {
                return Err(at(format!(
                    "subjects[{i}].name = {:?} appears twice",
                    s.name
                )));
            }
            if s.class.trim().is_empty() {
                return Err(at(format!("subjects[{i}].class is empty")));
            }
        }
        self.negative().map_err(at)?;
        for (i, p) in self.prompts.iter().enumerate() {
            let holes = p.text.matches("{}").count();
            match &p.subjects {
                None if holes != 1 => {
                    return Err(at(format!(
                        "prompts[{i}].text has {holes} `{{}}`: a prompt without `subjects` needs exactly one"
                    )));
                }
                None => {}
                Some(tuples) => {
                    for t in tuples {
                        if t.len() != holes {
                            return Err(at(format!(
                                "prompts[{i}].subjects: {t:?} has {} names for {holes} `{{}}`",
                                t.len()
                            )));
                        }
                        if let Some(n) = t.iter().find(|n| !names.contains(n.as_str())) {
                            return Err(at(format!(
                                "prompts[{i}].subjects: no subject named {n:?}"
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The per-image negative-similarity rule.
    pub fn negative(&self) -> Result<Negative, String> {
        self.conventions.negative()
    }

    /// Every image the protocol names, grouped by generation call (subject tuple, prompt,
    /// seed) and ordered by prompt, then tuple, then seed, then instance.
    pub fn items(&self) -> Vec<Item> {
        let index = |n: &str| self.subjects.iter().position(|s| s.name == n);
        let mut out = Vec::new();
        for (pi, p) in self.prompts.iter().enumerate() {
            let tuples: Vec<Vec<usize>> = match &p.subjects {
                None => (0..self.subjects.len()).map(|s| vec![s]).collect(),
                Some(t) => t
                    .iter()
                    .map(|names| names.iter().filter_map(|n| index(n)).collect())
                    .collect(),
            };
            for subjects in tuples {
                let names: Vec<&str> = subjects
                    .iter()
                    .map(|&s| self.subjects[s].name.as_str())
                    .collect();
                let case = names.join("+");
                let mut prompt = p.text.clone();
                for &s in &subjects {
                    prompt = prompt.replacen("{}", &self.subjects[s].class, 1);
                }
                for &seed in &self.seeds {
                    for instance in 0..self.images_per_prompt {
                        out.push(Item {
                            file: PathBuf::from(&case)
                                .join(format!("p{pi:03}-s{seed}-i{instance:02}.png")),
                            case: case.clone(),
                            subjects: subjects.clone(),
                            prompt_index: pi,
                            prompt: prompt.clone(),
                            seed,
                            instance,
                        });
                    }
                }
            }
        }
        out
    }
}

/// A reference argument with its relative paths made relative to `base` (shard paths and
/// `key=path` fields alike).
fn relative_reference(arg: &str, base: &Path) -> String {
    let join = |p: &str| base.join(p.trim()).display().to_string();
    if let Some((shard, row)) = arg.split_once('#') {
        return format!("{}#{row}", join(shard));
    }
    arg.split(',')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim(), join(v)),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const SUBJECTS: &str = r#"
[[subjects]]
name = "ann"
class = "woman"
reference = "photo=ann.png,mask=ann_mask.png"
[[subjects]]
name = "bob"
class = "man"
reference = "shards/s.parquet#row-1:0"
"#;

    #[test]
    fn items_fill_class_words_and_name_files_by_prompt_seed_instance() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "name = \"t\"\nseeds = [3, 4]\nimages_per_prompt = 2\n{SUBJECTS}\n\
             [[prompts]]\ntext = \"a {{}} in the snow\"\ncategory = \"context\"\n\
             [[prompts]]\ntext = \"a {{}} and a {{}} talking\"\nsubjects = [[\"bob\", \"ann\"]]\n"
        );
        let p = Protocol::load(&write(tmp.path(), "p.toml", &text), None).unwrap();
        let items = p.items();
        // 2 subjects × 2 seeds × 2 instances, then 1 pair × 2 seeds × 2 instances.
        assert_eq!(items.len(), 8 + 4);
        assert_eq!(items[0].prompt, "a woman in the snow");
        assert_eq!(items[0].file, PathBuf::from("ann/p000-s3-i00.png"));
        assert_eq!(items[3].file, PathBuf::from("ann/p000-s4-i01.png"));
        assert_eq!(items[4].case, "bob");
        assert_eq!(items[8].prompt, "a man and a woman talking");
        assert_eq!(items[8].subjects, vec![1, 0]);
        assert_eq!(items[8].file, PathBuf::from("bob+ann/p001-s3-i00.png"));
        // References are resolved against the protocol's folder.
        let base = tmp.path().display();
        assert_eq!(
            p.subjects[0].reference,
            format!("photo={base}/ann.png,mask={base}/ann_mask.png")
        );
        assert_eq!(
            p.subjects[1].reference,
            format!("{base}/shards/s.parquet#row-1:0")
        );
    }

    #[test]
    fn bad_protocols_name_the_file_and_field() {
        let tmp = tempfile::tempdir().unwrap();
        let err = |text: &str| {
            let path = write(tmp.path(), "bad.toml", text);
            Protocol::load(&path, None).unwrap_err().to_string()
        };
        let prompt = "[[prompts]]\ntext = \"a {} reading\"\n";
        let e = err(&format!("name = \"t\"\nstep = 3\n{SUBJECTS}{prompt}"));
        assert!(
            e.contains("bad.toml") && e.contains("unknown field `step`"),
            "{e}"
        );
        let e = err(&format!("name = \"t\"\n{prompt}"));
        assert!(e.contains("bad.toml") && e.contains("no subjects"), "{e}");
        let e = err(&format!(
            "name = \"t\"\n{SUBJECTS}[[prompts]]\ntext = \"two {{}} {{}}\"\n"
        ));
        assert!(e.contains("prompts[0].text has 2"), "{e}");
        let e = err(&format!(
            "name = \"t\"\n{SUBJECTS}[[prompts]]\ntext = \"{{}} and {{}}\"\nsubjects = [[\"ann\", \"cat\"]]\n"
        ));
        assert!(e.contains("no subject named \"cat\""), "{e}");
        let e = err(&format!("name = \"t\"\n{SUBJECTS}{SUBJECTS}{prompt}"));
        assert!(e.contains("\"ann\" appears twice"), "{e}");
        let e = err(&format!(
            "name = \"t\"\n[conventions]\nnegative_face_sim = \"abs\"\n{SUBJECTS}{prompt}"
        ));
        assert!(e.contains("negative_face_sim"), "{e}");
        let e = err(&format!(
            "name = \"t\"\n{SUBJECTS}[[prompts]]\ntext = \"a {{}} dancing\"\npose = \"pose.png\"\n"
        ));
        assert!(
            e.contains("prompts[0].pose") && e.contains("generation.controlnet"),
            "{e}"
        );
        // With a ControlNet, the pose is found next to the protocol.
        let ok = format!(
            "name = \"t\"\n[generation]\ncontrolnet = \"cn\"\ncontrolnet_context = \"image_tokens\"\n\
             {SUBJECTS}[[prompts]]\ntext = \"a {{}} dancing\"\npose = \"pose.png\"\n"
        );
        let p = Protocol::load(&write(tmp.path(), "posed.toml", &ok), None).unwrap();
        assert_eq!(
            p.prompts[0].pose.as_deref(),
            Some(tmp.path().join("pose.png").as_path())
        );
        assert_eq!(
            p.generation.controlnet.as_deref(),
            Some(tmp.path().join("cn").as_path())
        );
        // Subjects from a separate file, resolved against that file's folder.
        let sub = tmp.path().join("people");
        std::fs::create_dir_all(&sub).unwrap();
        let subjects = write(&sub, "subjects.toml", SUBJECTS);
        let path = write(tmp.path(), "p.toml", &format!("name = \"t\"\n{prompt}"));
        let p = Protocol::load(&path, Some(&subjects)).unwrap();
        assert!(p.subjects[0].reference.contains("people/ann.png"));
        let e = Protocol::load(&path, Some(&tmp.path().join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.toml") && e.contains("cannot read"),
            "{e}"
        );
    }
}
