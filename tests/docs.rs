//! The links of the README and of docs/*.md: every relative link names a file of the
//! repository, and every `#anchor` names a heading of its target (GitHub's anchors), so a
//! moved section (the alert runbooks, the dashboard guide) cannot leave a dead link behind.
//! Links to other sites are not fetched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The markdown files whose links are checked.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The text outside fenced code blocks and inline code spans.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut code = false;
        for c in line.chars() {
            if c == '`' {
                code = !code;
            } else if !code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation dropped (inline code keeps its
/// text), spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of a markdown file; repeated headings get `-1`, `-2`… as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let mut anchor = base.clone();
        let mut n = 0;
        while out.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        out.insert(anchor);
    }
    out
}

/// The targets of the inline links `[text](target)` of a text.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = &rest[..end];
            if !target.contains(char::is_whitespace) {
                out.push(target.to_string());
            }
        }
    }
    out
}

/// What is wrong with the links of `file`.
fn broken_links(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut problems = Vec::new();
    for target in links(&prose(&text)) {
        if target.starts_with("http://")
            || target.starts_with("https://")
            || target.starts_with("mailto:")
        {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
        let linked = if path.is_empty() {
            file.to_path_buf()
        } else {
            file.parent().unwrap().join(path)
        };
        if !linked.exists() {
            problems.push(format!("{target}: no such file"));
            continue;
        }
        if !anchor.is_empty() {
            let linked_text = std::fs::read_to_string(&linked).unwrap_or_default();
            if !anchors(&linked_text).contains(anchor) {
                problems.push(format!("{target}: no heading with this anchor"));
            }
        }
    }
    problems
}

#[test]
fn every_link_between_the_docs_resolves() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        checked += links(&prose(&text)).len();
        for p in broken_links(&file) {
            problems.push(format!(
                "{}: {p}",
                file.strip_prefix(repo()).unwrap().display()
            ));
        }
    }
    assert!(
        checked > 40,
        "only {checked} links found: is the link parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// The checker itself finds what it must: GitHub anchors, a missing file, a missing anchor.
#[test]
fn the_link_checker_catches_dead_links() {
    assert_eq!(
        slug(" Debug a failing signature: `paynotify verify`"),
        "debug-a-failing-signature-paynotify-verify"
    );
    assert_eq!(
        slug(" On Kubernetes (Secrets and routes)"),
        "on-kubernetes-secrets-and-routes"
    );
    assert_eq!(slug(" PaynotifyIngressDown"), "paynotifyingressdown");
    let a = anchors("# T\n## Same\n```\n## Not a heading\n```\n## Same\n");
    assert_eq!(
        a,
        BTreeSet::from(["t".into(), "same".into(), "same-1".into()])
    );
    let dir = std::env::temp_dir().join(format!("paynotify-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.md");
    std::fs::write(dir.join("b.md"), "# B\n## Present\n").unwrap();
    std::fs::write(
        &file,
        "# A\n[ok](b.md#present) [ok](#a) [gone](c.md) [wrong](b.md#absent) [self](#nope)\n\
         `[code](x.md)` [web](https://example.com/#x)\n",
    )
    .unwrap();
    let problems = broken_links(&file);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        problems,
        [
            "c.md: no such file",
            "b.md#absent: no heading with this anchor",
            "#nope: no heading with this anchor"
        ]
    );
}
