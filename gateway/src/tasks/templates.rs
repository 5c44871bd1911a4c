//! Prompt templates for `POST /v1/generate`: immutable numbered versions plus aliases, per
//! tenant, created and listed through the admin API. A template is a Jinja body (minijinja,
//! strict about undefined variables), its declared variables, an optional system prompt,
//! default model and sampling defaults.
//!
//! Storage: one JSON file per tenant, `<data>/templates/<hex tenant>.json`, rewritten
//! atomically (temp file, fsync, rename) under an exclusive `flock` on `<data>/templates/.lock`
//! that every writer (any replica) takes, starting from what is on disk; readers reload a
//! tenant's file whenever its size or modification time changed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use utoipa::ToSchema;

use crate::admin::require_admin;
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
const MAX_VARIABLES: usize = 64;
/// Names the Jinja engine provides; a template may use them without declaring them.
const BUILTINS: [&str; 6] = ["range", "dict", "namespace", "debug", "loop", "self"];

/// The type a variable's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    String,
    Number,
    Integer,
    Boolean,
    Array,
    Object,
}

impl VarType {
    fn admits(self, v: &serde_json::Value) -> bool {
        match self {
            VarType::String => v.is_string(),
            VarType::Number => v.is_number(),
            VarType::Integer => v.is_i64() || v.is_u64(),
            VarType::Boolean => v.is_boolean(),
            VarType::Array => v.is_array(),
            VarType::Object => v.is_object(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            VarType::String => "string",
            VarType::Number => "number",
            VarType::Integer => "integer",
            VarType::Boolean => "boolean",
            VarType::Array => "array",
            VarType::Object => "object",
        }
    }
}

/// A declared variable, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Variable {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: VarType,
    pub required: bool,
}

/// A variable as an admin declares it: a name (a required string) or an object.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VariableSpec {
    Name(String),
    Full {
        name: String,
        #[serde(rename = "type", default = "default_type")]
        kind: VarType,
        #[serde(default = "yes")]
        required: bool,
    },
}

fn default_type() -> VarType {
    VarType::String
}

fn yes() -> bool {
    true
}

/// Sampling defaults a template carries; a request's own values win.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// Lowercase letters, digits, `.`, `_`, `-`; up to 64 characters. A name that exists gets a new version.
    pub name: String,
    /// The Jinja body of the user message.
    pub template: String,
    /// Every variable the body uses: names (required strings) or `{name, type, required}`.
    #[serde(default)]
    pub variables: Vec<VariableSpec>,
    pub system: Option<String>,
    /// The model to generate with when a request names none.
    pub model: Option<String>,
    #[serde(default)]
    pub defaults: SamplingDefaults,
    pub description: Option<String>,
}

/// One immutable template version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateVersion {
    pub name: String,
    pub version: u64,
    pub template: String,
    pub variables: Vec<Variable>,
    pub system: Option<String>,
    pub model: Option<String>,
    pub defaults: SamplingDefaults,
    pub description: Option<String>,
    /// sha256 of the body.
    pub sha256: String,
    pub created: u64,
    pub created_by: String,
}

