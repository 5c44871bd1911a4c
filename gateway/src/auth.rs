//! Who is calling: bearer JWTs (HS256 secret, or RS256/ES256 keys from a PEM or JWKS file, the
//! algorithm fixed by configuration) or static API keys stored as SHA-256 hashes. Either way
//! the caller becomes a [`Principal`] with a tenant, a role and the models it may use.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    /// Works the labelling queues (and the console's labelling page); no admin route.
    Labeller,
    Admin,
}

/// The claims Switchyard reads; `exp`, `nbf`, `iss` and `aud` are checked by the decoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    pub role: Role,
    /// Patterns like `support-*`; absent means every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Per-token overrides of the default limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// An authenticated caller, put into the request's extensions by the auth middleware.
#[derive(Debug, Clone)]
pub struct Principal {
    pub sub: String,
    pub tenant: String,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_streams: Option<u32>,
    /// When the token it came from expires (unix seconds), if it does.
    pub expires: Option<u64>,
}

impl Principal {
    /// A caller with no claims of its own (auth off, or the bootstrap admin key).
    pub fn plain(sub: &str, tenant: &str, role: Role) -> Self {
        Self {
            sub: sub.into(),
            tenant: tenant.into(),
            role,
            models: None,
            rpm: None,
            tpm: None,
            max_streams: None,
            expires: None,
        }
    }
}

impl Principal {
    /// Whether this caller may use `model` (`name`, `name@version` or `name@alias`): the
    /// patterns match the adapter or base name, with `*` as a wildcard.
    pub fn may_use(&self, model: &str) -> bool {
        let name = model.split('@').next().unwrap_or(model);
        self.models.as_ref().is_none_or(|patterns| patterns.iter().any(|p| glob(p, name)))
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head) && text.len() >= head.len() + tail.len() && {
                let rest = &text[head.len()..];
                // Later `*`s: try every split point.
                (0..=rest.len()).filter(|&i| rest.is_char_boundary(i)).any(|i| glob(tail, &rest[i..]))
            }
        }
    }
}

/// Why a request was refused, for the `switchyard_auth_failures_total` metric. Clients only
/// ever see "missing or invalid bearer token".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    Malformed,
    BadSignature,
    WrongAlgorithm,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    UnknownKey,
    BadClaims,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::BadSignature => "bad_signature",
            Failure::WrongAlgorithm => "wrong_algorithm",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::WrongAudience => "wrong_audience",
            Failure::WrongIssuer => "wrong_issuer",
            Failure::UnknownKey => "unknown_key",
            Failure::BadClaims => "bad_claims",
        }
    }
}

/// Verification keys: one for a secret or PEM, or several by `kid` from a JWKS file.
enum Keys {
    One(DecodingKey),
    ByKid(HashMap<String, DecodingKey>),
}

/// An API key file entry: `{"sha256": "<hex of the key>", "sub": .., "tenant": .., "role": ..}`.
#[derive(Debug, Deserialize)]
struct ApiKeyEntry {
    sha256: String,
    #[serde(flatten)]
    claims: Claims,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.is_some())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

pub struct Authenticator {
    jwt: Option<(Keys, Validation)>,
    api_keys: HashMap<String, Claims>,
}

/// The auth part of the configuration, as the CLI gathered it.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub hs256_secret: Option<String>,
    pub rs256_public_key: Option<std::path::PathBuf>,
    pub es256_public_key: Option<std::path::PathBuf>,
    /// A JWKS file; its keys must use `jwks_algorithm`.
    pub jwks_file: Option<std::path::PathBuf>,
    pub jwks_algorithm: Option<Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub api_keys_file: Option<std::path::PathBuf>,
}

