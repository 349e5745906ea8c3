//! The server's one error type and the one table that maps it to an HTTP
//! status and a distribution-spec error code. Every failure a client sees is
//! a JSON body `{"errors":[{"code","message","detail"}]}` built here.

use orlop_engine::Digest;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(Digest),
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("provided digest did not match uploaded content: {0}")]
    DigestInvalid(String),
    #[error("blob unknown to registry: {0}")]
    ManifestBlobUnknown(Digest),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("manifest is referenced by index {parent} in this repository; delete the index first")]
    ManifestReferenced { parent: Digest },
    #[error("invalid repository name {0}")]
    NameInvalid(String),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("requested range not satisfiable (blob is {size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    #[error("upload chunk out of order: upload is at offset {offset}")]
    UploadOutOfOrder { offset: u64, location: String },
    #[error("invalid pagination number: {0}")]
    PaginationNumberInvalid(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("requested access to the resource is denied: {0}")]
    Denied(String),
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    #[error("request head of {size} bytes exceeds the limit of {limit} bytes")]
    HeadTooLarge { size: u64, limit: u64 },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not found")]
    NotFound,
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is damaged: {0}")]
    Damaged(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The table: HTTP status and spec error code of every variant.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        use ApiError::*;
        match self {
            BlobUnknown(_) => (404, "BLOB_UNKNOWN"),
            BlobUploadInvalid(_) => (400, "BLOB_UPLOAD_INVALID"),
            BlobUploadUnknown => (404, "BLOB_UPLOAD_UNKNOWN"),
            DigestInvalid(_) => (400, "DIGEST_INVALID"),
            ManifestBlobUnknown(_) => (400, "MANIFEST_BLOB_UNKNOWN"),
            ManifestInvalid(_) => (400, "MANIFEST_INVALID"),
            ManifestUnknown(_) => (404, "MANIFEST_UNKNOWN"),
            ManifestReferenced { .. } => (409, "DENIED"),
            NameInvalid(_) => (400, "NAME_INVALID"),
            NameUnknown(_) => (404, "NAME_UNKNOWN"),
            TagInvalid(_) => (400, "TAG_INVALID"),
            SizeInvalid(_) => (400, "SIZE_INVALID"),
            TooLarge { .. } => (413, "SIZE_INVALID"),
            RangeNotSatisfiable { .. } => (416, "BLOB_UPLOAD_INVALID"),
            UploadOutOfOrder { .. } => (416, "BLOB_UPLOAD_INVALID"),
            PaginationNumberInvalid(_) => (400, "PAGINATION_NUMBER_INVALID"),
            Unauthorized => (401, "UNAUTHORIZED"),
            Denied(_) => (403, "DENIED"),
            Unsupported(_) => (405, "UNSUPPORTED"),
            HeadTooLarge { .. } => (431, "UNSUPPORTED"),
            MethodNotAllowed => (405, "UNSUPPORTED"),
            NotFound => (404, "UNSUPPORTED"),
            TooManyRequests(_) => (429, "TOOMANYREQUESTS"),
            Unavailable(_) => (503, "UNAVAILABLE"),
            Damaged(_) => (500, "UNKNOWN"),
            Internal(_) => (500, "UNKNOWN"),
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> Vec<u8> {
        let (_, code) = self.status_and_code();
        let detail = match self {
            ApiError::BlobUnknown(d) | ApiError::ManifestBlobUnknown(d) => {
                json!({ "digest": d.to_string() })
            }
            ApiError::UploadOutOfOrder { offset, .. } => json!({ "offset": offset }),
            ApiError::RangeNotSatisfiable { size } => json!({ "size": size }),
            _ => serde_json::Value::Null,
        };
        let v =
            json!({ "errors": [{ "code": code, "message": self.to_string(), "detail": detail }] });
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// Engine errors as clients see them.
impl From<orlop_engine::Error> for ApiError {
    fn from(e: orlop_engine::Error) -> Self {
        use orlop_engine::Error as E;
        match e {
            E::DigestMismatch { expected, actual } => {
                ApiError::DigestInvalid(format!("expected {expected}, content is {actual}"))
            }
            E::InvalidDigest { input, reason } => {
                ApiError::DigestInvalid(format!("{input}: {reason}"))
            }
            E::BlobUnknown(d) => ApiError::BlobUnknown(d),
            E::SizeMismatch { expected, actual } => {
                ApiError::SizeInvalid(format!("expected {expected} bytes, got {actual}"))
            }
            E::RangeInvalid { size, .. } => ApiError::RangeNotSatisfiable { size },
            E::ShuttingDown => ApiError::Unavailable("the registry is shutting down".into()),
            E::Poisoned => ApiError::Unavailable(
                "the store refuses writes after an I/O failure; the operator must restart it"
                    .into(),
            ),
            E::ReadOnly => ApiError::Unsupported("the registry is read-only".into()),
            // A row too large for the store's journal (a manifest naming
            // thousands of blobs): refused like any oversized payload.
            E::ChangeTooLarge { bytes, max, .. } => ApiError::TooLarge {
                size: bytes as u64,
                limit: max as u64,
            },
            e if e.is_corruption() => ApiError::Damaged(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
