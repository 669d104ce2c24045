//! What a call can fail with: the server's own answer (`{"error", "status"}`), or not
//! reaching it, or an answer that is not what the contract says.

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the call; `message` is its `error` text.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// No answer: connection refused, reset, timed out, DNS.
    #[error("cannot reach the server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that is not what the contract says (`what` names the call).
    #[error("unexpected answer to {what}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The answer's body broke off.
    #[error("reading the answer to {what} failed")]
    Body {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// The event stream could not be resumed, or carried a frame the contract does not allow.
    #[error("the event stream of operation {operation} failed: {reason}")]
    Stream { operation: String, reason: String },
    /// A server URL that is not an absolute http(s) URL.
    #[error("invalid server URL {0:?}: it must be http:// or https://")]
    BadUrl(String),
    /// An id that cannot name a resource (empty, `.` or `..`).
    #[error("invalid id {0:?}")]
    BadId(String),
    /// A token that cannot be sent in a header.
    #[error("the token contains characters a header cannot carry")]
    BadToken,
}

impl ClientError {
    /// The HTTP status of a refusal by the server.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
