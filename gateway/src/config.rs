//! Configuration: CLI flags, then `SWITCHYARD_*` env vars, then an optional TOML file, then
//! defaults; validated once into [`Settings`]. A bad setting stops start-up naming the setting.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Served at `/v1/embeddings` when this directory exists and no `embed_model` is set.
pub const DEFAULT_EMBED_MODEL_PATH: &str = "models/all-MiniLM-L6-v2";

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "OpenAI-compatible gateway for local models and LoRA adapters")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the model and serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Sign an HS256 token for development and tests.
    MintToken(MintArgs),
    /// Print the OpenAPI spec (the committed copy is openapi/openapi.json).
    Openapi,
    /// Print the SHA-256 of an API key, as the API key file stores it.
    HashApiKey {
        /// The key to hash.
        key: String,
    },
}

#[derive(Debug, Args)]
pub struct MintArgs {
    /// The shared secret the gateway verifies with.
    #[arg(long, env = "SWITCHYARD_JWT_HS256_SECRET", hide_env_values = true)]
    pub secret: String,
    #[arg(long)]
    pub sub: String,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    #[arg(long, value_enum, default_value = "user")]
    pub role: RoleArg,
    /// Models or adapters the token may use (patterns like `support-*`); all when absent.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Requests per minute for this token (overrides the server default).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute for this token.
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Concurrent streams for this token.
    #[arg(long)]
    pub max_streams: Option<u32>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    pub ttl_seconds: u64,
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    pub issuer: Option<String>,
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    User,
    Labeller,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
pub enum JwksAlgorithm {
    #[serde(rename = "RS256")]
    #[value(name = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    #[value(name = "ES256")]
    Es256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Our own candle engine: per-request LoRA adapters on a shared base, continuous batching.
    Candle,
    /// mistralrs: the reference backend; serves the base model only.
    Mistralrs,
    /// No model: answers at once with the prompt's last message (gateway benchmarks, client
    /// development).
    Echo,
}

/// Every setting is optional here so that the file and defaults can fill the gaps.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the long flags, with underscores).
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "SWITCHYARD_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080].
    #[arg(long, env = "SWITCHYARD_PORT")]
    pub port: Option<u16>,
    /// A GGUF file or an HF directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: Option<PathBuf>,
    /// The name clients use in `model` [default: derived from the file name].
    #[arg(long, env = "SWITCHYARD_MODEL_ID")]
    pub model_id: Option<String>,
    /// A sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json)
    /// served at `/v1/embeddings` under the directory's name; `off` turns embeddings off
    /// [default: models/all-MiniLM-L6-v2 if that directory exists, else off].
    #[arg(long, env = "SWITCHYARD_EMBED_MODEL")]
    pub embed_model: Option<PathBuf>,
    /// Completion logging for feedback: `on`, `off`, or `redact` (message text removed)
    /// [default: on].
    #[arg(long, env = "SWITCHYARD_FEEDBACK_LOG")]
    pub feedback_log: Option<crate::feedback::LogMode>,
    /// Size in MiB at which the completion log starts a new file [default: 64].
    #[arg(long, env = "SWITCHYARD_FEEDBACK_ROTATE_MB")]
    pub feedback_rotate_mb: Option<u64>,
    /// Threads the candle engine splits its matmuls across [default: every core].
    #[arg(long, env = "SWITCHYARD_THREADS")]
    pub threads: Option<usize>,
    /// Serve `/metrics` on this address (`host:port`) instead of the API port.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Which engine serves the model [default: candle].
    #[arg(long, env = "SWITCHYARD_ENGINE")]
    pub engine: Option<EngineKind>,
    /// How often running releases are judged on their live evidence, in milliseconds
    /// [default: 5000].
    #[arg(long, env = "SWITCHYARD_RELEASE_TICK_MS")]
    pub release_tick_ms: Option<u64>,
    /// Generations running at once; more get 429 [default: 32].
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT")]
    pub max_concurrent: Option<usize>,
    /// Largest accepted request body in bytes [default: 4194304].
    #[arg(long, env = "SWITCHYARD_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Largest `max_tokens` a request may ask for [default: 4096].
    #[arg(long, env = "SWITCHYARD_MAX_TOKENS")]
    pub max_tokens: Option<usize>,
    /// Most messages in one chat request [default: 512].
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGES")]
    pub max_messages: Option<usize>,
    /// Cap on the model's context length in tokens [default: the model's own].
    #[arg(long, env = "SWITCHYARD_CONTEXT_LEN")]
    pub context_len: Option<usize>,
    /// Log format [default: text].
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Directory for all of the gateway's state (the adapter registry lives in `registry/`)
    /// [default: ./data].
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token for the admin API; the admin API is off without it.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Key that signs console session cookies; replicas behind one address need the same one
    /// [default: derived from the admin token, else random per process].
    #[arg(long, env = "SWITCHYARD_CONSOLE_SECRET", hide_env_values = true)]
    pub console_secret: Option<String>,
    /// Directory under which `POST /admin/adapters/{name}/versions {"path": ..}` may import.
    #[arg(long, env = "SWITCHYARD_IMPORT_ROOT")]
    pub import_root: Option<PathBuf>,
    /// Memory budget for loaded adapter versions, in MiB [default: 512].
    #[arg(long, env = "SWITCHYARD_ADAPTER_CACHE_MB")]
    pub adapter_cache_mb: Option<usize>,
    /// Precision the candle engine reads adapters' LoRA weights in: `bf16` (half the memory
    /// traffic; like vLLM and LoRAX, which serve adapters in a half-precision model dtype; the
    /// rounding is far below the 4-bit base's own) or `f32` (exactly the merged weights)
    /// [default: bf16].
    #[arg(long, env = "SWITCHYARD_LORA_DTYPE")]
    pub lora_dtype: Option<runtime::lora::LoraDtype>,
    /// What the candle engine's decode steps multiply the 4- and 8-bit weights against: `f32`
    /// (exact: a dense matmul up to the order of additions) or `q8` (activations rounded to 8
    /// bits per block of 32 and integer dot products, as llama.cpp does: faster batches on
    /// CPUs without AVX-512, but logits move by a few tenths and greedy answers can change)
    /// [default: f32].
    #[arg(long, env = "SWITCHYARD_ACTIVATIONS")]
    pub activations: Option<runtime::kernels::Activations>,
    /// Memory for the candle engine's prompt prefix cache, in MiB: prompts that start like a
    /// recent prompt or conversation (same adapter version) copy those keys and values
    /// instead of computing them; 0 turns it off [default: 128].
    #[arg(long, env = "SWITCHYARD_PREFIX_CACHE_MB")]
    pub prefix_cache_mb: Option<usize>,
    /// Authentication: `on` (the default) or `off` (explicitly; start-up warns loudly).
    #[arg(long, env = "SWITCHYARD_AUTH")]
    pub auth: Option<AuthMode>,
    /// HS256 shared secret for bearer JWTs.
    #[arg(long, env = "SWITCHYARD_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// RS256 public key (PEM) for bearer JWTs.
    #[arg(long, env = "SWITCHYARD_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// ES256 public key (PEM) for bearer JWTs.
    #[arg(long, env = "SWITCHYARD_JWT_ES256_PUBLIC_KEY")]
    pub jwt_es256_public_key: Option<PathBuf>,
    /// JWKS file with the public keys for bearer JWTs (selected by `kid`).
    #[arg(long, env = "SWITCHYARD_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// The one algorithm the JWKS keys are used with [default: RS256].
    #[arg(long, env = "SWITCHYARD_JWT_JWKS_ALGORITHM")]
    pub jwt_jwks_algorithm: Option<JwksAlgorithm>,
    /// Required `iss` claim.
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// JSON list of static API keys: `[{"sha256": .., "sub": .., "tenant": .., "role": .., "models": [..]}]`.
    #[arg(long, env = "SWITCHYARD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Redis for sharing state across replicas (e.g. redis://127.0.0.1:6379); none: local only.
    #[arg(long, env = "SWITCHYARD_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Requests per minute per caller; 0 = unlimited [default: 0].
    #[arg(long, env = "SWITCHYARD_RATE_LIMIT_RPM")]
    pub rate_limit_rpm: Option<u32>,
    /// Prompt + completion tokens per minute per caller; 0 = unlimited [default: 0].
    #[arg(long, env = "SWITCHYARD_RATE_LIMIT_TPM")]
    pub rate_limit_tpm: Option<u32>,
    /// Concurrent streams per caller; 0 = unlimited [default: 0].
    #[arg(long, env = "SWITCHYARD_MAX_STREAMS_PER_KEY")]
    pub max_streams_per_key: Option<u32>,
    /// When Redis does not answer: `open` keeps serving under local limits, `closed` refuses
    /// [default: open].
    #[arg(long, env = "SWITCHYARD_RATE_LIMIT_REDIS_FAILURE")]
    pub rate_limit_redis_failure: Option<FailMode>,
    /// Seconds that in-flight requests and streams get to finish after SIGTERM/SIGINT
    /// [default: 30].
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// HTTP worker threads [default: 2].
    #[arg(long, env = "SWITCHYARD_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
}

