//! Bearer tokens (JWT, HS256) verified the same way in every module.

use std::future::{Ready, ready};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::Problem;

/// The secret the development configuration ships with; refused in production.
pub const DEVELOPMENT_SECRET: &str = "colony-development-secret-do-not-use-in-production";

const ISSUER: &str = "colony";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Seller,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Self::Customer),
            "seller" => Ok(Self::Seller),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown role {other:?}: customer, seller or admin")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token was not issued by colony")]
    WrongIssuer,
}

/// Issues and verifies tokens with one HMAC secret.
#[derive(Clone)]
pub struct Authenticator {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator { secret: *** }")
    }
}

impl Authenticator {
    pub fn new(secret: &str) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        Hmac::<Sha256>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!())
    }

    /// A signed token for `subject` with `role`, valid for `ttl`.
    pub fn issue(&self, subject: &str, role: Role, ttl: Duration) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: subject.to_string(),
            role,
            iss: ISSUER.to_string(),
            iat: now,
            exp: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{header}.{body}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// The claims of a token that is well formed, signed with our secret, unexpired.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let signing_input = &token[..header.len() + 1 + body.len()];
        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        let header: Header = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(AuthError::Malformed)?;
        // Only HS256: never let the token choose a weaker or asymmetric algorithm.
        if header.alg != "HS256" {
            return Err(AuthError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AuthError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AuthError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(AuthError::WrongIssuer);
        }
        if claims.exp <= chrono::Utc::now().timestamp() {
            return Err(AuthError::Expired);
        }
        Ok(claims)
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub role: Role,
}

impl Caller {
    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<&Self, Problem> {
        if roles.contains(&self.role) {
            Ok(self)
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs the role {}", role_list(roles)),
            ))
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| format!("{r:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn unauthorized(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

impl FromRequest for Caller {
    type Error = Problem;
    type Future = Ready<Result<Self, Problem>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(caller_of(req))
    }
}

fn caller_of(req: &HttpRequest) -> Result<Caller, Problem> {
    let auth = req
        .app_data::<web::Data<Authenticator>>()
        .ok_or_else(|| Problem::internal(&"no authenticator configured"))?;
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("send Authorization: Bearer <token>"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized("the Authorization header must be: Bearer <token>"))?;
    let claims = auth
        .verify(token)
        .map_err(|e| unauthorized(&e.to_string()))?;
    Ok(Caller {
        subject: claims.sub,
        role: claims.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_issued_verifies_with_the_same_secret_only() {
        let auth = Authenticator::new("s3cret");
        let token = auth.issue("alice", Role::Customer, Duration::from_secs(60));
        let claims = auth.verify(&token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.role),
            ("alice", Role::Customer)
        );
        assert_eq!(
            Authenticator::new("other").verify(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn expired_tampered_and_foreign_algorithms_are_refused() {
        let auth = Authenticator::new("s3cret");
        let expired = auth.issue("alice", Role::Admin, Duration::ZERO);
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));

        let token = auth.issue("alice", Role::Customer, Duration::from_secs(60));
        let parts: Vec<&str> = token.split('.').collect();
        let forged_body = URL_SAFE_NO_PAD
            .encode(br#"{"sub":"alice","role":"admin","iss":"colony","iat":0,"exp":99999999999}"#);
        let forged = format!("{}.{}.{}", parts[0], forged_body, parts[2]);
        assert_eq!(auth.verify(&forged), Err(AuthError::BadSignature));

        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert_eq!(auth.verify(&none_alg), Err(AuthError::Malformed));
        assert_eq!(auth.verify("a.b"), Err(AuthError::Malformed));
    }
}
