//! What the key declarations print: `chatbox genconfig` (a commented TOML file with
//! every key at its default), README.md's configuration table, and the list of
//! variables in `chatbox --help`.

use std::fmt::Write as _;

use super::keys::Key;
use super::models::{LlmSection, ModelConfig};
use super::{Config, LlmProvider};

/// One key with its default, as the three renderings need it.
struct Row {
    key: &'static Key,
    /// The default as TOML; `None` when the key is unset by default.
    default: Option<toml::Value>,
}

fn rows() -> Vec<Row> {
    Config::default()
        .values()
        .into_iter()
        .map(|(key, default)| Row { key, default })
        .collect()
}

/// `chatbox genconfig`: every key with its documentation, variable, bounds and
/// default. Keys unset by default, and keys whose default follows other keys, are
/// commented out: written down, a derived default would stop following.
pub fn genconfig() -> String {
    let mut out = String::from(
        "# chatbox configuration: every key at its default (`chatbox genconfig`).\n\
         # Use it with `chatbox --config FILE`. The environment variable named above\n\
         # each key overrides the file. Commented keys are unset, or follow other keys\n\
         # unless set. jwt_secret and encryption_key are required outside --dev:\n\
         # make each with `openssl rand -hex 32`.\n",
    );
    for row in rows() {
        let key = row.key;
        let _ = write!(out, "\n# {}\n# {}", key.doc(), key.env());
        let bounds = key.bounds_text();
        if !bounds.is_empty() {
            let _ = write!(out, "; {bounds}");
        }
        if !key.derived.is_empty() {
            let _ = write!(out, "; unless set: {}", key.derived);
        }
        out.push('\n');
        match &row.default {
            Some(toml::Value::Table(_)) => out.push_str(&models_example()),
            Some(v) if key.derived.is_empty() => {
                let _ = writeln!(out, "{} = {v}", key.field);
            }
            Some(v) => {
                let _ = writeln!(out, "# {} = {v}", key.field);
            }
            None => {
                let _ = writeln!(out, "# {} = \"\"", key.field);
            }
        }
    }
    out
}

/// The `[[llm.models]]` tables, commented: empty by default, so the example shows
/// one model with every field at its default.
fn models_example() -> String {
    let mut example = ModelConfig::new("fast", LlmProvider::Openai);
    example.base_url = Some("https://api.openai.com/v1".into());
    example.api_key_env = Some("OPENAI_API_KEY".into());
    example.model = Some("gpt-4o-mini".into());
    let section = LlmSection {
        models: vec![example],
    };
    let text = toml::to_string(&section).unwrap_or_default();
    let mut out = String::from(
        "# (none by default; each table below is one model, the first is the default;\n\
         # also `api_key`, and `fallback` = another model's id)\n",
    );
    for line in text.lines().filter(|l| !l.is_empty()) {
        let line = if line == "[[models]]" {
            "[[llm.models]]"
        } else {
            line
        };
        let _ = writeln!(out, "# {line}");
    }
    out
}

/// README.md's configuration table (between its `config-table` markers).
pub fn markdown_table() -> String {
    let mut out =
        String::from("| key | variable | default | bounds | meaning |\n|---|---|---|---|---|\n");
    for row in rows() {
        let key = row.key;
        let default = match &row.default {
            Some(toml::Value::Table(_)) => "empty".to_owned(),
            Some(v) => format!("`{v}`"),
            None => "unset".to_owned(),
        };
        let default = if key.derived.is_empty() {
            default
        } else {
            format!("{default}; unless set: {}", key.derived)
        };
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {} | {} |",
            key.shown,
            key.env(),
            escape(&default),
            escape(&key.bounds_text()),
            escape(key.doc())
        );
    }
    out
}

/// Pipes would end a Markdown table cell.
fn escape(cell: &str) -> String {
    cell.replace('|', "\\|")
}

/// The variables for `chatbox --help`, one line each with its default.
pub fn env_help() -> String {
    let rows = rows();
    let width = rows
        .iter()
        .map(|r| r.key.env().len())
        .max()
        .unwrap_or(0)
        .max("CHATBOX_CONFIG".len());
    let mut out = String::from(
        "Environment variables (each overrides the configuration key of the same name;\n\
         `chatbox genconfig` prints them all as a commented file):\n",
    );
    let _ = writeln!(
        out,
        "  {:width$}  the configuration file, as --config",
        "CHATBOX_CONFIG"
    );
    for row in rows {
        let default = match &row.default {
            Some(toml::Value::Table(_)) | None => String::new(),
            Some(v) => format!(" [default: {v}]"),
        };
        let _ = writeln!(
            out,
            "  {:width$}  {}{default}",
            row.key.env(),
            row.key.doc()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::KEYS;
    use super::*;

    #[test]
    fn genconfig_is_toml_with_every_key() {
        let text = genconfig();
        let table: toml::Table = toml::from_str(&text).unwrap();
        for key in KEYS {
            let active = table.contains_key(key.field);
            let commented = text.contains(&format!("\n# {} = ", key.field))
                || text.contains(&format!("\n# [[{}]]\n", key.shown));
            assert!(active ^ commented, "{} active={active}", key.field);
            assert!(text.contains(&key.env()), "{}", key.env());
        }
        assert!(table.contains_key("listen") && !table.contains_key("jwt_secret"));
        // Derived keys stay commented, or they would stop following.
        assert!(
            text.contains("\n# ws_frames_per_minute_max = 600\n"),
            "{text}"
        );
        assert!(text.contains("\n# [[llm.models]]\n"), "{text}");
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.listen, Config::default().listen);
    }

    #[test]
    fn the_models_example_parses_once_uncommented() {
        let text: String = models_example()
            .lines()
            .filter(|l| !l.starts_with("# ("))
            .filter(|l| !l.starts_with("# also"))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.llm.models.len(), 1);
        assert_eq!(c.llm.models[0].model.as_deref(), Some("gpt-4o-mini"));
    }

    #[test]
    fn table_and_help_name_every_variable() {
        let table = markdown_table();
        let help = env_help();
        for key in KEYS {
            assert!(table.contains(&format!("`{}`", key.env())), "{}", key.env());
            assert!(help.contains(&key.env()), "{}", key.env());
        }
        assert!(table.contains("| `rate_limit_per_minute` | `CHATBOX_RATE_LIMIT_PER_MINUTE` | `60` | 1..=1000000 messages/min |"), "{table}");
        assert!(
            table.contains("`llm.models` | `CHATBOX_LLM_MODELS` | empty"),
            "{table}"
        );
    }
}
