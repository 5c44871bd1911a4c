//! Reading, writing and hashing the two files of a PEFT adapter directory.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sha2::{Digest, Sha256};

use super::{AdapterConfig, Limits, LoraTensorKey};
use crate::error::{AdapterError, Result};

/// PEFT's config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// No real adapter config comes close to this; it bounds memory spent on hostile uploads.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The raw bytes of an adapter, read once so that what is validated, hashed and copied
/// into the registry is the same data even if the source directory changes meanwhile.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

impl AdapterFiles {
    /// Reads both files from `dir`, refusing files larger than `limits` before reading them.
    pub fn read(dir: &Path, limits: &Limits) -> Result<Self> {
        let config_limit = limits.max_file_bytes.min(MAX_CONFIG_BYTES);
        Ok(Self {
            config: read_limited(&dir.join(CONFIG_FILE), config_limit)?,
            weights: read_limited(&dir.join(WEIGHTS_FILE), limits.max_file_bytes)?,
        })
    }

    /// Total bytes of both files.
    pub fn size_bytes(&self) -> u64 {
        (self.config.len() + self.weights.len()) as u64
    }
}

/// Writes a PEFT-loadable adapter: F32 safetensors plus a config with `peft_type` LORA and
/// `task_type` CAUSAL_LM. Each tensor is `(key, row-major data, shape)`.
pub fn write_adapter_dir(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &[(LoraTensorKey, Vec<f32>, Vec<usize>)],
) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut encoded = Vec::with_capacity(tensors.len());
    for (key, data, shape) in tensors {
        let elements: usize = shape.iter().product();
        if elements != data.len() {
            return Err(AdapterError::invalid(format!(
                "tensor {key} has shape {shape:?} ({elements} elements) but {} values",
                data.len()
            )));
        }
        if !seen.insert(*key) {
            return Err(AdapterError::invalid(format!("tensor {key} given twice")));
        }
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        encoded.push((key.peft_name(), shape.clone(), bytes));
    }
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| AdapterError::invalid(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // transformers' loader expects this metadata key in PyTorch-origin files.
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let weights = safetensors::serialize(views, Some(metadata))
        .map_err(|e| AdapterError::invalid(format!("cannot serialise {WEIGHTS_FILE}: {e}")))?;

    let mut config = config.clone();
    config.peft_type = Some("LORA".to_owned());
    config.task_type.get_or_insert_with(|| "CAUSAL_LM".to_owned());
    let config_json = serde_json::to_vec_pretty(&config)
        .map_err(|e| AdapterError::invalid(format!("cannot serialise {CONFIG_FILE}: {e}")))?;

    fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    for (name, bytes) in [(CONFIG_FILE, &config_json), (WEIGHTS_FILE, &weights)] {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(|e| AdapterError::io(path, e))?;
    }
    Ok(())
}

/// SHA-256 content hash of an adapter directory, as hex.
pub fn content_hash(dir: &Path) -> Result<String> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read(&path).map_err(|e| AdapterError::io(path, e))
    };
    Ok(content_hash_bytes(&read(CONFIG_FILE)?, &read(WEIGHTS_FILE)?))
}

/// The hash behind [`content_hash`]. Each file contributes its name and length before its
/// bytes, so swapping the two files or moving bytes between them changes the hash.
pub fn content_hash_bytes(config: &[u8], weights: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)] {
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex::encode(hasher.finalize())
}

/// Resolves `path` (relative paths are taken from `root`) and checks that it stays inside
/// `root` after following symlinks; the gateway uses this for server-side imports.
pub fn ensure_within(root: &Path, path: &Path) -> Result<PathBuf> {
    let canonical_root = root.canonicalize().map_err(|e| AdapterError::io(root, e))?;
    let joined = canonical_root.join(path);
    let canonical = joined.canonicalize().map_err(|e| {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::NotFound | ErrorKind::NotADirectory => {
                AdapterError::invalid(format!("{} does not exist", path.display()))
            }
            // A NUL byte or an over-long name: the caller's path can never name a file.
            ErrorKind::InvalidInput | ErrorKind::InvalidFilename => {
                AdapterError::invalid(format!("{:?} is not a valid path: {e}", path.display().to_string()))
            }
            _ => AdapterError::io(&joined, e),
        }
    })?;
    if canonical.starts_with(&canonical_root) {
        Ok(canonical)
    } else {
        Err(AdapterError::PathEscape { path: path.to_path_buf(), root: root.to_path_buf() })
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AdapterError::invalid(format!("{} is missing", path.display()))
        } else {
            AdapterError::io(path, e)
        }
    })?;
    let meta = file.metadata().map_err(|e| AdapterError::io(path, e))?;
    if !meta.is_file() {
        return Err(AdapterError::invalid(format!("{} is not a regular file", path.display())));
    }
    let too_large = |actual: u64| AdapterError::TooLarge {
        what: format!("{} (bytes)", path.file_name().unwrap_or_default().to_string_lossy()),
        actual,
        limit,
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    // The file may grow after the metadata check; never read more than the limit allows.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut buf).map_err(|e| AdapterError::io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{tiny_shape, write_tiny_adapter};
    use crate::LoraModule;

    #[test]
    fn hash_is_stable_and_changes_with_any_byte() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_adapter(dir.path(), &tiny_shape(), 2, &[LoraModule::QProj], 1);
        let h1 = content_hash(dir.path()).unwrap();
        assert_eq!(h1.len(), 64);
        assert_eq!(content_hash(dir.path()).unwrap(), h1);

        let path = dir.path().join(WEIGHTS_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_ne!(content_hash(dir.path()).unwrap(), h1);
    }

    #[test]
    fn hash_detects_swapped_files() {
        assert_ne!(content_hash_bytes(b"ab", b"cd"), content_hash_bytes(b"cd", b"ab"));
        assert_ne!(content_hash_bytes(b"abc", b"d"), content_hash_bytes(b"ab", b"cd"));
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_adapter(dir.path(), &tiny_shape(), 2, &[LoraModule::QProj], 1);
        let limits = Limits { max_file_bytes: 64, ..Limits::default() };
        let err = AdapterFiles::read(dir.path(), &limits).unwrap_err();
        assert_eq!(err.code(), "adapter_too_large", "{err}");
    }

    #[test]
    fn missing_file_is_an_invalid_adapter() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CONFIG_FILE), b"{}").unwrap();
        let err = AdapterFiles::read(dir.path(), &Limits::default()).unwrap_err();
        assert_eq!(err.code(), "invalid_adapter");
        assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");
    }

    #[test]
    fn ensure_within_rejects_escapes() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("inside")).unwrap();
        assert!(ensure_within(root.path(), Path::new("inside")).is_ok());
        let err = ensure_within(root.path(), Path::new("inside/../..")).unwrap_err();
        assert_eq!(err.code(), "path_escape");
        let err = ensure_within(root.path(), Path::new("/")).unwrap_err();
        assert_eq!(err.code(), "path_escape");
    }
}
