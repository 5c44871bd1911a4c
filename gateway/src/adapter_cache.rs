//! Loaded adapter versions in memory, under a byte budget with least-recently-used eviction.
//! Keyed by (name, version), never by alias, so a moved alias can never serve stale weights.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use adapters::BaseModelShape;
use parking_lot::Mutex;
use runtime::lora::{AdapterWeights, LoraDtype};

use crate::error::ApiError;
use crate::metrics::Metrics;

pub struct AdapterCache {
    budget: usize,
    metrics: Arc<Metrics>,
    shape: BaseModelShape,
    /// Precision the runtime reads loaded versions in.
    dtype: LoraDtype,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<(String, u64), (Arc<AdapterWeights>, u64)>,
    bytes: usize,
    clock: u64,
}

impl AdapterCache {
    pub fn new(budget: usize, shape: BaseModelShape, dtype: LoraDtype, metrics: Arc<Metrics>) -> Self {
        Self { budget, metrics, shape, dtype, inner: Mutex::new(Inner::default()) }
    }

    /// The loaded weights of `name@version`, reading `dir` on a miss.
    pub async fn get(&self, name: &str, version: u64, dir: PathBuf) -> Result<Arc<AdapterWeights>, ApiError> {
        let key = (name.to_owned(), version);
        {
            let mut inner = self.inner.lock();
            inner.clock += 1;
            let now = inner.clock;
            if let Some((weights, used)) = inner.entries.get_mut(&key) {
                *used = now;
                self.metrics.adapter_cache.with_label_values(&["hit"]).inc();
                return Ok(weights.clone());
            }
        }
        self.metrics.adapter_cache.with_label_values(&["miss"]).inc();
        let started = std::time::Instant::now();
        let (shape, dtype) = (self.shape.clone(), self.dtype);
        let weights = tokio::task::spawn_blocking(move || {
            AdapterWeights::load_peft_dir_as(&dir, &shape, &candle_core::Device::Cpu, dtype)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        self.metrics.adapter_load_seconds.observe(started.elapsed().as_secs_f64());
        let weights = Arc::new(weights);
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.bytes += weights.bytes;
        inner.entries.insert(key.clone(), (weights.clone(), now));
        // Evict least recently used versions (never the one just loaded). Running requests keep
        // their own `Arc`, so eviction only drops the cache's reference.
        while inner.bytes > self.budget && inner.entries.len() > 1 {
            let Some(oldest) = inner
                .entries
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((w, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= w.bytes;
                self.metrics.adapter_cache.with_label_values(&["eviction"]).inc();
            }
        }
        Ok(weights)
    }
}
