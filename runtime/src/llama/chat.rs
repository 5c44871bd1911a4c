//! Everything that turns chat messages into the token ids a model was trained on: the model's
//! own Jinja chat template (GGUF metadata or `tokenizer_config.json`, ChatML when it ships
//! none) and one loader for a GGUF file or an HF directory. Serving and training share it, so
//! an adapter is trained on exactly the prompts it will be served.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use tokenizers::Tokenizer;

use super::Llama;
use crate::error::{Result, RuntimeError};

/// Who speaks a chat message: the contract's type, so requests, logs and training examples
/// reach the template unchanged.
pub use protocol::dataset::Role;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A model's chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template reads a `tools` variable: a tool-calling model's own format.
    speaks_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// `source` is the Jinja text (ChatML when `None`); the EOS token is the first of `eos_ids`.
    pub fn new(
        source: Option<&str>,
        bos_token: Option<String>,
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_owned()).map_err(|e| {
            RuntimeError::model("chat_template", format!("the model's chat template does not parse: {e}"))
        })?;
        let eos_token = eos_ids.first().and_then(|&id| tokenizer.id_to_token(id)).unwrap_or_default();
        let speaks_tools = source.is_some_and(|s| s.contains("tools"));
        Ok(Self { env, bos_token: bos_token.unwrap_or_default(), eos_token, speaks_tools })
    }

    /// Reads `tokenizer_config.json` (template, special tokens) and `config.json` (EOS ids).
    pub fn from_hf_dir(dir: &Path, tokenizer: &Tokenizer) -> Result<(Self, Vec<u32>)> {
        let read = |name: &str| -> serde_json::Value {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        let tok_cfg = read("tokenizer_config.json");
        let cfg = read("config.json");
        let token_str = |v: &serde_json::Value| {
            v.as_str().map(str::to_owned).or_else(|| v.get("content").and_then(|c| c.as_str()).map(str::to_owned))
        };
        let mut eos: Vec<u32> = match &cfg["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        };
        if let Some(id) = token_str(&tok_cfg["eos_token"]).and_then(|t| tokenizer.token_to_id(&t)) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let template = Self::new(tok_cfg["chat_template"].as_str(), token_str(&tok_cfg["bos_token"]), tokenizer, &eos)?;
        Ok((template, eos))
    }

    /// The prompt text for `(role, content)` messages, ending where the assistant's answer starts.
    pub fn render<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> std::result::Result<String, String> {
        let messages: Vec<_> =
            messages.into_iter().map(|(role, content)| context! { role => role, content => content }).collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| format!("the chat template refused these messages: {e}"))
    }

    /// Whether the template has its own tool format (it reads `tools`, and assistant
    /// `tool_calls` and `tool` messages as OpenAI sends them).
    pub fn speaks_tools(&self) -> bool {
        self.speaks_tools
    }

    /// The prompt text for OpenAI-shaped messages (`role`, `content`, `tool_calls`,
    /// `tool_call_id`) and OpenAI-shaped `tools`, through the template's own tool format.
    pub fn render_with_tools(
        &self,
        messages: &serde_json::Value,
        tools: &serde_json::Value,
    ) -> std::result::Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => minijinja::Value::from_serialize(messages),
                tools => minijinja::Value::from_serialize(tools),
                add_generation_prompt => true,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| format!("the chat template refused these messages: {e}"))
    }

    /// The token that ends an assistant turn (what a trained answer must end with).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A chat model as loaded from disk: weights, tokenizer, template and the ids that end a turn.
pub struct ChatModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos_ids: Vec<u32>,
}

impl ChatModel {
    /// Loads a llama GGUF file (tokenizer and template from its metadata) or an HF directory
    /// (`config.json`, safetensors, `tokenizer.json`, `tokenizer_config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() {
            let (model, meta, tokenizer) = Llama::from_gguf(path)?;
            let template = ChatTemplate::new(
                meta.chat_template.as_deref(),
                meta.bos_token.clone(),
                &tokenizer,
                &meta.eos_token_ids,
            )?;
            Ok(Self { model, tokenizer, template, eos_ids: meta.eos_token_ids })
        } else {
            let model = Llama::from_hf_dir(path)?;
            let file = path.join("tokenizer.json");
            let tokenizer = Tokenizer::from_file(&file).map_err(|e| RuntimeError::model(&file, e.to_string()))?;
            let (template, eos_ids) = ChatTemplate::from_hf_dir(path, &tokenizer)?;
            Ok(Self { model, tokenizer, template, eos_ids })
        }
    }
}
