//! `meta.k8s.io/v1` `Status` errors, with the messages, reasons and details
//! the real API server writes (`k8s.io/apimachinery/pkg/api/errors`).
use std::fmt;

use serde_json::{Value, json};

use super::resources::Kind;

/// An API error: what the server answers with a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason`: `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...
    pub reason: String,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, when the real server fills it.
    pub details: Option<Value>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// `Status.reason` for an HTTP code, as `errors.FromObject`/`NewGenericServerResponse` pick it.
pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "",
    }
}

fn details(kind: Kind, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": kind.plural() });
    if !kind.group().is_empty() {
        d["group"] = json!(kind.group());
    }
    d
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>, details: Option<Value>) -> Self {
        Self { code, reason: reason.to_owned(), message: message.into(), details }
    }

    /// `services "web" not found`
    pub(crate) fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified_plural()),
            Some(details(kind, name)),
        )
    }

    /// The real server's answer to a path it does not serve.
    pub(crate) fn no_such_path() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource", Some(json!({})))
    }

    /// `services "web" already exists`
    pub(crate) fn already_exists(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified_plural()),
            Some(details(kind, name)),
        )
    }

    /// `Operation cannot be fulfilled on services "web": <why>`
    pub(crate) fn conflict(kind: Kind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", kind.qualified_plural()),
            Some(details(kind, name)),
        )
    }

    /// The optimistic-concurrency conflict of an update with a stale resourceVersion.
    pub(crate) fn modified(kind: Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 `Service "web" is invalid: field: Reason: detail`, one cause per field error.
    pub(crate) fn invalid(kind: Kind, name: &str, causes: &[FieldError]) -> Self {
        let text: Vec<String> = causes.iter().map(FieldError::to_string).collect();
        let message = if text.len() == 1 {
            format!("{} \"{name}\" is invalid: {}", kind.kind(), text[0])
        } else {
            format!("{} \"{name}\" is invalid: [{}]", kind.kind(), text.join(", "))
        };
        let mut d = json!({
            "name": name,
            "kind": kind.kind(),
            "causes": causes.iter().map(|c| json!({
                "reason": c.reason,
                "message": format!("{}: {}", c.reason_text(), c.detail_text()),
                "field": c.field,
            })).collect::<Vec<_>>(),
        });
        if !kind.group().is_empty() {
            d["group"] = json!(kind.group());
        }
        Self::new(422, "Invalid", message, Some(d))
    }

    /// 403 as the RBAC authorizer words it, for the kubeconfig's user `test`.
    pub(crate) fn forbidden(kind: Kind, verb: &str, ns: Option<&str>) -> Self {
        let group = if kind.group().is_empty() { String::new() } else { format!(" in API group \"{}\"", kind.group()) };
        let scope = ns.map_or_else(|| " at the cluster scope".to_owned(), |ns| format!(" in the namespace \"{ns}\""));
        let mut d = json!({ "kind": kind.plural() });
        if !kind.group().is_empty() {
            d["group"] = json!(kind.group());
        }
        Self::new(
            403,
            "Forbidden",
            format!("{} is forbidden: User \"test\" cannot {verb} resource \"{}\"{group}{scope}", kind.qualified_plural(), kind.plural()),
            Some(d),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message, None)
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json; got {content_type:?}"), None)
    }

    /// 410 Expired, as a watch `ERROR` event or a list with a compacted continue token.
    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message, None)
    }

    /// 504 for a list or get at a resourceVersion the server has not reached (after waiting 3 s).
    pub(crate) fn too_large_resource_version(want: u64, have: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {want}, current: {have}"),
            Some(json!({
                "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
                "retryAfterSeconds": 1,
            })),
        )
    }

    pub(crate) fn internal(message: &str) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
            Some(json!({ "causes": [{ "message": message }] })),
        )
    }

    /// A fault injected by the test: the reason the real server gives that code.
    pub(crate) fn injected(code: u16) -> Self {
        match code {
            500 => Self::internal("injected fault"),
            429 => Self::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                Some(json!({ "retryAfterSeconds": 1 })),
            ),
            504 => Self::new(
                504,
                "Timeout",
                "Timeout: request did not complete within requested timeout - context deadline exceeded",
                Some(json!({})),
            ),
            _ => Self::new(code, reason_for(code), format!("injected fault ({code})"), Some(json!({}))),
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One field error of an `Invalid` answer (`field.Error`).
#[derive(Debug, Clone)]
pub(crate) struct FieldError {
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueDuplicate`, `FieldValueForbidden`.
    pub reason: &'static str,
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: &str, detail: &str) -> Self {
        Self { field: field.to_owned(), reason: "FieldValueRequired", value: None, detail: detail.to_owned() }
    }

    pub fn invalid(field: &str, value: &str, detail: &str) -> Self {
        Self {
            field: field.to_owned(),
            reason: "FieldValueInvalid",
            value: Some(value.to_owned()),
            detail: detail.to_owned(),
        }
    }

    pub fn not_supported(field: &str, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Self {
            field: field.to_owned(),
            reason: "FieldValueNotSupported",
            value: Some(value.to_owned()),
            detail: format!("supported values: {}", list.join(", ")),
        }
    }

    pub fn duplicate(field: &str, value: &str) -> Self {
        Self { field: field.to_owned(), reason: "FieldValueDuplicate", value: Some(value.to_owned()), detail: String::new() }
    }

    fn reason_text(&self) -> &'static str {
        match self.reason {
            "FieldValueRequired" => "Required value",
            "FieldValueNotSupported" => "Unsupported value",
            "FieldValueDuplicate" => "Duplicate value",
            "FieldValueForbidden" => "Forbidden",
            _ => "Invalid value",
        }
    }

    fn detail_text(&self) -> String {
        match (&self.value, self.detail.is_empty()) {
            (Some(v), true) => format!("{v:?}"),
            (Some(v), false) => format!("{v:?}: {}", self.detail),
            (None, _) => self.detail.clone(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.field, self.reason_text(), self.detail_text())
    }
}
