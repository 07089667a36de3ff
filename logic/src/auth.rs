//! AuthService: registration, login, JWT access and refresh tokens, rotation and logout.
//!
//! Each login creates a session in repo; both of its tokens carry the session id (`sid`). An
//! access token is valid while it has not expired and its session is active, so logout (which
//! revokes the session) stops both tokens at once. A refresh rotates the session's refresh token
//! id with a compare-and-set: the refresh token presented stops working, and presenting an
//! already rotated refresh token again (a replay, for example of a stolen token) revokes the
//! whole session.
//!
//! Username rules: 3 to 32 characters of `a-z A-Z 0-9 _ . -`. Password rules: 8 to 128
//! characters. Nickname: at most 50 characters (default: the username).

use gochat_infra::time::now_ms;
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::logic as pb;
use gochat_proto::logic::auth_service_server::AuthService;
use gochat_proto::repo as rpb;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::{Logic, RepoApi, repo_err};
use gochat_infra::mq::Bus;

/// The signing keys.
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// HS256 keys from a secret of at least 32 bytes.
    pub fn new(secret: &str) -> Result<Self, AppError> {
        if secret.len() < 32 {
            return Err(AppError::internal(
                "the JWT secret must be at least 32 bytes",
            ));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        })
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The login session.
    pub sid: String,
    /// `access` or `refresh`.
    pub typ: String,
    /// The token's own id.
    pub jti: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
}

const ACCESS: &str = "access";
const REFRESH: &str = "refresh";

fn unauthorized(message: &str) -> AppError {
    AppError::new(ErrorCode::Unauthorized, message)
}

fn new_jti() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn validate_username(u: &str) -> Result<(), AppError> {
    let n = u.chars().count();
    if !(3..=32).contains(&n)
        || !u
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(AppError::invalid(
            "username must be 3 to 32 characters of letters, digits, '_', '.' or '-'",
        ));
    }
    Ok(())
}

fn validate_password(p: &str) -> Result<(), AppError> {
    let n = p.chars().count();
    if !(8..=128).contains(&n) {
        return Err(AppError::invalid("password must be 8 to 128 characters"));
    }
    Ok(())
}

pub(crate) fn logic_user(u: rpb::User) -> pb::User {
    pb::User {
        id: u.id,
        username: u.username,
        nickname: u.nickname,
        avatar_url: u.avatar_url,
        created_at: u.created_at,
    }
}

