//! Secrets stay secret: no `Debug` of a value holding one prints it, and the data
//! directory (sealed messages, `--dev` keys) is the owner's alone, with a warning
//! in the log when it is not.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use chatbox::config::LlmProvider;
use chatbox::llm::{LlmSection, ModelConfig};

const SECRETS: &[&str] = &[
    "jwt-secret-0123456789abcdef0123456789abcdef",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "sk-llm-api-key-0001",
    "metrics-token-0002",
    "webhook-secret-0003",
    "smtp-password-0004",
    "sk-model-api-key-0005",
    "mongo-password-0006",
    "hook-path-token-0007",
    "s3-access-key-id-0008",
    "s3-secret-access-key-0009",
];

/// A configuration with every secret it can hold set to one of [`SECRETS`].
fn config_with_every_secret() -> chatbox::Config {
    let mut model = ModelConfig::new("m", LlmProvider::Openai);
    model.api_key = Some(SECRETS[7].into());
    chatbox::Config {
        jwt_secret: Some(SECRETS[0].into()),
        encryption_key: Some(SECRETS[1].into()),
        encryption_previous_keys: vec![SECRETS[2].into()],
        llm_api_key: Some(SECRETS[3].into()),
        metrics_token: Some(SECRETS[4].into()),
        notify_webhook_secret: Some(SECRETS[5].into()),
        notify_smtp_password: Some(SECRETS[6].into()),
        llm: LlmSection {
            models: vec![model],
        },
        mongo_uri: Some(format!("mongodb://chatbox:{}@db:27017", SECRETS[8])),
        notify_webhook_url: Some(format!("https://hooks.example.com/{}", SECRETS[9])),
        notify_smtp_username: Some("chatbox-user".into()),
        s3_access_key_id: Some(SECRETS[10].into()),
        s3_secret_access_key: Some(SECRETS[11].into()),
        ..chatbox::Config::default()
    }
}

fn assert_hides_secrets(shown: &str) {
    for s in SECRETS {
        assert!(!shown.contains(s), "{s} shown in:\n{shown}");
    }
}

#[test]
fn config_debug_shows_no_secret() {
    let cfg = config_with_every_secret();
    for shown in [format!("{cfg:?}"), format!("{cfg:#?}")] {
        assert_hides_secrets(&shown);
        // What is not secret is still there to debug with.
        for visible in ["listen: 127.0.0.1:8080", "chatbox-user", "jwt_secret: ***"] {
            assert!(shown.contains(visible), "{visible} missing:\n{shown}");
        }
    }
    assert!(format!("{:?}", chatbox::Config::default()).contains("jwt_secret: <unset>"));
}

/// A key whose name says it holds a secret is declared `#[secret]`, so that a key
/// added later cannot be forgotten.
#[test]
fn keys_named_like_secrets_are_declared_secret() {
    for key in chatbox::config::KEYS {
        let f = key.field;
        let named = [
            "secret",
            "password",
            "token",
            "api_key",
            "encryption",
            "uri",
            "access_key",
        ]
        .iter()
        .any(|w| f.contains(w))
            // URLs that may carry credentials (a webhook's token, nats://user:pass@).
            || f.ends_with("_url") && (f.starts_with("notify") || f.starts_with("nats"));
        assert_eq!(key.secret, named, "{f}: declare it #[secret] or rename it");
    }
}

#[test]
fn key_ring_and_verifier_debug_show_no_key() {
    let cfg = config_with_every_secret();
    let ring = chatbox::crypto::KeyRing::new(SECRETS[1], &[SECRETS[2].to_owned()]).unwrap();
    let shown = format!("{ring:?}");
    assert_hides_secrets(&shown);
    assert!(
        shown.contains(&format!("{:08x}", ring.current_key_id())),
        "{shown}"
    );
    let verifier = chatbox::auth::Verifier::new(SECRETS[0].as_bytes());
    let shown = format!("{verifier:?}");
    assert_hides_secrets(&shown);
    // jsonwebtoken keeps the secret as bytes: not in decimal either.
    let bytes = format!("{:?}", SECRETS[0].as_bytes());
    assert!(!shown.contains(&bytes[1..bytes.len() - 1]), "{shown}");
    assert_hides_secrets(&format!("{:?}", cfg.llm));
}

// --- The data directory ------------------------------------------------------

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts the binary on `dir` (with `--dev` when asked), waits for its readiness
/// line, stops it and returns what it wrote on stderr.
fn serve_once(dir: &Path, dev: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatbox"));
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .env("CHATBOX_DATA_DIR", dir)
        .env("CHATBOX_LISTEN", "127.0.0.1:0")
        .env("CHATBOX_CORES", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if dev {
        cmd.arg("--dev");
    } else {
        cmd.env("CHATBOX_JWT_SECRET", SECRETS[0])
            .env("CHATBOX_ENCRYPTION_KEY", SECRETS[1]);
    }
    let mut child: Child = cmd.spawn().expect("the binary runs");
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("chatbox listening on"));
    // Start-up logs everything it checked before the readiness line.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(ready, "no readiness line; stderr:\n{stderr}");
    stderr
}

fn temp_base() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("chatbox-secrets-")
        .tempdir()
        .unwrap()
        .keep()
}

#[test]
fn a_fresh_data_directory_is_private() {
    for dev in [false, true] {
        let dir = temp_base().join("data");
        let stderr = serve_once(&dir, dev);
        assert_eq!(mode(&dir), 0o700, "dev {dev}");
        if dev {
            assert_eq!(mode(&dir.join("dev-secrets.toml")), 0o600);
        }
        assert!(!stderr.contains("chmod"), "no warning expected:\n{stderr}");
    }
}

#[test]
fn a_data_directory_others_can_read_is_a_warning() {
    let dir = temp_base().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stderr = serve_once(&dir, true);
    assert!(
        stderr.contains("WARN") && stderr.contains("has mode 0755") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert_eq!(mode(&dir), 0o755, "the operator's choice is left alone");

    // A secrets file others can read, found on the next start.
    let secrets = dir.join("dev-secrets.toml");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = serve_once(&dir, true);
    assert!(
        stderr.contains("dev-secrets.toml has mode 0644") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}
