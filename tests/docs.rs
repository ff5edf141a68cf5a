//! The documentation is checked against the code: every key the configuration file
//! takes is named in docs/configuration.md, every outcome the relay can give is
//! explained in docs/troubleshooting.md, and every page the README's map names exists.

use std::collections::BTreeSet;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The words (letters, digits, `_`) inside the backtick spans of a Markdown text.
fn backticked(doc: &str) -> BTreeSet<String> {
    doc.split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| {
            span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The configuration keys `src` declares: the field names of its `pub struct`s (serde
/// takes the field names as keys: there is no renaming in these files), as
/// `Struct.field`.
fn struct_fields(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in src.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            if rest.ends_with('{') {
                current = rest.split_whitespace().next().map(str::to_string);
            }
            continue;
        }
        if line == "}" {
            current = None;
            continue;
        }
        let Some(name) = &current else { continue };
        if let Some(field) = line.trim().strip_prefix("pub ") {
            if let Some((field, _)) = field.split_once(':') {
                out.push((name.clone(), field.trim().to_string()));
            }
        }
    }
    out
}

#[test]
fn every_configuration_key_is_in_the_configuration_page() {
    let doc = backticked(&read("docs/configuration.md"));
    let mut keys = struct_fields(&read("src/config/raw.rs"));
    keys.extend(
        struct_fields(&read("src/limits/mod.rs"))
            .into_iter()
            .filter(|(s, _)| s == "Limits"),
    );
    keys.extend(
        struct_fields(&read("src/cost.rs"))
            .into_iter()
            .filter(|(s, _)| s == "RawPrice"),
    );
    assert!(
        keys.len() > 100,
        "only {} keys found: the scan broke",
        keys.len()
    );
    assert!(keys.contains(&("RawRoute".into(), "cache".into())));
    let missing: Vec<String> = keys
        .iter()
        .filter(|(_, field)| !doc.contains(field))
        .map(|(s, f)| format!("{s}.{f}"))
        .collect();
    assert!(
        missing.is_empty(),
        "configuration keys not named in docs/configuration.md: {missing:?}"
    );
}

/// The outcomes: every error kind, every deadline's, and the two the end stage names.
fn outcomes() -> BTreeSet<String> {
    let strings_in = |src: &str, from: &str| -> Vec<String> {
        let start = src.find(from).unwrap_or_else(|| panic!("no `{from}`"));
        let body = &src[start..];
        let end = body.find("\n    }\n").expect("the function ends");
        body[..end]
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut all: BTreeSet<String> = BTreeSet::new();
    all.extend(strings_in(&read("src/error.rs"), "pub fn kind(&self)"));
    let stall = read("src/stall.rs");
    all.extend(strings_in(&stall, "pub fn outcome(self)"));
    all.extend(strings_in(&stall, "pub fn session_outcome(self)"));
    let end = read("src/proxy/end.rs");
    for word in ["\"ok\"", "\"client_disconnect\""] {
        assert!(end.contains(word), "end.rs no longer names {word}");
        all.insert(word.trim_matches('"').to_string());
    }
    all.insert("internal".into());
    all
}

#[test]
fn every_outcome_is_explained_in_troubleshooting() {
    let doc = read("docs/troubleshooting.md");
    let outcomes = outcomes();
    assert!(outcomes.len() > 30, "{outcomes:?}");
    let missing: Vec<&String> = outcomes
        .iter()
        .filter(|o| !doc.contains(&format!("| `{o}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "outcomes without a row in docs/troubleshooting.md: {missing:?}"
    );
}

#[test]
fn the_readme_starts_with_the_two_commands_and_maps_every_page() {
    let readme = read("README.md");
    let start: Vec<&str> = readme.lines().skip(2).take(3).collect();
    assert!(start[0].starts_with("```sh"), "{start:?}");
    assert!(start[1].starts_with("scripts/run.sh"), "{start:?}");
    assert!(start[2].starts_with("scripts/test.sh"), "{start:?}");
    let pages: Vec<String> = std::fs::read_dir(format!("{ROOT}/docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    assert!(pages.len() >= 8, "{pages:?}");
    for page in pages {
        assert!(
            readme.contains(&format!("(docs/{page})")),
            "README does not map docs/{page}"
        );
    }
}
