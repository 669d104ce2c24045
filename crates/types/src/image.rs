//! Images: listing, import from a registry, and Boxwood's lineage extension.

use serde::{Deserialize, Serialize};

use crate::redact::HIDDEN;

/// `Image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    pub uuid: String,
    pub tag: Option<String>,
    pub created_at: String,
    pub operation_uuid: Option<String>,
}

/// `GET /images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

/// `PATCH /images/{uuid}/tag` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagRequest {
    pub tag: String,
}

/// `POST /images/import` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    pub registry: RegistrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrySpec {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
}

/// `Debug` hides the password.
#[derive(Clone, Serialize, Deserialize)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials").field("username", &self.username).field("password", &HIDDEN).finish()
    }
}

/// Boxwood extension `GET /images/{uuid}/lineage`: where an image comes from and what was
/// made from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageView {
    pub image: ImageView,
    pub parent: Option<String>,
    /// Parent first, up to the root.
    pub ancestors: Vec<ImageView>,
    /// Direct children, oldest first.
    pub children: Vec<ImageView>,
    /// Direct children the retention policy removed, oldest first.
    pub removed_children: Vec<RemovedImageView>,
}

/// An image the retention policy removed, as lineage names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedImageView {
    pub uuid: String,
    pub created_at: String,
    pub removed_at: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print_and_unset_fields_are_not_sent() {
        let req = ImportRequest {
            registry: RegistrySpec {
                url: "docker://docker.io/library/alpine:3".into(),
                credentials: Some(RegistryCredentials { username: "u".into(), password: "hunter2".into() }),
            },
            tag: None,
            timeout: None,
        };
        assert!(!format!("{req:?}").contains("hunter2"));
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 1, "{json}");
        assert_eq!(json["registry"]["credentials"]["password"], "hunter2", "but it is sent");
    }
}