impl Authenticator {
    pub fn new(s: &AuthSettings) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{} cannot be read: {e}", p.display()));
        let mut chosen: Vec<(Algorithm, Keys)> = Vec::new();
        if let Some(secret) = &s.hs256_secret {
            chosen.push((Algorithm::HS256, Keys::One(DecodingKey::from_secret(secret.as_bytes()))));
        }
        if let Some(p) = &s.rs256_public_key {
            let key = DecodingKey::from_rsa_pem(&read(p)?)
                .map_err(|e| format!("{}: not an RSA public key PEM: {e}", p.display()))?;
            chosen.push((Algorithm::RS256, Keys::One(key)));
        }
        if let Some(p) = &s.es256_public_key {
            let key = DecodingKey::from_ec_pem(&read(p)?)
                .map_err(|e| format!("{}: not an EC public key PEM: {e}", p.display()))?;
            chosen.push((Algorithm::ES256, Keys::One(key)));
        }
        if let Some(p) = &s.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(p)?).map_err(|e| format!("{}: not a JWKS file: {e}", p.display()))?;
            let mut keys = HashMap::new();
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone().ok_or_else(|| format!("{}: every key needs a kid", p.display()))?;
                keys.insert(kid, DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: {e}", p.display()))?);
            }
            let alg = s.jwks_algorithm.unwrap_or(Algorithm::RS256);
            chosen.push((alg, Keys::ByKid(keys)));
        }
        if chosen.len() > 1 {
            return Err("configure exactly one JWT key source (HS256 secret, RS256 key, ES256 key or JWKS file)".into());
        }
        let jwt = chosen.pop().map(|(alg, keys)| {
            let mut v = Validation::new(alg);
            v.leeway = 5;
            v.validate_nbf = true;
            v.required_spec_claims = ["exp".to_owned()].into_iter().collect();
            match &s.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &s.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            (keys, v)
        });
        let mut api_keys = HashMap::new();
        if let Some(p) = &s.api_keys_file {
            let entries: Vec<ApiKeyEntry> = serde_json::from_slice(&read(p)?)
                .map_err(|e| format!("{}: not a JSON list of API keys: {e}", p.display()))?;
            for e in entries {
                api_keys.insert(e.sha256.to_lowercase(), e.claims);
            }
        }
        if jwt.is_none() && api_keys.is_empty() {
            return Err("auth is on but no JWT key (SWITCHYARD_JWT_HS256_SECRET, ...) or API key file is configured; \
                        set one, or switch auth off explicitly with SWITCHYARD_AUTH=off"
                .into());
        }
        Ok(Self { jwt, api_keys })
    }

    /// Checks an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, Failure> {
        let token = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty());
        let token = token.ok_or(Failure::Missing)?;
        if let Some(claims) = self.api_keys.get(&hex::encode(Sha256::digest(token.as_bytes()))) {
            return Ok(principal(claims.clone()));
        }
        let (keys, validation) = self.jwt.as_ref().ok_or(Failure::BadSignature)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Failure::Malformed)?;
        if header.alg != validation.algorithms[0] {
            return Err(Failure::WrongAlgorithm);
        }
        let key = match keys {
            Keys::One(k) => k,
            Keys::ByKid(map) => header.kid.as_ref().and_then(|k| map.get(k)).ok_or(Failure::UnknownKey)?,
        };
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
            K::InvalidSignature => Failure::BadSignature,
            K::ExpiredSignature => Failure::Expired,
            K::ImmatureSignature => Failure::NotYetValid,
            K::InvalidAudience => Failure::WrongAudience,
            K::InvalidIssuer => Failure::WrongIssuer,
            K::InvalidAlgorithm => Failure::WrongAlgorithm,
            K::Json(_) | K::MissingRequiredClaim(_) => Failure::BadClaims,
            _ => Failure::Malformed,
        })?;
        Ok(principal(data.claims))
    }
}

fn principal(c: Claims) -> Principal {
    Principal {
        sub: c.sub,
        tenant: c.tenant,
        role: c.role,
        models: c.models,
        rpm: c.rpm,
        tpm: c.tpm,
        max_streams: c.max_streams,
        expires: c.exp,
    }
}

/// Signs an HS256 token (the `mint-token` subcommand, tests and development).
/// Compares a presented secret with the expected one in time that depends only on their
/// lengths, so the time taken does not tell how much of the secret matched.
pub fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, ApiError> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_patterns_match_names_not_versions() {
        let p = Principal { models: Some(vec!["support-*".into()]), ..Principal::plain("s", "t", Role::User) };
        assert!(p.may_use("support-bot@7"));
        assert!(p.may_use("support-bot"));
        assert!(!p.may_use("sales-bot"));
        assert!(glob("a*b*c", "axxbyyc") && !glob("a*b*c", "axxbyy"));
    }
}
