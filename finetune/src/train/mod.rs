//! LoRA training in candle on the layer that serves: the schedule the hyper-parameters imply
//! ([`config`]; the parameters are `protocol::params`), trainable
//! pairs and AdamW ([`params`]), token batches and log-probabilities ([`batch`]) and the loop
//! with checkpoints, early stopping and progress ([`trainer`]).

pub mod batch;
pub mod config;
pub mod params;
pub mod trainer;

pub use config::RunPlan;
