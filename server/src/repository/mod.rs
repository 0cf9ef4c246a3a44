//! The model repository in Triton's layout: `<root>/<model>/config.pbtxt` and
//! `<root>/<model>/<version>/<default_model_filename>`. Scans the root, loads every model
//! it can, and keeps a reason for every one it cannot, so one broken model never stops
//! the others from serving.
//!
//! It also owns what reaches callers about the repository: model names from requests are
//! checked before anything touches the disk or the index, and reasons name paths relative
//! to the repository, never where it lies on disk (the logs keep the full paths).
//!
//! In model control mode `poll`, [`poll`] keeps the models in step with their directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sluice_proto::inference::ModelConfig;

use crate::config::{ModelControl, ModelControlMode};
use crate::error::{Error, LoadError};
use crate::model::{LoadOptions, LoadedModel};
use crate::spec::{clip, ModelSpec, VersionPolicy};

pub mod poll;

pub const CONFIG_FILE: &str = "config.pbtxt";
/// Longest model name: a directory name on every common file system.
pub const MAX_MODEL_NAME_BYTES: usize = 255;

/// Why `name` cannot name a model (it must be one directory directly in the repository),
/// or `Ok`.
pub fn check_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the model name is empty".to_owned());
    }
    if name.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!(
            "the model name is {} bytes long, above {MAX_MODEL_NAME_BYTES}",
            name.len()
        ));
    }
    if name.contains(['/', '\\']) {
        return Err("a model name cannot contain '/' or '\\'".to_owned());
    }
    // Covers `.` and `..`, and hidden directories, which the scan skips.
    if name.starts_with('.') {
        return Err("a model name cannot start with '.'".to_owned());
    }
    if name.chars().any(char::is_control) {
        return Err("a model name cannot contain control characters".to_owned());
    }
    Ok(())
}

/// State of one model as RepositoryIndex reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    Ready,
    Unavailable { reason: String },
}

impl ModelState {
    /// Triton's state names.
    pub fn name(&self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Unavailable { .. } => "UNAVAILABLE",
        }
    }
}

struct ModelEntry {
    state: ModelState,
    /// Loaded versions, newest last.
    versions: BTreeMap<i64, Arc<LoadedModel>>,
    /// Why the last load failed while these versions kept serving; cleared by the next
    /// load that succeeds.
    reload_error: Option<String>,
    /// Mode poll: the model's directory as read before the last load was tried.
    source: Option<poll::Observed>,
}

/// One row of the repository index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

pub struct Repository {
    root: PathBuf,
    /// Spellings of the root's path (with a trailing separator) removed from every reason
    /// a caller sees, longest first.
    hidden_prefixes: Vec<String>,
    options: LoadOptions,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// One load or unload at a time, so two calls for one model cannot interleave.
    control: Mutex<()>,
}

/// Reason shown for a model that is in the repository but not loaded.
pub const NOT_LOADED: &str = "unloaded";
/// How the reason of a failed reload starts, while the versions loaded before serve.
pub const RELOAD_FAILED: &str = "reload failed (the versions loaded before keep serving)";

