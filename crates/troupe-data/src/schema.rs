//! Shard format v1: one Parquet row per image. `datasets/README.md` is the user-facing spec;
//! this module is its single implementation (column names, Arrow types, metadata keys).

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema};

use crate::error::{DataError, Location};

/// The schema version this build writes. Readers accept exactly the versions in [`KNOWN_VERSIONS`].
pub const SCHEMA_VERSION: u32 = 1;
/// Schema versions this build can read.
pub const KNOWN_VERSIONS: &[u32] = &[1];
/// Parquet key-value metadata key holding the schema version (decimal string).
pub const META_VERSION: &str = "troupe.schema_version";
/// Parquet key-value metadata key naming the program that wrote the shard.
pub const META_PRODUCER: &str = "troupe.producer";
/// Hugging Face `datasets` reads its feature types from this key, so `image`, `mask` and `pose`
/// load as `datasets.Image`.
pub const META_HF: &str = "huggingface";

/// Length of an identity embedding (ArcFace / insightface `normed_embedding`).
pub const EMBEDDING_DIM: usize = 512;
/// Five (x, y) face keypoints: left eye, right eye, nose, left mouth corner, right mouth corner.
pub const KEYPOINTS_LEN: usize = 10;
/// Characters per image.
pub const MAX_CHARACTERS: usize = 3;
/// How far an embedding's L2 norm may be from 1 before `check` flags it.
pub const NORM_TOLERANCE: f32 = 1e-3;

/// Column names, in schema order.
pub mod col {
    pub const ID: &str = "id";
    pub const IMAGE: &str = "image";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    pub const CAPTION: &str = "caption";
    pub const CHARACTERS: &str = "characters";
    pub const POSE: &str = "pose";
    // Fields of one character struct.
    pub const EMBEDDING: &str = "embedding";
    pub const KEYPOINTS: &str = "keypoints";
    pub const MASK: &str = "mask";
    pub const BBOX: &str = "bbox";
    // Fields of the Hugging Face Image struct.
    pub const BYTES: &str = "bytes";
    pub const PATH: &str = "path";
}

/// An encoded image as Hugging Face's `Image` feature stores it: file bytes plus an optional
/// original path (informational only; the bytes are the data).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EncodedImage {
    /// The encoded file (PNG, JPEG or WebP).
    pub bytes: Vec<u8>,
    /// Where the image came from, if known.
    pub path: Option<String>,
}

/// One character (person) in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Character {
    /// L2-normalised identity embedding, [`EMBEDDING_DIM`] floats.
    pub embedding: Vec<f32>,
    /// Five face keypoints as x0, y0, ..., x4, y4 in image pixels.
    pub keypoints: Vec<f32>,
    /// 8-bit grayscale PNG at image size; non-zero pixels belong to the character.
    pub mask: EncodedImage,
    /// Tight bounding box of the mask's non-zero pixels: x0, y0, x1, y1 (x1, y1 exclusive).
    pub bbox: [u32; 4],
}

/// One row of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Unique sample id (stable across re-packing; used in reports and skip logs).
    pub id: String,
    /// The image.
    pub image: EncodedImage,
    /// Image width in pixels (lets buckets be planned without decoding).
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Caption text.
    pub caption: String,
    /// One to three characters, in slot order.
    pub characters: Vec<Character>,
    /// Optional pose image (any size; resized to the training size).
    pub pose: Option<EncodedImage>,
}

fn image_struct_fields() -> Fields {
    Fields::from(vec![
        Field::new(col::BYTES, DataType::Binary, true),
        Field::new(col::PATH, DataType::Utf8, true),
    ])
}

/// The Arrow type of an encoded image column (Hugging Face `Image`).
pub fn image_type() -> DataType {
    DataType::Struct(image_struct_fields())
}

/// The fields of one character struct.
pub fn character_fields() -> Fields {
    let f32_list = DataType::List(Arc::new(Field::new_list_field(DataType::Float32, true)));
    let i32_list = DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true)));
    Fields::from(vec![
        Field::new(col::EMBEDDING, f32_list.clone(), true),
        Field::new(col::KEYPOINTS, f32_list, true),
        Field::new(col::MASK, image_type(), true),
        Field::new(col::BBOX, i32_list, true),
    ])
}

/// The Arrow type of the `characters` column.
pub fn characters_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(
        DataType::Struct(character_fields()),
        true,
    )))
}

/// The Arrow schema of a v1 shard (without file metadata). Every field is nullable because
/// Hugging Face `datasets` only applies its feature types to fields equal to the ones it
/// generates, which are nullable; the reader rejects nulls where a value is required.
pub fn arrow_schema() -> Schema {
    Schema::new(vec![
        Field::new(col::ID, DataType::Utf8, true),
        Field::new(col::IMAGE, image_type(), true),
        Field::new(col::WIDTH, DataType::Int32, true),
        Field::new(col::HEIGHT, DataType::Int32, true),
        Field::new(col::CAPTION, DataType::Utf8, true),
        Field::new(col::CHARACTERS, characters_type(), true),
        Field::new(col::POSE, image_type(), true),
    ])
}

