//! Reading and writing shard files (Parquet, schema in [`crate::schema`]).
//!
//! Writing is atomic per shard (`*.parquet.partial`, then rename) and never overwrites an existing
//! file. Reading validates the schema version and every column type up front, then converts one
//! row group at a time; a bad value in one row is an error for that row only.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, Float32Array, Int32Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{DataError, Location, Result};
use crate::schema::{self, Character, EncodedImage, Sample, col};

/// File name extension of shards.
pub const SHARD_EXTENSION: &str = "parquet";

/// How shards are cut.
#[derive(Debug, Clone)]
pub struct ShardWriterOptions {
    /// A row group closes after this many rows ...
    pub rows_per_row_group: usize,
    /// ... or once its rows hold this many encoded bytes, whichever comes first. A row group is
    /// the unit the loader reads and holds in memory, so this bounds the loader's read size.
    pub bytes_per_row_group: usize,
    /// A shard closes once it holds at least this many bytes ...
    pub shard_bytes: u64,
    /// ... or at least this many rows (checked at row-group boundaries).
    pub shard_rows: u64,
    /// File names are `{prefix}-{index:05}.parquet`.
    pub prefix: String,
    /// Written to the `troupe.producer` metadata key.
    pub producer: String,
}

impl Default for ShardWriterOptions {
    fn default() -> Self {
        Self {
            rows_per_row_group: 64,
            bytes_per_row_group: 32 << 20,
            shard_bytes: 512 << 20,
            shard_rows: u64::MAX,
            prefix: "shard".into(),
            producer: format!("troupe {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A finished shard.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    /// Its path.
    pub path: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
}

/// Writes samples into a sequence of shards in one directory.
pub struct ShardWriter {
    dir: PathBuf,
    options: ShardWriterOptions,
    schema: Arc<Schema>,
    open: Option<OpenShard>,
    pending: Vec<Sample>,
    pending_bytes: usize,
    finished: Vec<ShardInfo>,
}

struct OpenShard {
    writer: ArrowWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    rows: u64,
}

impl ShardWriter {
    /// Starts writing into `dir` (created if missing). Refuses a directory that already holds
    /// shards with the same prefix, so a re-run never overwrites data.
    pub fn new(dir: &Path, options: ShardWriterOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, &e))?;
        let existing = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, &e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| name.starts_with(&format!("{}-", options.prefix)));
        if let Some(name) = existing {
            return Err(DataError::new(
                Location::file(dir.join(&name)),
                "the output directory already holds shards; choose an empty directory (nothing was overwritten)",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            options,
            // The `huggingface` key must sit in the Arrow schema's own metadata: pyarrow (and so
            // `datasets`) reads schema metadata from the embedded Arrow schema.
            schema: Arc::new(
                schema::arrow_schema().with_metadata(
                    [(schema::META_HF.to_string(), schema::hf_features_json())]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                ),
            ),
            open: None,
            pending: Vec::new(),
            pending_bytes: 0,
            finished: Vec::new(),
        })
    }

    /// Adds one sample. The caller validates it first; the writer only stores it.
    pub fn push(&mut self, sample: Sample) -> Result<()> {
        self.pending_bytes += encoded_size(&sample);
        self.pending.push(sample);
        if self.pending.len() >= self.options.rows_per_row_group
            || self.pending_bytes >= self.options.bytes_per_row_group
        {
            self.flush_row_group()?;
        }
        Ok(())
    }

    /// Writes what is pending, closes the last shard and returns every shard written.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.flush_row_group()?;
        self.close_shard()?;
        Ok(self.finished)
    }

