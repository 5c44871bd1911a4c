//! LoRA training in candle on the layer that serves: hyper-parameters ([`config`]), trainable
//! pairs and AdamW ([`params`]), token batches and log-probabilities ([`batch`]) and the loop
//! with checkpoints, early stopping and progress ([`trainer`]).

pub mod batch;
pub mod config;
pub mod params;
pub mod trainer;

pub use config::{Schedule, Stage, TrainConfig};
