//! Which endpoint a request path names.

use crate::error::clip;

/// The route of a request: what the path names.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    Server,
    Live,
    Ready,
    AllStats,
    Model {
        name: String,
        version: String,
        action: ModelAction,
    },
    Index,
    Load(String),
    Unload(String),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) enum ModelAction {
    Metadata,
    Ready,
    Config,
    Stats,
    Infer,
}

/// The route a path names, or the 404 message.
pub(super) fn route(path: &str) -> Result<Route, String> {
    let parts: Vec<String> = path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| format!("the path {} is not valid percent-encoded UTF-8", clip(path)))?;
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let model = |name: &str, version: &str, action| Route::Model {
        name: name.to_owned(),
        version: version.to_owned(),
        action,
    };
    let action = |tail: &[&str]| match tail {
        [] => Some(ModelAction::Metadata),
        ["ready"] => Some(ModelAction::Ready),
        ["config"] => Some(ModelAction::Config),
        ["stats"] => Some(ModelAction::Stats),
        ["infer"] => Some(ModelAction::Infer),
        _ => None,
    };
    let found = match parts.as_slice() {
        ["v2"] => Some(Route::Server),
        ["v2", "health", "live"] => Some(Route::Live),
        ["v2", "health", "ready"] => Some(Route::Ready),
        ["v2", "models", "stats"] => Some(Route::AllStats),
        ["v2", "repository", "index"] => Some(Route::Index),
        ["v2", "repository", "models", name, "load"] => Some(Route::Load((*name).to_owned())),
        ["v2", "repository", "models", name, "unload"] => Some(Route::Unload((*name).to_owned())),
        ["v2", "models", name, "versions", version, tail @ ..] => {
            action(tail).map(|a| model(name, version, a))
        }
        ["v2", "models", name, tail @ ..] => action(tail).map(|a| model(name, "", a)),
        _ => None,
    };
    found.ok_or_else(|| format!("no endpoint at {}", clip(path)))
}

/// `%XX` escapes decoded; `None` when an escape is malformed or the result is not UTF-8.
pub(super) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
