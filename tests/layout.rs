//! The modules of `src/` import one way: no module reaches itself through `crate::`
//! paths, and only the wiring reads `config`. A module is a file, or a folder counted as one (`src/tap/openai.rs` is `tap`);
//! `main.rs`, `lib.rs` and `src/bin` wire everything by design and are left out, and so is
//! test code (from `#[cfg(test)] mod tests` on).
//!
//! And no function of `src/` is longer than [`MAX_FN_LINES`] lines, test code aside.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn without_tests(text: &str) -> &str {
    let mut at = 0;
    while let Some(i) = text[at..].find("#[cfg(test)]") {
        let start = at + i;
        let rest = text[start + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod tests") {
            return &text[..start];
        }
        at = start + 1;
    }
    text
}

/// The modules named in `crate::name` and `crate::{a, b::c}` paths of `text`.
fn imports(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(src).unwrap();
        let first = rel.iter().next().unwrap().to_string_lossy().into_owned();
        if first == "bin" || first == "main.rs" || first == "lib.rs" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = imports(without_tests(&text));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    graph
}

/// A cycle through `start`, if there is one: the modules in order.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                return Some(path.clone());
            }
            if graph.contains_key(next) && seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.contains_key("proxy") && graph.contains_key("config"));
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|c| format!("{} -> {}", c.join(" -> "), c[0]))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// `config` is the top of the house: only the wiring reads it; every other module owns
/// its settings type, which `config` builds.
#[test]
fn only_the_wiring_imports_config() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let wiring = ["server", "reload"];
    let graph = module_graph(&src);
    let readers: Vec<&String> = graph
        .iter()
        .filter(|(m, deps)| deps.contains("config") && !wiring.contains(&m.as_str()))
        .map(|(m, _)| m)
        .collect();
    assert!(
        readers.is_empty(),
        "modules below the wiring import config: {readers:?}"
    );
}

#[test]
fn the_checker_finds_a_cycle_and_reads_grouped_imports() {
    let deps = imports("use crate::{a, b::c};\nfn f() { crate::d::x(); }");
    assert_eq!(
        deps,
        ["a", "b", "d"].iter().map(|s| s.to_string()).collect()
    );
    let mut graph = BTreeMap::new();
    graph.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    graph.insert("y".to_string(), BTreeSet::from(["z".to_string()]));
    graph.insert("z".to_string(), BTreeSet::from(["x".to_string()]));
    assert_eq!(cycle_from(&graph, "x").unwrap(), ["x", "y", "z"]);
    graph.get_mut("z").unwrap().clear();
    assert_eq!(cycle_from(&graph, "x"), None);
    assert_eq!(without_tests("a\n#[cfg(test)]\nmod tests {}\n"), "a\n");
}

/// The longest a function of `src/` may be, counted from its `fn` line to its closing
/// brace.
const MAX_FN_LINES: usize = 80;

