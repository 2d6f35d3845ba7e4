//! The project's documents stand on their own: a newcomer who clones the repository has only
//! what is in it. Every relative link in a Markdown file points at a file of the repository, and
//! no tracked file sends the reader to a place outside it (a sibling checkout such as
//! `../shared/`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files git tracks, or every file under the repository's documentation folders when this is
/// not a git checkout (a source tarball).
fn tracked_files() -> Vec<PathBuf> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo())
        .output();
    match out {
        Ok(o) if o.status.success() => o
            .stdout
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| PathBuf::from(String::from_utf8_lossy(s).into_owned()))
            .collect(),
        _ => panic!(
            "git ls-files failed in {}: the docs test needs a git checkout",
            repo().display()
        ),
    }
}

/// Relative link targets of a Markdown text: `[text](target)` with no scheme, no anchor-only
/// target; the anchor part is dropped.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].trim();
        rest = &rest[end..];
        if target.is_empty()
            || target.starts_with('#')
            || target.contains("://")
            || target.starts_with("mailto:")
            || target.contains(' ')
        {
            continue;
        }
        let path = target.split('#').next().unwrap_or(target);
        links.push(path.to_string());
    }
    links
}

#[test]
fn markdown_links_point_inside_the_repository() {
    let root = repo();
    let mut broken = Vec::new();
    for file in tracked_files() {
        if file.extension().and_then(|e| e.to_str()) != Some("md") {
            continue;
        }
        let text = std::fs::read_to_string(root.join(&file)).expect("read a tracked markdown file");
        let dir = file.parent().unwrap_or(Path::new(""));
        for link in relative_links(&text) {
            let target = root.join(dir).join(&link);
            if !target.exists() {
                broken.push(format!("{}: {link}", file.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to files that do not exist: {broken:#?}"
    );
}

#[test]
fn no_file_cites_a_place_outside_the_repository() {
    // The test bed and the conventions are the project's own files now
    // (integration/README.md, CONTRIBUTING.md); these names were notes outside the repository.
    let outside = [
        "../shared/",
        "shared/TESTBED.md",
        "TESTBED.md",
        "CONVENTIONS.md",
    ];
    let root = repo();
    let me = Path::new("tests/docs.rs");
    let mut found = Vec::new();
    for file in tracked_files() {
        if file == me {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(root.join(&file)) else {
            continue; // binary files
        };
        for (n, line) in text.lines().enumerate() {
            if outside.iter().any(|o| line.contains(o)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "files that cite places outside the repository: {found:#?}"
    );
}
