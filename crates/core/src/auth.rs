//! Bearer tokens, namespaces and permissions. Tokens are configured by their SHA-256 (or in
//! plain text, hashed at load); only hashes are kept in memory.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use boxwood_store::{Store, TokenRecord};

use crate::error::{CoreError, CoreResult};

/// The namespace whose images and tags every caller can read.
pub const PUBLIC_NAMESPACE: &str = "public";

/// What a token may do (the lowercase names `/whoami` reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Import,
    Spawn,
    SpawnDisposable,
    List,
    Cancel,
    SetImageTag,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::Import,
        Permission::Spawn,
        Permission::SpawnDisposable,
        Permission::List,
        Permission::Cancel,
        Permission::SetImageTag,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Import => "import",
            Permission::Spawn => "spawn",
            Permission::SpawnDisposable => "spawn_disposable",
            Permission::List => "list",
            Permission::Cancel => "cancel",
            Permission::SetImageTag => "set_image_tag",
        }
    }
}

/// One configured token. `Debug` redacts the secret.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The secret itself (convenient for development; prefer `sha256`).
    #[serde(default)]
    pub token: Option<String>,
    /// Hex SHA-256 of the secret.
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "all_permissions")]
    pub permissions: BTreeSet<Permission>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token", &crate::redact::secret(&self.token))
            .field("sha256", &self.sha256)
            .field("namespace", &self.namespace)
            .field("permissions", &self.permissions)
            .finish()
    }
}

fn default_namespace() -> String {
    "default".into()
}

fn all_permissions() -> BTreeSet<Permission> {
    Permission::ALL.into_iter().collect()
}

/// The authenticated identity behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_uuid: Uuid,
    pub namespace: String,
    pub permissions: BTreeSet<Permission>,
}

impl Caller {
    pub fn require(&self, p: Permission) -> CoreResult<()> {
        if self.permissions.contains(&p) { Ok(()) } else { Err(CoreError::Forbidden(p.as_str())) }
    }

    /// Namespaces whose objects this caller can read, its own first.
    pub fn visible_namespaces(&self) -> Vec<String> {
        let mut v = vec![self.namespace.clone()];
        if self.namespace != PUBLIC_NAMESPACE {
            v.push(PUBLIC_NAMESPACE.to_owned());
        }
        v
    }
}

/// Checks bearer tokens against the configured hashes.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    entries: Vec<([u8; 32], Caller)>,
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The caller of a token created with `boxwood token create` (unknown permission names,
/// from a newer version, grant nothing).
pub fn caller_from_record(t: &TokenRecord) -> Caller {
    let permissions =
        t.permissions.iter().filter_map(|name| Permission::ALL.into_iter().find(|p| p.as_str() == name)).collect();
    Caller { token_uuid: t.uuid, namespace: t.namespace.clone(), permissions }
}

/// Parses permission names (`list,spawn`…); `all` means every permission.
pub fn parse_permissions(names: &[String]) -> CoreResult<BTreeSet<Permission>> {
    let mut set = BTreeSet::new();
    for n in names.iter().flat_map(|n| n.split(',')).map(str::trim).filter(|n| !n.is_empty()) {
        if n == "all" {
            set.extend(Permission::ALL);
            continue;
        }
        let p = Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == n)
            .ok_or_else(|| CoreError::bad(format!("unknown permission {n:?}")))?;
        set.insert(p);
    }
    Ok(set)
}