/// Validated settings; everything downstream reads only these.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub model_path: PathBuf,
    pub model_id: String,
    /// `None`: no embedding model, `/v1/embeddings` answers 404 for every model.
    pub embed_model: Option<PathBuf>,
    pub engine: EngineKind,
    /// 0: every core.
    pub threads: usize,
    pub feedback_log: crate::feedback::LogMode,
    pub feedback_rotate_bytes: u64,
    /// `None`: `/metrics` is on the API port.
    pub metrics_listen: Option<String>,
    pub max_concurrent: usize,
    pub release_tick: std::time::Duration,
    pub body_limit: usize,
    pub max_tokens: usize,
    pub max_messages: usize,
    pub context_len: Option<usize>,
    pub log_format: LogFormat,
    pub http_workers: usize,
    pub data_dir: PathBuf,
    pub admin_token: Option<String>,
    pub console_secret: Option<String>,
    pub import_root: Option<PathBuf>,
    pub adapter_cache_bytes: usize,
    pub lora_dtype: runtime::lora::LoraDtype,
    pub prefix_cache_bytes: usize,
    pub activations: runtime::kernels::Activations,
    pub redis: Option<redis::Client>,
    pub shutdown_timeout: u64,
    pub limits: crate::limits::Limits,
    pub redis_failure: crate::limits::RedisFailure,
    /// `None`: auth switched off explicitly.
    pub auth: Option<std::sync::Arc<crate::auth::Authenticator>>,
}

