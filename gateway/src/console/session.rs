//! Console sessions: a sign-in with a token the API accepts (the admin token, an admin or
//! labeller JWT, an API key) becomes an HttpOnly, SameSite=Strict cookie holding a signed
//! (HS256) copy of the caller's claims and a random CSRF token. The page learns the CSRF token
//! from `GET /console/session` (same origin only) and sends it back in `x-csrf-token` with
//! every state-changing request; the cookie alone changes nothing (signed double submit).

use actix_web::cookie::{Cookie, SameSite};
use actix_web::HttpRequest;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{Principal, Role};
use crate::error::ApiError;
pub(crate) use crate::tasks::now;

/// The cookie's name.
pub const COOKIE: &str = "switchyard_session";
/// The header a state-changing request from the console carries.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts (or until the signing token's own expiry, if sooner).
const LIFETIME_SECONDS: u64 = 8 * 3600;

/// What the cookie carries, signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub sub: String,
    pub tenant: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    pub exp: u64,
    pub csrf: String,
}

impl Session {
    pub fn principal(&self) -> Principal {
        Principal {
            models: self.models.clone(),
            expires: Some(self.exp),
            ..Principal::plain(&self.sub, &self.tenant, self.role)
        }
    }

    /// Whether `given` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| crate::auth::same_secret(g, &self.csrf))
    }

    /// A state-changing request's check: its `x-csrf-token` header is this session's token.
    pub fn require_csrf(&self, headers: &actix_web::http::header::HeaderMap) -> Result<(), ApiError> {
        let given = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if self.csrf_matches(given) {
            return Ok(());
        }
        Err(ApiError::Forbidden {
            message: format!("a request signed in with a console session must carry its `{CSRF_HEADER}` header"),
        })
    }
}

/// Signs and checks session cookies.
pub struct Sessions {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Sessions {
    /// The key: the configured console secret; else one derived from the admin token (so
    /// replicas sharing it accept each other's cookies); else random for this process.
    pub fn new(secret: Option<&str>, admin_token: Option<&str>) -> Self {
        let key: Vec<u8> = match (secret, admin_token) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(t)) => Sha256::digest(format!("switchyard-console-session:{t}").as_bytes()).to_vec(),
            (None, None) => {
                let mut k = vec![0u8; 32];
                rand::rng().fill_bytes(&mut k);
                k
            }
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        Self { encoding: EncodingKey::from_secret(&key), decoding: DecodingKey::from_secret(&key), validation }
    }

    /// A new session for `principal`, ending no later than `not_after` (unix seconds).
    pub fn start(&self, principal: &Principal) -> Result<(Session, String), ApiError> {
        self.start_until(principal, principal.expires)
    }

    fn start_until(&self, principal: &Principal, not_after: Option<u64>) -> Result<(Session, String), ApiError> {
        let mut csrf = [0u8; 32];
        rand::rng().fill_bytes(&mut csrf);
        let exp = now() + LIFETIME_SECONDS;
        let session = Session {
            sub: principal.sub.clone(),
            tenant: principal.tenant.clone(),
            role: principal.role,
            models: principal.models.clone(),
            exp: not_after.map_or(exp, |n| n.min(exp)),
            csrf: hex::encode(csrf),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &session, &self.encoding)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((session, token))
    }

    /// The session a cookie value holds, if it is one this gateway signed and it has not
    /// expired.
    pub fn check(&self, cookie: &str) -> Option<Session> {
        jsonwebtoken::decode::<Session>(cookie, &self.decoding, &self.validation).ok().map(|d| d.claims)
    }
}

/// The `Set-Cookie` for a session (`Secure` when the request came over HTTPS, as a proxy's
/// `Forwarded`/`X-Forwarded-Proto` says).
pub fn cookie(req: &HttpRequest, value: String, max_age: u64) -> Cookie<'static> {
    let secure = req.connection_info().scheme() == "https";
    Cookie::build(COOKIE, value)
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .secure(secure)
        .max_age(actix_web::cookie::time::Duration::seconds(max_age as i64))
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_round_trips_and_a_forged_one_fails() {
        let sessions = Sessions::new(None, Some("admin-token"));
        let p = Principal::plain("ann", "acme", Role::Labeller);
        let (session, token) = sessions.start(&p).unwrap();
        let back = sessions.check(&token).unwrap();
        assert_eq!((back.sub.as_str(), back.role, back.csrf.as_str()), ("ann", Role::Labeller, session.csrf.as_str()));
        assert!(back.csrf_matches(Some(&session.csrf)));
        assert!(!back.csrf_matches(Some("nope")) && !back.csrf_matches(None));
        let other = Sessions::new(None, Some("another-token"));
        assert!(other.check(&token).is_none(), "a cookie signed with another key");
        let (_, expired) = sessions.start_until(&p, Some(now() - 10)).unwrap();
        assert!(sessions.check(&expired).is_none(), "an expired cookie");
        let mut tampered = token.clone();
        tampered.insert(tampered.len() / 2, 'x');
        assert!(sessions.check(&tampered).is_none());
    }
}