/// A template's versions and aliases.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateEntry {
    pub versions: Vec<TemplateVersion>,
    pub aliases: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TenantFile {
    templates: BTreeMap<String, TemplateEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateListing {
    pub name: String,
    pub latest: u64,
    pub aliases: BTreeMap<String, u64>,
    pub versions: Vec<TemplateVersion>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateList {
    pub object: String,
    pub data: Vec<TemplateListing>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTemplateAlias {
    pub alias: String,
    pub version: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// The tenant whose templates these are (default: the caller's; `default` for the bootstrap admin token).
    pub tenant: Option<String>,
}

/// A tenant's file as last read, with the modification time and size it had then.
type Cached = (std::time::SystemTime, u64, Arc<TenantFile>);

/// Every tenant's templates, cached per file.
pub struct Templates {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Templates {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), cache: Mutex::new(HashMap::new()) })
    }

    fn path(&self, tenant: &str) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(tenant)))
    }

    fn load(&self, tenant: &str) -> Result<Arc<TenantFile>, ApiError> {
        let path = self.path(tenant);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Arc::default()),
            Err(e) => return Err(ApiError::Internal(format!("reading {}: {e}", path.display()))),
        };
        let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
        if let Some((m, l, file)) = self.cache.lock().get(tenant) {
            if (*m, *l) == stamp {
                return Ok(file.clone());
            }
        }
        let bytes = std::fs::read(&path).map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?;
        let file: TenantFile = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Internal(format!("{} is not a template file: {e}", path.display())))?;
        let file = Arc::new(file);
        self.cache.lock().insert(tenant.to_owned(), (stamp.0, stamp.1, file.clone()));
        Ok(file)
    }

    /// Changes a tenant's file under the writers' lock, starting from the disk.
    fn change<T>(&self, tenant: &str, f: impl FnOnce(&mut TenantFile) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let io = |e: std::io::Error| ApiError::Internal(format!("template store: {e}"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
            .map_err(io)?;
        flock(&lock).map_err(io)?;
        let path = self.path(tenant);
        let mut file: TenantFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TenantFile::default(),
            Err(e) => return Err(io(e)),
        };
        let out = f(&mut file)?;
        let tmp = self.dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut w = std::fs::File::create(&tmp).map_err(io)?;
        w.write_all(&serde_json::to_vec_pretty(&file).map_err(|e| ApiError::Internal(e.to_string()))?).map_err(io)?;
        w.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.cache.lock().remove(tenant);
        Ok(out)
        // The lock is released when `lock` drops.
    }

    /// `name`, `name@3` or `name@alias` (`latest` always means the newest version).
    pub fn resolve(&self, tenant: &str, spec: &str) -> Result<TemplateVersion, ApiError> {
        let (name, which) = spec.split_once('@').unwrap_or((spec, "latest"));
        let not_found = || ApiError::NotFound { message: format!("no template `{spec}`") };
        let file = self.load(tenant)?;
        let entry = file.templates.get(name).ok_or_else(not_found)?;
        let version = match which.parse::<u64>() {
            Ok(v) => v,
            Err(_) if which == "latest" => entry.versions.last().map_or(0, |v| v.version),
            Err(_) => *entry.aliases.get(which).ok_or_else(not_found)?,
        };
        entry.versions.iter().find(|v| v.version == version).cloned().ok_or_else(not_found)
    }
}

fn flock(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// The tenant an admin route acts on.
pub(crate) fn admin_tenant(req: &HttpRequest, asked: Option<String>) -> Result<String, ApiError> {
    if let Some(t) = asked {
        super::required_text(&t, "tenant", 128)?;
        return Ok(t);
    }
    let who = caller(req);
    Ok(if who.sub == "bootstrap-admin" { "default".to_owned() } else { who.tenant })
}

/// Checks a new template and turns it into its stored version (number set by the store).
fn build(wire: CreateTemplate, created_by: &str) -> Result<TemplateVersion, ApiError> {
    let invalid = |m: String, p: &str| ApiError::invalid(m, Some(p.to_owned()));
    if !valid_name(&wire.name) {
        return Err(invalid(
            "name: 1 to 64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit".into(),
            "name",
        ));
    }
    if wire.template.trim().is_empty() || wire.template.len() > MAX_TEMPLATE_BYTES {
        return Err(invalid(format!("template must be 1 to {MAX_TEMPLATE_BYTES} bytes"), "template"));
    }
    if wire.variables.len() > MAX_VARIABLES {
        return Err(invalid(format!("at most {MAX_VARIABLES} variables"), "variables"));
    }
    let mut variables: Vec<Variable> = Vec::with_capacity(wire.variables.len());
    for (i, spec) in wire.variables.into_iter().enumerate() {
        let v = match spec {
            VariableSpec::Name(name) => Variable { name, kind: VarType::String, required: true },
            VariableSpec::Full { name, kind, required } => Variable { name, kind, required },
        };
        let ident = v.name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && v.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && v.name.len() <= 64;
        if !ident {
            return Err(invalid(format!("variable `{}` is not an identifier", v.name), &format!("variables[{i}]")));
        }
        if variables.iter().any(|o| o.name == v.name) {
            return Err(invalid(format!("variable `{}` is declared twice", v.name), &format!("variables[{i}]")));
        }
        variables.push(v);
    }
    let env = environment();
    let compiled = env
        .template_from_str(&wire.template)
        .map_err(|e| invalid(format!("the template does not compile: {e}"), "template"))?;
    let mut used: Vec<String> = compiled.undeclared_variables(false).into_iter().collect();
    used.sort();
    if let Some(missing) =
        used.iter().find(|u| !BUILTINS.contains(&u.as_str()) && !variables.iter().any(|v| &v.name == *u))
    {
        return Err(invalid(format!("the template uses `{missing}` but variables does not declare it"), "variables"));
    }
    let d = &wire.defaults;
    if d.max_tokens.is_some_and(|m| m == 0) {
        return Err(invalid("defaults.max_tokens must be at least 1".into(), "defaults.max_tokens"));
    }
    if d.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(invalid("defaults.temperature must be between 0 and 2".into(), "defaults.temperature"));
    }
    if d.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(invalid("defaults.top_p must be in (0, 1]".into(), "defaults.top_p"));
    }
    if wire.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err(invalid("model must not be empty".into(), "model"));
    }
    Ok(TemplateVersion {
        sha256: hex::encode(sha2::Sha256::digest(wire.template.as_bytes())),
        name: wire.name,
        version: 0,
        template: wire.template,
        variables,
        system: wire.system.filter(|s| !s.trim().is_empty()),
        model: wire.model,
        defaults: wire.defaults,
        description: wire.description,
        created: super::now(),
        created_by: created_by.to_owned(),
    })
}

