//! Model control mode `poll`: every `repository_poll_secs` the repository is read again
//! and each model follows its directory. A directory that appears is loaded; one that
//! changes is reloaded beside the versions serving, which are swapped out once the new
//! ones are ready (requests already admitted finish on the old ones); one that goes is
//! unloaded. A change that does not load leaves the versions serving as they were, with
//! the reason in RepositoryIndex, until the directory changes again.
//!
//! **What counts as a change.** Each model directory is read into a [`Fingerprint`]:
//! the bytes of `config.pbtxt` (hashed), and the name, kind, size and modification time
//! of every entry of the model directory, of each numeric version directory and of
//! `warmup/` (one level: files deeper down are seen through their folder only). Hidden
//! entries (`.name`) are left out, as editors and copy tools park their temporary files
//! there. At most [`MAX_ENTRIES`] entries are read per model (hidden ones counted); a larger directory is
//! reported with the reason instead of being read without bound.
//!
//! **When a change is acted on.** Only once two consecutive scans read the same
//! fingerprint: a file still being copied changes size or time between two scans, so a
//! half-written model is not loaded (a copy that stalls for longer than the interval
//! can still be caught: write elsewhere and rename the finished directory into place).
//! A model whose fingerprint is the one it was last loaded (or refused) from is never
//! touched. When only some version directories changed and `config.pbtxt`, `warmup/`
//! and the other files of the model did not, the unchanged versions keep serving as
//! they are and only the changed or new ones load.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::{check_model_name, load_model, model_dirs, Repository, CONFIG_FILE};
use crate::config::{Config, ModelControlMode};

/// Most directory entries read for one model: its own, its version directories' and
/// `warmup/`'s together.
pub const MAX_ENTRIES: usize = 4096;

/// One entry of a model directory as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    /// Relative to the directory read (`warmup/` entries carry the prefix).
    name: String,
    dir: bool,
    len: u64,
    modified: Option<SystemTime>,
}

/// What a model directory held when it was read; equal fingerprints mean nothing that
/// the model loads from changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Hash of `config.pbtxt`'s bytes (with its length); `None`: there is none.
    config: Option<u64>,
    /// Everything outside the version directories: config.pbtxt, warmup/ and its files.
    shared: Vec<Mark>,
    /// What each numeric version directory holds.
    versions: BTreeMap<i64, Vec<Mark>>,
}

/// A model directory as read: its fingerprint, or why it could not be read.
pub type Observed = Result<Fingerprint, String>;

impl Fingerprint {
    /// Versions whose directories, and everything they share with the other versions,
    /// are as in `before`: those need no reload.
    fn unchanged_versions(&self, before: &Fingerprint) -> Vec<i64> {
        if self.config != before.config || self.shared != before.shared {
            return Vec::new();
        }
        self.versions
            .iter()
            .filter(|(v, marks)| before.versions.get(v) == Some(marks))
            .map(|(v, _)| *v)
            .collect()
    }
}

/// Read the model directory `dir` (blocking).
pub fn observe(dir: &Path) -> Observed {
    observe_within(dir, MAX_ENTRIES)
}

fn observe_within(dir: &Path, cap: usize) -> Observed {
    let mut budget = cap;
    let mut fingerprint = Fingerprint::default();
    for mark in entries(dir, "", cap, &mut budget)? {
        let version = mark
            .dir
            .then(|| mark.name.parse::<i64>().ok().filter(|v| *v >= 0))
            .flatten();
        if let Some(version) = version {
            let marks = entries(&dir.join(&mark.name), "", cap, &mut budget)?;
            fingerprint
                .versions
                .entry(version)
                .or_default()
                .extend(marks);
            continue;
        }
        if mark.dir && mark.name == "warmup" {
            let marks = entries(&dir.join("warmup"), "warmup/", cap, &mut budget)?;
            fingerprint.shared.extend(marks);
        }
        if !mark.dir && mark.name == CONFIG_FILE {
            fingerprint.config = Some(hash_file(&dir.join(CONFIG_FILE))?);
        }
        fingerprint.shared.push(mark);
    }
    Ok(fingerprint)
}