    fn flush_row_group(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(self.open_shard()?);
        }
        let shard = self.open.as_mut().expect("opened above");
        let batch = samples_to_batch(&self.pending, self.schema.clone());
        let err = |e: parquet::errors::ParquetError| {
            DataError::new(Location::file(&shard.partial), e.to_string())
        };
        shard.writer.write(&batch).map_err(err)?;
        shard.writer.flush().map_err(err)?;
        shard.rows += self.pending.len() as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        if shard.writer.bytes_written() as u64 >= self.options.shard_bytes
            || shard.rows >= self.options.shard_rows
        {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&self) -> Result<OpenShard> {
        let index = self.finished.len();
        let path = self.dir.join(format!(
            "{}-{index:05}.{SHARD_EXTENSION}",
            self.options.prefix
        ));
        let partial = path.with_extension("parquet.partial");
        let file = File::create(&partial).map_err(|e| DataError::io(&partial, &e))?;
        let kv = vec![
            KeyValue::new(
                schema::META_VERSION.into(),
                schema::SCHEMA_VERSION.to_string(),
            ),
            KeyValue::new(schema::META_PRODUCER.into(), self.options.producer.clone()),
        ];
        // Images are already compressed; snappy only helps the small columns and costs little.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(Some(kv))
            .set_max_row_group_row_count(None)
            .set_created_by(self.options.producer.clone())
            .build();
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))
            .map_err(|e| DataError::new(Location::file(&partial), e.to_string()))?;
        Ok(OpenShard {
            writer,
            partial,
            path,
            rows: 0,
        })
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let file = shard
            .writer
            .into_inner()
            .map_err(|e| DataError::new(Location::file(&shard.partial), e.to_string()))?;
        file.sync_all()
            .map_err(|e| DataError::io(&shard.partial, &e))?;
        let bytes = file
            .metadata()
            .map_err(|e| DataError::io(&shard.partial, &e))?
            .len();
        std::fs::rename(&shard.partial, &shard.path).map_err(|e| DataError::io(&shard.path, &e))?;
        self.finished.push(ShardInfo {
            path: shard.path,
            rows: shard.rows,
            bytes,
        });
        Ok(())
    }
}

fn encoded_size(s: &Sample) -> usize {
    let chars: usize = s
        .characters
        .iter()
        .map(|c| c.mask.bytes.len() + 4 * (c.embedding.len() + 14))
        .sum();
    s.image.bytes.len() + s.caption.len() + chars + s.pose.as_ref().map_or(0, |p| p.bytes.len())
}

fn image_array<'a>(images: impl Iterator<Item = Option<&'a EncodedImage>>) -> StructArray {
    let images: Vec<Option<&EncodedImage>> = images.collect();
    let bytes = BinaryArray::from_iter(images.iter().map(|i| i.map(|i| i.bytes.as_slice())));
    let paths = StringArray::from_iter(images.iter().map(|i| i.and_then(|i| i.path.as_deref())));
    let nulls = NullBuffer::from_iter(images.iter().map(|i| i.is_some()));
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    let DataType::Struct(fields) = schema::image_type() else {
        unreachable!()
    };
    StructArray::new(fields, vec![Arc::new(bytes), Arc::new(paths)], nulls)
}

fn list_array(values: ArrayRef, lengths: impl Iterator<Item = usize>) -> ListArray {
    let field = Arc::new(Field::new_list_field(values.data_type().clone(), true));
    ListArray::new(field, OffsetBuffer::from_lengths(lengths), values, None)
}

fn samples_to_batch(samples: &[Sample], schema: Arc<Schema>) -> RecordBatch {
    let chars: Vec<&Character> = samples.iter().flat_map(|s| &s.characters).collect();
    let f32s = |get: fn(&Character) -> &[f32]| {
        let values =
            Float32Array::from_iter_values(chars.iter().flat_map(|c| get(c).iter().copied()));
        list_array(Arc::new(values), chars.iter().map(|c| get(c).len()))
    };
    let bbox = Int32Array::from_iter_values(chars.iter().flat_map(|c| c.bbox.map(|v| v as i32)));
    let character_struct = StructArray::new(
        schema::character_fields(),
        vec![
            Arc::new(f32s(|c| &c.embedding)),
            Arc::new(f32s(|c| &c.keypoints)),
            Arc::new(image_array(chars.iter().map(|c| Some(&c.mask)))),
            Arc::new(list_array(Arc::new(bbox), chars.iter().map(|_| 4))),
        ],
        None,
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            samples.iter().map(|s| s.id.as_str()),
        )),
        Arc::new(image_array(samples.iter().map(|s| Some(&s.image)))),
        Arc::new(Int32Array::from_iter_values(
            samples.iter().map(|s| s.width as i32),
        )),
        Arc::new(Int32Array::from_iter_values(
            samples.iter().map(|s| s.height as i32),
        )),
        Arc::new(StringArray::from_iter_values(
            samples.iter().map(|s| s.caption.as_str()),
        )),
        Arc::new(list_array(
            Arc::new(character_struct),
            samples.iter().map(|s| s.characters.len()),
        )),
        Arc::new(image_array(samples.iter().map(|s| s.pose.as_ref()))),
    ];
    RecordBatch::try_new(schema, columns).expect("arrays are built to the schema")
}