/// The `huggingface` metadata value: feature types for `datasets.load_dataset("parquet", ...)`.
/// Lists are written as one-element JSON lists, a form every `datasets` version understands.
pub fn hf_features_json() -> String {
    let value = |dtype: &str| serde_json::json!({"dtype": dtype, "_type": "Value"});
    let image = serde_json::json!({"_type": "Image"});
    let features = serde_json::json!({
        col::ID: value("string"),
        col::IMAGE: image,
        col::WIDTH: value("int32"),
        col::HEIGHT: value("int32"),
        col::CAPTION: value("string"),
        col::CHARACTERS: [{
            col::EMBEDDING: [value("float32")],
            col::KEYPOINTS: [value("float32")],
            col::MASK: image,
            col::BBOX: [value("int32")],
        }],
        col::POSE: image,
    });
    serde_json::json!({"info": {"features": features}}).to_string()
}

/// Checks of one row that need no image decoding: counts, lengths, finiteness, norms, ranges.
/// Returns every problem found (not just the first), each naming its field.
pub fn validate_fields(sample: &Sample, at: &Location) -> Vec<DataError> {
    let mut errors = Vec::new();
    let mut err =
        |field: String, message: String| errors.push(DataError::new(at.field(field), message));
    if sample.id.is_empty() {
        err(col::ID.into(), "sample id is empty".into());
    }
    if sample.image.bytes.is_empty() {
        err(
            format!("{}.{}", col::IMAGE, col::BYTES),
            "image bytes are missing or empty".into(),
        );
    }
    if sample.width == 0 || sample.height == 0 {
        err(
            format!("{}/{}", col::WIDTH, col::HEIGHT),
            format!(
                "image size must be positive, got {}x{}",
                sample.width, sample.height
            ),
        );
    }
    let n = sample.characters.len();
    if !(1..=MAX_CHARACTERS).contains(&n) {
        err(
            col::CHARACTERS.into(),
            format!("expected 1 to {MAX_CHARACTERS} characters, found {n}"),
        );
    }
    for (i, ch) in sample.characters.iter().enumerate() {
        let field = |name: &str| format!("{}[{i}].{name}", col::CHARACTERS);
        if ch.embedding.len() != EMBEDDING_DIM {
            err(
                field(col::EMBEDDING),
                format!(
                    "expected {EMBEDDING_DIM} values, found {}",
                    ch.embedding.len()
                ),
            );
        } else if let Some(j) = ch.embedding.iter().position(|v| !v.is_finite()) {
            err(
                field(col::EMBEDDING),
                format!("value {j} is not finite ({})", ch.embedding[j]),
            );
        } else {
            let norm = ch.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
            if (norm - 1.0).abs() > NORM_TOLERANCE {
                err(
                    field(col::EMBEDDING),
                    format!(
                        "L2 norm is {norm:.6}, expected 1 ± {NORM_TOLERANCE} (normalise it as insightface's normed_embedding)"
                    ),
                );
            }
        }
        if ch.keypoints.len() != KEYPOINTS_LEN {
            err(
                field(col::KEYPOINTS),
                format!(
                    "expected {KEYPOINTS_LEN} values (5 x,y pairs), found {}",
                    ch.keypoints.len()
                ),
            );
        } else if let Some(j) = ch.keypoints.iter().position(|v| !v.is_finite()) {
            err(
                field(col::KEYPOINTS),
                format!("value {j} is not finite ({})", ch.keypoints[j]),
            );
        } else if sample.width > 0 && sample.height > 0 {
            for (k, p) in ch.keypoints.chunks_exact(2).enumerate() {
                let (x, y) = (p[0], p[1]);
                if x < 0.0 || y < 0.0 || x > sample.width as f32 || y > sample.height as f32 {
                    err(
                        field(col::KEYPOINTS),
                        format!(
                            "keypoint {k} ({x}, {y}) is outside the {}x{} image",
                            sample.width, sample.height
                        ),
                    );
                }
            }
        }
        let [x0, y0, x1, y1] = ch.bbox;
        if x0 >= x1 || y0 >= y1 || x1 > sample.width || y1 > sample.height {
            err(
                field(col::BBOX),
                format!(
                    "bounding box {:?} is empty or outside the {}x{} image",
                    ch.bbox, sample.width, sample.height
                ),
            );
        }
        if ch.mask.bytes.is_empty() {
            err(field(col::MASK), "mask bytes are missing or empty".into());
        }
    }
    if let Some(pose) = &sample.pose
        && pose.bytes.is_empty()
    {
        err(
            format!("{}.{}", col::POSE, col::BYTES),
            "pose struct present but its bytes are empty".into(),
        );
    }
    errors
}
