//! The fingerprint and the rule that acts on it.

use super::*;

fn fingerprint(versions: &[i64]) -> Observed {
    Ok(Fingerprint {
        config: Some(1),
        shared: Vec::new(),
        versions: versions.iter().map(|v| (*v, Vec::new())).collect(),
    })
}

#[test]
fn a_change_is_acted_on_once_it_reads_the_same_twice() {
    let (a, b) = (fingerprint(&[1]), fingerprint(&[1, 2]));
    let broken: Observed = Err("cannot read".to_owned());
    for (now, before, served, action) in [
        // Unchanged, or absent and unknown: never touched.
        (Some(&a), Some(&a), Some(&a), Action::Leave),
        (Some(&a), Some(&b), Some(&a), Action::Leave),
        (None, None, None, Action::Leave),
        (Some(&broken), Some(&broken), Some(&broken), Action::Leave),
        // Changed since the scan before: maybe still being written.
        (Some(&b), Some(&a), Some(&a), Action::Wait),
        (Some(&b), None, None, Action::Wait),
        (None, Some(&a), Some(&a), Action::Wait),
        // The same on two scans.
        (Some(&b), Some(&b), Some(&a), Action::Load),
        (Some(&b), Some(&b), None, Action::Load),
        (Some(&broken), Some(&broken), Some(&a), Action::Load),
        (Some(&a), Some(&a), Some(&broken), Action::Load),
        (None, None, Some(&a), Action::Remove),
    ] {
        assert_eq!(
            decide(now, before, served),
            action,
            "{now:?} {before:?} {served:?}"
        );
    }
}

#[test]
// Kept whole: one model directory, changed step by step, each step's fingerprint checked.
fn the_fingerprint_sees_what_a_model_loads_from() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let write = |path: &str, bytes: &[u8]| {
        let path = model.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("config.pbtxt", b"max_batch_size: 8");
    write("1/model.pt", b"weights");
    write("warmup/sample", b"0000");
    let first = observe(&model).unwrap();
    assert_eq!(
        observe(&model).unwrap(),
        first,
        "reading again changes nothing"
    );
    assert_eq!(first.versions.keys().copied().collect::<Vec<_>>(), vec![1]);

    // Hidden entries are not part of it.
    write(".config.pbtxt.swp", b"x");
    write("1/.partial", b"x");
    assert_eq!(observe(&model).unwrap(), first);

    // The same length, other bytes: the config's hash tells them apart.
    write("config.pbtxt", b"max_batch_size: 4");
    let config_changed = observe(&model).unwrap();
    assert_ne!(config_changed.config, first.config);
    assert!(config_changed.unchanged_versions(&first).is_empty());

    // A new version: the old one is unchanged and needs no reload.
    write("2/model.pt", b"weights 2");
    let two = observe(&model).unwrap();
    assert_eq!(two.unchanged_versions(&config_changed), vec![1]);
    // New weights in version 1 (another size): only version 2 is unchanged.
    write("1/model.pt", b"new weights");
    assert_eq!(observe(&model).unwrap().unchanged_versions(&two), vec![2]);
    // A new warm-up sample concerns every version.
    let before = observe(&model).unwrap();
    write("warmup/other", b"1111");
    assert!(observe(&model)
        .unwrap()
        .unchanged_versions(&before)
        .is_empty());

    // Entries are read up to the cap, then the directory is refused with the reason.
    let err = observe_within(&model, 3).unwrap_err();
    assert!(err.contains("more than 3 entries"), "{err}");
    assert!(observe_within(&model, 64).is_ok());
    let err = observe(&dir.path().join("missing")).unwrap_err();
    assert!(err.contains("cannot read"), "{err}");
}