/// An open shard: metadata read and validated, rows read on demand one row group at a time.
pub struct ShardReader {
    path: PathBuf,
    file: File,
    metadata: ArrowReaderMetadata,
    row_group_starts: Vec<u64>,
    version: u32,
    producer: Option<String>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("rows", &self.num_rows())
            .finish()
    }
}

/// One row read from a shard: its row number in the file and the sample, or why it is unusable.
pub type RowRead = (u64, Result<Sample>);

impl ShardReader {
    /// Opens a shard, reads its footer and checks the schema version and every column type.
    pub fn open(path: &Path) -> Result<Self> {
        let at = Location::file(path);
        let file = File::open(path).map_err(|e| DataError::io(path, &e))?;
        let metadata =
            ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| {
                DataError::new(
                    at.clone(),
                    format!("not a readable Parquet file (truncated or corrupt?): {e}"),
                )
            })?;
        let kv = metadata.metadata().file_metadata().key_value_metadata();
        let get = |key: &str| {
            kv.and_then(|kv| kv.iter().find(|e| e.key == key))
                .and_then(|e| e.value.clone())
        };
        let version = match get(schema::META_VERSION) {
            None => {
                return Err(DataError::new(
                    at,
                    format!(
                        "no `{}` metadata: not a troupe shard (write shards with `troupe data pack`)",
                        schema::META_VERSION
                    ),
                ));
            }
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|v| schema::KNOWN_VERSIONS.contains(v))
                .ok_or_else(|| {
                    DataError::new(
                        at.clone(),
                        format!(
                            "shard schema version `{v}` is not known to this build (it reads {:?})",
                            schema::KNOWN_VERSIONS
                        ),
                    )
                })?,
        };
        check_columns(metadata.schema(), &at)?;
        let file_len = file.metadata().map_err(|e| DataError::io(path, &e))?.len();
        let mut row_group_starts = vec![0u64];
        for (g, rg) in metadata.metadata().row_groups().iter().enumerate() {
            // The parquet reader asserts (panics) on negative offsets and sizes: a damaged
            // footer must be an error instead.
            for c in rg.columns() {
                let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
                let len = c.compressed_size();
                let fits = start >= 0
                    && len >= 0
                    && (start as u64)
                        .checked_add(len as u64)
                        .is_some_and(|end| end <= file_len);
                if !fits {
                    return Err(DataError::new(
                        at,
                        format!(
                            "row group {g}, column `{}`: the footer places its data at {start}+{len}, outside the file's {file_len} bytes (corrupt or truncated file?)",
                            c.column_path()
                        ),
                    ));
                }
            }
            let rows = u64::try_from(rg.num_rows()).map_err(|_| {
                DataError::new(
                    at.clone(),
                    format!("row group {g} has {} rows", rg.num_rows()),
                )
            })?;
            row_group_starts.push(row_group_starts.last().unwrap() + rows);
        }
        let producer = get(schema::META_PRODUCER);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
            row_group_starts,
            version,
            producer,
        })
    }

    /// The shard's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Schema version from the metadata.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Producer string from the metadata, if any.
    pub fn producer(&self) -> Option<&str> {
        self.producer.as_deref()
    }

    /// Rows in the shard.
    pub fn num_rows(&self) -> u64 {
        *self.row_group_starts.last().unwrap()
    }

    /// Row groups in the shard.
    pub fn num_row_groups(&self) -> usize {
        self.row_group_starts.len() - 1
    }

    /// First row and row count of row group `g`.
    pub fn row_group_span(&self, g: usize) -> (u64, u64) {
        (
            self.row_group_starts[g],
            self.row_group_starts[g + 1] - self.row_group_starts[g],
        )
    }

    fn read_batches(
        &self,
        row_groups: Vec<usize>,
        projection: Option<&[&str]>,
    ) -> Result<Vec<RecordBatch>> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| DataError::io(&self.path, &e))?;
        let mut builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                .with_row_groups(row_groups.clone())
                .with_batch_size(1 << 16);
        if let Some(names) = projection {
            let roots: Vec<usize> = names
                .iter()
                .map(|n| self.metadata.schema().index_of(n).expect("checked in open"))
                .collect();
            let mask = ProjectionMask::roots(self.metadata.parquet_schema(), roots);
            builder = builder.with_projection(mask);
        }
        let fail = |e: &dyn std::fmt::Display| {
            let (first, _) = self.row_group_span(row_groups[0]);
            DataError::new(
                Location::file(&self.path),
                format!(
                    "cannot read row group(s) {row_groups:?} (rows from {first}; corrupt or truncated file?): {e}"
                ),
            )
        };
        decoding(&self.path, || {
            let reader = builder.build().map_err(|e| fail(&e))?;
            reader
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| fail(&e))
        })
    }

    /// Reads row group `g`: one entry per row, with its row number in the file.
    /// A file-level failure (corrupt pages) is an `Err`; a bad value is an `Err` for its row only.
    pub fn read_row_group(&self, g: usize) -> Result<Vec<RowRead>> {
        let (mut row, _) = self.row_group_span(g);
        let mut out = Vec::new();
        for batch in self.read_batches(vec![g], None)? {
            let cols = Columns::new(&batch);
            for i in 0..batch.num_rows() {
                out.push((row, cols.sample(i, &Location::row(&self.path, row))));
                row += 1;
            }
        }
        Ok(out)
    }

    /// The number of characters of every row, read from the list structure of one small leaf
    /// (`characters[].bbox`), not the embeddings or masks. A null list counts as 0.
    pub fn read_character_counts(&self) -> Result<Vec<usize>> {
        let groups = (0..self.num_row_groups()).collect::<Vec<_>>();
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let schema = self.metadata.parquet_schema();
        let leaf = (0..schema.num_columns()).find(|&i| {
            let column = schema.column(i);
            let parts = column.path().parts();
            parts.first().map(String::as_str) == Some(col::CHARACTERS)
                && parts.iter().any(|p| p == col::BBOX)
        });
        let Some(leaf) = leaf else {
            return Err(DataError::new(
                Location::file(&self.path).field(col::CHARACTERS),
                "no `bbox` field in the characters column",
            ));
        };
        let file = self
            .file
            .try_clone()
            .map_err(|e| DataError::io(&self.path, &e))?;
        let fail = |e: &dyn std::fmt::Display| {
            DataError::new(
                Location::file(&self.path).field(col::CHARACTERS),
                format!("cannot read the character lists (corrupt or truncated file?): {e}"),
            )
        };
        let builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                .with_row_groups(groups)
                .with_batch_size(1 << 16)
                .with_projection(ProjectionMask::leaves(schema, [leaf]));
        let batches = decoding(&self.path, || {
            builder
                .build()
                .map_err(|e| fail(&e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| fail(&e))
        })?;
        let mut out = Vec::with_capacity(self.num_rows() as usize);
        for batch in batches {
            let lists = batch
                .column(0)
                .as_any()
                .downcast_ref::<ListArray>()
                .ok_or_else(|| fail(&"`characters` is not a list"))?;
            for i in 0..lists.len() {
                out.push(if lists.is_null(i) {
                    0
                } else {
                    lists.value_length(i) as usize
                });
            }
        }
        Ok(out)
    }

    /// Reads only the `width` and `height` columns of every row (for planning buckets without
    /// decoding images). A null or non-positive size is an error naming its row.
    pub fn read_sizes(&self) -> Result<Vec<(u32, u32)>> {
        let groups = (0..self.num_row_groups()).collect::<Vec<_>>();
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(self.num_rows() as usize);
        for batch in self.read_batches(groups, Some(&[col::WIDTH, col::HEIGHT]))? {
            let w = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int32Array>()
                .expect("checked type");
            let h = batch
                .column(1)
                .as_any()
                .downcast_ref::<Int32Array>()
                .expect("checked type");
            for i in 0..batch.num_rows() {
                let row = out.len() as u64;
                let at = Location::row(&self.path, row);
                let get = |a: &Int32Array, name: &str| -> Result<u32> {
                    if a.is_null(i) || a.value(i) <= 0 {
                        let v = if a.is_null(i) {
                            "null".to_string()
                        } else {
                            a.value(i).to_string()
                        };
                        return Err(DataError::new(
                            at.field(name),
                            format!("image size must be a positive integer, got {v}"),
                        ));
                    }
                    Ok(a.value(i) as u32)
                };
                out.push((get(w, col::WIDTH)?, get(h, col::HEIGHT)?));
            }
        }
        Ok(out)
    }
}

