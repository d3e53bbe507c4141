//! Every section citation in the code names a section that exists in this checkout.
//!
//! Comments cite the spec as `spec` followed by the section sign and a number (`N`, `N.M`,
//! chains like `N/M`). The document is the one named last before the sign on the same line:
//! `spec-wave2` is `docs/spec-wave2.md`, `TORCH_RANDN.md` is
//! `reference/refcheck/TORCH_RANDN.md`, and anything else (`spec`, `Spec`, nothing) is
//! `docs/spec.md`. A section exists when the document has a Markdown heading that starts with
//! its number (`## 3. …`, `### 3.3 …`, `### 4b. …`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SECTION_SIGN: char = '\u{a7}';

/// The trees whose files may cite the spec; the fixtures are data, not prose.
const SCANNED: &[&str] = &["src", "tests", "scripts", "benches"];
const SKIPPED: &[&str] = &["tests/fixtures"];

/// Citations known not to resolve, each waiting for its file's owner to fix it:
/// (file, document, section). An entry that no longer occurs fails the test, so the list
/// only shrinks.
const KNOWN_DANGLING: &[(&str, &str, &str)] = &[];

/// The documents a citation can name: (marker before the section sign, path).
const DOCUMENTS: &[(&str, &str)] = &[
    ("TORCH_RANDN.md", "reference/refcheck/TORCH_RANDN.md"),
    ("spec-wave2", "docs/spec-wave2.md"),
    ("spec", "docs/spec.md"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The section numbers of a Markdown document's headings.
fn sections(doc: &str) -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("reading {doc}: {e}"));
    text.lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let title = l.trim_start_matches('#').trim_start();
            let id: String = title
                .chars()
                .take_while(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || *c == '.')
                .collect();
            let id = id.trim_end_matches('.');
            id.starts_with(|c: char| c.is_ascii_digit())
                .then(|| id.to_string())
        })
        .collect()
}

/// The section number right after a section sign: digits, an optional lowercase letter
/// (`4b`), then `.digits` parts. `None` when no digit follows.
fn section_at(after: &str) -> Option<String> {
    let b = after.as_bytes();
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut end = digits(0);
    if end == 0 {
        return None;
    }
    if end < b.len() && b[end].is_ascii_lowercase() {
        let letter_end = end + 1;
        if letter_end == b.len() || !b[letter_end].is_ascii_alphanumeric() {
            end = letter_end;
        }
    }
    while end + 1 < b.len() && b[end] == b'.' && b[end + 1].is_ascii_digit() {
        end = digits(end + 1);
    }
    Some(after[..end].to_string())
}

/// Which document `before` (the line up to a section sign) cites: the marker that occurs last,
/// as a word of its own. `Err` names an unknown `*.md` right before the sign.
fn document_of(before: &str) -> Result<&'static str, String> {
    let last_word = before.split_whitespace().last().unwrap_or("");
    let last_word = last_word.trim_matches(|c: char| "`'\"(".contains(c));
    if last_word.ends_with(".md") && !DOCUMENTS.iter().any(|(m, _)| last_word.ends_with(m)) {
        return Err(format!("an unknown document, {last_word}"));
    }
    let lower = before.to_ascii_lowercase();
    let mut best: Option<(usize, &'static str)> = None;
    for (marker, path) in DOCUMENTS {
        let m = marker.to_ascii_lowercase();
        for (at, _) in lower.match_indices(&m) {
            let starts_word = lower[..at]
                .chars()
                .last()
                .is_none_or(|c| !c.is_alphanumeric());
            // `spec` must not be the start of `spec-wave2`.
            let whole = !(*marker == "spec" && lower[at..].starts_with("spec-wave2"));
            if starts_word && whole && best.is_none_or(|(b, _)| at > b) {
                best = Some((at, path));
            }
        }
    }
    Ok(best.map_or("docs/spec.md", |(_, p)| p))
}

fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root()).unwrap_or(&path);
        if SKIPPED.iter().any(|s| rel == Path::new(s)) {
            continue;
        }
        if path.is_dir() {
            text_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every citation: (file relative to the root, line number, document, section).
fn citations() -> Vec<(String, usize, &'static str, String)> {
    let mut files = Vec::new();
    for dir in SCANNED {
        text_files(&root().join(dir), &mut files);
    }
    files.sort();
    let mut found = Vec::new();
    for path in files {
        // Binary files are not prose.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let rel = path
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (n, line) in text.lines().enumerate() {
            for (at, _) in line.match_indices(SECTION_SIGN) {
                let Some(section) = section_at(&line[at + SECTION_SIGN.len_utf8()..]) else {
                    continue;
                };
                let doc = document_of(&line[..at]).unwrap_or_else(|why| {
                    panic!("{rel}:{}: {SECTION_SIGN}{section} cites {why}", n + 1)
                });
                found.push((rel.clone(), n + 1, doc, section));
            }
        }
    }
    found
}

#[test]
fn every_spec_citation_names_an_existing_section() {
    let docs: Vec<(&str, BTreeSet<String>)> =
        DOCUMENTS.iter().map(|(_, d)| (*d, sections(d))).collect();
    let found = citations();
    assert!(
        found.len() > 100,
        "only {} citations found: is the scanner broken?",
        found.len()
    );
    let mut dangling = Vec::new();
    for (file, line, doc, section) in &found {
        let known = &docs.iter().find(|(d, _)| d == doc).unwrap().1;
        if known.contains(section) {
            continue;
        }
        if KNOWN_DANGLING.contains(&(file.as_str(), *doc, section.as_str())) {
            continue;
        }
        dangling.push(format!(
            "{file}:{line}: {SECTION_SIGN}{section} is not a section of {doc}"
        ));
    }
    assert!(dangling.is_empty(), "{}", dangling.join("\n"));
    for (file, doc, section) in KNOWN_DANGLING {
        assert!(
            found
                .iter()
                .any(|(f, _, d, s)| f == file && d == doc && s == section),
            "{file}: {SECTION_SIGN}{section} ({doc}) no longer occurs: remove it from \
             KNOWN_DANGLING"
        );
    }
}

#[test]
fn the_scanner_reads_citations_as_written() {
    let s = SECTION_SIGN;
    assert_eq!(section_at("3.3, `x`").as_deref(), Some("3.3"));
    assert_eq!(section_at("6.1.").as_deref(), Some("6.1"));
    assert_eq!(section_at("4 step 5").as_deref(), Some("4"));
    assert_eq!(section_at("4b). The").as_deref(), Some("4b"));
    assert_eq!(section_at("1/").as_deref(), Some("1"));
    assert_eq!(section_at("N"), None);
    assert_eq!(document_of("(spec "), Ok("docs/spec.md"));
    assert_eq!(document_of("// Spec "), Ok("docs/spec.md"));
    assert_eq!(document_of("aspect ratio, "), Ok("docs/spec.md"));
    assert_eq!(document_of("(spec-wave2 "), Ok("docs/spec-wave2.md"));
    assert_eq!(
        document_of(&format!("(spec-wave2 {s}1, ")),
        Ok("docs/spec-wave2.md")
    );
    assert_eq!(
        document_of("block, TORCH_RANDN.md "),
        Ok("reference/refcheck/TORCH_RANDN.md")
    );
    assert_eq!(
        document_of(&format!("TORCH_RANDN.md {s}4b; spec ")),
        Ok("docs/spec.md")
    );
    assert!(document_of("see README.md ").is_err());
    assert!(sections("docs/spec.md").is_superset(&["0", "3.3", "10"].map(String::from).into()));
    assert!(sections("reference/refcheck/TORCH_RANDN.md").contains("4b"));
}