impl Repository {
    /// Scan `root` and load the models `control` asks for (all of them in mode `none`).
    /// Blocking: loads weights. A model that fails to load is kept with its reason.
    pub fn open(
        root: &Path,
        options: LoadOptions,
        control: &ModelControl,
    ) -> Result<Repository, String> {
        let dirs = model_dirs(root)
            .map_err(|e| format!("cannot read model repository {}: {e}", root.display()))?;
        let names: Vec<String> = dirs
            .iter()
            .filter_map(|d| {
                let name = d.file_name().and_then(|n| n.to_str());
                match name.map(|n| (n, check_model_name(n))) {
                    Some((n, Ok(()))) => Some(n.to_owned()),
                    Some((_, Err(why))) => {
                        tracing::warn!(dir = %d.display(), "not a model directory: {why}");
                        None
                    }
                    None => {
                        tracing::warn!(dir = %d.display(), "not a model directory: the name is not UTF-8");
                        None
                    }
                }
            })
            .collect();
        let wanted = |name: &str| match control.mode {
            ModelControlMode::None | ModelControlMode::Poll => true,
            ModelControlMode::Explicit => control.load_models.iter().any(|m| m == name || m == "*"),
        };
        if let Some(missing) = control
            .load_models
            .iter()
            .find(|m| *m != "*" && !names.contains(m))
        {
            return Err(format!(
                "--load-model {missing}: no such model in {}",
                root.display()
            ));
        }
        let repository = Repository {
            root: root.to_owned(),
            hidden_prefixes: hidden_prefixes(root),
            options,
            models: RwLock::new(BTreeMap::new()),
            control: Mutex::new(()),
        };
        for name in names {
            if control.mode == ModelControlMode::Poll {
                // Read before it loads, so that a change made meanwhile is seen.
                let observed = poll::observe(&root.join(&name));
                repository.apply(&name, observed);
            } else if wanted(&name) {
                // A model that fails is kept with its reason (logged there).
                let _ = repository.load_entry(&name, None);
            } else {
                repository.set(&name, ModelEntry::unloaded());
            }
        }
        Ok(repository)
    }

