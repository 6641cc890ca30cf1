//! A character reference from any `troupe sample --reference` form: `SHARD#ROW_ID[:C]`,
//! `image=…,mask=…,embedding=…,keypoints=…`, or a plain photo `photo=IMG,mask=MASK`, whose
//! identity and keypoints come from its largest face (the reference inference code's rule).

use std::path::Path;

use troupe_diffusion::reference::Reference;
use troupe_faces::FaceAnalysis;

use crate::EvalError;
use crate::clip_score::read_image;

fn bad(arg: &str, message: impl Into<String>) -> EvalError {
    EvalError::Input {
        path: arg.to_string(),
        message: message.into(),
    }
}

/// Resolves `arg` (paths relative to `base`); `photo=` needs `faces`.
pub fn resolve(
    arg: &str,
    base: &Path,
    faces: Option<&FaceAnalysis>,
) -> Result<Reference, EvalError> {
    let fields: Vec<(&str, &str)> = arg
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let Some((_, photo)) = fields.iter().find(|(k, _)| *k == "photo") else {
        return Ok(Reference::parse(arg, base)?);
    };
    let Some(fa) = faces else {
        return Err(bad(
            arg,
            "a `photo=` reference needs face models (--face-detector and --face-recognizer)",
        ));
    };
    let mask = fields
        .iter()
        .find(|(k, _)| *k == "mask")
        .ok_or_else(|| bad(arg, "`photo=` needs `mask=`"))?
        .1;
    if let Some((k, _)) = fields.iter().find(|(k, _)| !["photo", "mask"].contains(k)) {
        return Err(bad(
            arg,
            format!("unknown field `{k}` with `photo=` (expected photo, mask)"),
        ));
    }
    let (photo, mask) = (base.join(photo), base.join(mask));
    let image = read_image(&photo)?;
    let mask_img = read_image(&mask)?;
    let face = fa.largest(&image)?.ok_or_else(|| EvalError::Input {
        path: photo.display().to_string(),
        message: "no face found".into(),
    })?;
    let kps: Vec<f32> = face.detection.kps.iter().flatten().copied().collect();
    let source = format!("photo={},mask={}", photo.display(), mask.display());
    let file = photo.display().to_string();
    Ok(Reference::from_parts(
        source,
        image,
        mask_img,
        face.normed_embedding(),
        &kps,
        &file,
    )?)
}