/// Runs parquet decoding work. The `parquet` crate asserts (panics) on some corrupt pages
/// instead of returning an error; such a panic becomes an error naming the file, and the panic
/// message is not printed.
fn decoding<T>(path: &Path, work: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::error::catch_quietly(work).unwrap_or_else(|why| {
        Err(DataError::new(
            Location::file(path),
            format!("corrupt data pages (the Parquet decoder failed: {why})"),
        ))
    })
}

/// Column types compared by shape: nullability and list item names are ignored, so files written
/// by pyarrow or `datasets` with the same logical types read too.
fn same_shape(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => same_shape(x.data_type(), y.data_type()),
        (DataType::Struct(x), DataType::Struct(y)) => y.iter().all(|fy| {
            x.iter()
                .any(|fx| fx.name() == fy.name() && same_shape(fx.data_type(), fy.data_type()))
        }),
        _ => a == b,
    }
}

fn check_columns(actual: &Schema, at: &Location) -> Result<()> {
    for expected in schema::arrow_schema().fields() {
        let Ok(found) = actual.field_with_name(expected.name()) else {
            return Err(DataError::new(
                at.field(expected.name()),
                "required column is missing",
            ));
        };
        if !same_shape(found.data_type(), expected.data_type()) {
            return Err(DataError::new(
                at.field(expected.name()),
                format!(
                    "column has type {}, expected {}",
                    found.data_type(),
                    expected.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// Typed views of one record batch's columns.
struct Columns<'a> {
    id: &'a StringArray,
    image: &'a StructArray,
    width: &'a Int32Array,
    height: &'a Int32Array,
    caption: &'a StringArray,
    characters: &'a ListArray,
    pose: &'a StructArray,
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .expect("column types checked on open")
}

fn child<'a, T: 'static>(s: &'a StructArray, name: &str) -> &'a T {
    s.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .expect("column types checked on open")
}

fn image_at(s: &StructArray, i: usize, at: &Location, field: &str) -> Result<Option<EncodedImage>> {
    if s.is_null(i) {
        return Ok(None);
    }
    let bytes = child::<BinaryArray>(s, col::BYTES);
    let paths = child::<StringArray>(s, col::PATH);
    if bytes.is_null(i) {
        return Err(DataError::new(
            at.field(format!("{field}.{}", col::BYTES)),
            "image bytes are null (troupe shards embed image bytes, not paths)",
        ));
    }
    let path = (!paths.is_null(i)).then(|| paths.value(i).to_string());
    Ok(Some(EncodedImage {
        bytes: bytes.value(i).to_vec(),
        path,
    }))
}

fn f32_list(list: &ListArray, i: usize, at: &Location, field: &str) -> Result<Vec<f32>> {
    if list.is_null(i) {
        return Err(DataError::new(at.field(field), "value is null"));
    }
    let values = list.value(i);
    let values = values
        .as_any()
        .downcast_ref::<Float32Array>()
        .expect("checked type");
    if values.null_count() > 0 {
        return Err(DataError::new(at.field(field), "list contains nulls"));
    }
    Ok(values.values().to_vec())
}

impl<'a> Columns<'a> {
    fn new(batch: &'a RecordBatch) -> Self {
        Self {
            id: column(batch, col::ID),
            image: column(batch, col::IMAGE),
            width: column(batch, col::WIDTH),
            height: column(batch, col::HEIGHT),
            caption: column(batch, col::CAPTION),
            characters: column(batch, col::CHARACTERS),
            pose: column(batch, col::POSE),
        }
    }

    fn sample(&self, i: usize, at: &Location) -> Result<Sample> {
        let null = |name: &str| DataError::new(at.field(name), "value is null");
        let string = |a: &StringArray, name: &str| {
            if a.is_null(i) {
                Err(null(name))
            } else {
                Ok(a.value(i).to_string())
            }
        };
        let size = |a: &Int32Array, name: &str| -> Result<u32> {
            if a.is_null(i) {
                return Err(null(name));
            }
            u32::try_from(a.value(i)).map_err(|_| {
                DataError::new(at.field(name), format!("negative size {}", a.value(i)))
            })
        };
        let image = image_at(self.image, i, at, col::IMAGE)?.ok_or_else(|| null(col::IMAGE))?;
        if self.characters.is_null(i) {
            return Err(null(col::CHARACTERS));
        }
        let chars = self.characters.value(i);
        let chars = chars
            .as_any()
            .downcast_ref::<StructArray>()
            .expect("checked type");
        let embeddings = child::<ListArray>(chars, col::EMBEDDING);
        let keypoints = child::<ListArray>(chars, col::KEYPOINTS);
        let masks = child::<StructArray>(chars, col::MASK);
        let bboxes = child::<ListArray>(chars, col::BBOX);
        let mut characters = Vec::with_capacity(chars.len());
        for c in 0..chars.len() {
            let field = |name: &str| format!("{}[{c}].{name}", col::CHARACTERS);
            if chars.is_null(c) {
                return Err(DataError::new(
                    at.field(format!("{}[{c}]", col::CHARACTERS)),
                    "character is null",
                ));
            }
            let bbox = if bboxes.is_null(c) {
                return Err(null(&field(col::BBOX)));
            } else {
                let v = bboxes.value(c);
                let v = v
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .expect("checked type");
                if v.len() != 4 || v.null_count() > 0 || v.values().iter().any(|&x| x < 0) {
                    return Err(DataError::new(
                        at.field(field(col::BBOX)),
                        format!(
                            "expected 4 non-negative integers x0, y0, x1, y1, found {:?}",
                            v.values()
                        ),
                    ));
                }
                [
                    v.value(0) as u32,
                    v.value(1) as u32,
                    v.value(2) as u32,
                    v.value(3) as u32,
                ]
            };
            characters.push(Character {
                embedding: f32_list(embeddings, c, at, &field(col::EMBEDDING))?,
                keypoints: f32_list(keypoints, c, at, &field(col::KEYPOINTS))?,
                mask: image_at(masks, c, at, &field(col::MASK))?
                    .ok_or_else(|| null(&field(col::MASK)))?,
                bbox,
            });
        }
        Ok(Sample {
            id: string(self.id, col::ID)?,
            image,
            width: size(self.width, col::WIDTH)?,
            height: size(self.height, col::HEIGHT)?,
            caption: string(self.caption, col::CAPTION)?,
            characters,
            pose: image_at(self.pose, i, at, col::POSE)?,
        })
    }
}

/// Expands paths (shard files or folders of shards) into a sorted list of shard files.
/// A folder contributes its `*.parquet` files (not recursively); an empty result is an error.
pub fn find_shards(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, &e))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| DataError::io(path, &e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == SHARD_EXTENSION) && p.is_file())
                .collect();
            if found.is_empty() {
                return Err(DataError::new(
                    Location::file(path),
                    "folder holds no *.parquet shards",
                ));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}