impl<R: RepoApi, B: Bus> Logic<R, B> {
    fn sign(&self, claims: &Claims) -> Result<String, AppError> {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.core.keys.encoding,
        )
        .map_err(|e| AppError::internal(format!("signing a token: {e}")))
    }

    /// Decodes a token of type `typ` (signature and expiry checked).
    fn decode(&self, token: &str, typ: &str) -> Result<Claims, AppError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.core.keys.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => unauthorized("token expired"),
                _ => unauthorized("invalid token"),
            })?;
        if data.claims.typ != typ {
            return Err(unauthorized(&format!("not an {typ} token")));
        }
        Ok(data.claims)
    }

    /// Issues an access and a refresh token for a session.
    fn issue(
        &self,
        user: &str,
        sid: &str,
        refresh_jti: &str,
    ) -> Result<(String, String, i64), AppError> {
        let now = now_ms() / 1000;
        let access_ttl = i64::try_from(self.core.settings.access_ttl.as_secs()).unwrap_or(900);
        let refresh_ttl =
            i64::try_from(self.core.settings.refresh_ttl.as_secs()).unwrap_or(604_800);
        let access = self.sign(&Claims {
            sub: user.to_owned(),
            sid: sid.to_owned(),
            typ: ACCESS.into(),
            jti: new_jti(),
            iat: now,
            exp: now + access_ttl,
        })?;
        let refresh = self.sign(&Claims {
            sub: user.to_owned(),
            sid: sid.to_owned(),
            typ: REFRESH.into(),
            jti: refresh_jti.to_owned(),
            iat: now,
            exp: now + refresh_ttl,
        })?;
        Ok((access, refresh, access_ttl))
    }

    fn refresh_expiry_ms(&self) -> i64 {
        now_ms() + i64::try_from(self.core.settings.refresh_ttl.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// The user an access token belongs to, if it is valid and its session active.
    pub async fn authenticate(&self, token: &str) -> Result<(String, i64), AppError> {
        let claims = self.decode(token, ACCESS)?;
        let session = self
            .core
            .repo
            .get_session(Request::new(rpb::GetSessionRequest {
                session_id: claims.sid.clone(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner();
        if !session.active || session.user_id != claims.sub {
            return Err(unauthorized("session ended; log in again"));
        }
        Ok((claims.sub, claims.exp))
    }

    async fn load_user(&self, id: &str) -> Result<pb::User, AppError> {
        let u = self
            .core
            .repo
            .get_user(Request::new(rpb::GetUserRequest {
                user_id: id.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner()
            .user
            .ok_or_else(|| AppError::new(ErrorCode::UserNotFound, "user not found"))?;
        Ok(logic_user(u))
    }
}

#[tonic::async_trait]
impl<R: RepoApi, B: Bus> AuthService for Logic<R, B> {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let r = request.into_inner();
        if r.username.is_empty() || r.password.is_empty() {
            return Err(AppError::invalid("username and password are required").into());
        }
        let verified = self
            .core
            .repo
            .verify_password(Request::new(rpb::VerifyPasswordRequest {
                username: r.username,
                password: r.password,
            }))
            .await?
            .into_inner();
        let user = match (verified.valid, verified.user) {
            (true, Some(u)) => u,
            _ => {
                return Err(AppError::new(
                    ErrorCode::InvalidPassword,
                    "wrong username or password",
                )
                .into());
            }
        };
        let jti = new_jti();
        let session = self
            .core
            .repo
            .create_session(Request::new(rpb::CreateSessionRequest {
                user_id: user.id.clone(),
                refresh_jti: jti.clone(),
                expires_at: self.refresh_expiry_ms(),
            }))
            .await?
            .into_inner();
        let (access_token, refresh_token, expires_in) =
            self.issue(&user.id, &session.session_id, &jti)?;
        Ok(Response::new(pb::LoginResponse {
            access_token,
            refresh_token,
            expires_in,
            user: Some(logic_user(user)),
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = request.into_inner();
        validate_username(&r.username)?;
        validate_password(&r.password)?;
        if r.nickname.chars().count() > 50 {
            return Err(AppError::invalid("nickname must be at most 50 characters").into());
        }
        let user = self
            .core
            .repo
            .create_user(Request::new(rpb::CreateUserRequest {
                username: r.username,
                password: r.password,
                nickname: r.nickname,
                avatar_url: String::new(),
            }))
            .await?
            .into_inner()
            .user
            .ok_or_else(|| AppError::internal("repo returned no user"))?;
        Ok(Response::new(pb::RegisterResponse {
            user: Some(logic_user(user)),
        }))
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let claims = self.decode(&request.get_ref().refresh_token, REFRESH)?;
        let jti = new_jti();
        let rotated = self
            .core
            .repo
            .rotate_session(Request::new(rpb::RotateSessionRequest {
                session_id: claims.sid.clone(),
                old_refresh_jti: claims.jti.clone(),
                new_refresh_jti: jti.clone(),
                expires_at: self.refresh_expiry_ms(),
            }))
            .await?
            .into_inner();
        if !rotated.rotated {
            // A refresh token that was already used: treat it as stolen and end the session.
            let revoked = self
                .core
                .repo
                .revoke_session(Request::new(rpb::RevokeSessionRequest {
                    session_id: claims.sid,
                }))
                .await?
                .into_inner();
            if revoked.revoked {
                tracing::warn!(user = %claims.sub, "refresh token replayed; session revoked");
            }
            return Err(unauthorized("refresh token is no longer valid").into());
        }
        let (access_token, refresh_token, expires_in) =
            self.issue(&claims.sub, &claims.sid, &jti)?;
        let user = self.load_user(&claims.sub).await?;
        Ok(Response::new(pb::RefreshTokenResponse {
            access_token,
            refresh_token,
            expires_in,
            user: Some(user),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let claims = self.decode(&request.get_ref().access_token, ACCESS)?;
        self.core
            .repo
            .revoke_session(Request::new(rpb::RevokeSessionRequest {
                session_id: claims.sid,
            }))
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let (user_id, exp) = self.authenticate(&request.get_ref().access_token).await?;
        Ok(Response::new(pb::ValidateTokenResponse {
            user_id,
            expires_at: exp,
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let user = self.load_user(&request.get_ref().user_id).await?;
        Ok(Response::new(pb::GetUserResponse { user: Some(user) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_rules() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("a.b-c_9").is_ok());
        for bad in ["ab", "with space", "ünï", &"x".repeat(33), ""] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_rules() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("short").is_err());
        assert!(validate_password(&"p".repeat(129)).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Keys::new("too short").is_err());
        assert!(Keys::new(&"k".repeat(32)).is_ok());
    }
}
