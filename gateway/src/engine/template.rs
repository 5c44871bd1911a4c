//! The model's own chat template (Jinja, from the GGUF metadata or `tokenizer_config.json`),
//! rendered with minijinja; ChatML when a model ships none.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use tokenizers::Tokenizer;

use super::Message;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos_token: Option<String>, tokenizer: &Tokenizer, eos_ids: &[u32]) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_owned())
            .map_err(|e| anyhow::anyhow!("the model's chat template does not parse: {e}"))?;
        let eos_token = eos_ids.first().and_then(|&id| tokenizer.id_to_token(id)).unwrap_or_default();
        Ok(Self { env, bos_token: bos_token.unwrap_or_default(), eos_token })
    }

    /// Reads `tokenizer_config.json` (template, special tokens) and `config.json` (EOS ids).
    pub fn from_hf_dir(dir: &Path, tokenizer: &Tokenizer) -> anyhow::Result<(Self, Vec<u32>)> {
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

    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
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
}