/// The one Jinja environment: strict about undefined variables, no auto-escaping (prompts
/// are not HTML).
pub(crate) fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// Checks `variables` against the declaration and renders the body; 400s name the variable.
pub(crate) fn render(
    t: &TemplateVersion,
    variables: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, ApiError> {
    let invalid = |m: String, p: String| ApiError::invalid(m, Some(p));
    for name in variables.keys() {
        if !t.variables.iter().any(|v| &v.name == name) {
            let known: Vec<&str> = t.variables.iter().map(|v| v.name.as_str()).collect();
            return Err(invalid(
                format!("template `{}` has no variable `{name}` (it declares: {})", t.name, known.join(", ")),
                format!("variables.{name}"),
            ));
        }
    }
    for v in &t.variables {
        match variables.get(&v.name) {
            None | Some(serde_json::Value::Null) if v.required => {
                return Err(invalid(format!("variable `{}` is required", v.name), format!("variables.{}", v.name)))
            }
            Some(value) if !value.is_null() && !v.kind.admits(value) => {
                return Err(invalid(
                    format!("variable `{}` must be a {}", v.name, v.kind.as_str()),
                    format!("variables.{}", v.name),
                ))
            }
            _ => {}
        }
    }
    // Optional variables left out are present as none, so `{% if rush %}` reads them.
    let mut context = variables.clone();
    for v in &t.variables {
        context.entry(v.name.clone()).or_insert(serde_json::Value::Null);
    }
    let env = environment();
    let compiled = env.template_from_str(&t.template).map_err(|e| ApiError::Internal(e.to_string()))?;
    compiled.render(minijinja::Value::from_serialize(&context)).map_err(|e| {
        ApiError::invalid(
            format!("template `{}` v{} failed to render: {e}", t.name, t.version),
            Some("variables".to_owned()),
        )
    })
}

#[utoipa::path(
    post,
    path = "/admin/templates",
    operation_id = "create_template",
    tag = "templates",
    request_body = CreateTemplate,
    params(TenantQuery),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new immutable version (1 for a new name)", body = TemplateVersion),
        (status = 400, description = "A bad name, a body that does not compile, or a variable used but not declared", body = ErrorResponse, example = json!({"error": {"message": "the template uses `customer` but variables does not declare it", "type": "invalid_request_error", "param": "variables", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 403, description = "Not an admin", body = ErrorResponse)
    )
)]
pub(crate) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<TenantQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &req)?;
    let tenant = admin_tenant(&req, query.into_inner().tenant)?;
    let wire: CreateTemplate = read_json(&req, payload, state.body_limit).await?;
    let mut version = build(wire, &caller(&req).sub)?;
    let store = state.templates.clone();
    let stored = web::block(move || {
        store.change(&tenant, |file| {
            let entry = file.templates.entry(version.name.clone()).or_default();
            version.version = entry.versions.last().map_or(1, |v| v.version + 1);
            entry.versions.push(version.clone());
            Ok(version)
        })
    })
    .await??;
    Ok(HttpResponse::Created().json(stored))
}

#[utoipa::path(
    get,
    path = "/admin/templates",
    operation_id = "list_templates",
    tag = "templates",
    params(TenantQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every template of the tenant with its versions and aliases", body = TemplateList),
        (status = 400, description = "A blank or overlong `tenant`", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 403, description = "Not an admin", body = ErrorResponse)
    )
)]
pub(crate) async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<TenantQuery>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &req)?;
    let tenant = admin_tenant(&req, query.into_inner().tenant)?;
    let file = state.templates.load(&tenant)?;
    let data = file.templates.iter().map(|(name, e)| listing(name, e)).collect();
    Ok(HttpResponse::Ok().json(TemplateList { object: "list".into(), data }))
}