impl ServeArgs {
    /// Fills unset values from the config file, then turns everything into settings.
    pub fn into_settings(self) -> Result<Settings, String> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => ServeArgs::default(),
        };
        let model_path = self.model.or(file.model).unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_PATH));
        let engine = self.engine.or(file.engine).unwrap_or(EngineKind::Candle);
        let model_id = match self.model_id.or(file.model_id) {
            Some(id) => id,
            None if engine == EngineKind::Echo => "echo".to_owned(),
            None => derive_model_id(&model_path),
        };
        let settings = Settings {
            host: self.host.or(file.host).unwrap_or_else(|| "127.0.0.1".to_owned()),
            port: self.port.or(file.port).unwrap_or(8080),
            model_path,
            model_id,
            embed_model: embed_model(self.embed_model.or(file.embed_model))?,
            engine,
            threads: self.threads.or(file.threads).unwrap_or(0),
            feedback_log: self.feedback_log.or(file.feedback_log).unwrap_or(crate::feedback::LogMode::On),
            feedback_rotate_bytes: self.feedback_rotate_mb.or(file.feedback_rotate_mb).unwrap_or(64).max(1) << 20,
            metrics_listen: self.metrics_listen.or(file.metrics_listen).filter(|a| !a.is_empty()),
            max_concurrent: self.max_concurrent.or(file.max_concurrent).unwrap_or(32),
            release_tick: std::time::Duration::from_millis(
                self.release_tick_ms.or(file.release_tick_ms).unwrap_or(5000).max(50),
            ),
            body_limit: self.body_limit.or(file.body_limit).unwrap_or(4 << 20),
            max_tokens: self.max_tokens.or(file.max_tokens).unwrap_or(4096),
            max_messages: self.max_messages.or(file.max_messages).unwrap_or(512),
            context_len: self.context_len.or(file.context_len),
            log_format: self.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            http_workers: self.http_workers.or(file.http_workers).unwrap_or(2),
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("data")),
            admin_token: self.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            console_secret: self.console_secret.or(file.console_secret).filter(|t| !t.is_empty()),
            import_root: self.import_root.or(file.import_root),
            adapter_cache_bytes: self.adapter_cache_mb.or(file.adapter_cache_mb).unwrap_or(512) << 20,
            lora_dtype: self.lora_dtype.or(file.lora_dtype).unwrap_or(runtime::lora::LoraDtype::Bf16),
            prefix_cache_bytes: self.prefix_cache_mb.or(file.prefix_cache_mb).unwrap_or(128) << 20,
            activations: self.activations.or(file.activations).unwrap_or_default(),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(30),
            limits: crate::limits::Limits {
                rpm: self.rate_limit_rpm.or(file.rate_limit_rpm).unwrap_or(0),
                tpm: self.rate_limit_tpm.or(file.rate_limit_tpm).unwrap_or(0),
                max_streams: self.max_streams_per_key.or(file.max_streams_per_key).unwrap_or(0),
            },
            redis_failure: match self
                .rate_limit_redis_failure
                .or(file.rate_limit_redis_failure)
                .unwrap_or(FailMode::Open)
            {
                FailMode::Open => crate::limits::RedisFailure::Open,
                FailMode::Closed => crate::limits::RedisFailure::Closed,
            },
            auth: match self.auth.or(file.auth).unwrap_or(AuthMode::On) {
                AuthMode::Off => None,
                AuthMode::On => {
                    Some(std::sync::Arc::new(crate::auth::Authenticator::new(&crate::auth::AuthSettings {
                        hs256_secret: self.jwt_hs256_secret.or(file.jwt_hs256_secret).filter(|s| !s.is_empty()),
                        rs256_public_key: self.jwt_rs256_public_key.or(file.jwt_rs256_public_key),
                        es256_public_key: self.jwt_es256_public_key.or(file.jwt_es256_public_key),
                        jwks_file: self.jwt_jwks_file.or(file.jwt_jwks_file),
                        jwks_algorithm: self.jwt_jwks_algorithm.or(file.jwt_jwks_algorithm).map(|a| match a {
                            JwksAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
                            JwksAlgorithm::Es256 => jsonwebtoken::Algorithm::ES256,
                        }),
                        issuer: self.jwt_issuer.or(file.jwt_issuer),
                        audience: self.jwt_audience.or(file.jwt_audience),
                        api_keys_file: self.api_keys_file.or(file.api_keys_file),
                    })?))
                }
            },
            redis: match self.redis_url.or(file.redis_url).filter(|u| !u.is_empty()) {
                None => None,
                Some(url) => Some(redis::Client::open(url.as_str()).map_err(|e| {
                    format!("setting redis_url (SWITCHYARD_REDIS_URL) {url:?} is not a Redis URL: {e}")
                })?),
            },
        };
        settings.check()?;
        Ok(settings)
    }
}