    /// Load (or reload) a model from disk; the old versions, if any, serve until the new
    /// ones are ready, then drain and stop. If the load fails they keep serving, with
    /// the reason in the index (Triton's behaviour); a model without any is UNAVAILABLE.
    /// `config`, when given, replaces the model's config.pbtxt (Triton's `config` load
    /// parameter): it is validated like the file, and an invalid one is the caller's
    /// error, answered before the model being served is touched. Blocking: loads weights.
    pub fn load(&self, name: &str, config: Option<ModelConfig>) -> Result<(), Error> {
        check_model_name(name).map_err(|message| Error::InvalidRequest {
            model: clip(name),
            message,
        })?;
        let _one_at_a_time = self.one_at_a_time();
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::ModelNotFound {
                model: name.to_owned(),
            });
        }
        let spec = match config {
            None => None,
            Some(config) => Some(
                crate::spec::spec_from_config_with(config, &dir, &self.options.defaults.limits)
                    .map_err(|e| Error::InvalidRequest {
                        model: name.to_owned(),
                        message: format!("invalid config parameter: {}", self.public(&e)),
                    })?,
            ),
        };
        self.load_entry(name, spec)
            .map_err(|reason| Error::ModelUnavailable {
                model: name.to_owned(),
                reason,
            })
    }

    /// Unload a model: new requests get UNAVAILABLE at once; requests already admitted
    /// finish on the old instances, which stop once they are done.
    pub fn unload(&self, name: &str) -> Result<(), Error> {
        check_model_name(name).map_err(|message| Error::InvalidRequest {
            model: clip(name),
            message,
        })?;
        let _one_at_a_time = self.one_at_a_time();
        if !self.is_known(name) {
            return Err(Error::ModelNotFound {
                model: name.to_owned(),
            });
        }
        self.set(name, ModelEntry::unloaded());
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    /// `spec`: a configuration given with the load request, else config.pbtxt is read.
    /// The new versions load beside the ones serving, which are swapped out only once
    /// the new ones are ready; if the load fails, they keep serving. `Err`: the reason.
    fn load_entry(&self, name: &str, spec: Option<ModelSpec>) -> Result<(), String> {
        let loaded = load_model(
            &self.root.join(name),
            name,
            self.options,
            spec,
            BTreeMap::new(),
        );
        self.settle(name, loaded, None)
    }

    /// Serve what a load produced, or record why it failed (see [`Repository::failed`]),
    /// remembering `source`, the directory as read before the load.
    fn settle(
        &self,
        name: &str,
        loaded: Result<BTreeMap<i64, Arc<LoadedModel>>, LoadError>,
        source: Option<poll::Observed>,
    ) -> Result<(), String> {
        match loaded {
            Ok(versions) => {
                let list: Vec<String> = versions.keys().map(i64::to_string).collect();
                tracing::info!(model = %name, versions = %list.join(","), "model ready");
                self.set(
                    name,
                    ModelEntry {
                        state: ModelState::Ready,
                        versions,
                        reload_error: None,
                        source,
                    },
                );
                Ok(())
            }
            Err(e) => Err(self.failed(name, &self.public(&e.to_string()), source)),
        }
    }

    /// A load of `name` failed for `reason`: versions already serving keep serving,
    /// with the reason shown beside them (Triton keeps a model whose reload fails); a
    /// model without any is UNAVAILABLE with the reason. Returns the reason as shown.
    fn failed(&self, name: &str, reason: &str, source: Option<poll::Observed>) -> String {
        let mut models = self
            .models
            .write()
            .expect("repository lock is never poisoned");
        match models.get_mut(name) {
            Some(entry) if !entry.versions.is_empty() => {
                tracing::error!(model = %name, %reason, "model failed to reload; its loaded versions keep serving");
                let shown = format!("{RELOAD_FAILED}: {reason}");
                entry.reload_error = Some(shown.clone());
                entry.source = source;
                shown
            }
            Some(_) | None => {
                tracing::error!(model = %name, %reason, "model failed to load; serving the others");
                let entry = ModelEntry {
                    source,
                    ..ModelEntry::unavailable(reason.to_owned())
                };
                let old = models.insert(name.to_owned(), entry);
                drop(models);
                drop(old);
                reason.to_owned()
            }
        }
    }

    fn set(&self, name: &str, entry: ModelEntry) {
        let old = self
            .models
            .write()
            .expect("repository lock is never poisoned")
            .insert(name.to_owned(), entry);
        drop(old); // outside the lock: the old versions' batchers drain on their own
    }

    /// The control lock. It guards no data, only the order of loads and unloads, so a
    /// load that panicked while holding it leaves nothing inconsistent: later loads go on.
    fn one_at_a_time(&self) -> std::sync::MutexGuard<'_, ()> {
        self.control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `text` with the repository's location removed, so paths in it read relative to
    /// the repository (`mlp/config.pbtxt`).
    fn public(&self, text: &str) -> String {
        self.hidden_prefixes
            .iter()
            .fold(text.to_owned(), |t, prefix| t.replace(prefix.as_str(), ""))
    }

    /// The model version a request names: `""` or `"-1"` is the newest loaded version.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, Error> {
        let models = self
            .models
            .read()
            .expect("repository lock is never poisoned");
        let entry = models.get(name).ok_or_else(|| Error::ModelNotFound {
            model: name.to_owned(),
        })?;
        if let ModelState::Unavailable { reason } = &entry.state {
            return Err(Error::ModelUnavailable {
                model: name.to_owned(),
                reason: reason.clone(),
            });
        }
        let found = match version {
            "" | "-1" => entry.versions.values().next_back(),
            v => v.parse::<i64>().ok().and_then(|v| entry.versions.get(&v)),
        };
        found.cloned().ok_or_else(|| Error::VersionNotFound {
            model: name.to_owned(),
            version: version.to_owned(),
            available: entry
                .versions
                .keys()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Loaded versions of a model, ascending.
    pub fn versions(&self, name: &str) -> Vec<i64> {
        let models = self
            .models
            .read()
            .expect("repository lock is never poisoned");
        models
            .get(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.models
            .read()
            .expect("repository lock is never poisoned")
            .contains_key(name)
    }

    /// Every loaded model version.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let models = self
            .models
            .read()
            .expect("repository lock is never poisoned");
        models
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self
            .models
            .read()
            .expect("repository lock is never poisoned");
        let mut rows = Vec::new();
        for (name, entry) in models.iter() {
            match &entry.state {
                ModelState::Ready => rows.extend(entry.versions.keys().map(|v| IndexEntry {
                    name: name.clone(),
                    version: v.to_string(),
                    state: entry.state.name(),
                    reason: entry.reload_error.clone().unwrap_or_default(),
                })),
                ModelState::Unavailable { reason } => rows.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: entry.state.name(),
                    reason: reason.clone(),
                }),
            }
        }
        rows
    }
}

