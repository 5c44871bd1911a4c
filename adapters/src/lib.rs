//! What a LoRA adapter is in Switchyard, and where its versions live.
//!
//! This crate owns:
//! - the PEFT LoRA format ([`peft`]): `adapter_config.json` ([`AdapterConfig`]) and
//!   `adapter_model.safetensors`, tensor naming ([`LoraTensorKey`]), validation against the
//!   served base model ([`validate_adapter_dir`], [`BaseModelShape`], [`Limits`]), writing
//!   ([`write_adapter_dir`]) and the content hash ([`content_hash`]);
//! - the versioned registry ([`registry`]): immutable numbered versions with a
//!   [`Manifest`] each, aliases with promote / compare-and-set / rollback, deletion guarded
//!   by aliases, and an append-only audit log, all behind [`Registry`] whose readers get an
//!   atomically swapped [`Snapshot`].
//!
//! The model that runs adapters (kernels, llama, LoRA maths) is the `runtime` crate's; it
//! depends on this one for the format, never the other way round.
//!
//! Errors are one enum, [`AdapterError`], whose [`AdapterError::code`] strings are stable
//! and whose [`AdapterError::class`] tells the HTTP layer which status family applies.
//!
//! Invariants this crate must keep:
//! - it never imports actix, tokio or anything HTTP, nor any tensor library; the gateway maps
//!   errors to responses;
//! - a published version's files and hash never change (only a manifest's `lineage` and
//!   `metrics` may be updated), and a version number is never reused, even after deletion;
//! - a failed registration leaves disk and snapshot exactly as they were.

mod error;
pub mod peft;
pub mod registry;
#[cfg(test)]
mod test_support;

pub use error::{AdapterError, ErrorClass, Result};
pub use peft::{
    base_matches, content_hash, validate_adapter_bytes, validate_adapter_dir, write_adapter_dir, AdapterConfig,
    BaseModelShape, Limits, LoraModule, LoraPart, LoraTensorKey, TargetModules, ValidatedAdapter,
};
pub use registry::{
    parse_model_ref, AdapterListing, AliasChange, AliasState, AuditAction, AuditRecord, Decision, Evidence, Manifest,
    Registry, Release, ReleasePolicy, ReleaseStatus, Resolved, Route, Selector, ShadowRule, Snapshot, Source,
};
