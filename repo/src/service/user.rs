//! UserService: accounts, with passwords hashed once by repo (argon2id, PHC strings) and public
//! fields cached in `user_info:{id}`.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use gochat_infra::{AppError, ErrorCode, time::now_ms};
use gochat_proto::repo as pb;
use gochat_proto::repo::user_service_server::UserService;
use tonic::{Request, Response, Status};

use super::{Repo, cache_read, cache_write, id_field, id_list, pb_user, status, user_not_found};
use crate::cache::Cache;
use crate::model::{AuthSession, User, UserChanges};
use crate::store::{Store, StoreError};

/// The most users one `GetUsers` call may ask for.
const MAX_BATCH: usize = 1000;

impl<S: Store, C: Cache> Repo<S, C> {
    fn argon2(&self) -> Result<Argon2<'static>, AppError> {
        let s = self.settings();
        let params = Params::new(s.argon2_memory_kib, s.argon2_iterations, 1, None)
            .map_err(|e| AppError::internal(format!("argon2 parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Hashes a password on the blocking pool (it takes tens of milliseconds on purpose).
    async fn hash_password(&self, password: String) -> Result<String, AppError> {
        let argon2 = self.argon2()?;
        tokio::task::spawn_blocking(move || {
            let mut salt = [0u8; 16];
            rand::fill(&mut salt);
            let salt = SaltString::encode_b64(&salt)
                .map_err(|e| AppError::internal(format!("salt: {e}")))?;
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AppError::internal(format!("hashing: {e}")))
        })
        .await
        .map_err(|e| AppError::internal(format!("hashing task: {e}")))?
    }

    /// Checks a password against a PHC hash on the blocking pool.
    async fn verify_password(&self, password: String, hash: String) -> Result<bool, AppError> {
        let argon2 = self.argon2()?;
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| AppError::internal(format!("stored hash unreadable: {e}")))?;
            Ok(argon2.verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(|e| AppError::internal(format!("verify task: {e}")))?
    }

    /// A user through the cache.
    pub(crate) async fn load_user(&self, id: i64) -> Result<Option<User>, AppError> {
        if let Some(u) = cache_read(self.cache().get_user(id).await, "user_info") {
            return Ok(Some(u));
        }
        let user = self.store().get_user(id).await?;
        if let Some(u) = &user {
            cache_write(
                self.cache().set_user(u, self.settings().user_ttl).await,
                "user_info",
            );
        }
        Ok(user)
    }

    /// Users through the cache, in the order of `ids`, unknown ids left out.
    pub(crate) async fn load_users(&self, ids: &[i64]) -> Result<Vec<User>, AppError> {
        let cached = match self.cache().get_users(ids).await {
            Ok(v) if v.len() == ids.len() => v,
            Ok(_) => vec![None; ids.len()],
            Err(err) => {
                tracing::warn!(cause = %err, "cache read failed; using the database");
                vec![None; ids.len()]
            }
        };
        let missing: Vec<i64> = ids
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_none())
            .map(|(id, _)| *id)
            .collect();
        let mut found: std::collections::HashMap<i64, User> = std::collections::HashMap::new();
        if !missing.is_empty() {
            for u in self.store().get_users(&missing).await? {
                cache_write(
                    self.cache().set_user(&u, self.settings().user_ttl).await,
                    "user_info",
                );
                found.insert(u.id, u);
            }
        }
        Ok(ids
            .iter()
            .zip(cached)
            .filter_map(|(id, c)| c.or_else(|| found.remove(id)))
            .collect())
    }

    /// Fails with 2000 unless every id is a user.
    pub(crate) async fn require_users(&self, ids: &[i64]) -> Result<(), AppError> {
        let found = self.load_users(ids).await?;
        if found.len() != ids.len() {
            let known: std::collections::HashSet<i64> = found.iter().map(|u| u.id).collect();
            if let Some(missing) = ids.iter().find(|id| !known.contains(id)) {
                return Err(user_not_found(*missing));
            }
        }
        Ok(())
    }
}

/// A hash to verify against when the username is unknown, so that the answer takes as long as
/// for a known user (no username probing by timing).
static DUMMY_HASH: OnceLock<String> = OnceLock::new();

fn validate_jti(jti: &str) -> Result<(), AppError> {
    if jti.is_empty() || jti.len() > 64 {
        return Err(AppError::invalid("refresh token id must be 1 to 64 bytes"));
    }
    Ok(())
}

fn validate_username(username: &str) -> Result<(), AppError> {
    let n = username.chars().count();
    if !(3..=50).contains(&n) {
        return Err(AppError::invalid("username must be 3 to 50 characters"));
    }
    Ok(())
}

fn validate_password(password: &str) -> Result<(), AppError> {
    if password.is_empty() || password.len() > 1024 {
        return Err(AppError::invalid("password must be 1 to 1024 bytes"));
    }
    Ok(())
}

fn validate_profile(nickname: &str, avatar_url: &str) -> Result<(), AppError> {
    if nickname.chars().count() > 50 {
        return Err(AppError::invalid("nickname must be at most 50 characters"));
    }
    if avatar_url.chars().count() > 255 {
        return Err(AppError::invalid(
            "avatar_url must be at most 255 characters",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl<S: Store, C: Cache> UserService for Repo<S, C> {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let r = request.into_inner();
        validate_username(&r.username)?;
        validate_password(&r.password)?;
        validate_profile(&r.nickname, &r.avatar_url)?;
        let hash = self.hash_password(r.password).await?;
        let now = now_ms();
        let user = User {
            id: self.inner.ids.next_id(),
            nickname: if r.nickname.is_empty() {
                r.username.clone()
            } else {
                r.nickname
            },
            username: r.username,
            password_hash: hash,
            avatar_url: r.avatar_url,
            created_at: now,
            updated_at: now,
        };
        self.store().create_user(&user).await.map_err(|e| match e {
            StoreError::UserExists => status(AppError::new(
                ErrorCode::UserExists,
                format!("username {:?} is taken", user.username),
            )),
            other => status(other),
        })?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(pb_user(&user)),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let id = id_field("user_id", &request.get_ref().user_id)?;
        let user = self
            .load_user(id)
            .await?
            .ok_or_else(|| user_not_found(id))?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(pb_user(&user)),
        }))
    }

    async fn get_user_by_username(
        &self,
        request: Request<pb::GetUserByUsernameRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let name = &request.get_ref().username;
        let user = self
            .store()
            .get_user_by_username(name)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                AppError::new(ErrorCode::UserNotFound, format!("user {name:?} not found"))
            })?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(pb_user(&user)),
        }))
    }

    async fn get_users(
        &self,
        request: Request<pb::GetUsersRequest>,
    ) -> Result<Response<pb::GetUsersResponse>, Status> {
        let ids = id_list("user_ids", &request.get_ref().user_ids, MAX_BATCH)?;
        let users = self.load_users(&ids).await?;
        Ok(Response::new(pb::GetUsersResponse {
            users: users.iter().map(pb_user).collect(),
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let r = request.into_inner();
        let id = id_field("user_id", &r.user_id)?;
        validate_profile(
            r.nickname.as_deref().unwrap_or(""),
            r.avatar_url.as_deref().unwrap_or(""),
        )?;
        let password_hash = match r.password {
            Some(p) => {
                validate_password(&p)?;
                Some(self.hash_password(p).await?)
            }
            None => None,
        };
        let changes = UserChanges {
            nickname: r.nickname,
            avatar_url: r.avatar_url,
            password_hash,
        };
        let user = self
            .store()
            .update_user(id, &changes, now_ms())
            .await
            .map_err(status)?
            .ok_or_else(|| user_not_found(id))?;
        cache_write(self.cache().del_user(id).await, "user_info");
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(pb_user(&user)),
        }))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        validate_jti(&r.refresh_jti)?;
        let now = now_ms();
        let session = AuthSession {
            id: self.inner.ids.next_id(),
            user_id: user,
            refresh_jti: r.refresh_jti,
            revoked: 0,
            expires_at: r.expires_at,
            created_at: now,
            updated_at: now,
        };
        self.store()
            .create_session(&session)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateSessionResponse {
            session_id: session.id.to_string(),
        }))
    }

    async fn rotate_session(
        &self,
        request: Request<pb::RotateSessionRequest>,
    ) -> Result<Response<pb::RotateSessionResponse>, Status> {
        let r = request.into_inner();
        let id = id_field("session_id", &r.session_id)?;
        validate_jti(&r.old_refresh_jti)?;
        validate_jti(&r.new_refresh_jti)?;
        let rotated = self
            .store()
            .rotate_session(
                id,
                &r.old_refresh_jti,
                &r.new_refresh_jti,
                r.expires_at,
                now_ms(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RotateSessionResponse {
            rotated: rotated.is_some(),
            user_id: rotated.map(|s| s.user_id.to_string()).unwrap_or_default(),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let id = id_field("session_id", &request.get_ref().session_id)?;
        let revoked = self
            .store()
            .revoke_session(id, now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RevokeSessionResponse { revoked }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let id = id_field("session_id", &request.get_ref().session_id)?;
        let session = self.store().get_session(id).await.map_err(status)?;
        Ok(Response::new(match session {
            Some(s) => pb::GetSessionResponse {
                active: s.is_active(now_ms()),
                user_id: s.user_id.to_string(),
                expires_at: s.expires_at,
            },
            None => pb::GetSessionResponse::default(),
        }))
    }

    async fn verify_password(
        &self,
        request: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        let r = request.into_inner();
        let user = self
            .store()
            .get_user_by_username(&r.username)
            .await
            .map_err(status)?;
        let Some(user) = user else {
            let dummy = match DUMMY_HASH.get() {
                Some(h) => h.clone(),
                None => {
                    let h = self.hash_password("gochat-dummy-password".into()).await?;
                    DUMMY_HASH.get_or_init(|| h).clone()
                }
            };
            let _ = self.verify_password(r.password, dummy).await?;
            return Ok(Response::new(pb::VerifyPasswordResponse {
                valid: false,
                user: None,
            }));
        };
        let valid = self
            .verify_password(r.password, user.password_hash.clone())
            .await?;
        Ok(Response::new(pb::VerifyPasswordResponse {
            valid,
            user: valid.then(|| pb_user(&user)),
        }))
    }
}
