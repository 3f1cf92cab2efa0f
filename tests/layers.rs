//! The house rules that a compiler does not check, kept true as tests (in the
//! manner of glommio's tests/linters.rs): the layers of src/ and their imports,
//! a `//!` line opening every module, and the size of files and functions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module of src/ and its layer, lowest first. A module may import
/// from its own layer and those below, never above; a new module must be placed
/// here on purpose.
const LAYERS: &[(&str, u8)] = &[
    // Leaves: no domain knowledge.
    ("clock", 0),
    ("config", 0),
    ("crypto", 0),
    ("auth", 0),
    ("limiter", 0),
    ("media", 0),
    ("metrics", 0),
    ("pool", 0),
    ("outbound", 0),
    ("secret", 0),
    ("trace", 0),
    // The thread-per-core runtime.
    ("runtime", 1),
    // Services.
    ("store", 2),
    ("llm", 2),
    ("notify", 2),
    // The application.
    ("app", 3),
];

const FILE_LINES_MAX: usize = 800;
const FN_LINES_MAX: usize = 70;

fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out
}

/// The top-level module a source file belongs to; `None` for the crate roots.
fn module_of(path: &Path) -> Option<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = path.strip_prefix(&src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The top-level modules named after `crate::` in `text`, `use` groups included
/// (`use crate::{a::X, b}`). Comments are skipped.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
    {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Only the heads of the group's paths, at its top nesting level.
                let mut depth = 0;
                let mut head = true;
                let mut name = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => head = true,
                        c if head && (c.is_alphanumeric() || c == '_') => name.push(c),
                        _ if head && !name.is_empty() => {
                            found.insert(std::mem::take(&mut name));
                            head = false;
                        }
                        _ => {}
                    }
                }
                if !name.is_empty() {
                    found.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in sources() {
        let Some(module) = module_of(&path) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("source is readable");
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(crate_imports(&text).into_iter().filter(|d| *d != module));
    }
    graph
}

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| {
            panic!("module `{module}` has no layer: place it in LAYERS (tests/layers.rs)")
        })
}

#[test]
fn imports_point_down_the_layers() {
    let mut wrong = Vec::new();
    for (module, deps) in graph() {
        for dep in deps {
            if layer(&dep) > layer(&module) {
                wrong.push(format!(
                    "{module} (layer {}) imports {dep} (layer {})",
                    layer(&module),
                    layer(&dep)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn no_module_reaches_itself() {
    let graph = graph();
    // Depth-first search with colours; a grey node met again closes a cycle.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, bool>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let from = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node, false);
        path.push(node);
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(node, true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut state, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_runtime_knows_no_application() {
    let graph = graph();
    let runtime = graph.get("runtime").expect("src/runtime exists");
    for domain in ["app", "store", "llm", "notify"] {
        assert!(!runtime.contains(domain), "runtime imports {domain}");
    }
}

#[test]
fn every_module_says_its_job_first() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|p| {
            !std::fs::read_to_string(p)
                .expect("readable")
                .starts_with("//!")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! line: {missing:?}"
    );
}

#[test]
fn files_fit_the_house_limit() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter_map(|p| {
            let n = std::fs::read_to_string(&p)
                .expect("readable")
                .lines()
                .count();
            (n > FILE_LINES_MAX).then(|| format!("{} ({n} lines)", p.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {FILE_LINES_MAX} lines: {long:?}"
    );
}

/// Functions over the limit need a reason on a `// Long:` comment just above them.
#[test]
fn functions_fit_on_a_screen_or_say_why_not() {
    let mut long = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).expect("readable");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let body = line.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) fn ",
            ]
            .iter()
            .any(|p| body.starts_with(p));
            if !is_fn || line.trim_end().ends_with(';') {
                continue;
            }
            let indent = line.len() - body.len();
            let end = lines[i + 1..]
                .iter()
                .position(|l| {
                    l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}')
                })
                .map_or(lines.len(), |p| i + 1 + p);
            let reason = lines[i.saturating_sub(4)..i]
                .iter()
                .any(|l| l.contains("// Long:"));
            if end - i + 1 > FN_LINES_MAX && !reason {
                long.push(format!(
                    "{}:{} ({} lines)",
                    path.display(),
                    i + 1,
                    end - i + 1
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {FN_LINES_MAX} lines without a `// Long:` reason: {long:#?}"
    );
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let text =
        "use crate::{a::X, b};\nuse crate::c::{d, e::F};\nlet x = crate::g::h();\n// crate::z\n";
    let found: Vec<String> = crate_imports(text).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "g"]);
}