impl ModelEntry {
    fn unloaded() -> ModelEntry {
        ModelEntry::unavailable(NOT_LOADED.to_owned())
    }

    fn unavailable(reason: String) -> ModelEntry {
        ModelEntry {
            state: ModelState::Unavailable { reason },
            versions: BTreeMap::new(),
            reload_error: None,
            source: None,
        }
    }
}

/// The ways the root's path can appear in a message: as given, absolute and resolved
/// (symbolic links followed), each with a trailing separator; longest first, so that a
/// shorter spelling never cuts into a longer one.
fn hidden_prefixes(root: &Path) -> Vec<String> {
    let mut spellings = vec![root.to_path_buf()];
    spellings.extend(std::path::absolute(root).ok());
    spellings.extend(root.canonicalize().ok());
    let mut prefixes: Vec<String> = spellings
        .into_iter()
        // "." or "/" alone would cut into unrelated text.
        .filter(|p| {
            p.components()
                .any(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .map(|p| {
            let mut s = p.display().to_string();
            if !s.ends_with(std::path::MAIN_SEPARATOR) {
                s.push(std::path::MAIN_SEPARATOR);
            }
            s
        })
        .collect();
    prefixes.sort_by_key(|p| std::cmp::Reverse(p.len()));
    prefixes.dedup();
    prefixes
}

/// Model directories: every non-hidden subdirectory of the root, sorted.
fn model_dirs(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(".")
                    .starts_with('.')
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Numeric version directories of a model, ascending.
fn version_dirs(dir: &Path) -> Vec<i64> {
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|&v| v >= 0)
        .collect();
    versions.sort_unstable();
    versions
}

fn select_versions(policy: &VersionPolicy, available: &[i64]) -> Result<Vec<i64>, String> {
    match policy {
        VersionPolicy::Latest(n) => Ok(available.iter().rev().take(*n).rev().copied().collect()),
        VersionPolicy::All => Ok(available.to_vec()),
        VersionPolicy::Specific(wanted) => {
            if let Some(missing) = wanted.iter().find(|v| !available.contains(v)) {
                return Err(format!(
                    "version_policy asks for version {missing}, which has no directory"
                ));
            }
            Ok(wanted.clone())
        }
    }
}

/// Load the versions of the model in `dir` that its version policy selects; a version in
/// `reusable` (loaded from files that have not changed since) is taken over as it is.
fn load_model(
    dir: &Path,
    name: &str,
    options: LoadOptions,
    spec: Option<ModelSpec>,
    mut reusable: BTreeMap<i64, Arc<LoadedModel>>,
) -> Result<BTreeMap<i64, Arc<LoadedModel>>, LoadError> {
    let limits = options.defaults.limits;
    let spec = Arc::new(match spec {
        Some(spec) => spec,
        None => crate::spec::load_spec_with(dir.join(CONFIG_FILE), &limits)
            .map_err(|e| LoadError::Config(e.to_string()))?,
    });
    let available = version_dirs(dir);
    if available.is_empty() {
        return Err(LoadError::Config(format!(
            "{}: no numeric version directory (e.g. {name}/1/{})",
            dir.display(),
            spec.model_filename
        )));
    }
    let versions = select_versions(&spec.version_policy, &available).map_err(LoadError::Config)?;
    // Every version runs its own instances: the model's threads are the product.
    if versions
        .len()
        .checked_mul(spec.instance_count)
        .is_none_or(|n| n > limits.max_model_instances)
    {
        return Err(LoadError::Config(format!(
            "{} versions of {} instances each are more than max_model_instances {}",
            versions.len(),
            spec.instance_count,
            limits.max_model_instances
        )));
    }
    let mut loaded = BTreeMap::new();
    for version in versions {
        if let Some(model) = reusable.remove(&version) {
            loaded.insert(version, model);
            continue;
        }
        let version_dir = dir.join(version.to_string());
        let model =
            LoadedModel::load(spec.clone(), version, version_dir, options).map_err(|e| {
                LoadError::Version {
                    version,
                    source: Box::new(e),
                }
            })?;
        loaded.insert(version, Arc::new(model));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests;