/// Functions allowed to be longer, by file (under `src/`) and name. `metrics.rs`'s `new`
/// registers every metric family, one flat statement after another: split, it would only
/// be harder to check against docs/metrics.md's list.
const LONG_FNS_ALLOWED: [(&str, &str); 1] = [("metrics.rs", "new")];

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `text` with every comment, string and character literal blanked (newlines kept, so
/// byte offsets and line numbers are the text's): the braces left are the code's.
/// Lifetimes and labels (`'a`) stay.
fn code_only(text: &str) -> Vec<u8> {
    let src = text.as_bytes();
    let mut out = src.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to.min(src.len())] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let prev_ident = |back: usize| i >= back && is_ident(src[i - back]);
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(src.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < src.len() && depth > 0 {
                if src[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if src[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if src[i] == b'r'
            && (!prev_ident(1) || (src[i - 1] == b'b' && !prev_ident(2)))
            && rest[1..]
                .iter()
                .position(|&b| b != b'#')
                .is_some_and(|h| rest[1 + h] == b'"')
        {
            // A raw string: r"…", r#"…"#, br"…".
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body = i + 2 + hashes;
            let end = src[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(src.len(), |p| body + p + close.len());
            blank(&mut out, i + 1, end);
            i = end;
        } else if src[i] == b'"' {
            let mut j = i + 1;
            while j < src.len() && src[j] != b'"' {
                j += if src[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if src[i] == b'\'' {
            // A character literal ('x', '\n', '\'', 'é') or a lifetime ('a).
            let end = if rest.get(1) == Some(&b'\\') {
                rest[3..]
                    .iter()
                    .position(|&b| b == b'\'')
                    .map(|p| i + 3 + p + 1)
            } else {
                let width = match rest.get(1) {
                    Some(b) if *b >= 0xf0 => 4,
                    Some(b) if *b >= 0xe0 => 3,
                    Some(b) if *b >= 0xc0 => 2,
                    _ => 1,
                };
                (rest.get(1 + width) == Some(&b'\'')).then_some(i + 2 + width)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The offset of the `}` closing the `{` at `open`.
fn closing_brace(code: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, &b) in code.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// Where the item starting at `from` opens its body: the first `{` outside parentheses
/// and brackets, or None if a `;` ends it first (a declaration without a body).
fn body_start(code: &[u8], from: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (i, &b) in code.iter().enumerate().skip(from) {
        match b {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'{' if depth == 0 => return Some(i),
            b';' if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

/// The spans of the items under `#[cfg(test)]`: test modules and test-only helpers.
fn test_items(code: &[u8]) -> Vec<std::ops::Range<usize>> {
    let attr = b"#[cfg(test)]";
    let mut out = Vec::new();
    for at in (0..code.len()).filter(|&i| code[i..].starts_with(attr)) {
        if let Some(open) = body_start(code, at + attr.len()) {
            out.push(at..closing_brace(code, open) + 1);
        }
    }
    out
}

/// Every function with a body in `text` outside test items: (line of its `fn`, name,
/// lines from there to its closing brace). Functions inside functions count on their own
/// (and in the one around them).
fn functions(text: &str) -> Vec<(usize, String, usize)> {
    let code = code_only(text);
    let tests = test_items(&code);
    let line_at = |i: usize| 1 + code[..i].iter().filter(|&&b| b == b'\n').count();
    let mut out = Vec::new();
    for at in 0..code.len().saturating_sub(2) {
        let keyword = code[at..].starts_with(b"fn")
            && (at == 0 || !is_ident(code[at - 1]))
            && code[at + 2].is_ascii_whitespace();
        if !keyword || tests.iter().any(|t| t.contains(&at)) {
            continue;
        }
        let name_start = at
            + 2
            + code[at + 2..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
        let name_len = code[name_start..]
            .iter()
            .take_while(|&&b| is_ident(b))
            .count();
        let name = String::from_utf8_lossy(&code[name_start..name_start + name_len]).into_owned();
        if let Some(open) = body_start(&code, name_start + name_len) {
            let first = line_at(at);
            let last = line_at(closing_brace(&code, open));
            out.push((first, name, last - first + 1));
        }
    }
    out
}

/// Functions of `src/` over [`MAX_FN_LINES`]: (path under `src/`, line, name, lines).
fn long_functions(src: &Path) -> Vec<(String, usize, String, usize)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out = Vec::new();
    for path in files {
        let rel = path.strip_prefix(src).unwrap();
        let rel = rel
            .iter()
            .map(|c| c.to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, name, lines) in functions(&text) {
            if lines > MAX_FN_LINES {
                out.push((rel.clone(), line, name, lines));
            }
        }
    }
    out.sort_by(|a, b| {
        b.3.cmp(&a.3)
            .then_with(|| a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
    });
    out
}

/// A long function does several things; as named steps each can be read, and found, on
/// its own. Test code is left out: a test is one scenario told in order, and its
/// assertions read best where they happen.
#[test]
fn no_function_is_longer_than_80_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long = long_functions(&src);
    let allowed = |file: &str, name: &str| LONG_FNS_ALLOWED.contains(&(file, name));
    let stale: Vec<_> = LONG_FNS_ALLOWED
        .iter()
        .filter(|(file, name)| !long.iter().any(|l| l.0 == *file && l.2 == *name))
        .collect();
    let over: Vec<String> = long
        .iter()
        .filter(|l| !allowed(&l.0, &l.2))
        .map(|(file, line, name, lines)| format!("src/{file}:{line} {name}: {lines} lines"))
        .collect();
    assert!(
        over.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them into named steps):\n{}",
        over.join("\n")
    );
    assert!(
        stale.is_empty(),
        "allowed to be long but no longer are (take them off LONG_FNS_ALLOWED): {stale:?}"
    );
}

#[test]
fn the_length_counter_skips_strings_comments_chars_and_test_code() {
    let text = r####"
fn short() {
    let s = "}}} { // not a comment";
    let r = r#"}" { "#;
    let c = '}';
    let e = '\'';
    let u = '\u{7d}';
    let x: &'static str = "é"; // }
    /* { nested /* } */ { */
    let b = b'{';
}
pub(crate) async fn outer<'a, T: Fn(u8) -> u8>(x: [u8; 4], f: fn(u8)) -> &'a str
where
    T: Send,
{
    fn inner() {
    }
    'label: loop {
        break 'label;
    }
    ""
}
trait T {
    fn declared(&self) -> [u8; 2];
}
#[cfg(test)]
mod tests {
    fn ignored() {
    }
}
fn last() {}
"####;
    let all = functions(text);
    let found: Vec<(usize, &str, usize)> = all
        .iter()
        .map(|(line, name, lines)| (*line, name.as_str(), *lines))
        .collect();
    assert_eq!(
        found,
        [
            (2, "short", 10),
            (12, "outer", 11),
            (16, "inner", 2),
            (31, "last", 1)
        ]
    );
    assert_eq!(code_only("a // b\nc").len(), "a // b\nc".len());
}