impl Settings {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_concurrent (SWITCHYARD_MAX_CONCURRENT)", self.max_concurrent),
            ("max_tokens (SWITCHYARD_MAX_TOKENS)", self.max_tokens),
            ("max_messages (SWITCHYARD_MAX_MESSAGES)", self.max_messages),
            ("http_workers (SWITCHYARD_HTTP_WORKERS)", self.http_workers),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("setting {name} must be at least 1"));
            }
        }
        if self.body_limit < 1024 {
            return Err(format!(
                "setting body_limit (SWITCHYARD_BODY_LIMIT) must be at least 1024, got {}",
                self.body_limit
            ));
        }
        if self.context_len == Some(0) {
            return Err("setting context_len (SWITCHYARD_CONTEXT_LEN) must be at least 1".to_owned());
        }
        if self.model_id.trim().is_empty() {
            return Err("setting model_id (SWITCHYARD_MODEL_ID) must not be empty".to_owned());
        }
        Ok(())
    }
}

/// An explicit directory must hold a model; the default is used only when it does.
fn embed_model(setting: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    let is_model = |p: &Path| p.join("config.json").is_file();
    match setting {
        Some(p) if p.as_os_str().is_empty() || p == Path::new("off") => Ok(None),
        Some(p) if is_model(&p) => Ok(Some(p)),
        Some(p) => Err(format!(
            "setting embed_model (SWITCHYARD_EMBED_MODEL) {}: not a model directory (no config.json there)",
            p.display()
        )),
        None => Ok(Some(PathBuf::from(DEFAULT_EMBED_MODEL_PATH)).filter(|p| is_model(p))),
    }
}

