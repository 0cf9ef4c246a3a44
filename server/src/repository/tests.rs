//! Model names, hidden locations and version policies.

use super::*;

#[test]
fn model_names() {
    assert!(check_model_name("mlp").is_ok());
    assert!(check_model_name("resnet-50_v1.2").is_ok());
    assert!(check_model_name(&"m".repeat(MAX_MODEL_NAME_BYTES)).is_ok());
    for (name, why) in [
        ("", "empty"),
        ("a/b", "'/'"),
        ("..\\x", "'/'"),
        ("../x", "'/'"),
        ("..", "start with '.'"),
        (".hidden", "start with '.'"),
        ("tab\there", "control characters"),
    ] {
        let err = check_model_name(name).unwrap_err();
        assert!(err.contains(why), "{name:?}: {err}");
    }
    let err = check_model_name(&"m".repeat(MAX_MODEL_NAME_BYTES + 1)).unwrap_err();
    assert!(err.contains("256 bytes"), "{err}");
    assert_eq!(clip(&"m".repeat(100)).len(), 64 + 3);
    assert_eq!(clip("a\nb"), "a\\nb");
}

#[test]
fn reasons_hide_where_the_repository_lies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let prefixes = hidden_prefixes(&root);
    let text = format!(
        "{}/mlp/config.pbtxt: bad; {}/mlp/1/model.pt: missing",
        root.display(),
        root.canonicalize().unwrap().display()
    );
    let shown = prefixes.iter().fold(text, |t, p| t.replace(p.as_str(), ""));
    assert_eq!(shown, "mlp/config.pbtxt: bad; mlp/1/model.pt: missing");
    // A root of "." or "/" is never cut out of unrelated text.
    assert!(hidden_prefixes(Path::new("/")).is_empty());
    assert!(hidden_prefixes(Path::new(".")).iter().all(|p| p.len() > 2));
}

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
