//! Initialising the adapter from the public IP-Adapter checkpoints, as StoryMaker does
//! (storymaker.md §5.1).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use troupe_models::adapter::Adapter;
use troupe_models::adapter_file::AdapterFile;
use troupe_models::weights::StateDict;

/// From IP-Adapter-FaceID-PlusV2-SDXL the PPR's `proj.*`, `norm.*`, `perceiver_resampler.*`
/// and all processors (`ip_adapter.*`); from IP-Adapter-Plus-SDXL-ViT-H the projection model
/// as `resample.*`. Every other weight keeps its fresh initialisation (`pos_embed`,
/// `bg_embed`, `proj_out` zero). A tensor whose shape differs is an error naming it.
/// Returns a summary.
pub fn init_from_pretrained(
    adapter: &mut Adapter,
    faceid: Option<&Path>,
    ip_plus: Option<&Path>,
) -> Result<String> {
    let mut merged: BTreeMap<String, troupe_pt::Tensor> = adapter.tensors().into_iter().collect();
    // (target key, tensor, source file) of every pretrained tensor StoryMaker uses.
    let mut wanted = Vec::new();
    let mut ignored = 0usize;
    if let Some(path) = faceid {
        let ppr = [
            "image_proj_model.proj.",
            "image_proj_model.norm.",
            "image_proj_model.perceiver_resampler.",
        ];
        for (key, t) in AdapterFile::read(path)?.tensors {
            if key.starts_with("ip_adapter.") || ppr.iter().any(|p| key.starts_with(p)) {
                wanted.push((key, t, path));
            } else {
                ignored += 1;
            }
        }
    }
    if let Some(path) = ip_plus {
        for (key, t) in AdapterFile::read(path)?.tensors {
            match key.strip_prefix("image_proj_model.") {
                Some(name) => wanted.push((format!("image_proj_model.resample.{name}"), t, path)),
                None => ignored += 1,
            }
        }
    }
    let mut taken = std::collections::BTreeSet::new();
    for (key, t, file) in wanted {
        match merged.get_mut(&key) {
            Some(slot) if slot.shape == t.shape => {
                *slot = t;
                taken.insert(key);
            }
            Some(slot) => bail!(
                "{}: `{key}` has shape {:?}, the adapter needs {:?} (check model.lora_rank and the base model)",
                file.display(),
                t.shape,
                slot.shape
            ),
            None => ignored += 1,
        }
    }
    // Every tensor a checkpoint is meant to provide must come from it: a gap would silently
    // keep its fresh value.
    let mut sources: Vec<(&Path, Vec<&str>)> = Vec::new();
    if let Some(path) = faceid {
        sources.push((
            path,
            vec![
                "ip_adapter.",
                "image_proj_model.proj.",
                "image_proj_model.norm.",
                "image_proj_model.perceiver_resampler.",
            ],
        ));
    }
    if let Some(path) = ip_plus {
        sources.push((path, vec!["image_proj_model.resample."]));
    }
    for (path, prefixes) in sources {
        let gaps: Vec<&String> = merged
            .keys()
            .filter(|k| prefixes.iter().any(|p| k.starts_with(p)) && !taken.contains(*k))
            .collect();
        if !gaps.is_empty() {
            let shown: Vec<&str> = gaps.iter().take(10).map(|k| k.as_str()).collect();
            bail!(
                "{}: lacks {} tensor(s) the adapter takes from it, e.g. {}",
                path.display(),
                gaps.len(),
                shown.join(", ")
            );
        }
    }
    let count = |prefixes: &[&str]| {
        taken
            .iter()
            .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
            .count()
    };
    let groups = [
        ("processors", count(&["ip_adapter."])),
        (
            "PPR proj/norm/perceiver_resampler",
            count(&[
                "image_proj_model.proj.",
                "image_proj_model.norm.",
                "image_proj_model.perceiver_resampler.",
            ]),
        ),
        ("PPR resample", count(&["image_proj_model.resample."])),
    ];
    let shown: Vec<String> = groups.iter().map(|(g, n)| format!("{g}: {n}")).collect();
    let tensors: Vec<(String, troupe_pt::Tensor)> = merged.into_iter().collect();
    adapter.load_tensors(StateDict::from_tensors(&tensors)?)?;
    Ok(format!(
        "initialised {} tensors from pretrained checkpoints ({}; {ignored} not used)",
        taken.len(),
        shown.join(", ")
    ))
}
