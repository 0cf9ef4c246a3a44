//! The model repository in Triton's layout: `<root>/<model>/config.pbtxt` and
//! `<root>/<model>/<version>/<default_model_filename>`. Scans the root, loads every model
//! it can, and keeps a reason for every one it cannot, so one broken model never stops
//! the others from serving.

pub mod model_config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

pub use model_config::{
    config_dtype_name, parse_text, spec_from_config, ConfigFileError, DeviceKind, ModelSpec,
    Platform, QueueSettings, ScalingParams, TensorSpec, VersionPolicy,
};

use crate::config::{ModelControl, ModelControlMode};
use crate::error::Error;
use crate::model::{LoadOptions, LoadedModel};

pub const CONFIG_FILE: &str = "config.pbtxt";

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
    options: LoadOptions,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// One load or unload at a time, so two calls for one model cannot interleave.
    control: Mutex<()>,
}

/// Reason shown for a model that is in the repository but not loaded.
pub const NOT_LOADED: &str = "unloaded";

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
            .map(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        let wanted = |name: &str| match control.mode {
            ModelControlMode::None => true,
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
            options,
            models: RwLock::new(BTreeMap::new()),
            control: Mutex::new(()),
        };
        for name in names {
            if wanted(&name) {
                repository.load_entry(&name);
            } else {
                repository.set(&name, ModelEntry::unloaded());
            }
        }
        Ok(repository)
    }

    /// Load (or reload) a model from disk; the old versions, if any, drain and stop.
    /// Blocking: loads weights.
    pub fn load(&self, name: &str) -> Result<(), Error> {
        let _one_at_a_time = self.control.lock().expect("control lock is never poisoned");
        if !self.root.join(name).is_dir() || name.starts_with('.') || name.contains('/') {
            return Err(Error::ModelNotFound {
                model: name.to_owned(),
            });
        }
        match &self.load_entry(name) {
            ModelState::Ready => Ok(()),
            ModelState::Unavailable { reason } => Err(Error::ModelUnavailable {
                model: name.to_owned(),
                reason: reason.clone(),
            }),
        }
    }

    /// Unload a model: new requests get UNAVAILABLE at once; requests already admitted
    /// finish on the old instances, which stop once they are done.
    pub fn unload(&self, name: &str) -> Result<(), Error> {
        let _one_at_a_time = self.control.lock().expect("control lock is never poisoned");
        if !self.is_known(name) {
            return Err(Error::ModelNotFound {
                model: name.to_owned(),
            });
        }
        self.set(name, ModelEntry::unloaded());
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    fn load_entry(&self, name: &str) -> ModelState {
        let entry = match load_model(&self.root.join(name), name, self.options) {
            Ok(versions) => {
                let list: Vec<String> = versions.keys().map(i64::to_string).collect();
                tracing::info!(model = %name, versions = %list.join(","), "model ready");
                ModelEntry {
                    state: ModelState::Ready,
                    versions,
                }
            }
            Err(reason) => {
                tracing::error!(model = %name, %reason, "model failed to load; serving the others");
                ModelEntry {
                    state: ModelState::Unavailable { reason },
                    versions: BTreeMap::new(),
                }
            }
        };
        let state = entry.state.clone();
        self.set(name, entry);
        state
    }

    fn set(&self, name: &str, entry: ModelEntry) {
        let old = self
            .models
            .write()
            .expect("repository lock is never poisoned")
            .insert(name.to_owned(), entry);
        drop(old); // outside the lock: the old versions' batchers drain on their own
    }

    pub fn root(&self) -> &Path {
        &self.root
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
                    reason: String::new(),
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
        ModelEntry {
            state: ModelState::Unavailable {
                reason: NOT_LOADED.to_owned(),
            },
            versions: BTreeMap::new(),
        }
    }
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

fn load_model(
    dir: &Path,
    name: &str,
    options: LoadOptions,
) -> Result<BTreeMap<i64, Arc<LoadedModel>>, String> {
    let spec = Arc::new(model_config::load_spec(dir.join(CONFIG_FILE)).map_err(|e| e.to_string())?);
    let available = version_dirs(dir);
    if available.is_empty() {
        return Err(format!(
            "{}: no numeric version directory (e.g. {name}/1/{})",
            dir.display(),
            spec.model_filename
        ));
    }
    let mut loaded = BTreeMap::new();
    for version in select_versions(&spec.version_policy, &available)? {
        let version_dir = dir.join(version.to_string());
        let model = LoadedModel::load(spec.clone(), version, version_dir, options)
            .map_err(|e| format!("version {version}: {e}"))?;
        loaded.insert(version, Arc::new(model));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policies() {
        let avail = [1, 2, 5];
        assert_eq!(
            select_versions(&VersionPolicy::Latest(1), &avail).unwrap(),
            vec![5]
        );
        assert_eq!(
            select_versions(&VersionPolicy::Latest(2), &avail).unwrap(),
            vec![2, 5]
        );
        assert_eq!(
            select_versions(&VersionPolicy::All, &avail).unwrap(),
            vec![1, 2, 5]
        );
        assert_eq!(
            select_versions(&VersionPolicy::Specific(vec![2]), &avail).unwrap(),
            vec![2]
        );
        assert!(select_versions(&VersionPolicy::Specific(vec![3]), &avail)
            .unwrap_err()
            .contains('3'));
    }
}