/// The entries of `dir` but hidden ones, sorted, each name after `prefix`; every entry
/// read spends one of `budget` (of `cap` in all).
fn entries(dir: &Path, prefix: &str, cap: usize, budget: &mut usize) -> Result<Vec<Mark>, String> {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", dir.display());
    let mut marks = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        *budget = budget.checked_sub(1).ok_or_else(|| {
            format!(
                "{} holds more than {cap} entries (with its version and warmup directories): \
                 too many to follow",
                dir.display()
            )
        })?;
        let entry = entry.map_err(fail)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symbolic links (a mounted volume's files often are), and see a
        // dangling one as itself.
        let meta = std::fs::metadata(&path)
            .or_else(|_| std::fs::symlink_metadata(&path))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        marks.push(Mark {
            name: format!("{prefix}{name}"),
            dir: meta.is_dir(),
            len: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    marks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(marks)
}

/// A hash of the file's bytes and length, reading at most one byte more than a
/// config.pbtxt may hold (a longer one is refused when it loads).
fn hash_file(path: &Path) -> Result<u64, String> {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(fail)?
        .take(crate::spec::MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Ok(hasher.finish())
}

/// What one scan does about one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// The directory is as the model was last loaded (or refused) from, or absent and
    /// unknown.
    Leave,
    /// It differs, but not as it was on the scan before: it may still be being written.
    Wait,
    /// It differs, the same on two scans: load it.
    Load,
    /// It is gone, on two scans: unload the model.
    Remove,
}

/// `now`, `before`: the directory on this scan and the one before (`None`: absent);
/// `served`: what the model was last loaded or refused from (`None`: not known).
fn decide(now: Option<&Observed>, before: Option<&Observed>, served: Option<&Observed>) -> Action {
    if now == served {
        Action::Leave
    } else if now != before {
        Action::Wait
    } else if now.is_some() {
        Action::Load
    } else {
        Action::Remove
    }
}

impl Repository {
    /// Load the model `name` from what `observed` read of its directory, beside the
    /// versions serving (see [`Repository::failed`] for a load that fails). Blocking.
    pub(super) fn apply(&self, name: &str, observed: Observed) {
        let _one_at_a_time = self.one_at_a_time();
        let fingerprint = match &observed {
            Ok(fingerprint) => fingerprint.clone(),
            Err(reason) => {
                let reason = self.public(reason);
                self.failed(name, &reason, Some(observed));
                return;
            }
        };
        let reusable = {
            let models = self
                .models
                .read()
                .expect("repository lock is never poisoned");
            match models.get(name) {
                // After a failed reload the serving versions came from an older
                // directory than `source`: none is reused then.
                Some(entry) if entry.reload_error.is_none() => match &entry.source {
                    Some(Ok(before)) => fingerprint
                        .unchanged_versions(before)
                        .into_iter()
                        .filter_map(|v| entry.versions.get(&v).map(|m| (v, m.clone())))
                        .collect(),
                    Some(Err(_)) | None => BTreeMap::new(),
                },
                Some(_) | None => BTreeMap::new(),
            }
        };
        let dir = self.root.join(name);
        let loaded = load_model(&dir, name, self.options, None, reusable);
        // The reason is logged and shown by `settle`.
        let _ = self.settle(name, loaded, Some(observed));
    }

    /// The model's directory is gone: new requests get NOT_FOUND, requests already
    /// admitted finish on the versions they hold.
    fn forget(&self, name: &str) {
        let _one_at_a_time = self.one_at_a_time();
        let old = self
            .models
            .write()
            .expect("repository lock is never poisoned")
            .remove(name);
        drop(old); // outside the lock
        tracing::info!(model = %name, "model directory removed: model unloaded");
    }

    /// What each known model was last loaded or refused from.
    fn sources(&self) -> BTreeMap<String, Option<Observed>> {
        let models = self
            .models
            .read()
            .expect("repository lock is never poisoned");
        models
            .iter()
            .map(|(name, entry)| (name.clone(), entry.source.clone()))
            .collect()
    }
}

/// The poll's memory between scans.
struct Poller {
    root: PathBuf,
    /// Every model directory on the last scan.
    seen: BTreeMap<String, Observed>,
    /// Why the last scan could not read the root (logged once, until it can again).
    root_error: Option<String>,
}

impl Poller {
    /// Every model directory of the root, read.
    fn scan(&self) -> Result<BTreeMap<String, Observed>, String> {
        let dirs = model_dirs(&self.root)
            .map_err(|e| format!("cannot read model repository {}: {e}", self.root.display()))?;
        Ok(dirs
            .iter()
            .filter_map(|dir| {
                let name = dir.file_name()?.to_str()?;
                check_model_name(name).ok()?;
                Some((name.to_owned(), observe(dir)))
            })
            .collect())
    }

    /// One scan, and what it calls for. Blocking; stops between models once `stop`
    /// fires.
    fn poll(&mut self, repository: &Repository, stop: &CancellationToken) {
        let now = match self.scan() {
            Ok(now) => now,
            Err(reason) => {
                if self.root_error.as_ref() != Some(&reason) {
                    tracing::error!(%reason, "repository poll: cannot read the repository; models keep serving, retrying next poll");
                }
                self.root_error = Some(reason);
                return;
            }
        };
        if self.root_error.take().is_some() {
            tracing::info!("repository poll: the repository can be read again");
        }
        let sources = repository.sources();
        let names: BTreeSet<&String> = now.keys().chain(sources.keys()).collect();
        for name in names {
            if stop.is_cancelled() {
                break;
            }
            let served = sources.get(name).and_then(Option::as_ref);
            match decide(now.get(name), self.seen.get(name), served) {
                Action::Leave | Action::Wait => {}
                Action::Load => {
                    tracing::info!(model = %name, "repository poll: model directory changed, loading");
                    repository.apply(name, now[name].clone());
                }
                Action::Remove => repository.forget(name),
            }
        }
        self.seen = now;
    }
}

/// In mode poll, follow the repository of `owner` every `repository_poll_interval`
/// until `stop`; in the other modes the task ends at once. Each scan runs on a blocking
/// thread, one after the other.
pub fn spawn<G>(
    owner: Arc<G>,
    config: &Config,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    G: AsRef<Repository> + Send + Sync + 'static,
{
    let mode = config.control.mode;
    let interval = config.repository_poll_interval;
    tokio::spawn(async move {
        match mode {
            ModelControlMode::Poll => {}
            ModelControlMode::None | ModelControlMode::Explicit => return,
        }
        let root = owner.as_ref().as_ref().root().to_owned();
        let fresh = || Poller {
            root: root.clone(),
            seen: BTreeMap::new(),
            root_error: None,
        };
        let mut poller = Some(fresh());
        let mut tick = tokio::time::interval(interval);
        // A poll that runs long is followed by a full interval, not by a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut this = poller.take().unwrap_or_else(fresh);
            let (owner, halt) = (owner.clone(), stop.clone());
            let scan = tokio::task::spawn_blocking(move || {
                this.poll(owner.as_ref().as_ref(), &halt);
                this
            });
            tokio::select! {
                // The scan stops after the model it is loading.
                _ = stop.cancelled() => return,
                done = scan => match done {
                    Ok(this) => poller = Some(this),
                    Err(e) => tracing::error!("repository poll failed: {e}; polling again next interval"),
                },
            }
        }
    })
}

#[cfg(test)]
mod tests;