fn read_file(path: &Path) -> Result<ServeArgs, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("config file {} cannot be read: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// `models/SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`.
fn derive_model_id(path: &Path) -> String {
    let stem = path.file_name().and_then(|s| s.to_str()).unwrap_or("model");
    let stem = stem.strip_suffix(".gguf").unwrap_or(stem);
    let stem = match stem.rsplit_once('.') {
        Some((head, quant)) if quant.starts_with('Q') || quant.starts_with('F') => head,
        _ => stem,
    };
    stem.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_comes_from_the_file_name() {
        assert_eq!(derive_model_id(Path::new(DEFAULT_MODEL_PATH)), "smollm2-135m-instruct");
        assert_eq!(derive_model_id(Path::new("/m/tiny-llama")), "tiny-llama");
    }

    #[test]
    fn file_fills_gaps_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "port = 9000\nmax_concurrent = 3\n").unwrap();
        let args = ServeArgs { config: Some(path), port: Some(9100), auth: Some(AuthMode::Off), ..Default::default() };
        let s = args.into_settings().unwrap();
        assert_eq!((s.port, s.max_concurrent), (9100, 3));
    }

    #[test]
    fn lora_dtype_defaults_to_bf16_and_takes_f32_from_flag_or_file() {
        use runtime::lora::LoraDtype;
        let off = || ServeArgs { auth: Some(AuthMode::Off), ..Default::default() };
        assert_eq!(off().into_settings().unwrap().lora_dtype, LoraDtype::Bf16);
        let flag = ServeArgs { lora_dtype: Some("f32".parse().unwrap()), ..off() };
        assert_eq!(flag.into_settings().unwrap().lora_dtype, LoraDtype::F32);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "lora_dtype = \"f32\"\n").unwrap();
        assert_eq!(
            ServeArgs { config: Some(path.clone()), ..off() }.into_settings().unwrap().lora_dtype,
            LoraDtype::F32
        );
        std::fs::write(&path, "lora_dtype = \"fp8\"\n").unwrap();
        let err = ServeArgs { config: Some(path), ..off() }.into_settings().unwrap_err();
        assert!(err.contains("fp8") || err.contains("lora_dtype"), "{err}");
        let err = "fp8".parse::<LoraDtype>().unwrap_err();
        assert!(err.contains("expected f32 or bf16"), "{err}");
    }

    #[test]
    fn activations_default_to_exact_f32_and_take_q8_from_flag_or_file() {
        use runtime::kernels::Activations;
        let off = || ServeArgs { auth: Some(AuthMode::Off), ..Default::default() };
        assert_eq!(off().into_settings().unwrap().activations, Activations::F32);
        let flag = ServeArgs { activations: Some("q8".parse().unwrap()), ..off() };
        assert_eq!(flag.into_settings().unwrap().activations, Activations::Q8);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "activations = \"q8\"\n").unwrap();
        assert_eq!(
            ServeArgs { config: Some(path.clone()), ..off() }.into_settings().unwrap().activations,
            Activations::Q8
        );
        std::fs::write(&path, "activations = \"int4\"\n").unwrap();
        let err = ServeArgs { config: Some(path), ..off() }.into_settings().unwrap_err();
        assert!(err.contains("int4") || err.contains("activations"), "{err}");
        let err = "int4".parse::<Activations>().unwrap_err();
        assert!(err.contains("expected f32 or q8"), "{err}");
    }

    #[test]
    fn embed_model_must_be_a_model_directory_and_off_turns_it_off() {
        let off = || ServeArgs { auth: Some(AuthMode::Off), ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let err = ServeArgs { embed_model: Some(dir.path().to_owned()), ..off() }.into_settings().unwrap_err();
        assert!(err.contains("SWITCHYARD_EMBED_MODEL") && err.contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let s = ServeArgs { embed_model: Some(dir.path().to_owned()), ..off() }.into_settings().unwrap();
        assert_eq!(s.embed_model.as_deref(), Some(dir.path()));
        let s = ServeArgs { embed_model: Some(PathBuf::from("off")), ..off() }.into_settings().unwrap();
        assert_eq!(s.embed_model, None);
        let toml = dir.path().join("s.toml");
        std::fs::write(&toml, format!("embed_model = {:?}\n", dir.path().join("nope"))).unwrap();
        let err = ServeArgs { config: Some(toml), ..off() }.into_settings().unwrap_err();
        assert!(err.contains("embed_model"), "{err}");
    }

    #[test]
    fn unknown_file_key_and_zero_values_stop_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "prot = 9000\n").unwrap();
        let err = ServeArgs { config: Some(path), ..Default::default() }.into_settings().unwrap_err();
        assert!(err.contains("prot"), "{err}");
        let err = ServeArgs { max_concurrent: Some(0), auth: Some(AuthMode::Off), ..Default::default() }
            .into_settings()
            .unwrap_err();
        assert!(err.contains("SWITCHYARD_MAX_CONCURRENT"), "{err}");
    }
}