fn listing(name: &str, e: &TemplateEntry) -> TemplateListing {
    TemplateListing {
        name: name.to_owned(),
        latest: e.versions.last().map_or(0, |v| v.version),
        aliases: e.aliases.clone(),
        versions: e.versions.clone(),
    }
}

#[utoipa::path(
    get,
    path = "/admin/templates/{name}",
    operation_id = "show_template",
    tag = "templates",
    params(("name" = String, Path, description = "Template name"), TenantQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The template's versions and aliases", body = TemplateListing),
        (status = 400, description = "A blank or overlong `tenant`", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 403, description = "Not an admin", body = ErrorResponse),
        (status = 404, description = "No such template", body = ErrorResponse)
    )
)]
pub(crate) async fn show(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<TenantQuery>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &req)?;
    let tenant = admin_tenant(&req, query.into_inner().tenant)?;
    let name = path.into_inner();
    let file = state.templates.load(&tenant)?;
    let entry =
        file.templates.get(&name).ok_or_else(|| ApiError::NotFound { message: format!("no template `{name}`") })?;
    Ok(HttpResponse::Ok().json(listing(&name, entry)))
}

#[utoipa::path(
    post,
    path = "/admin/templates/{name}/aliases",
    operation_id = "set_template_alias",
    tag = "templates",
    request_body = SetTemplateAlias,
    params(("name" = String, Path, description = "Template name"), TenantQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The template with the alias moved", body = TemplateListing),
        (status = 400, description = "A bad alias name (or `latest`, which always means the newest)", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 403, description = "Not an admin", body = ErrorResponse),
        (status = 404, description = "No such template or version", body = ErrorResponse)
    )
)]
pub(crate) async fn set_alias(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<TenantQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &req)?;
    let tenant = admin_tenant(&req, query.into_inner().tenant)?;
    let name = path.into_inner();
    let wire: SetTemplateAlias = read_json(&req, payload, state.body_limit).await?;
    if !valid_name(&wire.alias) || wire.alias == "latest" || wire.alias.parse::<u64>().is_ok() {
        return Err(ApiError::invalid(
            "alias: a lowercase name that is not a number and not `latest`",
            Some("alias".to_owned()),
        ));
    }
    let store = state.templates.clone();
    let listed = web::block(move || {
        store.change(&tenant, |file| {
            let entry = file
                .templates
                .get_mut(&name)
                .ok_or_else(|| ApiError::NotFound { message: format!("no template `{name}`") })?;
            if !entry.versions.iter().any(|v| v.version == wire.version) {
                return Err(ApiError::NotFound {
                    message: format!("template `{name}` has no version {}", wire.version),
                });
            }
            entry.aliases.insert(wire.alias, wire.version);
            Ok(listing(&name, entry))
        })
    })
    .await??;
    Ok(HttpResponse::Ok().json(listed))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/templates", web::post().to(create))
        .route("/admin/templates", web::get().to(list))
        .route("/admin/templates/{name}", web::get().to(show))
        .route("/admin/templates/{name}/aliases", web::post().to(set_alias));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(body: &str, vars: Vec<VariableSpec>) -> Result<TemplateVersion, ApiError> {
        build(
            CreateTemplate {
                name: "letter".into(),
                template: body.into(),
                variables: vars,
                system: None,
                model: None,
                defaults: SamplingDefaults::default(),
                description: None,
            },
            "admin",
        )
    }

    #[test]
    fn renders_exactly_and_names_bad_variables() {
        let t = template(
            "Dear {{ name }},{% for i in items %} {{ i }}{% endfor %}",
            vec![
                VariableSpec::Name("name".into()),
                VariableSpec::Full { name: "items".into(), kind: VarType::Array, required: true },
            ],
        )
        .unwrap();
        let vars = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(
            render(&t, &vars(serde_json::json!({"name": "Ann", "items": ["a", "b"]}))).unwrap(),
            "Dear Ann, a b"
        );
        let e = render(&t, &vars(serde_json::json!({"items": []}))).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("variables.name"));
        let e = render(&t, &vars(serde_json::json!({"name": 3, "items": []}))).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("variables.name"));
        let e = render(&t, &vars(serde_json::json!({"name": "x", "items": [], "extra": 1}))).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("variables.extra"));
    }

    #[test]
    fn a_variable_used_but_not_declared_is_refused() {
        let e = template("Hi {{ who }}", vec![]).unwrap_err();
        assert!(e.to_string().contains("`who`"), "{e}");
        let e = template("Hi {{ who ", vec![VariableSpec::Name("who".into())]).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("template"));
    }
}