/// Creates a token in the store and returns its secret (shown once; only its hash is kept).
pub async fn create_token(
    store: &dyn Store,
    namespace: &str,
    permissions: &BTreeSet<Permission>,
    description: Option<String>,
) -> CoreResult<(String, TokenRecord)> {
    if namespace.is_empty()
        || namespace == PUBLIC_NAMESPACE
        || !namespace.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(CoreError::bad(format!(
            "invalid namespace {namespace:?}: letters, digits, '-', '_', '.'; not {PUBLIC_NAMESPACE:?}"
        )));
    }
    let secret = format!("bw_{}", hex::encode(rand::random::<[u8; 24]>()));
    let record = TokenRecord {
        sha256: sha256_hex(&secret),
        uuid: Uuid::new_v4(),
        namespace: namespace.to_owned(),
        permissions: permissions.iter().map(|p| p.as_str().to_owned()).collect(),
        description,
        created_at_us: crate::clock::now_us(),
        revoked_at_us: None,
    };
    store.insert_token(&record).await?;
    Ok((secret, record))
}

impl Authenticator {
    pub fn new(tokens: &[TokenConfig]) -> CoreResult<Self> {
        let mut entries = Vec::new();
        for t in tokens {
            let hash_hex = match (&t.token, &t.sha256) {
                (Some(secret), None) => sha256_hex(secret),
                (None, Some(h)) => h.to_ascii_lowercase(),
                _ => return Err(CoreError::bad("each token needs exactly one of `token` or `sha256`")),
            };
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&hash_hex, &mut hash)
                .map_err(|_| CoreError::bad(format!("token sha256 {hash_hex:?} is not 64 hex digits")))?;
            if t.namespace.is_empty() {
                return Err(CoreError::bad("token namespace must not be empty"));
            }
            let mut id = [0u8; 16];
            id.copy_from_slice(&Sha256::digest(hash)[..16]);
            let token_uuid = uuid::Builder::from_random_bytes(id).into_uuid();
            entries.push((
                hash,
                Caller { token_uuid, namespace: t.namespace.clone(), permissions: t.permissions.clone() },
            ));
        }
        Ok(Self { entries })
    }

    pub fn authenticate(&self, bearer: Option<&str>) -> CoreResult<Caller> {
        let secret = bearer.filter(|s| !s.is_empty()).ok_or(CoreError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        // Comparing digests, not secrets: timing reveals nothing usable about the secret.
        self.entries.iter().find(|(h, _)| *h == digest).map(|(_, c)| c.clone()).ok_or(CoreError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_hashed_tokens_authenticate_to_stable_identities() {
        let cfg = vec![
            TokenConfig {
                token: Some("s3cret".into()),
                sha256: None,
                namespace: "a".into(),
                permissions: all_permissions(),
            },
            TokenConfig {
                token: None,
                sha256: Some(sha256_hex("other")),
                namespace: "b".into(),
                permissions: [Permission::List].into(),
            },
        ];
        let auth = Authenticator::new(&cfg).unwrap();
        let a = auth.authenticate(Some("s3cret")).unwrap();
        assert_eq!(a.namespace, "a");
        assert_eq!(a.token_uuid, Authenticator::new(&cfg).unwrap().authenticate(Some("s3cret")).unwrap().token_uuid);
        let b = auth.authenticate(Some("other")).unwrap();
        assert!(b.require(Permission::List).is_ok());
        assert!(matches!(b.require(Permission::Spawn), Err(CoreError::Forbidden("spawn"))));
        assert!(matches!(auth.authenticate(Some("nope")), Err(CoreError::Unauthorized)));
        assert!(matches!(auth.authenticate(None), Err(CoreError::Unauthorized)));
        assert_eq!(b.visible_namespaces(), vec!["b".to_string(), PUBLIC_NAMESPACE.to_string()]);
    }

    #[test]
    fn rejects_ambiguous_or_malformed_entries() {
        let both = TokenConfig {
            token: Some("x".into()),
            sha256: Some("y".into()),
            namespace: "a".into(),
            permissions: all_permissions(),
        };
        assert!(Authenticator::new(&[both]).is_err());
        let bad = TokenConfig {
            token: None,
            sha256: Some("zz".into()),
            namespace: "a".into(),
            permissions: all_permissions(),
        };
        assert!(Authenticator::new(&[bad]).is_err());
    }
}
